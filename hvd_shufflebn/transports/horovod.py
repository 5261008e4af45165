"""Horovod's collectives on one process set (the MPI and the Gloo controller, elastic included)."""
import os
import time
from typing import Dict

import horovod.torch as hvd
import torch
from horovod.common.exceptions import HorovodInternalError

from ..errors import ShuffleBatchNormError
from ..waits import WaitContext, wait_until
from .base import Transport, pack_rows, rows_from, unpack_rows

# Between polls of a handle. Horovod's own synchronize() sleeps 1 ms in C++; from Python a 1 ms
# sleep cost about 0.45 ms more per wait (2 ranks, this 2-core machine), 0.2 ms does not.
_POLL_PAUSE = 0.0002


class HorovodTransport(Transport):
    """The move is one ``alltoall`` (a row count per peer, most of them 0), submitted with the
    header sum and the statistics sum: all three share one negotiation cycle, and Horovod fuses
    the two float64 sums. The header is checked first: ranks that disagree on num_features send
    rows of different lengths, which Horovod answers with an error on every rank; the header
    names the real problem instead. The move cannot hang when ranks disagree on the permutation
    (a rank just receives other row counts), so it needs no check before it starts.
    """

    def __init__(self, process_set):
        self.process_set = process_set
        self.rank = process_set.rank()
        self.size = process_set.size()
        # Horovod built without GPU collectives only takes CPU tensors.
        self._cpu_only = not hvd.nccl_built()
        self.stall_board = _stall_board(process_set, self.rank, self.size)

    def rows_device(self, device):
        return torch.device("cpu") if self._cpu_only else device

    def _stage(self, tensor):
        return tensor.to(self.rows_device(tensor.device))

    def current(self, requested):
        return (hvd.is_initialized() and self.process_set.size() == self.size
                and self.process_set.rank() == self.rank)

    def _wait(self, handle, context: WaitContext, waiting_for: str):
        wait_until(lambda: hvd.poll(handle), context, self, waiting_for, pause=_POLL_PAUSE)
        # Done: returns at once. A peer that died surfaces here as HorovodInternalError, which
        # must stay what it is: elastic Horovod recovers from exactly that.
        return hvd.synchronize(handle)

    def exchange(self, name, rows, expect, width, device, context, header=None, sums=None,
                 check=None, match=0):
        self.check_usable()
        sent, counts = pack_rows(rows, self.size, width, device)
        splits = torch.tensor(counts, dtype=torch.int32)
        moved = hvd.alltoall_async(self._stage(sent), splits=splits, name=name,
                                   process_set=self.process_set)
        summed = None
        if header is not None:
            header_handle = hvd.allreduce_async(self._stage(header), op=hvd.Sum,
                                                name=name + ".header", process_set=self.process_set)
            sums_handle = hvd.allreduce_async(self._stage(sums), op=hvd.Sum, name=name + ".sum",
                                              process_set=self.process_set)
            everyone = "the sum over all ranks"
            summed_header = self._wait(header_handle, context, everyone)
            try:
                check(summed_header)
            except ShuffleBatchNormError:
                self._drain(moved, sums_handle, context=context)
                raise
            summed = self._wait(sums_handle, context, everyone).to(device)
        received, received_counts = self._wait(moved, context, rows_from(expect))
        return unpack_rows(received, received_counts.tolist(), expect, device), summed

    def _drain(self, *handles, context):
        """Collect the other collectives of an exchange that is being abandoned: with rows of
        different lengths they end in an error on every rank, quickly."""
        for handle in handles:
            try:
                self._wait(handle, context, "the rest of an abandoned exchange")
            except (HorovodInternalError, ShuffleBatchNormError):
                pass

    def sum(self, name, totals, context):
        self.check_usable()
        handle = hvd.allreduce_async(self._stage(totals), op=hvd.Sum, name=name,
                                     process_set=self.process_set)
        return self._wait(handle, context, "the sum over all ranks").to(totals.device)

    def gather_objects(self, name, obj, context):
        import pickle
        self.check_usable()
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        lengths = self._wait(hvd.allgather_async(torch.tensor([payload.numel()]),
                                                 name=name + ".len", process_set=self.process_set),
                             context, "every rank's report").tolist()
        data = self._wait(hvd.allgather_async(payload, name=name + ".obj",
                                              process_set=self.process_set),
                          context, "every rank's report")
        return [pickle.loads(chunk.numpy().tobytes()) for chunk in torch.split(data, lengths)]


class KVStallBoard:
    """Posts in the key-value store of horovodrun's rendezvous server (Gloo runs, elastic ones
    included), which every worker can reach over HTTP whatever state Horovod is in."""

    SCOPE = "hvd_shufflebn_stall"

    def __init__(self, address: str, port: int, set_id: int, rank: int, size: int):
        self.address, self.port = address, port
        self.set_id, self.rank, self.size = set_id, rank, size

    def post_and_read(self, status: tuple, grace: float, max_age: float) -> Dict[int, tuple]:
        from horovod.runner.http.http_client import (put_data_into_kvstore,
                                                      read_data_from_kvstore)
        key = "{}.{}".format
        started = time.time()
        put_data_into_kvstore(self.address, self.port, self.SCOPE, key(self.set_id, self.rank),
                              (tuple(status), started))
        heard = {}
        deadline = time.monotonic() + grace
        while len(heard) < self.size - 1 and time.monotonic() < deadline:
            for other in range(self.size):
                if other == self.rank or other in heard:
                    continue
                try:
                    other_status, posted = read_data_from_kvstore(
                        self.address, self.port, self.SCOPE, key(self.set_id, other))
                except RuntimeError:  # nothing posted yet
                    continue
                if posted > started - max_age:  # not left over from an earlier stall
                    heard[other] = other_status
            time.sleep(0.05)
        return heard


def _stall_board(process_set, rank, size):
    """Where waiting ranks can tell each other where they wait, whatever Horovod's state: the
    rendezvous server's key-value store under horovodrun's Gloo, an MPI communicator of its own
    under MPI, or nothing (the timeout error then says it could not tell)."""
    address = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR")
    port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
    if hvd.gloo_enabled() and address and port:
        return KVStallBoard(address, int(port), process_set.process_set_id, rank, size)
    from . import mpi
    if mpi.usable():
        return mpi.MPIStallBoard(mpi.duplicate_communicator(process_set))
    return None


def check_process_set(process_set, layer: str) -> None:
    """The process set must be usable by this rank, and global under elastic Horovod."""
    if not hvd.is_initialized():
        raise ShuffleBatchNormError(
            f"ShuffleBatchNorm {layer!r}: Horovod is not initialised; call hvd.init() before the "
            "first training forward")
    if os.environ.get("HOROVOD_ELASTIC") == "1" and process_set is not hvd.global_process_set:
        raise ShuffleBatchNormError(
            f"ShuffleBatchNorm {layer!r}: process sets are not supported under elastic Horovod "
            "(Horovod itself does not support them there); use the global process set")
    if process_set.process_set_id is None:
        raise ShuffleBatchNormError(
            f"ShuffleBatchNorm {layer!r}: {process_set} is not registered with Horovod; pass it "
            "to hvd.init(process_sets=...) or hvd.add_process_set()")
    if process_set.rank() is None or process_set.rank() < 0:
        raise ShuffleBatchNormError(
            f"ShuffleBatchNorm {layer!r}: rank {hvd.rank()} is not in {process_set}")
