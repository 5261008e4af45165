"""Swapping ShuffleBatchNorm into a model and back out: convert_shuffle_batchnorm and
revert_shuffle_batchnorm."""
import itertools
from typing import Callable, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from .batchnorm import ShuffleBatchNorm

_BATCHNORM_FOR_INPUT_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d,
                            5: nn.BatchNorm3d}
# Batch norms whose forward is plain batch norm, so a ShuffleBatchNorm can stand in for them.
_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# timm's batch norm + activation layers: batch norm, then their `drop` and `act` children. Known by
# name and children, as timm need not be installed (nor importable beside this torch).
_NORM_ACT_NAMES = ("BatchNormAct2d", "SyncBatchNormAct")


class ShuffleBatchNormAct(ShuffleBatchNorm):
    """What convert_shuffle_batchnorm makes of timm's BatchNormAct2d: a ShuffleBatchNorm followed
    by that layer's own ``drop`` and ``act`` modules (the same objects, so the same state)."""

    def forward(self, input):
        return self.act(self.drop(super().forward(input)))


def convert_shuffle_batchnorm(module: nn.Module, *,
                              include: Optional[Callable[[str, nn.Module], bool]] = None,
                              convert_subclasses: bool = False, **layer_kwargs) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d and SyncBatchNorm in ``module`` by a ShuffleBatchNorm.

    Parameters, buffers and child modules are moved over as they are (the same tensors:
    requires_grad, device, dtype and any optimizer's references survive), so ``state_dict()``
    keys and values do not change. ``layer_kwargs`` go to every new layer (``permutation``,
    ``process_set``, ``seed``); a SyncBatchNorm's ``process_group`` goes to its replacement unless
    ``layer_kwargs`` names one.

    timm's BatchNormAct2d (and SyncBatchNormAct) becomes a ShuffleBatchNormAct that still applies
    its ``drop`` and ``act``. Any other subclass of a batch norm may compute something else in its
    own forward, which would be lost: it raises ValueError, unless ``convert_subclasses=True``
    converts it as a plain batch norm. ``include(path, layer) -> bool``, when given, picks the
    batch norms to convert (``path``: the dotted name, as in ``named_modules()``); the others stay.
    Returns ``module``, or the new layer if ``module`` itself is a batch norm.
    """
    def convert_layer(mod, path):
        where = path or "the root"
        if any(is_lazy(t) for t in itertools.chain(mod.parameters(), mod.buffers())):
            raise ValueError(f"cannot convert the uninitialised lazy batch norm at {where}; run "
                             "one forward pass first")
        if _is_norm_act(mod):
            cls = ShuffleBatchNormAct
        elif type(mod) in _PLAIN_BATCHNORMS or convert_subclasses:
            cls = ShuffleBatchNorm
        else:
            name = f"{type(mod).__module__}.{type(mod).__qualname__}"
            raise ValueError(f"cannot convert {name} at {where}: a batch norm subclass whose "
                             "forward may do more than batch norm, which ShuffleBatchNorm would "
                             "drop; pass convert_subclasses=True to convert it as a plain batch "
                             "norm, or leave it out with include=")
        kwargs = dict(layer_kwargs)
        if isinstance(mod, nn.SyncBatchNorm):
            kwargs.setdefault("process_group", mod.process_group)
        new = cls(mod.num_features, mod.eps, mod.momentum, mod.affine, mod.track_running_stats,
                  name=path or None, **kwargs)
        _move_state(mod, new)
        new._batchnorm_class = type(mod)
        return new

    def convert(mod, path):
        if isinstance(mod, _BatchNorm) and not isinstance(mod, ShuffleBatchNorm) \
                and (include is None or include(path, mod)):
            return convert_layer(mod, path)
        for child_name, child in mod.named_children():
            child_path = f"{path}.{child_name}" if path else child_name
            mod._modules[child_name] = convert(child, child_path)
        return mod
    return convert(module, "")


def revert_shuffle_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every ShuffleBatchNorm back into the batch norm class it replaced (for a layer built
    directly: BatchNorm1d, 2d or 3d, by the inputs it has seen), keeping its state and children;
    a SyncBatchNorm gets the layer's ``process_group``."""
    if isinstance(module, ShuffleBatchNorm):
        cls = module._batchnorm_class or _BATCHNORM_FOR_INPUT_DIM.get(module._input_dim)
        if cls is None:
            raise ValueError(f"cannot tell which BatchNorm class ShuffleBatchNorm {module.name!r} "
                             "should become: it was built directly and has not seen an input yet")
        new = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats)
        _move_state(module, new)
        if isinstance(new, nn.SyncBatchNorm):
            new.process_group = module.process_group
        return new
    for child_name, child in module.named_children():
        module._modules[child_name] = revert_shuffle_batchnorm(child)
    return module


def _is_norm_act(mod: _BatchNorm) -> bool:
    return type(mod).__name__ in _NORM_ACT_NAMES and set(mod._modules) == {"drop", "act"}


def _move_state(source: _BatchNorm, target: _BatchNorm) -> None:
    for key in ("weight", "bias"):
        setattr(target, key, getattr(source, key))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        target._buffers[key] = source._buffers.get(key)
    # Children in their order (timm's drop, act): the same objects, the same state_dict keys.
    # Those the target's constructor made for itself (a reverted BatchNormAct2d's) are replaced.
    target._modules.update(source._modules)
    target.train(source.training)
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
