"""Shuffling BatchNorm (MoCo, He et al. 2019, section 3.3) across Horovod ranks, exact in backward."""
from .batchnorm import ShuffleBatchNorm
from .convert import ShuffleBatchNormAct, convert_shuffle_batchnorm, revert_shuffle_batchnorm
from .errors import ShuffleBatchNormError

__all__ = ["ShuffleBatchNorm", "ShuffleBatchNormAct", "ShuffleBatchNormError", "convert_shuffle_batchnorm",
           "revert_shuffle_batchnorm"]
__version__ = "0.1.0"
