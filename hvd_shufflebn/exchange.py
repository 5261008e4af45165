"""Moving statistics between ranks, and making every rank raise the same error.

One forward exchange moves and sums:

* a point-to-point move: each rank sends one packet to the one rank that borrows from it, so the
  bytes per rank do not grow with the world size;
* a sum over all ranks of a small vector: the running statistics need the union of all batches,
  and every rank must learn about a bad input on ANY rank, or the ranks would diverge or hang.

Two transports do this: Horovod's collectives (any controller), or mpi4py next to Horovod's MPI
(far lower latency). The slow, rare work of finding out WHAT went wrong, and where, happens only
after the sum says something did.
"""
import atexit
import os
import pickle
from typing import Callable, List, Optional, Tuple

import horovod.torch as hvd
import torch

TRANSPORTS = ("auto", "horovod", "mpi")


class ShuffleBatchNormError(RuntimeError):
    """Raised on every rank of the process set, with the same message, when any rank's input is bad."""


class HorovodTransport:
    """Horovod's collectives on one process set (works with both the MPI and the Gloo controller).

    The move and the sum are submitted together and share one negotiation cycle; the move cannot
    hang when ranks disagree on the permutation (a rank just receives 0 or 2 rows), so the check
    can come after both.
    """

    def __init__(self, process_set):
        self.process_set = process_set
        self.rank = process_set.rank()
        self.size = process_set.size()
        # Horovod built without GPU collectives only takes CPU tensors.
        self._cpu_only = not hvd.nccl_built()

    def exchange(self, name: str, row: torch.Tensor, dest: int, source: int,
                 totals: Optional[torch.Tensor] = None,
                 check: Optional[Callable[[torch.Tensor], None]] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Send ``row`` (shape (1, L)) to rank ``dest`` and receive the one from ``source``; if
        given, sum ``totals`` over all ranks and call ``check`` on the sum before the received row
        is returned (``check`` raises when the exchange must not be used)."""
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
            summed = hvd.synchronize(summed)
            check(summed)
            summed = summed.to(device)
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


class MPITransport:
    """mpi4py on a duplicate of the process set's MPI communicator: the packets go straight to MPI
    (microseconds) instead of through Horovod's background thread (a negotiation cycle, about a
    millisecond). Valid when Horovod runs on MPI; packets are staged through host memory.

    The sum and its check come BEFORE the point-to-point move: a receive from a rank that sends
    elsewhere (ranks that disagree on the permutation) would hang.
    """

    def __init__(self, process_set):
        from mpi4py import MPI
        world = MPI.COMM_WORLD
        # Our own communicator, so our messages never match Horovod's or the user's.
        if process_set.mpi_comm is not None:
            self.comm = process_set.mpi_comm.Dup()
        elif process_set.process_set_id == 0:  # the global set
            self.comm = world.Dup()
        else:  # collective over the set's members only
            self.comm = world.Create_group(world.Get_group().Incl(process_set.ranks))
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        # Free it before Horovod's own exit handler (registered earlier, so run later) finalises
        # MPI: a communicator freed after MPI_Finalize aborts the process.
        atexit.register(self._free)

    def _free(self):
        from mpi4py import MPI
        if not MPI.Is_finalized() and self.comm != MPI.COMM_NULL:
            self.comm.Free()

    def exchange(self, name, row, dest, source, totals=None, check=None):
        device = row.device
        if totals is not None:
            totals = totals.cpu()
            summed = torch.empty_like(totals)
            _wait(self.comm.Iallreduce(totals.numpy(), summed.numpy()))
            check(summed)
            totals = summed.to(device)
        row = row.cpu()
        received = torch.empty_like(row)
        _wait(self.comm.Irecv(received.numpy(), source, 0), self.comm.Isend(row.numpy(), dest, 0))
        return received.to(device), totals

    def sum(self, name, totals):
        summed = torch.empty_like(totals.cpu())
        self.comm.Allreduce(totals.cpu().numpy(), summed.numpy())
        return summed.to(totals.device)

    def gather_objects(self, name, obj):
        return self.comm.allgather(obj)


def _wait(*requests) -> None:
    """Wait for MPI requests, yielding the core between polls: the ranks' main threads share the
    cores with Horovod's background threads, and a busy-waiting MPI_Wait starves them (measured
    on 2 cores, 2 ranks: about 2x the latency); with a core to spare, the yield returns at once."""
    from mpi4py import MPI
    requests = list(requests)
    while not MPI.Request.Testall(requests):
        os.sched_yield()


def mpi_usable() -> bool:
    """Whether mpi4py can share Horovod's MPI: Horovod runs on MPI, with the same world, and MPI
    allows calls from several threads (Horovod's background thread makes its own)."""
    if not hvd.mpi_enabled():
        return False
    try:
        from mpi4py import MPI
    except ImportError:
        return False
    return (MPI.Query_thread() == MPI.THREAD_MULTIPLE
            and MPI.COMM_WORLD.Get_size() == hvd.size() and MPI.COMM_WORLD.Get_rank() == hvd.rank())


_transports = {}  # (kind, process set id) -> transport, shared by all layers


def make_transport(kind: str, process_set):
    """The transport named ``kind`` ("auto": MPI when usable, else Horovod) for ``process_set``."""
    key = (kind, process_set.process_set_id)
    if key not in _transports:
        if kind == "horovod" or (kind == "auto" and not mpi_usable()):
            _transports[key] = HorovodTransport(process_set)
        elif mpi_usable():
            _transports[key] = MPITransport(process_set)
        else:
            raise ShuffleBatchNormError(
                "transport='mpi' needs Horovod running on MPI (not Gloo) with mpi4py on the same "
                "MPI_COMM_WORLD and MPI_THREAD_MULTIPLE; use transport='horovod' or 'auto'")
    return _transports[key]


# Layout of the vector summed over ranks in the forward exchange: a header, then per-channel sums.
ERRORS, FINGERPRINT, FINGERPRINT_SQ, NEEDS_GRAD, COUNT = range(5)
HEADER = 5


def raise_if_any_rank_failed(transport, name: str, header: torch.Tensor,
                             local_error: Optional[str], perm, needs_grad: bool) -> None:
    """Raise the same ShuffleBatchNormError on every rank if any rank reported a problem.

    ``header`` is the summed header: the number of ranks with a local error, the sum and sum of
    squares of the fingerprints of (layer name, permutation) (all equal iff
    size * sum(f^2) == sum(f)^2, exact in float64 for f < 2**20), and the number of ranks whose
    input needs a gradient (a backward exchange on only some ranks would hang).
    """
    errors, fp, fp_sq, grads = (float(header[i]) for i in (ERRORS, FINGERPRINT, FINGERPRINT_SQ,
                                                            NEEDS_GRAD))
    size = transport.size
    if errors == 0 and size * fp_sq == fp * fp and grads in (0, size):
        return
    reports = transport.gather_objects(name + ".error", (name, local_error, perm, needs_grad))
    names = [n for n, _, _, _ in reports]
    if len(set(names)) > 1:  # possible with the MPI transport, which matches calls by order only
        raise ShuffleBatchNormError("ShuffleBatchNorm: ranks are in different layers: " + ", ".join(
            f"rank {r} in {n!r}" for r, n in enumerate(names)))
    problems = [f"rank {r}: {err}" for r, (_, err, _, _) in enumerate(reports) if err]
    if not problems and len({p for _, _, p, _ in reports}) > 1:
        problems.append("ranks disagree on the permutation: " + ", ".join(
            f"rank {r} uses {p}" for r, (_, _, p, _) in enumerate(reports)))
    if not problems:
        problems.append("the input requires grad on ranks "
                        f"{[r for r, (_, _, _, g) in enumerate(reports) if g]} only; a backward "
                        "pass on some ranks but not others would hang")
    raise ShuffleBatchNormError(f"ShuffleBatchNorm {name!r} (process set of {size} ranks): "
                                + "; ".join(problems))


def raise_unless_all_ranks_agree(transport, name: str, what: str,
                                 value: int) -> None:
    """Raise the same ShuffleBatchNormError on every rank unless all ranks hold the same ``value``."""
    totals = transport.sum(name, torch.tensor([value, value * value], dtype=torch.float64))
    if transport.size * float(totals[1]) == float(totals[0]) ** 2:
        return
    values = transport.gather_objects(name, value)
    raise ShuffleBatchNormError(f"ShuffleBatchNorm {name!r}: ranks disagree on {what}: "
                                + ", ".join(f"rank {r} has {v}" for r, v in enumerate(values)))
