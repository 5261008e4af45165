"""Swapping ShuffleBatchNorm into a model and back out: convert_shuffle_batchnorm and
revert_shuffle_batchnorm."""
import itertools

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from .batchnorm import ShuffleBatchNorm

_BATCHNORM_FOR_INPUT_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d,
                            5: nn.BatchNorm3d}


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
