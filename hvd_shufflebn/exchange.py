"""Moving statistics between ranks: the transports.

One forward exchange moves and sums:

* a point-to-point move: each rank sends one packet to the one rank that borrows from it, so the
  bytes per rank do not grow with the world size;
* a sum over all ranks of a small header (agreement.py: errors, fingerprints) and of the
  count-weighted sums the running statistics need.

Two transports do this: Horovod's collectives (any controller, elastic runs included), or mpi4py
next to Horovod's MPI (far lower latency). Every wait is bounded (waits.py).
"""
import atexit
import os
import pickle
from typing import Callable, List, Optional, Tuple

import horovod.torch as hvd
import torch
from horovod.common.exceptions import HorovodInternalError

from .agreement import raise_unless_all_ranks_agree
from .errors import ShuffleBatchNormError
from .waits import KVStallBoard, MPIStallBoard, WaitContext, wait_until

TRANSPORTS = ("auto", "horovod", "mpi")
# Horovod's own synchronize() sleeps 1 ms between polls; ours does the same, with a deadline.
_HOROVOD_POLL_PAUSE = 0.001


class _Transport:
    rank: int
    size: int
    stall_board = None
    broken: Optional[str] = None  # set when a wait timed out: late messages would be mismatched

    def agree_before_first_exchange(self, layer: str, num_features: int, context) -> None:
        """Make sure all ranks' packets for ``layer`` will have the same length (see
        MPITransport); Horovod's collectives need nothing: the header names a mismatch."""

    def _check_usable(self):
        if self.broken is not None:
            raise ShuffleBatchNormError(
                "ShuffleBatchNorm cannot exchange any more in this process: an earlier wait timed "
                f"out and a late message could be taken for a new one. That wait: {self.broken}")


