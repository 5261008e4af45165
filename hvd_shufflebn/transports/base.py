"""What every transport does: one interface, so the math is written once (functional.py).

A transport moves rows of float64 statistics between the ranks of one group and sums small
vectors over them; every wait is bounded (waits.py). The forward exchange sums a header first and
calls ``check`` on it before anything received is used (agreement.py).
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..agreement import raise_unless_all_ranks_agree
from ..errors import ShuffleBatchNormError
from ..waits import WaitContext

Rows = Dict[int, torch.Tensor]  # peer rank -> rows (n, L), in the order routing.py defines


class Transport:
    rank: int
    size: int
    kind: str = ""    # "mpi", "horovod", "torch.distributed" or "local"
    reason: str = ""  # why "auto" chose it (or "asked for")
    stall_board = None  # where waiting ranks tell each other where they wait (waits.py)
    broken: Optional[str] = None  # set when a wait timed out: late messages would be mismatched
    pending = None  # deferred.PendingChecks, on a transport that can leave its checks for later

    def exchange(self, name: str, rows: Rows, expect: Dict[int, int], width: int, device,
                 context: WaitContext,
                 header: Optional[torch.Tensor] = None, sums: Optional[torch.Tensor] = None,
                 check: Optional[Callable[[torch.Tensor], None]] = None, match: int = 0
                 ) -> Tuple[Rows, Optional[torch.Tensor]]:
        """Send ``rows[d]`` to rank ``d`` and receive ``expect[s]`` rows (of ``width`` float64
        values, returned on ``device``) from rank ``s``; if given,
        sum ``header`` and ``sums`` over all ranks and call ``check`` on the summed header before
        the rows are used (``check`` raises when the exchange must not be used). ``match`` is
        equal on two ranks only if they agree on the layer, step, direction and permutation
        (for transports that match point-to-point messages). Returns the received rows by
        source rank and the summed ``sums``."""
        raise NotImplementedError

    def rows_device(self, device: torch.device) -> torch.device:
        """Where this transport wants the rows of a layer whose input lives on ``device``: the
        host for transports that stage through host memory."""
        return torch.device("cpu")

    def defers_checks(self, device: torch.device) -> bool:
        """Whether a forward on ``device`` leaves its agreement check for the step's one read
        (deferred.py): where reading the summed header at once would make the host wait for a
        GPU."""
        return False

    def check_pending(self) -> None:
        """Run the agreement checks left for the step's one read (deferred.py), if any."""
        if self.pending:
            self.pending.check_all(self)

    def all_gather(self, name: str, tensor: torch.Tensor, context: WaitContext) -> torch.Tensor:
        """Every rank's ``tensor`` (the same size on every rank), as (size, n) in rank order, on
        ``tensor``'s device (for transports that defer their checks)."""
        raise NotImplementedError

    def current(self, requested: str) -> bool:
        """Whether a layer that asked for ``requested`` may keep using this transport (a
        re-initialised Horovod or torch.distributed needs a new one)."""
        return True

    def sum(self, name: str, totals: torch.Tensor, context: WaitContext) -> torch.Tensor:
        raise NotImplementedError

    def sum_and_check(self, name: str, header: torch.Tensor, sums: torch.Tensor,
                      check: Callable[[torch.Tensor], None], context: WaitContext
                      ) -> torch.Tensor:
        """The forward of a layer that moves no rows (borrow_from="others"): ``exchange``
        without rows, in the same collectives and with the same bookkeeping, so that a rank
        which shuffles while the others pool meets them and every rank raises the same error.
        Returns the summed ``sums``."""
        return self.exchange(name, {}, {}, sums.numel(), sums.device, context, header, sums,
                             check)[1]

    def gather_objects(self, name: str, obj, context: WaitContext) -> List[object]:
        """Every rank's ``obj``, in rank order (slow; for the error path only)."""
        raise NotImplementedError

    # Transports whose collectives abort or mismatch on vectors of different lengths (MPI,
    # torch.distributed) check once per layer, before its first exchange, that all ranks agree
    # on num_features; their worlds never change size within a process, so once is enough.
    # Horovod's header names a mismatch instead (its world can change: elastic).
    # A transport that defers its checks also agrees on what decides its forward's collective
    # and size (``also``: groups_per_rank and borrow_from).
    AGREE_ON_LENGTHS_FIRST = False

    def agree_before_first_exchange(self, layer: str, num_features: int, context: WaitContext,
                                    also: Tuple[Tuple[str, int], ...] = ()) -> None:
        if not self.AGREE_ON_LENGTHS_FIRST:
            return
        agreed = self.__dict__.setdefault("_agreed", set())
        if layer not in agreed:
            for what, value in (("num_features", num_features),) + also:
                raise_unless_all_ranks_agree(self, f"{layer}.{what}", what, value, context)
            agreed.add(layer)

    def check_usable(self) -> None:
        if self.broken is not None:
            raise ShuffleBatchNormError(
                "ShuffleBatchNorm cannot exchange any more in this process: an earlier wait timed "
                f"out and a late message could be taken for a new one. That wait: {self.broken}")


def rows_from(expect: Dict[int, int]) -> str:
    """What a wait for these rows is waiting for, in words."""
    ranks = sorted(expect)
    if not ranks:
        return "no rows (the others' part of the exchange)"
    return f"the rows of rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def pack_rows(rows: Rows, size: int, width: int, device) -> Tuple[torch.Tensor, List[int]]:
    """The rows of an all-to-all: concatenated in rank order, and how many go to each rank. A
    rank with nothing to send still submits a tensor on ``device``: Horovod with GPU collectives
    refuses a CPU tensor from one rank when the others submit CUDA ones."""
    counts = [rows[r].shape[0] if r in rows else 0 for r in range(size)]
    if not rows:
        return torch.empty(0, width, dtype=torch.float64, device=device), counts
    if len(rows) == 1:
        return next(iter(rows.values())), counts
    return torch.cat([rows[r] for r in sorted(rows)]), counts


def unpack_rows(received: torch.Tensor, counts: List[int], expect: Dict[int, int],
                device) -> Rows:
    """The received rows of an all-to-all (``counts`` per source rank), by source rank."""
    chunks = received.to(device).split(counts)
    return {source: chunks[source] for source in expect}


def empty_rows(expect: Dict[int, int], width: int, device) -> Rows:
    return {source: torch.empty(n, width, dtype=torch.float64, device=device)
            for source, n in expect.items()}
