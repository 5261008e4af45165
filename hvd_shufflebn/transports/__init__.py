"""Choosing a transport. Horovod and mpi4py are imported only when their transport is used.

    "auto"               Horovod when it is initialised (its MPI through mpi4py when usable), else
                         torch.distributed when a process group is, else one process
    "horovod"            Horovod's collectives (any controller, Gloo and elastic included)
    "mpi"                mpi4py beside Horovod's MPI (microseconds per exchange)
    "torch.distributed"  a torch.distributed process group (torchrun; Gloo or NCCL)
    "local"              one process: groups of one batch lend to each other
"""
import os
import sys

from ..errors import ShuffleBatchNormError

TRANSPORTS = ("auto", "horovod", "mpi", "torch.distributed", "local")

# One transport per (kind, group, rank, size), shared by all layers. Rank and size are part of
# the key: elastic Horovod re-initialises with a new world in the same process.
_transports = {}
# Launchers set these; with more than one process and nothing initialised, "auto" must not
# quietly fall back to one process per rank.
_LAUNCHER_SIZES = ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "WORLD_SIZE", "PMI_SIZE")


def _horovod():
    """horovod.torch, if the program imported and initialised it."""
    hvd = sys.modules.get("horovod.torch")
    return hvd if hvd is not None and hvd.is_initialized() else None


def _import_horovod(layer):
    try:
        import horovod.torch as hvd
    except ImportError as error:
        raise ShuffleBatchNormError(
            f"ShuffleBatchNorm {layer!r}: this transport needs Horovod with PyTorch support "
            f"({error}); install it (HOROVOD_WITH_PYTORCH=1 pip install horovod) or use "
            "transport='torch.distributed' or 'local'") from None
    return hvd


def initialised_library():
    """"horovod" or "torch.distributed", whichever the program initialised (Horovod first), or
    None."""
    if _horovod() is not None:
        return "horovod"
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return "torch.distributed"
    return None


def resolve_with_reason(kind: str, layer: str):
    """What "auto" means here and now, and why, in words."""
    if kind != "auto":
        return kind, "asked for"
    initialised = initialised_library()
    if initialised == "horovod":
        from . import mpi
        if mpi.usable():
            return "mpi", "auto: Horovod runs on MPI (MPI_THREAD_MULTIPLE), mpi4py beside it"
        return "horovod", "auto: Horovod is initialised, not on an MPI that mpi4py can share"
    if initialised == "torch.distributed":
        return "torch.distributed", "auto: torch.distributed is initialised, Horovod is not"
    launched = {name: os.environ[name] for name in _LAUNCHER_SIZES
                if os.environ.get(name, "1").isdigit() and int(os.environ.get(name, "1")) > 1}
    if launched:
        raise ShuffleBatchNormError(
            f"ShuffleBatchNorm {layer!r}: started as one of several processes "
            f"({', '.join(f'{k}={v}' for k, v in launched.items())}) but neither Horovod nor "
            "torch.distributed is initialised: call hvd.init() or "
            "torch.distributed.init_process_group() before the first training forward (or pass "
            "transport='local' to shuffle within each process)")
    return "local", "auto: neither Horovod nor torch.distributed is initialised: one process"


def make_transport(kind: str, layer: str, process_set=None, process_group=None):
    """The transport for ``kind`` (one of TRANSPORTS) and the layer's group; its ``kind`` and
    ``reason`` say what it is and why it was chosen."""
    kind, reason = resolve_with_reason(kind, layer)
    if kind in ("horovod", "mpi"):
        hvd = _import_horovod(layer)
        from . import horovod
        process_set = hvd.global_process_set if process_set is None else process_set
        horovod.check_process_set(process_set, layer)
        key = (kind, process_set.process_set_id, process_set.rank(), process_set.size())
    elif kind == "torch.distributed":
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise ShuffleBatchNormError(
                f"ShuffleBatchNorm {layer!r}: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() before the first training forward")
        key = (kind, id(process_group), dist.get_rank(process_group),
               dist.get_world_size(process_group))
    else:
        key = ("local",)
    if key not in _transports:
        transport = _create(kind, process_set, process_group)
        transport.kind = kind
        _transports[key] = transport
    transport = _transports[key]
    transport.reason = reason
    return transport


def _create(kind, process_set, process_group):
    if kind == "horovod":
        from .horovod import HorovodTransport
        return HorovodTransport(process_set)
    if kind == "mpi":
        from . import mpi
        if not mpi.usable():
            raise ShuffleBatchNormError(
                "transport='mpi' needs Horovod running on MPI (not Gloo) with mpi4py on the same "
                "MPI_COMM_WORLD and MPI_THREAD_MULTIPLE; use transport='horovod' or 'auto'")
        return mpi.MPITransport(process_set)
    if kind == "torch.distributed":
        from .torch_distributed import TorchDistributedTransport
        return TorchDistributedTransport(process_group)
    from .local import LocalTransport
    return LocalTransport()
