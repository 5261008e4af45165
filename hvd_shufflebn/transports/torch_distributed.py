"""torch.distributed (torchrun; Gloo for CPU tensors, NCCL for CUDA tensors) on a process group."""
import pickle
import time
from typing import Dict

import torch
import torch.distributed as dist

from ..deferred import PendingChecks, forced as deferred_forced
from ..waits import wait_until
from .base import Transport, pack_rows, rows_from, unpack_rows


class TorchDistributedTransport(Transport):
    """The header and statistics sum (one ``all_reduce``) come first and are checked before the
    rows move (one ``all_to_all_single``): ranks that disagree on the permutation would disagree
    on how many rows each sends where. Rows travel on the group's device: CUDA under NCCL, the
    CPU otherwise. Collectives on vectors of different lengths abort under Gloo: lengths are
    agreed first (base.py).
    """

    AGREE_ON_LENGTHS_FIRST = True

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._global_ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        # "nccl", or a multi-backend group such as the default "cpu:gloo,cuda:nccl".
        backend = str(dist.get_backend(group))
        self._cuda_collectives = "nccl" in backend
        # The small collectives of the agreement and the error path: a NCCL-only group has no
        # CPU collectives.
        self._device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                        else torch.device("cpu"))
        self.stall_board = StoreStallBoard(self._global_ranks, self.rank)
        self.pending = PendingChecks()
        self._defer_everywhere = deferred_forced()

    def defers_checks(self, device):
        """Under NCCL with CUDA tensors (or everywhere, with $HVD_SHUFFLEBN_DEFER_CHECKS=1)."""
        return self._defer_everywhere or self.rows_device(device).type == "cuda"

    def rows_device(self, device):
        """CUDA tensors stay on their own device under NCCL; everything else goes through the
        host (Gloo)."""
        if device.type == "cuda" and self._cuda_collectives:
            return device
        return torch.device("cpu")

    def current(self, requested):
        return dist.is_initialized()

    def _wait(self, works, context, waiting_for, on_gpu=False):
        """Bounded by polling from the host; on a GPU the current stream only waits for the
        collective (polling would make the host wait for the device), and what bounds a hang is
        NCCL's own watchdog (init_process_group's timeout)."""
        if not on_gpu:
            wait_until(lambda: all(w.is_completed() for w in works), context, self, waiting_for)
        for work in works:
            work.wait()  # done: raises what the backend reported, if anything

    def exchange(self, name, rows, expect, width, device, context, header=None, sums=None,
                 check=None, match=0):
        self.check_usable()
        summed = None
        if header is not None:
            totals = torch.cat([header, sums.to(device)])
            self._wait([dist.all_reduce(totals, group=self.group, async_op=True)], context,
                       "the sum over all ranks", device.type == "cuda")
            check(totals[:header.numel()].cpu())
            summed = totals[header.numel():].to(device)
        # One all_to_all_single with a row count per peer (most of them 0): a collective, so its
        # completion can be polled on every backend, and consistent once the header agreed.
        sent, send_counts = pack_rows(rows, self.size, width, device)
        receive_counts = [expect.get(r, 0) for r in range(self.size)]
        received = torch.empty(sum(receive_counts), width, dtype=torch.float64,
                               device=device)
        work = dist.all_to_all_single(received, sent.contiguous(),
                                      receive_counts, send_counts, group=self.group,
                                      async_op=True)
        self._wait([work], context, rows_from(expect), device.type == "cuda")
        return unpack_rows(received, receive_counts, expect, device), summed

    def sum_and_check(self, name, header, sums, check, context):
        # The exchange's all_reduce alone: a rank that shuffles raises before its all-to-all.
        totals = self.sum(name, torch.cat([header, sums.to(header.device)]), context)
        check(totals[:header.numel()].cpu())
        return totals[header.numel():].to(sums.device)

    def sum(self, name, totals, context):
        self.check_usable()
        # CUDA tensors stay where they are under NCCL; the rest go where the group sums.
        summed = totals.to(self.rows_device(totals.device) if totals.is_cuda else self._device)
        self._wait([dist.all_reduce(summed, group=self.group, async_op=True)], context,
                   "the sum over all ranks", summed.is_cuda)
        return summed.to(totals.device)

    def all_gather(self, name, tensor, context):
        self.check_usable()
        out = torch.empty(self.size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        self._wait([_all_gather_single(out, tensor, group=self.group, async_op=True)], context,
                   "every rank's rows", tensor.is_cuda)
        return out.view(self.size, -1)

    def gather_objects(self, name, obj, context):
        self.check_usable()
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        lengths = torch.zeros(self.size, dtype=torch.int64, device=self._device)
        lengths[self.rank] = payload.numel()
        self._wait([dist.all_reduce(lengths, group=self.group, async_op=True)], context,
                   "every rank's report")
        padded = torch.zeros(self.size, int(lengths.max()), dtype=torch.uint8, device=self._device)
        padded[self.rank, :payload.numel()] = payload.to(self._device)
        self._wait([dist.all_reduce(padded, group=self.group, async_op=True)], context,
                   "every rank's report")
        padded, lengths = padded.cpu(), lengths.tolist()
        return [pickle.loads(padded[r, :lengths[r]].numpy().tobytes()) for r in range(self.size)]


# all_gather_into_tensor's newer name (torch >= 2.13).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class StoreStallBoard:
    """Posts in torch.distributed's own key-value store (the one init_process_group rendezvoused
    on), which every rank reaches whatever state the process group is in."""

    PREFIX = "hvd_shufflebn_stall/"

    def __init__(self, global_ranks, rank):
        self.global_ranks, self.rank = global_ranks, rank

    def post_and_read(self, status: tuple, grace: float, max_age: float) -> Dict[int, tuple]:
        store = dist.distributed_c10d._get_default_store()
        key = lambda r: f"{self.PREFIX}{self.global_ranks[r]}"  # noqa: E731
        started = time.time()
        store.set(key(self.rank), pickle.dumps((tuple(status), started)))
        heard = {}
        deadline = time.monotonic() + grace
        while len(heard) < len(self.global_ranks) - 1 and time.monotonic() < deadline:
            for other in range(len(self.global_ranks)):
                if other != self.rank and other not in heard and store.check([key(other)]):
                    other_status, posted = pickle.loads(store.get(key(other)))
                    if posted > started - max_age:  # not left over from an earlier stall
                        heard[other] = other_status
            time.sleep(0.05)
        return heard
