"""Moving statistics between ranks, and making every rank raise the same error.

One exchange = two collectives submitted together and waited for together, so they share one
round of Horovod's negotiation:

* a point-to-point move (alltoall with a single non-empty split): each rank sends one packet to
  one rank, so the bytes per rank do not grow with the world size;
* a sum over all ranks of a small vector (allreduce): the running statistics need the union of all
  batches, and every rank must learn about a bad input on ANY rank, or the ranks would diverge or
  hang.

The slow, rare work (finding out WHAT went wrong, and where) happens only after the sum says
something did.
"""
import pickle
from typing import List, Optional, Tuple

import horovod.torch as hvd
import torch


class ShuffleBatchNormError(RuntimeError):
    """Raised on every rank of the process set, with the same message, when any rank's input is bad."""


class HorovodTransport:
    """Horovod's collectives on one process set (works with both the MPI and the Gloo controller)."""

    def __init__(self, process_set):
        self.process_set = process_set
        self.rank = process_set.rank()
        self.size = process_set.size()
        # Horovod built without GPU collectives only takes CPU tensors.
        self._cpu_only = not hvd.nccl_built()

    def send_and_sum(self, name: str, row: torch.Tensor, dest: int,
                     totals: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Send ``row`` (shape (1, L)) to rank ``dest``; return the rows sent to this rank, stacked,
        and, if given, ``totals`` summed over all ranks. Both collectives run concurrently."""
        device = row.device
        if self._cpu_only:
            row = row.cpu()
            totals = None if totals is None else totals.cpu()
        splits = torch.zeros(self.size, dtype=torch.int32)
        splits[dest] = 1
        moved = hvd.alltoall_async(row, splits=splits, name=name, process_set=self.process_set)
        summed = None
        if totals is not None:
            summed = hvd.allreduce_async(totals, op=hvd.Sum, name=name + ".sum",
                                         process_set=self.process_set)
        received, _ = hvd.synchronize(moved)
        if summed is not None:
            summed = hvd.synchronize(summed).to(device)
        return received.to(device), summed

    def sum(self, name: str, totals: torch.Tensor) -> torch.Tensor:
        device = totals.device
        return hvd.allreduce(totals.cpu() if self._cpu_only else totals, op=hvd.Sum, name=name,
                             process_set=self.process_set).to(device)

    def gather_objects(self, name: str, obj) -> List[object]:
        """Every rank's ``obj``, in rank order (slow; for the error path only)."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        lengths = hvd.allgather(torch.tensor([payload.numel()]), name=name + ".len",
                                process_set=self.process_set).tolist()
        data = hvd.allgather(payload, name=name + ".obj", process_set=self.process_set)
        return [pickle.loads(chunk.numpy().tobytes()) for chunk in torch.split(data, lengths)]


# Layout of the vector summed over ranks in the forward exchange: a header, then per-channel sums.
ERRORS, FINGERPRINT, FINGERPRINT_SQ, NEEDS_GRAD, COUNT = range(5)
HEADER = 5


def raise_if_any_rank_failed(transport: HorovodTransport, name: str, header: torch.Tensor,
                             local_error: Optional[str], perm, needs_grad: bool) -> None:
    """Raise the same ShuffleBatchNormError on every rank if any rank reported a problem.

    ``header`` is the summed header: the number of ranks with a local error, the sum and sum of
    squares of the permutation fingerprints (all equal iff size * sum(f^2) == sum(f)^2, exact in
    float64 for f < 2**20), and the number of ranks whose input needs a gradient (a backward
    exchange on only some ranks would hang).
    """
    errors, fp, fp_sq, grads = (float(header[i]) for i in (ERRORS, FINGERPRINT, FINGERPRINT_SQ,
                                                            NEEDS_GRAD))
    size = transport.size
    if errors == 0 and size * fp_sq == fp * fp and grads in (0, size):
        return
    reports = transport.gather_objects(name + ".error", (local_error, perm, needs_grad))
    problems = [f"rank {r}: {err}" for r, (err, _, _) in enumerate(reports) if err]
    if not problems and len({p for _, p, _ in reports}) > 1:
        problems.append("ranks disagree on the permutation: " + ", ".join(
            f"rank {r} uses {p}" for r, (_, p, _) in enumerate(reports)))
    if not problems:
        problems.append("the input requires grad on ranks "
                        f"{[r for r, (_, _, g) in enumerate(reports) if g]} only; a backward "
                        "pass on some ranks but not others would hang")
    raise ShuffleBatchNormError(f"ShuffleBatchNorm {name!r} (process set of {size} ranks): "
                                + "; ".join(problems))


def raise_unless_all_ranks_agree(transport: HorovodTransport, name: str, what: str,
                                 value: int) -> None:
    """Raise the same ShuffleBatchNormError on every rank unless all ranks hold the same ``value``."""
    totals = transport.sum(name, torch.tensor([value, value * value], dtype=torch.float64))
    if transport.size * float(totals[1]) == float(totals[0]) ** 2:
        return
    values = transport.gather_objects(name, value)
    raise ShuffleBatchNormError(f"ShuffleBatchNorm {name!r}: ranks disagree on {what}: "
                                + ", ".join(f"rank {r} has {v}" for r, v in enumerate(values)))
