"""ShuffleBatchNorm, a drop-in torch.nn.BatchNorm*d, and the helpers that swap it in and out."""
import copy
import functools
import itertools
import logging
import os
import sys
import threading
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import agreement, deferred, recompute
from . import permutation as perms
from .errors import ShuffleBatchNormError
from .exchange import RouteBack, borrow_across_ranks, borrow_locally, make_report
from .functional import (Borrowed, ShuffleBatchNormFunction, accumulation_dtype,
                         failed_groups, group_statistics, groups_of, normalise, shape_error,
                         split_groups)
from .plan import POOLED, fingerprint, layer_key, plan_for
from .pooled import SumBack, borrow_pooled
from .transports import TRANSPORTS, make_transport
from .waits import WaitContext, resolve_timeout

# Collective names must match across ranks: layers are numbered in construction order, which is
# the same on every rank running the same program.
_layer_ids = itertools.count()  # layers built without a name
_warned_single_rank = set()
_all_layers = weakref.WeakSet()  # for the one line that says which transport runs
_announced = set()
_copying = threading.local()  # set while __deepcopy__ runs: keep group handles as they are
LOG_ENV = "HVD_SHUFFLEBN_LOG"  # "1": print that line to stderr too, not only log it at INFO
logger = logging.getLogger("hvd_shufflebn")
STEP_METADATA = "shufflebn_step"  # the step of a layer without num_batches_tracked
BORROW_FROM = ("permutation", "others")


