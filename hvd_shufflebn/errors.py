"""The one exception the layer raises for distributed problems."""


class ShuffleBatchNormError(RuntimeError):
    """Raised on every rank of the process set, with the same message, when any rank's input or
    set-up is bad; and on every rank that waited past its bound for the others."""
