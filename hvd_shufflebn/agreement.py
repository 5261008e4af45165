"""Every rank raises the same error, or none does.

Each forward exchange sums a small header over the ranks. If it shows that any rank has a
problem (a bad input, a permutation or layer or num_features that differs from the others', a
gradient needed on some ranks only), every rank gathers every rank's report and raises the same
ShuffleBatchNormError naming the ranks and the problem. The slow gather happens only then.
"""
from typing import NamedTuple, Optional

import torch

from .errors import ShuffleBatchNormError

# Layout of the summed header.
ERRORS, FINGERPRINT, FINGERPRINT_SQ, NEEDS_GRAD = range(4)
HEADER = 4


class Report(NamedTuple):
    """What a rank brings to a training step, for the error message if the ranks disagree."""
    layer: str
    error: Optional[str]
    perm: tuple
    needs_grad: bool
    num_features: int


def header(error: bool, fingerprint: int, needs_grad: bool) -> list:
    """What a rank adds to the summed header (host values: nothing is read from a device)."""
    return [float(error), float(fingerprint), float(fingerprint) ** 2, float(needs_grad)]


def raise_if_any_rank_failed(transport, name: str, header, report: Report, context) -> None:
    """Raise the same ShuffleBatchNormError on every rank if any rank reported a problem.

    ``header`` is the summed header: the number of ranks with a local error, the sum and sum of
    squares of the fingerprints (all equal iff size * sum(f^2) == sum(f)^2, exact in float64 for
    f < 2**20), and the number of ranks whose input needs a gradient (a backward exchange on
    only some ranks would hang).
    """
    errors, fp, fp_sq, grads = (header[i] for i in (ERRORS, FINGERPRINT, FINGERPRINT_SQ,
                                                    NEEDS_GRAD))
    size = transport.size
    if errors == 0 and size * fp_sq == fp * fp and grads in (0, size):
        return
    reports = [Report(*r) for r in transport.gather_objects(name + ".error", tuple(report),
                                                            context)]
    layers = [r.layer for r in reports]
    if len(set(layers)) > 1:  # possible with the MPI transport, which matches calls by order only
        raise ShuffleBatchNormError("ShuffleBatchNorm: ranks are in different layers: " + ", ".join(
            f"rank {r} in {n!r}" for r, n in enumerate(layers)) + ". Likely causes: the ranks "
            "call layers in different orders, or built different models (a layer built on some "
            "ranks only shifts the numbers of layers built later without a name: convert models "
            "with convert_shuffle_batchnorm, whose names are module paths, or pass name=)")
    prefix = f"ShuffleBatchNorm {name!r} (process set of {size} ranks): "
    if len({r.num_features for r in reports}) > 1:
        raise ShuffleBatchNormError(prefix + "ranks disagree on num_features: " + ", ".join(
            f"rank {r} has {rep.num_features}" for r, rep in enumerate(reports)))
    problems = [f"rank {r}: {rep.error}" for r, rep in enumerate(reports) if rep.error]
    if not problems and len({rep.perm for rep in reports}) > 1:
        problems.append("ranks disagree on the permutation: " + ", ".join(
            f"rank {r} uses {rep.perm}" for r, rep in enumerate(reports)))
    if not problems:
        problems.append("the input requires grad on ranks "
                        f"{[r for r, rep in enumerate(reports) if rep.needs_grad]} only; a "
                        "backward pass on some ranks but not others would hang")
    raise ShuffleBatchNormError(prefix + "; ".join(problems))


def raise_unless_all_ranks_agree(transport, name: str, what: str, value: int, context) -> None:
    """Raise the same ShuffleBatchNormError on every rank unless all ranks hold the same ``value``."""
    totals = transport.sum(name, torch.tensor([value, value * value], dtype=torch.float64),
                           context)
    if transport.size * float(totals[1]) == float(totals[0]) ** 2:
        return
    values = transport.gather_objects(name, value, context)
    raise ShuffleBatchNormError(f"ShuffleBatchNorm {name!r}: ranks disagree on {what}: "
                                + ", ".join(f"rank {r} has {v}" for r, v in enumerate(values)))