def _outside_compiled_graphs(forward):
    """torch.compiler.disable, without importing torch._dynamo (about 2 s) where nothing
    compiles: torch.compile compiles the model around the layer, not through it, since the layer
    talks to the other ranks and keeps Python state (records, the step) that a traced graph
    would freeze. Without torch._dynamo loaded, nothing can be compiling."""
    disabled = []

    @functools.wraps(forward)
    def outside(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return forward(*args, **kwargs)
        if not disabled:
            disabled.append(torch._dynamo.disable(forward))
        return disabled[0](*args, **kwargs)
    return outside


class ShuffleBatchNorm(_BatchNorm):
    r"""Batch normalisation with per-channel batch statistics borrowed from another rank (or
    another group of samples).

    In training mode, rank ``r`` normalises its own batch with the mean and biased variance of
    rank ``p[r]``'s batch, then applies its own affine weight and bias (MoCo's "Shuffling BN");
    with ``borrow_from="others"``, with those of all the other ranks' batches pooled.
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
        borrow_from: ``"permutation"`` (group g normalises with the statistics of the one
            group ``p[g]``) or ``"others"`` (with the pooled statistics of all groups but g:
            leak-free like shuffling, as steady as the global batch; ``permutation`` unused).
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
                 permutation: perms.PermutationSpec = "derangement",
                 borrow_from: str = "permutation", groups_per_rank: int = 1,
                 process_set=None, process_group=None, seed: int = 0, transport: str = "auto",
                 name: Optional[str] = None, timeout: Optional[float] = None, device=None,
                 dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.permutation = permutation
        self.borrow_from = borrow_from
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
        # Collective names must match across ranks: a converted layer is named by its module path;
        # a layer built directly without a name, by its number among those (construction order,
        # the same on every rank running the same program).
        self.name = f"shufflebn.{name}" if name else f"shufflebn.{next(_layer_ids)}"
        self.key = layer_key(self.name, num_features)
        self._untracked_step = 0  # the step of a layer without num_batches_tracked
        self._step_source = self._step_version = self._step_cache = None
        self._transport = None
        self.transport_reason: Optional[str] = None  # why the transport was chosen
        _all_layers.add(self)
        self.last_permutation = None
        self._batchnorm_class = None  # what convert_shuffle_batchnorm replaced, for revert
        self._input_dim = None
        self._records = recompute.Records()
        self._register_state_dict_hook(_after_state_dict)

    @property
    def permutation(self) -> perms.PermutationSpec:
        """The permutation spec: a mode name, a fixed permutation (a tuple) or a callable."""
        return self._permutation

    @permutation.setter
    def permutation(self, spec: perms.PermutationSpec) -> None:
        self._permutation = perms.check_spec(spec)  # sequences become tuples: plans are cached

    @property
    def borrow_from(self) -> str:
        """"permutation" (one lending group, chosen by ``permutation``) or "others" (the pooled
        statistics of all groups but the borrower)."""
        return self._borrow_from

    @borrow_from.setter
    def borrow_from(self, value: str) -> None:
        if value not in BORROW_FROM:
            raise ValueError(f"borrow_from must be one of {BORROW_FROM}, got {value!r}")
        self._borrow_from = value

    @property
    def step(self) -> int:
        """Training forwards taken so far; with ``seed``, it decides the permutation."""
        return self._host_step()

    @step.setter
    def step(self, value: int) -> None:
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.fill_(int(value))
        else:
            self._untracked_step = int(value)

    def _host_step(self) -> int:
        """The step, kept on the host: it is read from ``num_batches_tracked`` (a device read)
        only when someone else may have changed that buffer: it was replaced, written in place
        by an op that bumps its version (load_state_dict, fill_, DDP's buffer broadcast), or
        handed out by ``state_dict()`` (Horovod's broadcast_parameters and elastic state sync
        write into those tensors in place without bumping their version)."""
        counter = self.num_batches_tracked
        if counter is None:
            return self._untracked_step
        if counter is not self._step_source or counter._version != self._step_version:
            # Plain attributes set through __dict__: Module.__setattr__ costs microseconds.
            self.__dict__.update(_step_source=counter, _step_version=counter._version,
                                 _step_cache=int(counter))
        return self._step_cache

    def _advance_step(self, step: int) -> None:
        """One training forward at ``step`` done: the counter on the device and its host copy."""
        counter = self.num_batches_tracked
        if counter is None:
            self._untracked_step += 1
            return
        counter.add_(1)
        self.__dict__.update(_step_cache=step + 1, _step_version=counter._version)

    def _check_input_dim(self, input):  # for the local paths (eval, plain batch norm)
        error = shape_error(input, self.num_features)
        if error is not None:
            raise ValueError(f"ShuffleBatchNorm {self.name!r}: {error}")

    def extra_repr(self):
        groups = f", groups_per_rank={self.groups_per_rank}" if self.groups_per_rank > 1 else ""
        resolved = ""
        if self.transport == "auto" and self.resolved_transport is not None:
            resolved = f" (resolved: {self.resolved_transport!r})"
        borrow = (f"borrow_from={self.borrow_from!r}" if self.borrow_from == "others"
                  else f"permutation={self.permutation!r}")
        return (f"{super().extra_repr()}, {borrow}{groups}, "
                f"transport={self.transport!r}{resolved}, name={self.name!r}")

    @property
    def resolved_transport(self) -> Optional[str]:
        """What ``transport`` resolved to at the last training forward ("mpi", "horovod",
        "torch.distributed", "local"), or None before the first one; ``transport_reason`` says
        why."""
        return None if self._transport is None else self._transport.kind

    def _current_transport(self):
        """The layer's transport, looked up once and kept while it stays valid."""
        transport = self._transport
        if transport is None or not transport.current(self.transport):
            transport = make_transport(self.transport, self.name, self.process_set,
                                       self.process_group)
            self._transport, self.transport_reason = transport, transport.reason
            _announce(self, transport)
        return transport

    @_outside_compiled_graphs
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            # Local, like torch.nn.BatchNorm and SyncBatchNorm in eval: the running statistics,
            # or (track_running_stats=False) the batch's own; nothing travels, the step stays.
            self._check_input_dim(input)
            self._input_dim = input.dim()
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, self.running_mean is None, 0.0, self.eps)
        transport = self._current_transport()
        k = self.groups_per_rank
        if transport.size * k == 1:
            return self._plain_forward(input)
        if recompute.in_backward():
            return self._replay(input, transport)

        step = self._host_step()
        pooled = self.borrow_from == "others"
        plan = POOLED if pooled else plan_for(self.permutation, self.seed, step,
                                              transport.size * k, transport.rank, k)
        groups = groups_of(input.shape, input.dtype, self.num_features, k)
        error = plan.error or groups.error
        if error is not None:  # nothing of this input counts; the forward only reports
            groups = failed_groups(error, k)
        if error is not None and transport.size == 1:
            raise ShuffleBatchNormError(f"ShuffleBatchNorm {self.name!r}: {error}")
        needs_grad = input.requires_grad and torch.is_grad_enabled()
        acc = accumulation_dtype(input.dtype) if input.is_floating_point() else torch.float32
        with torch.no_grad():  # constants to autograd: the Function knows their gradient
            sizes, counts = groups.sizes, groups.counts
            chunks, means, variances = self._statistics(input, acc, error, sizes)
            header = report = context = pool_counts = None
            deferring = transport.size > 1 and transport.defers_checks(input.device)
            if transport.size > 1:
                context = WaitContext(self.name, step, "forward", self.timeout)
                transport.agree_before_first_exchange(
                    self.name, self.num_features, context,
                    (("groups_per_rank", k), ("borrow_from='others'", int(pooled))) if deferring
                    else ())
                header = agreement.header(error is not None, fingerprint(self.key, plan),
                                          needs_grad)
                report = lambda: make_report(self, error, plan, needs_grad)  # noqa: E731
            if deferring and transport.pending.holds(self):  # a step without backward
                transport.check_pending()
            if pooled:
                result, pool_counts = borrow_pooled(transport, self, means, variances, counts,
                                                    header, report, context)
            elif transport.size == 1:
                result = borrow_locally(plan, means, variances)
            elif deferring:
                result = deferred.borrow(transport, self, plan, means, variances, counts,
                                         header, report, context)
            else:
                result = borrow_across_ranks(transport, self, plan, means, variances, counts,
                                             header, report, context)
            if self.track_running_stats:
                self._update_running_stats(input, result, step)
        if error is not None:  # deferred checks only: the step's check raises on every rank
            self._advance_step(step)
            return deferred.PassThrough.apply(input, transport) if needs_grad else input.clone()
        weight, bias = _in_dtype(self.weight, acc), _in_dtype(self.bias, acc)
        if needs_grad:
            borrowed = Borrowed(chunks, groups, means, variances, result.means,
                                result.variances, self.eps,
                                self._route_back(transport, plan, step), pool_counts)
            output = ShuffleBatchNormFunction.apply(input, weight, bias, borrowed)
        else:  # MoCo's key encoder: no autograd Function, nothing kept
            output = normalise(chunks, weight, bias, result.means, result.variances, self.eps)
        call = recompute.checkpoint_call()
        if call is not None:  # a checkpointed block: its recomputation will replay this forward
            self._records.add(call, recompute.Record(step, plan, groups, means, variances,
                                                     result.means, result.variances, pool_counts))
        self._advance_step(step)
        self.__dict__.update(last_permutation=plan.perm, _input_dim=input.dim())
        return output

    def _route_back(self, transport, plan, step):
        """Where the gradient of the borrowed statistics goes in backward: back to the lending
        groups (shuffled), or into one sum over all ranks (pooled)."""
        context = None if transport.size == 1 else WaitContext(self.name, step, "backward",
                                                               self.timeout)
        if plan.perm is None:
            return SumBack(transport, self.name, context)
        return RouteBack(transport, self, plan, context)

    def _statistics(self, input, acc, error, sizes):
        """Per group: the input's views, means and variances."""
        if error is not None:  # still take part, so that the others learn about the error
            k = self.groups_per_rank
            zeros = torch.zeros(2, k, self.num_features, device=input.device, dtype=acc)
            return None, list(zeros[0]), list(zeros[1])
        chunks = split_groups(input, sizes)
        means, variances = group_statistics(chunks, acc)
        return chunks, means, variances

    def _update_running_stats(self, input, result, step):
        """Blend in the mean and unbiased variance of the global batch (identical on every rank)."""
        factor = self.momentum if self.momentum is not None else 1.0 / (step + 1.0)
        if result.global_mean is None:  # one process: the whole batch is the global batch
            torch.batch_norm_update_stats(input, self.running_mean, self.running_var, factor)
            return
        dtype = self.running_mean.dtype
        torch._foreach_lerp_([self.running_mean, self.running_var],
                             [_in_dtype(result.global_mean, dtype),
                              _in_dtype(result.global_var, dtype)], factor)

    def _replay(self, input, transport):
        """The recomputation of a checkpointed forward: the same permutation and borrowed
        statistics as the forward it recomputes, no communication, no change of state."""
        record = self._records.take(recompute.checkpoint_call())
        if record is None:
            transport.check_pending()  # a forward that failed keeps no record: its error first
            raise ShuffleBatchNormError(
                f"ShuffleBatchNorm {self.name!r}: a forward ran inside a backward pass, but not "
                "as the recomputation of a forward of this layer inside torch.utils.checkpoint "
                "(reentrant or not), so there is no forward whose permutation and statistics it "
                "could replay. Run training forwards outside backward hooks, or checkpoint with "
                "torch.utils.checkpoint.")
        acc = accumulation_dtype(input.dtype)
        borrowed = Borrowed(split_groups(input, record.groups.sizes), record.groups,
                            record.own_means, record.own_vars, record.borrowed_means,
                            record.borrowed_vars, self.eps,
                            self._route_back(transport, record.plan, record.step),
                            record.pool_counts)
        return ShuffleBatchNormFunction.apply(input, _in_dtype(self.weight, acc),
                                              _in_dtype(self.bias, acc), borrowed)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        if STEP_METADATA in local_metadata:
            self._untracked_step = int(local_metadata[STEP_METADATA])
        self._records = recompute.Records()

    def __deepcopy__(self, memo):
        """A copy in the same process (MoCo's ``encoder_k = deepcopy(encoder_q)``) shares the
        very process set and group handles: a dedicated group stays that group, even one with
        the same ranks as another."""
        for handle in (self.process_set, self.process_group):
            if handle is not None:
                memo[id(handle)] = handle
        _copying.active = True
        try:
            return copy._reconstruct(self, memo, *self.__reduce_ex__(4))
        finally:
            _copying.active = False

    def __getstate__(self):
        # Process sets and groups are handles on a library's state, not part of the layer's:
        # pickling keeps which one it is (its ranks), not a copy; deepcopy keeps the handle.
        # Recompute records stay behind.
        state = dict(self.__dict__)
        if not getattr(_copying, "active", False):
            state["process_set"] = _GroupRef.of_process_set(self.process_set)
            state["process_group"] = _GroupRef.of_process_group(self.process_group)
        state["_records"] = recompute.Records()
        state["_transport"] = state["_step_source"] = None  # looked up again where it lands
        return state

    def __setstate__(self, state):
        state.setdefault("groups_per_rank", 1)
        state.setdefault("_borrow_from", "permutation")
        if "permutation" in state:  # pickled before the spec became a property
            state["_permutation"] = perms.check_spec(state.pop("permutation"))
        state.setdefault("process_group", None)
        state.setdefault("_transport", None)
        state.setdefault("transport_reason", None)
        state.setdefault("_step_source", None)
        state.setdefault("_step_version", None)
        state.setdefault("_step_cache", None)
        super().__setstate__(state)
        if "key" not in state:
            self.key = layer_key(self.name, self.num_features)
        _all_layers.add(self)
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
                          stacklevel=_user_stacklevel())
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


