"""Lightning: a ``LayerSync`` plugin, the hook behind ``sync_batchnorm=True``, that swaps every
BatchNorm of the model for ShuffleBatchNorm when training starts and back when it ends.

    from hvd_shufflebn.lightning import ShuffleBatchNormPlugin
    trainer = Trainer(strategy="ddp", plugins=[ShuffleBatchNormPlugin()])

The layers take their statistics over the strategy's torch.distributed process group
(``transport="auto"``); keyword arguments go to every layer (``permutation``, ``groups_per_rank``,
``seed``, ``timeout``, ...).
"""
from .convert import convert_shuffle_batchnorm, revert_shuffle_batchnorm

_bases = []
try:
    from lightning.pytorch.plugins.layer_sync import LayerSync
    _bases.append(LayerSync)
except ImportError:
    pass
try:  # the standalone package has its own LayerSync; Trainer checks for its own class
    from pytorch_lightning.plugins.layer_sync import LayerSync as StandaloneLayerSync
    _bases.append(StandaloneLayerSync)
except ImportError:
    pass
if not _bases:
    raise ImportError("hvd_shufflebn.lightning needs Lightning 2.x: pip install lightning "
                      "(or pytorch-lightning)")


class ShuffleBatchNormPlugin(*_bases):
    """Converts on setup (``apply``) and reverts on teardown (``revert``)."""

    def __init__(self, **layer_kwargs):
        self.layer_kwargs = layer_kwargs

    def apply(self, model):
        return convert_shuffle_batchnorm(model, **self.layer_kwargs)

    def revert(self, model):
        return revert_shuffle_batchnorm(model)
