"""ShuffleBatchNorm, a drop-in torch.nn.BatchNorm*d, and the helpers that swap it in and out."""
import itertools
import warnings
from typing import Optional

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from . import permutation as perms
from .exchange import (TRANSPORTS, ShuffleBatchNormError, make_transport,
                       raise_unless_all_ranks_agree)
from .functional import ShuffleBatchNormFunction, input_error, shape_error

# Collective names must match across ranks: layers are numbered in construction order, which is
# the same on every rank running the same program.
_layer_ids = itertools.count()
_warned_single_rank = set()
_BATCHNORM_FOR_INPUT_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d,
                            5: nn.BatchNorm3d}


class ShuffleBatchNorm(_BatchNorm):
    r"""Batch normalisation with per-channel batch statistics borrowed from another rank.

    In training mode, rank ``r`` of ``process_set`` normalises its own batch with the mean and
    biased variance of rank ``p[r]``'s batch, then applies its own affine weight and bias
    (MoCo's "Shuffling BN"). Gradients flow exactly, including back through the borrowed
    statistics to the rank they came from. Running statistics track the union of all ranks'
    batches, identically on every rank. Eval mode uses them and communicates nothing.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as in torch.nn.BatchNorm2d.
        permutation: ``"derangement"`` (a fresh permutation without fixed points every step),
            ``"random"``, ``"shift"`` (rank r borrows from rank (r + 1) % size), a fixed
            sequence ``p``, or a callable ``(step, size) -> p``.
        process_set: the Horovod process set whose ranks exchange statistics.
        seed: seeds the ``"derangement"`` and ``"random"`` permutations (same on every rank).
        transport: ``"mpi"`` (mpi4py beside Horovod's MPI: microseconds per exchange),
            ``"horovod"`` (Horovod's collectives; any controller, Gloo included) or ``"auto"``
            (MPI when Horovod runs on it, else Horovod). Must be the same on every rank.
        name: a readable suffix for the names of this layer's collectives.

    Shape: input ``(N, C, *)``, output the same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *,
                 permutation: perms.PermutationSpec = "derangement",
                 process_set=hvd.global_process_set, seed: int = 0, transport: str = "auto",
                 name: Optional[str] = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.permutation = perms.check_spec(permutation)
        self.process_set = process_set
        self.seed = int(seed)
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.transport = transport
        layer_id = next(_layer_ids)
        self.name = f"shufflebn.{layer_id}" + (f".{name}" if name else "")
        self.step = 0  # training steps taken; with ``seed``, it decides the permutation
        self.last_permutation = None
        self._batchnorm_class = None  # what convert_shuffle_batchnorm replaced, for revert
        self._input_dim = None
        self._num_features_agreed = False

    def _check_input_dim(self, input):  # for the local paths (eval, a single rank)
        error = shape_error(input, self.num_features)
        if error is not None:
            raise ValueError(f"ShuffleBatchNorm {self.name!r}: {error}")

    def extra_repr(self):
        return (f"{super().extra_repr()}, permutation={self.permutation!r}, "
                f"transport={self.transport!r}, name={self.name!r}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training and self.running_mean is not None:
            # Eval with running statistics: purely local, like torch.nn.BatchNorm.
            self._check_input_dim(input)
            self._input_dim = input.dim()
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        transport = self._get_transport()
        if transport.size == 1:
            return self._single_rank_forward(input)

        update_running = self.training and self.track_running_stats
        factor = 0.0
        if update_running:
            factor = (self.momentum if self.momentum is not None
                      else 1.0 / (float(self.num_batches_tracked) + 1.0))
        if not self._num_features_agreed:
            # Once per layer: the exchanged packets' lengths depend on num_features.
            raise_unless_all_ranks_agree(transport, self.name + ".num_features", "num_features",
                                         self.num_features)
            self._num_features_agreed = True
        try:
            perm, local_error = perms.permutation_for(self.permutation, self.seed, self.step,
                                                      transport.size), None
        except ValueError as error:  # still join the exchange, so every rank can raise it
            perm, local_error = tuple(range(transport.size)), f"invalid permutation: {error}"
        local_error = local_error or input_error(input, self.num_features)
        needs_grad = torch.is_grad_enabled() and input.requires_grad

        output = ShuffleBatchNormFunction.apply(
            input, self.weight, self.bias,
            self.running_mean if update_running else None,
            self.running_var if update_running else None,
            self.num_features, factor, self.eps, perm, local_error, needs_grad, transport,
            self.name)
        if update_running:
            self.num_batches_tracked.add_(1)
        self.step += 1
        self.last_permutation = perm
        self._input_dim = input.dim()
        return output

    def _get_transport(self):
        if not hvd.is_initialized():
            raise ShuffleBatchNormError(
                f"ShuffleBatchNorm {self.name!r}: Horovod is not initialised; call hvd.init() "
                "before the first training forward")
        if self.process_set.process_set_id is None:
            raise ShuffleBatchNormError(
                f"ShuffleBatchNorm {self.name!r}: {self.process_set} is not registered with "
                "Horovod; pass it to hvd.init(process_sets=...) or hvd.add_process_set()")
        if self.process_set.rank() is None or self.process_set.rank() < 0:
            raise ShuffleBatchNormError(
                f"ShuffleBatchNorm {self.name!r}: rank {hvd.rank()} is not in {self.process_set}")
        return make_transport(self.transport, self.process_set)

    def _single_rank_forward(self, input):
        if self.process_set.process_set_id not in _warned_single_rank:
            _warned_single_rank.add(self.process_set.process_set_id)
            warnings.warn("ShuffleBatchNorm: the process set has a single rank, so there is no "
                          "other rank to borrow statistics from; using plain batch norm",
                          stacklevel=3)
        output = super().forward(input)
        self.last_permutation = (0,)
        self._input_dim = input.dim()
        return output

    @classmethod
    def convert_shuffle_batchnorm(cls, module: nn.Module, **layer_kwargs) -> nn.Module:
        """The spelling torch.nn.SyncBatchNorm users know; see :func:`convert_shuffle_batchnorm`."""
        return convert_shuffle_batchnorm(module, **layer_kwargs)


def convert_shuffle_batchnorm(module: nn.Module, **layer_kwargs) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d and SyncBatchNorm in ``module`` by a ShuffleBatchNorm.

    Parameters and buffers are moved over as they are (the same tensors: requires_grad, device,
    dtype and any optimizer's references survive), so ``state_dict()`` keys and values do not
    change. ``layer_kwargs`` go to every new layer (``permutation``, ``process_set``, ``seed``).
    Returns ``module``, or the new layer if ``module`` itself is a batch norm.
    """
    def convert(mod, path):
        if isinstance(mod, _BatchNorm) and not isinstance(mod, ShuffleBatchNorm):
            if any(is_lazy(t) for t in itertools.chain(mod.parameters(), mod.buffers())):
                raise ValueError(f"cannot convert the uninitialised lazy batch norm at "
                                 f"{path or 'the root'}; run one forward pass first")
            new = ShuffleBatchNorm(mod.num_features, mod.eps, mod.momentum, mod.affine,
                                   mod.track_running_stats, name=path or None, **layer_kwargs)
            _move_state(mod, new)
            new._batchnorm_class = type(mod)
            return new
        for child_name, child in mod.named_children():
            mod._modules[child_name] = convert(child, f"{path}.{child_name}" if path else child_name)
        return mod
    return convert(module, "")


def revert_shuffle_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every ShuffleBatchNorm back into the batch norm class it replaced (for a layer built
    directly: BatchNorm1d, 2d or 3d, by the inputs it has seen), keeping its state."""
    if isinstance(module, ShuffleBatchNorm):
        cls = module._batchnorm_class or _BATCHNORM_FOR_INPUT_DIM.get(module._input_dim)
        if cls is None:
            raise ValueError(f"cannot tell which BatchNorm class ShuffleBatchNorm {module.name!r} "
                             "should become: it was built directly and has not seen an input yet")
        new = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats)
        _move_state(module, new)
        return new
    for child_name, child in module.named_children():
        module._modules[child_name] = revert_shuffle_batchnorm(child)
    return module


def _move_state(source: _BatchNorm, target: _BatchNorm) -> None:
    for key in ("weight", "bias"):
        setattr(target, key, getattr(source, key))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        target._buffers[key] = source._buffers.get(key)
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