def _after_state_dict(module, state_dict, prefix, local_metadata):
    """Keep the step of a layer without num_batches_tracked in the state dict's metadata (no new
    key, so the state dict still loads strictly into a plain BatchNorm and back); a counter handed
    out may be written in place without a trace (a broadcast), so the next forward reads it."""
    if module.num_batches_tracked is None:
        local_metadata[STEP_METADATA] = module._untracked_step
    module._step_source = None


def _announce(layer, transport) -> None:
    """Once per transport, on its rank 0: which transport the layers run over, and why (logged
    at INFO; also printed when $HVD_SHUFFLEBN_LOG is 1)."""
    key = (transport.kind, id(transport))
    if key in _announced or transport.rank != 0:
        return
    _announced.add(key)
    same = sum(1 for other in _all_layers if other.transport == layer.transport
               and other.process_set is layer.process_set
               and other.process_group is layer.process_group)
    line = (f"hvd_shufflebn: {same} ShuffleBatchNorm layer(s) with transport={layer.transport!r} "
            f"run over {transport.kind!r} ({transport.reason}), {transport.size} rank(s)")
    logger.info(line)
    if os.environ.get(LOG_ENV) == "1":
        print(line, file=sys.stderr, flush=True)


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside this package and torch: a warning then points
    at the user's line (torch.compiler.disable and Module.__call__ add frames of their own)."""
    here = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith((here, torch_dir)):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _in_dtype(tensor, dtype):
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


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
