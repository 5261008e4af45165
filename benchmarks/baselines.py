"""The approaches ShuffleBatchNorm is compared with, and the instrumentation that counts bytes.

* SyncBatchNorm: examples/sync_batchnorm.py (exact; one allreduce in forward, one in backward).
* The collective pattern of the original single-node implementation: three allgathers per layer
  in forward (mean, var, count), the borrowed statistics used as constants (nothing in backward).
* MoCo's official Shuffling BN: shuffle the SAMPLES across ranks around the key encoder.
"""
import importlib.util
import itertools
import sys
from collections import defaultdict
from pathlib import Path

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = Path(__file__).resolve().parent.parent


# --- SyncBatchNorm from examples/ ------------------------------------------------------------

def load_sync_batchnorm():
    """The module examples/sync_batchnorm.py, or None if it is not there."""
    path = ROOT / "examples" / "sync_batchnorm.py"
    if not path.exists():
        return None
    if str(path.parent) not in sys.path:  # it imports its neighbour examples/common.py
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("sync_batchnorm_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the original implementation's collective pattern -------------------------------------------

_original_ids = itertools.count()


class OriginalPatternBatchNorm(_BatchNorm):
    """Rank r normalises with the statistics of rank (r + 1) % size, fetched by three blocking
    allgathers (mean, var, count: three Horovod negotiation cycles) and used as constants, so
    backward communicates nothing (and misses the gradient through the borrowed statistics)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = f"original.{next(_original_ids)}"

    def _check_input_dim(self, input):
        pass

    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
        count = torch.tensor([float(x.numel() // x.shape[1])])
        means = hvd.allgather(mean[None], name=self.name + ".mean")
        variances = hvd.allgather(var[None], name=self.name + ".var")
        counts = hvd.allgather(count, name=self.name + ".count")
        with torch.no_grad():  # running statistics of the union of all batches
            n = counts.sum()
            global_mean = (counts[:, None] * means).sum(0) / n
            global_var = (counts[:, None] * (variances + means ** 2)).sum(0) / n - global_mean ** 2
            self.running_mean.lerp_(global_mean, self.momentum)
            self.running_var.lerp_(global_var * n / (n - 1), self.momentum)
        source = (hvd.rank() + 1) % hvd.size()
        return F.batch_norm(x, means[source], variances[source], self.weight, self.bias,
                            False, 0.0, self.eps)


def convert_original(module):
    """Replace every BatchNorm by OriginalPatternBatchNorm, sharing parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            new = OriginalPatternBatchNorm(child.num_features, child.eps, child.momentum)
            new.load_state_dict(child.state_dict())
            module._modules[name] = new
        else:
            convert_original(child)
    return module


# --- MoCo's official Shuffling BN: shuffle the samples ------------------------------------------

class SampleShuffle(torch.nn.Module):
    """Key encoder wrapped as in MoCo's main code: gather every rank's batch, apply one random
    permutation of the global batch, encode this rank's slice (plain BN inside), gather the outputs
    and undo the permutation. The permutation comes from a common seed (MoCo broadcasts it from
    rank 0: one collective more), so this is a lower bound on that approach's cost."""

    def __init__(self, encoder, seed=0):
        super().__init__()
        self.encoder, self.seed, self.step = encoder, seed, 0

    def forward(self, x):
        n, rank = x.shape[0], hvd.rank()
        everyone = hvd.allgather(x, name="sampleshuffle.input")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        self.step += 1
        perm = torch.randperm(everyone.shape[0], generator=gen)
        out = self.encoder(everyone[perm[rank * n:(rank + 1) * n]])
        outputs = hvd.allgather(out, name="sampleshuffle.output")
        return outputs[torch.argsort(perm)[rank * n:(rank + 1) * n]]


# --- counting bytes handed to collectives --------------------------------------------------------

def _nbytes(obj):
    if isinstance(obj, (tuple, list)):  # alltoall returns (tensor, received splits)
        obj = obj[0]
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return np.asarray(obj).nbytes


class ByteCounter:
    """Wraps Horovod's collectives and an mpi4py communicator and tallies, per kind of collective,
    calls and the bytes each rank submits (``sent``) and gets back (``received``).
    Gradient allreduces of hvd.DistributedOptimizer are counted apart, as ``grad.allreduce``."""

    HVD_OPS = ("allreduce", "allreduce_async", "allgather", "allgather_async", "alltoall",
               "alltoall_async", "broadcast", "broadcast_async")

    def __init__(self):
        self.counts = defaultdict(lambda: {"calls": 0, "sent": 0, "received": 0})
        self._pending = {}  # async handle -> kind, for the received bytes on synchronize
        self._saved = []

    def add(self, kind, sent=0, received=0, calls=1):
        entry = self.counts[kind]
        entry["calls"] += calls
        entry["sent"] += sent
        entry["received"] += received

    def reset(self):
        self.counts.clear()

    def install(self):
        import horovod.torch.optimizer as hvd_optimizer
        for op in self.HVD_OPS:
            self._patch(hvd, op, self._wrap(getattr(hvd, op), op))
        self._patch(hvd, "synchronize", self._wrap_synchronize(hvd.synchronize))
        original = hvd_optimizer.allreduce_async_

        def grad_allreduce(tensor, *args, **kwargs):
            n = _nbytes(tensor)
            self.add("grad.allreduce", n, n)
            return original(tensor, *args, **kwargs)
        self._patch(hvd_optimizer, "allreduce_async_", grad_allreduce)
        return self

    def uninstall(self):
        for owner, attr, value in reversed(self._saved):
            setattr(owner, attr, value)
        self._saved.clear()

    def _patch(self, owner, attr, value):
        self._saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    def _wrap(self, fn, op):
        kind = "hvd." + op.replace("_async", "")

        def counted(tensor, *args, **kwargs):
            result = fn(tensor, *args, **kwargs)
            if op.endswith("_async"):
                self.add(kind, _nbytes(tensor))
                self._pending[result] = kind
            else:
                self.add(kind, _nbytes(tensor), _nbytes(result))
            return result
        return counted

    def _wrap_synchronize(self, fn):
        def counted(handle):
            result = fn(handle)
            kind = self._pending.pop(handle, None)
            if kind is not None:
                self.add(kind, calls=0, received=_nbytes(result))
            return result
        return counted

    def wrap_comm(self, comm):
        """A stand-in for an mpi4py communicator that counts its buffer-based calls (blocking or
        not): sums as "mpi.Allreduce", moves as "mpi.Send" (sent) and "mpi.Recv" (received)."""
        counter = self

        class CountingComm:
            def __getattr__(self, attr):
                method = getattr(comm, attr)
                if attr in ("Allreduce", "Iallreduce"):
                    def counted(sendbuf, recvbuf, *args, **kwargs):
                        counter.add("mpi.Allreduce", _nbytes(sendbuf), _nbytes(recvbuf))
                        return method(sendbuf, recvbuf, *args, **kwargs)
                elif attr in ("Send", "Isend"):
                    def counted(buf, *args, **kwargs):
                        counter.add("mpi.Send", sent=_nbytes(buf))
                        return method(buf, *args, **kwargs)
                elif attr in ("Recv", "Irecv"):
                    def counted(buf, *args, **kwargs):
                        counter.add("mpi.Recv", received=_nbytes(buf))
                        return method(buf, *args, **kwargs)
                elif attr == "Sendrecv":
                    def counted(sendbuf, dest, sendtag=0, recvbuf=None, *args, **kwargs):
                        counter.add("mpi.Send", sent=_nbytes(sendbuf))
                        counter.add("mpi.Recv", received=_nbytes(recvbuf))
                        return method(sendbuf, dest, sendtag, recvbuf, *args, **kwargs)
                else:
                    return method
                return counted
        return CountingComm()
