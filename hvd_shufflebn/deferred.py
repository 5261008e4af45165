"""The agreement check without a device sync per layer: CUDA tensors under NCCL.

Elsewhere each forward exchange reads its summed header on the host before any received row is
used (agreement.py): ranks that disagree on the permutation would disagree on the all-to-all's
sizes. On a GPU that read makes the host wait for the device once per layer. Where the rows stay
on a GPU (torch.distributed with NCCL), the forward instead moves everything in ONE all-gather
of a fixed size, whose shape does not depend on the permutation: the header, the 2C sums for
the running statistics and all k group rows of every rank. Ranks that disagree cannot hang it,
only compute with wrong numbers, which the check then throws away; each rank picks its lenders'
rows by index. The summed headers stay on the device until the step's check reads all of them in
one copy, which happens

* before the first backward exchange of the step (whose all-to-all does depend on the
  permutation): the headers of every training forward since the last check, a no-grad key
  encoder's included;
* at a training forward of a layer whose previous forward is still unchecked: a step without a
  backward (a key encoder alone) is checked at the next step's first forward.

Every rank then raises the same ShuffleBatchNormError. The rank whose input was bad passes a
copy of its input on (and raises in its backward at the same check), so that it keeps taking
part in the step's exchanges. What the failed step changed stays changed: the layers' step
counters and running statistics (taken from the batches of the ranks without a local error).
"""
import os
from typing import List, Sequence

import torch

from .agreement import HEADER, raise_if_any_rank_failed
from .exchange import ForwardResult, borrowed_result, global_statistics, rows_and_sums

DEFER_ENV = "HVD_SHUFFLEBN_DEFER_CHECKS"  # "1": the deferred check on any device (for tests)


def forced() -> bool:
    return os.environ.get(DEFER_ENV) == "1"


class PendingChecks:
    """The summed headers of the training forwards not checked yet, on one transport."""

    def __init__(self):
        self._entries: List[tuple] = []
        self._layers = set()  # ids of the layers with an entry (kept alive by the entry)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def holds(self, layer) -> bool:
        return id(layer) in self._layers

    def add(self, layer, summed_header: torch.Tensor, make_report, context) -> None:
        self._entries.append((layer, summed_header, make_report, context))
        self._layers.add(id(layer))

    def check_all(self, transport) -> None:
        """Read every pending header in ONE copy to the host and raise the same error on every
        rank if any rank reported a problem (the first such layer in forward order)."""
        if not self._entries:
            return
        entries, self._entries, self._layers = self._entries, [], set()
        headers = torch.stack([header for _, header, _, _ in entries]).tolist()  # the one read
        for (layer, _, make_report, context), header in zip(entries, headers):
            raise_if_any_rank_failed(transport, layer.name, header, make_report(), context)


def borrow(transport, layer, plan, means: List[torch.Tensor], variances: List[torch.Tensor],
           counts: Sequence[int], report_header: List[float], make_report,
           context) -> ForwardResult:
    """The shuffled forward exchange as one all-gather of a fixed size; the header is summed on
    the device and left for the step's check. Returns what borrow_across_ranks returns."""
    device, acc = means[0].device, means[0].dtype
    where = transport.rows_device(device)  # the input's GPU under NCCL
    k, c = len(means), means[0].numel()
    rows, sums = rows_and_sums(means, variances, counts, where)
    header = header_and_count(report_header, counts, where)
    h = header.numel()
    everyone = transport.all_gather(layer.name, torch.cat([header, sums, rows.view(-1)]),
                                    context)  # (size, h + 2C + 2kC)
    total, moments = leave_for_the_check(transport, layer, everyone[:, :h + 2 * c].sum(0),
                                         make_report, context)
    lenders = []  # the row of group g: its rank's (g // k), after the header and the sums
    for g in plan.perm[transport.rank * k:(transport.rank + 1) * k]:
        start = h + 2 * c * (1 + g % k)
        lenders.append(everyone[g // k, start:start + 2 * c])
    return borrowed_result(lenders, global_statistics(moments, total), device, acc)


def header_and_count(report_header: List[float], counts: Sequence[int],
                     device: torch.device) -> torch.Tensor:
    """What this rank adds to the summed header (agreement.py), then its number of values per
    channel, on ``device``."""
    return host_values(report_header + [float(sum(counts))], device)


def leave_for_the_check(transport, layer, summed: torch.Tensor, make_report, context):
    """``summed`` begins with the summed header and count (header_and_count): the header waits
    for the step's check; returns the global count (a device scalar) and what follows it."""
    transport.pending.add(layer, summed[:HEADER], make_report, context)
    return summed[HEADER], summed[HEADER + 1:]


def host_values(values: List[float], device: torch.device) -> torch.Tensor:
    """Host numbers as a float64 tensor on ``device`` without making the host wait: to a GPU from
    pinned memory, asynchronously (the caching host allocator keeps the block until the copy is
    done)."""
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=torch.float64, pin_memory=pinned).to(device,
                                                                          non_blocking=pinned)


class PassThrough(torch.autograd.Function):
    """The output of a rank whose own input failed while the check waits: a copy of the input
    (not a view: an in-place ReLU after the layer must work), and in backward that rank reaches
    the step's check like the others."""

    @staticmethod
    def forward(ctx, input, transport):
        ctx.transport = transport
        return input.clone()

    @staticmethod
    def backward(ctx, grad_output):
        ctx.transport.check_pending()
        return grad_output, None