class HorovodTransport(_Transport):
    """Horovod's collectives on one process set (works with both the MPI and the Gloo controller).

    The move, the header sum and the statistics sum are submitted together and share one
    negotiation cycle (the two sums, both float64, are fused by Horovod). The header is checked
    first: ranks that disagree on num_features send rows of different lengths, which Horovod
    answers with an error on every rank; the header names the real problem instead. The move
    cannot hang when ranks disagree on the permutation (a rank just receives 0 or 2 rows).
    """

    def __init__(self, process_set):
        self.process_set = process_set
        self.rank = process_set.rank()
        self.size = process_set.size()
        # Horovod built without GPU collectives only takes CPU tensors.
        self._cpu_only = not hvd.nccl_built()
        self.stall_board = _stall_board(process_set, self.rank, self.size)

    def _wait(self, handle, context: WaitContext, waiting_for: str):
        wait_until(lambda: hvd.poll(handle), context, self, waiting_for,
                   pause=_HOROVOD_POLL_PAUSE)
        # Done: returns at once. A peer that died surfaces here as HorovodInternalError, which
        # must stay what it is: elastic Horovod recovers from exactly that.
        return hvd.synchronize(handle)

    def exchange(self, name: str, row: torch.Tensor, dest: int, source: int,
                 context: WaitContext, header: Optional[torch.Tensor] = None,
                 sums: Optional[torch.Tensor] = None,
                 check: Optional[Callable[[torch.Tensor], None]] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Send ``row`` (shape (1, L)) to rank ``dest`` and receive the one from ``source``; if
        given, sum ``header`` and ``sums`` over all ranks and call ``check`` on the summed header
        before anything else is used (``check`` raises when the exchange must not be used).
        Returns the received row and the summed ``sums``."""
        self._check_usable()
        device = row.device
        stage = (lambda t: t.cpu()) if self._cpu_only else (lambda t: t)
        splits = torch.zeros(self.size, dtype=torch.int32)
        splits[dest] = 1
        what = f"the statistics of rank {source}"
        moved = hvd.alltoall_async(stage(row), splits=splits, name=name,
                                   process_set=self.process_set)
        summed = None
        if header is not None:
            header_handle = hvd.allreduce_async(stage(header), op=hvd.Sum, name=name + ".header",
                                                process_set=self.process_set)
            sums_handle = hvd.allreduce_async(stage(sums), op=hvd.Sum, name=name + ".sum",
                                              process_set=self.process_set)
            everyone = "the sum over all ranks"
            summed_header = self._wait(header_handle, context, everyone)
            try:
                check(summed_header)
            except ShuffleBatchNormError:
                self._drain(moved, sums_handle, context=context)
                raise
            summed = self._wait(sums_handle, context, everyone).to(device)
        received, _ = self._wait(moved, context, what)
        return received.to(device), summed

    def _drain(self, *handles, context):
        """Collect the other collectives of an exchange that is being abandoned: with rows of
        different lengths they end in an error on every rank, quickly."""
        for handle in handles:
            try:
                self._wait(handle, context, "the rest of an abandoned exchange")
            except (HorovodInternalError, ShuffleBatchNormError):
                pass

    def sum(self, name: str, totals: torch.Tensor, context: WaitContext) -> torch.Tensor:
        self._check_usable()
        handle = hvd.allreduce_async(totals.cpu() if self._cpu_only else totals, op=hvd.Sum,
                                     name=name, process_set=self.process_set)
        return self._wait(handle, context, "the sum over all ranks").to(totals.device)

    def gather_objects(self, name: str, obj, context: WaitContext) -> List[object]:
        """Every rank's ``obj``, in rank order (slow; for the error path only)."""
        self._check_usable()
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        lengths = self._wait(hvd.allgather_async(torch.tensor([payload.numel()]),
                                                 name=name + ".len", process_set=self.process_set),
                             context, "every rank's report").tolist()
        data = self._wait(hvd.allgather_async(payload, name=name + ".obj",
                                              process_set=self.process_set),
                          context, "every rank's report")
        return [pickle.loads(chunk.numpy().tobytes()) for chunk in torch.split(data, lengths)]


class MPITransport(_Transport):
    """mpi4py on a duplicate of the process set's MPI communicator: the packets go straight to MPI
    (microseconds) instead of through Horovod's background thread (a negotiation cycle, about a
    millisecond). Valid when Horovod runs on MPI; packets are staged through host memory.

    The sum and its check come BEFORE the point-to-point move: a receive from a rank that sends
    elsewhere (ranks that disagree on the permutation) would hang. MPI matches messages by order
    and length only, so each layer checks once that all ranks agree on num_features before its
    first exchange (``agreed``); an MPI world never changes size, so once is enough.
    """

    def __init__(self, process_set):
        self.comm = _duplicate_communicator(process_set)
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.stall_board = MPIStallBoard(self.comm.Dup())
        self.agreed = set()  # names of the layers whose num_features all ranks agree on
        # Free them before Horovod's own exit handler (registered earlier, so run later)
        # finalises MPI: a communicator freed after MPI_Finalize aborts the process.
        atexit.register(_free, self.comm, self.stall_board.comm)

    def agree_before_first_exchange(self, layer, num_features, context):
        if layer not in self.agreed:
            raise_unless_all_ranks_agree(self, layer + ".num_features", "num_features",
                                         num_features, context)
            self.agreed.add(layer)

    def exchange(self, name, row, dest, source, context, header=None, sums=None, check=None):
        self._check_usable()
        device = row.device
        summed = None
        if header is not None:
            totals = torch.cat([header, sums]).cpu()
            result = torch.empty_like(totals)
            self._wait([self.comm.Iallreduce(totals.numpy(), result.numpy())], context,
                       "the sum over all ranks")
            check(result[:header.numel()])
            summed = result[header.numel():].to(device)
        row = row.cpu()
        received = torch.empty_like(row)
        self._wait([self.comm.Irecv(received.numpy(), source, 0),
                    self.comm.Isend(row.numpy(), dest, 0)], context,
                   f"the statistics of rank {source}")
        return received.to(device), summed

    def _wait(self, requests, context, waiting_for):
        from mpi4py import MPI
        # Yield the core between polls: the ranks' main threads share the cores with Horovod's
        # background threads, and a busy-waiting MPI_Wait starves them (measured on 2 cores,
        # 2 ranks: about 2x the latency); with a core to spare, the yield returns at once.
        wait_until(lambda: MPI.Request.Testall(requests), context, self, waiting_for)

    def sum(self, name, totals, context):
        self._check_usable()
        totals = totals.cpu()
        summed = torch.empty_like(totals)
        self._wait([self.comm.Iallreduce(totals.numpy(), summed.numpy())], context,
                   "the sum over all ranks")
        return summed

    def gather_objects(self, name, obj, context):
        self._check_usable()
        import numpy as np
        payload = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        lengths = np.zeros(self.size, dtype=np.int64)
        self._wait([self.comm.Iallgather(np.array([payload.size], dtype=np.int64), lengths)],
                   context, "every rank's report")
        data = np.empty(int(lengths.sum()), dtype=np.uint8)
        self._wait([self.comm.Iallgatherv(payload, [data, lengths.tolist()])], context,
                   "every rank's report")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return [pickle.loads(data[offsets[r]:offsets[r + 1]].tobytes()) for r in range(self.size)]


def _duplicate_communicator(process_set):
    """Our own communicator, so our messages never match Horovod's or the user's."""
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    if process_set.mpi_comm is not None:
        return process_set.mpi_comm.Dup()
    if process_set.process_set_id == 0:  # the global set
        return world.Dup()
    return world.Create_group(world.Get_group().Incl(process_set.ranks))  # its members only


def _free(*comms):
    from mpi4py import MPI
    for comm in comms:
        if not MPI.Is_finalized() and comm != MPI.COMM_NULL:
            comm.Free()


def _stall_board(process_set, rank, size):
    """Where waiting ranks can tell each other where they wait, whatever Horovod's state: the
    rendezvous server's key-value store under horovodrun's Gloo, an MPI communicator of its own
    under MPI, or nothing (the timeout error then says it could not tell)."""
    address = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR")
    port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
    if hvd.gloo_enabled() and address and port:
        return KVStallBoard(address, int(port), process_set.process_set_id, rank, size)
    if mpi_usable():
        comm = _duplicate_communicator(process_set)
        atexit.register(_free, comm)
        return MPIStallBoard(comm)
    return None


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


# (kind, process set id, rank, size) -> transport, shared by all layers. Rank and size are part of
# the key: elastic Horovod re-initialises with a new world in the same process.
_transports = {}


def make_transport(kind: str, process_set):
    """The transport named ``kind`` ("auto": MPI when usable, else Horovod) for ``process_set``."""
    key = (kind, process_set.process_set_id, process_set.rank(), process_set.size())
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
