"""mpi4py beside Horovod's MPI: the rows go straight to MPI (microseconds) instead of through
Horovod's background thread (a negotiation cycle, about a millisecond)."""
import atexit
import pickle
import time
import zlib
from typing import Dict

import torch

from ..errors import ShuffleBatchNormError
from ..waits import wait_until
from .base import Transport, empty_rows, rows_from


class MPITransport(Transport):
    """mpi4py on a duplicate of the process set's MPI communicator; rows are staged through host
    memory.

    The forward waits once: the sum and the point-to-point moves start together. A receive must
    then never be matched by a row that was not meant for it (ranks that disagree on the
    permutation or the layer, a row left over from an exchange that raised): every message is
    tagged with ``match`` (equal on two ranks only if they agree on layer, step, direction and
    permutation) and with how many exchanges of this transport have raised so far (the same on
    every rank, since they raise together). When the summed header says something is wrong, the
    receives are cancelled before the error is raised. MPI matches messages by order and length
    only: lengths are agreed first (base.py).
    """

    AGREE_ON_LENGTHS_FIRST = True

    def __init__(self, process_set):
        from mpi4py import MPI
        self.comm = duplicate_communicator(process_set)
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.stall_board = MPIStallBoard(duplicate_communicator(process_set))
        self._tag_bound = min(self.comm.Get_attr(MPI.TAG_UB), 2 ** 31 - 1)
        self._failed_exchanges = 0

    def exchange(self, name, rows, expect, width, device, context, header=None, sums=None,
                 check=None, match=0):
        self.check_usable()
        tag = zlib.crc32(f"{match}:{self._failed_exchanges}".encode()) % self._tag_bound
        received = empty_rows(expect, width, "cpu")
        sent = {dest: r.cpu().contiguous() for dest, r in rows.items()}  # alive until done
        receives = [self.comm.Irecv(buffer.numpy(), source, tag)
                    for source, buffer in received.items()]
        sends = [self.comm.Isend(r.numpy(), dest, tag) for dest, r in sent.items()]
        summed = None
        if header is not None:
            totals = torch.cat([header, sums]).cpu()
            result = torch.empty_like(totals)
            self._wait([self.comm.Iallreduce(totals.numpy(), result.numpy())], context,
                       "the sum over all ranks")
            try:
                check(result[:header.numel()])
            except ShuffleBatchNormError:
                self._abandon(receives, sends)
                raise
            summed = result[header.numel():].to(device)
        self._wait(receives + sends, context, rows_from(expect))
        return {source: r.to(device) for source, r in received.items()}, summed

    def current(self, requested):
        import horovod.torch as hvd
        return hvd.is_initialized()

    def _abandon(self, receives, sends):
        """An exchange that raised on every rank: no receive of ours may take a later row, and
        later tags differ from this one's, so no later receive takes a row of this one."""
        from mpi4py import MPI
        self._failed_exchanges += 1
        for request in receives:
            request.Cancel()
        MPI.Request.Waitall(receives)  # a cancelled (or completed) receive returns at once
        for request in sends:  # a send nobody receives finishes in the background, or never
            request.Free()

    def _wait(self, requests, context, waiting_for):
        from mpi4py import MPI
        if not requests:  # nothing to wait for (a pooled layer moves no rows)
            return
        if MPI.Is_finalized():  # Horovod shut MPI down: another rank finished or failed
            raise ShuffleBatchNormError(
                f"ShuffleBatchNorm {context.layer!r}, step {context.step}, {context.phase}: MPI "
                "has been finalised (Horovod shuts down on every rank when one rank finishes or "
                "fails), so the exchange cannot run")
        # Yield the core between polls: the ranks' main threads share the cores with Horovod's
        # background threads, and a busy-waiting MPI_Wait starves them (measured on 2 cores,
        # 2 ranks: about 2x the latency); with a core to spare, the yield returns at once.
        wait_until(lambda: MPI.Request.Testall(requests), context, self, waiting_for)

    def sum(self, name, totals, context):
        self.check_usable()
        totals = totals.cpu()
        summed = torch.empty_like(totals)
        self._wait([self.comm.Iallreduce(totals.numpy(), summed.numpy())], context,
                   "the sum over all ranks")
        return summed

    def gather_objects(self, name, obj, context):
        import numpy as np
        self.check_usable()
        payload = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        lengths = np.zeros(self.size, dtype=np.int64)
        self._wait([self.comm.Iallgather(np.array([payload.size], dtype=np.int64), lengths)],
                   context, "every rank's report")
        data = np.empty(int(lengths.sum()), dtype=np.uint8)
        self._wait([self.comm.Iallgatherv(payload, [data, lengths.tolist()])], context,
                   "every rank's report")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return [pickle.loads(data[offsets[r]:offsets[r + 1]].tobytes()) for r in range(self.size)]


class MPIStallBoard:
    """Posts on a communicator of its own (so nothing else can match them): each waiting rank
    sends its status to every other rank, then collects what arrives within the grace period.

    The first rank to raise exits, and Horovod's shutdown then finalises MPI in every rank's
    background thread, under any MPI call still running: so each post carries the time its
    sender stops listening, and a rank stays until the last rank it heard from is done too."""

    TAG = 4242

    def __init__(self, comm):
        self.comm = comm

    def post_and_read(self, status: tuple, grace: float, max_age: float) -> Dict[int, tuple]:
        from mpi4py import MPI
        me, size = self.comm.Get_rank(), self.comm.Get_size()
        listen_until = time.time() + grace
        # Small messages leave eagerly; a rank that never receives does not block us.
        for other in range(size):
            if other != me:
                self.comm.isend((tuple(status), listen_until), dest=other, tag=self.TAG)
        heard, probe = {}, MPI.Status()
        while len(heard) < size - 1 and time.time() < listen_until and not MPI.Is_finalized():
            if self.comm.iprobe(source=MPI.ANY_SOURCE, tag=self.TAG, status=probe):
                source = probe.Get_source()
                heard[source], their_end = self.comm.recv(source=source, tag=self.TAG)
                listen_until = max(listen_until, min(their_end, time.time() + grace))
            else:
                time.sleep(0.01)
        time.sleep(max(0.0, listen_until - time.time()))
        return heard


def duplicate_communicator(process_set):
    """Our own communicator, so our messages never match Horovod's or the user's. Freed before
    Horovod's own exit handler (registered earlier, so run later) finalises MPI: a communicator
    freed after MPI_Finalize aborts the process."""
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    if process_set.mpi_comm is not None:
        comm = process_set.mpi_comm.Dup()
    elif process_set.process_set_id == 0:  # the global set
        comm = world.Dup()
    else:  # collective over the set's members only
        comm = world.Create_group(world.Get_group().Incl(process_set.ranks))
    atexit.register(_free, comm)
    return comm


def _free(comm):
    from mpi4py import MPI
    if not MPI.Is_finalized() and comm != MPI.COMM_NULL:
        comm.Free()


def usable() -> bool:
    """Whether mpi4py can share Horovod's MPI: Horovod runs on MPI, with the same world, and MPI
    allows calls from several threads (Horovod's background thread makes its own)."""
    import horovod.torch as hvd
    if not hvd.mpi_enabled():
        return False
    try:
        from mpi4py import MPI
    except ImportError:
        return False
    return (MPI.Query_thread() == MPI.THREAD_MULTIPLE
            and MPI.COMM_WORLD.Get_size() == hvd.size() and MPI.COMM_WORLD.Get_rank() == hvd.rank())
