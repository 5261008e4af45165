"""ShuffleBatchNorm, a drop-in torch.nn.BatchNorm*d, and the helpers that swap it in and out."""
import itertools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import permutation as perms
from . import recompute, routing
from .agreement import Report
from .errors import ShuffleBatchNormError
from .functional import (ShuffleBatchNormFunction, accumulation_dtype, exchange_statistics,
                         input_error, local_statistics, shape_error, update_running_stats)
from .transports import TRANSPORTS, make_transport
from .waits import WaitContext, resolve_timeout

# Collective names must match across ranks: layers are numbered in construction order, which is
# the same on every rank running the same program.
_layer_ids = itertools.count()
_warned_single_rank = set()
STEP_METADATA = "shufflebn_step"  # the step of a layer without num_batches_tracked


class ShuffleBatchNorm(_BatchNorm):
    r"""Batch normalisation with per-channel batch statistics borrowed from another rank (or
    another group of samples).

    In training mode, rank ``r`` normalises its own batch with the mean and biased variance of
    rank ``p[r]``'s batch, then applies its own affine weight and bias (MoCo's "Shuffling BN").
    With ``groups_per_rank=k`` each rank's batch is split into ``k`` contiguous groups and ``p``
    runs over all ``size * k`` groups; with ``k >= 2`` this works in a single process too.
    Gradients flow exactly, including back through the borrowed statistics to the group they came
    from. Running statistics track the union of all ranks' batches, identically on every rank.
    Eval mode uses them and communicates nothing.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as in torch.nn.BatchNorm2d.
        permutation: ``"derangement"`` (a fresh permutation without fixed points every step),
            ``"random"``, ``"shift"`` (group g borrows from group (g + 1) % n), a fixed
            sequence ``p``, or a callable ``(step, n) -> p``; n is the number of groups.
        groups_per_rank: how many contiguous groups each rank's batch is split into.
        process_set: the Horovod process set whose ranks exchange statistics (default: all).
        process_group: the torch.distributed process group (default: the world).
        seed: seeds the ``"derangement"`` and ``"random"`` permutations (same on every rank).
        transport: ``"auto"`` (Horovod when initialised, else torch.distributed when
            initialised, else one process), ``"horovod"``, ``"mpi"`` (mpi4py beside Horovod's
            MPI: microseconds per exchange), ``"torch.distributed"`` or ``"local"``. Must be the
            same on every rank.
        name: a readable suffix for the names of this layer's collectives.
        timeout: seconds to wait for the other ranks before raising (default: the environment
            variable ``HVD_SHUFFLEBN_TIMEOUT``, else 600).

    The permutation of a training forward depends on ``seed`` and ``step``, the number of
    training forwards so far. ``step`` is ``num_batches_tracked`` when the layer tracks running
    statistics, so it travels with ``state_dict()``, Horovod's broadcasts and elastic state;
    otherwise it is kept on the layer and in the state dict's metadata.

    Shape: input ``(N, C, *)``, output the same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 permutation: perms.PermutationSpec = "derangement", groups_per_rank: int = 1,
                 process_set=None, process_group=None, seed: int = 0, transport: str = "auto",
                 name: Optional[str] = None, timeout: Optional[float] = None, device=None,
                 dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.permutation = perms.check_spec(permutation)
        if isinstance(groups_per_rank, bool) or not isinstance(groups_per_rank, int) \
                or groups_per_rank < 1:
            raise ValueError(f"groups_per_rank must be an int >= 1, got {groups_per_rank!r}")
        self.groups_per_rank = groups_per_rank
        self.process_set = process_set
        self.process_group = process_group
        self.seed = int(seed)
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.transport = transport
        self.timeout = resolve_timeout(timeout)
        layer_id = next(_layer_ids)
        self.name = f"shufflebn.{layer_id}" + (f".{name}" if name else "")
        self._untracked_step = 0  # the step of a layer without num_batches_tracked
        self.last_permutation = None
        self._batchnorm_class = None  # what convert_shuffle_batchnorm replaced, for revert
        self._input_dim = None
        self._records = recompute.Records()
        self.register_state_dict_post_hook(_save_untracked_step)

    @property
    def step(self) -> int:
        """Training forwards taken so far; with ``seed``, it decides the permutation."""
        if self.num_batches_tracked is not None:
            # A read per forward (a device copy on GPUs): the counter can change behind the
            # layer's back without any trace (Horovod's in-place broadcasts of elastic state
            # sync do not bump the tensor's version), and a stale step is a wrong permutation.
            return int(self.num_batches_tracked)
        return self._untracked_step

    @step.setter
    def step(self, value: int) -> None:
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.fill_(int(value))
        else:
            self._untracked_step = int(value)

    def _check_input_dim(self, input):  # for the local paths (eval, plain batch norm)
        error = shape_error(input, self.num_features)
        if error is not None:
            raise ValueError(f"ShuffleBatchNorm {self.name!r}: {error}")

    def extra_repr(self):
        groups = f", groups_per_rank={self.groups_per_rank}" if self.groups_per_rank > 1 else ""
        return (f"{super().extra_repr()}, permutation={self.permutation!r}{groups}, "
                f"transport={self.transport!r}, name={self.name!r}")

    # torch.compile compiles the model around the layer, not through it: the layer talks to the
    # other ranks and keeps Python state (records, the step), which a traced graph would freeze.
    @torch.compiler.disable
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training and self.running_mean is not None:
            # Eval with running statistics: purely local, like torch.nn.BatchNorm.
            self._check_input_dim(input)
            self._input_dim = input.dim()
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        transport = make_transport(self.transport, self.name, self.process_set,
                                   self.process_group)
        k = self.groups_per_rank
        if transport.size * k == 1:
            return self._plain_forward(input)
        if recompute.in_backward():
            return self._replay(input, transport)

        step = self.step
        update_running = self.training and self.track_running_stats
        factor = 0.0
        if update_running:
            factor = self.momentum if self.momentum is not None else 1.0 / (step + 1.0)
        context = WaitContext(self.name, step, "forward", self.timeout)
        transport.agree_before_first_exchange(self.name, self.num_features, context)
        try:
            perm, local_error = perms.permutation_for(self.permutation, self.seed, step,
                                                      transport.size * k), None
        except ValueError as error:  # still join the exchange, so every rank can raise it
            perm, local_error = tuple(range(transport.size * k)), f"invalid permutation: {error}"
        local_error = local_error or input_error(input, self.num_features, k)
        needs_grad = torch.is_grad_enabled() and input.requires_grad
        report = Report(self.name, local_error, perm, needs_grad, self.num_features)
        route = routing.route(perm, transport.rank, k)
        if local_error is None:
            sizes = routing.group_sizes(input.size(0), k)
            mean, var, counts = local_statistics(input, self.num_features, sizes)
        else:  # still take part, so that the others learn about the error instead of hanging
            acc = accumulation_dtype(input.dtype) if input.is_floating_point() else torch.float32
            mean = var = torch.zeros(k, self.num_features, device=input.device, dtype=acc)
            sizes, counts = [0] * k, [0] * k
        borrowed_mean, borrowed_var, summed = exchange_statistics(transport, report, route, mean,
                                                                  var, counts, context)
        if update_running:
            update_running_stats(self.running_mean, self.running_var, summed, factor)
        output = ShuffleBatchNormFunction.apply(
            input, self.weight, self.bias, mean, borrowed_mean, borrowed_var, sizes, counts,
            self.eps, route, transport,
            WaitContext(self.name, step, "backward", self.timeout))
        if recompute.may_be_recomputed():
            self._records.add(recompute.Record(step, route, sizes, counts, mean, var,
                                               borrowed_mean, borrowed_var))
        if update_running:
            self.num_batches_tracked.add_(1)
        else:
            self._untracked_step += 1
        self.last_permutation = perm
        self._input_dim = input.dim()
        return output

    def _replay(self, input, transport):
        """The recomputation of a checkpointed forward: the same permutation and borrowed
        statistics as the forward it recomputes, no communication, no change of state."""
        sizes = routing.group_sizes(input.size(0), self.groups_per_rank)
        mean, var, counts = local_statistics(input, self.num_features, sizes)
        record = self._records.take(mean, var, counts)
        if record is None:
            raise ShuffleBatchNormError(
                f"ShuffleBatchNorm {self.name!r}: a forward ran inside a backward pass (the "
                "recomputation of torch.utils.checkpoint) but its input matches none of the last "
                f"{recompute.CAPACITY} forwards of this layer, so it cannot replay the "
                "permutation and statistics of the forward it recomputes. Is the checkpointed "
                "block deterministic (same input, dropout under preserve_rng_state=True)?")
        return ShuffleBatchNormFunction.apply(
            input, self.weight, self.bias, mean, record.borrowed_mean, record.borrowed_var,
            record.sizes, record.counts, self.eps, record.route, transport,
            WaitContext(self.name, record.step, "backward", self.timeout))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        if STEP_METADATA in local_metadata:
            self._untracked_step = int(local_metadata[STEP_METADATA])
        self._records = recompute.Records()

    def __getstate__(self):
        # Process sets and groups are handles on a library's state, not part of the layer's:
        # keep which one it is (pickling, deepcopy), not a copy. Recompute records stay behind.
        state = dict(self.__dict__)
        state["process_set"] = _GroupRef.of_process_set(self.process_set)
        state["process_group"] = _GroupRef.of_process_group(self.process_group)
        state["_records"] = recompute.Records()
        return state

    def __setstate__(self, state):
        state.setdefault("groups_per_rank", 1)
        state.setdefault("process_group", None)
        super().__setstate__(state)
        for key in ("process_set", "process_group"):
            if isinstance(getattr(self, key), _GroupRef):
                setattr(self, key, getattr(self, key).resolve())

    def _plain_forward(self, input):
        """One group in all: nothing to borrow from, so plain batch norm (with a warning)."""
        if self.process_set not in _warned_single_rank:
            _warned_single_rank.add(self.process_set)
            warnings.warn("ShuffleBatchNorm: there is a single rank and groups_per_rank=1, so "
                          "there is no other group to borrow statistics from; using plain batch "
                          "norm (set groups_per_rank >= 2 to shuffle within one process)",
                          stacklevel=3)
        if recompute.in_backward():  # a checkpoint's recomputation: no second update
            self._check_input_dim(input)
            output = F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        else:
            output = super().forward(input)
            if not (self.training and self.track_running_stats):
                self._untracked_step += 1
        self.last_permutation = (0,)
        self._input_dim = input.dim()
        return output

    @classmethod
    def convert_shuffle_batchnorm(cls, module: nn.Module, **layer_kwargs) -> nn.Module:
        """The spelling torch.nn.SyncBatchNorm users know; see :func:`convert_shuffle_batchnorm`."""
        from .convert import convert_shuffle_batchnorm
        return convert_shuffle_batchnorm(module, **layer_kwargs)


def _save_untracked_step(module, state_dict, prefix, local_metadata):
    """Keep the step of a layer without num_batches_tracked in the state dict's metadata: no new
    key, so the state dict still loads strictly into a plain BatchNorm and back."""
    if module.num_batches_tracked is None:
        local_metadata[STEP_METADATA] = module._untracked_step


class _GroupRef:
    """Which Horovod process set or torch.distributed group a layer uses, as it survives
    pickling and deepcopy: None for the default one, else the global ranks in it."""

    def __init__(self, kind: str, ranks: Optional[list]):
        self.kind, self.ranks = kind, ranks

    @classmethod
    def of_process_set(cls, process_set):
        if process_set is None:
            return None
        import horovod.torch as hvd
        default = process_set is hvd.global_process_set
        return cls("horovod", None if default else list(process_set.ranks))

    @classmethod
    def of_process_group(cls, group):
        if group is None:
            return None
        import torch.distributed as dist
        return cls("torch.distributed", sorted(dist.get_process_group_ranks(group)))

    def resolve(self):
        if self.kind == "horovod":
            import horovod.torch as hvd
            if self.ranks is None:
                return hvd.global_process_set
            # A ProcessSet with these ranks; Horovod's id for it if it is registered.
            process_set = hvd.ProcessSet(self.ranks)
            if hvd.is_initialized():
                from horovod.common.process_sets import _basics
                for set_id, ranks in _basics._get_process_set_ids_and_ranks().items():
                    if list(ranks) == self.ranks:
                        process_set.process_set_id = set_id
            return process_set
        import torch.distributed as dist
        for group in dist.distributed_c10d._world.pg_group_ranks:
            if sorted(dist.get_process_group_ranks(group)) == self.ranks:
                return group
        raise ShuffleBatchNormError(f"no torch.distributed process group with ranks {self.ranks} "
                                    "exists in this process; create it before loading the layer")
