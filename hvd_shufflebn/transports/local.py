"""One process: every group lends to another group of the same batch; nothing to send."""
from .base import Transport


class LocalTransport(Transport):
    rank, size = 0, 1

    def exchange(self, name, rows, expect, width, device, context, header=None, sums=None,
                 check=None, match=0):
        assert not rows and not expect, "one process has no other rank to exchange with"
        if header is not None:
            check(header)
        return {}, sums

    def current(self, requested):
        if requested == "local":
            return True
        from . import initialised_library  # "auto": Horovod or torch.distributed may be up now
        return initialised_library() is None

    def sum(self, name, totals, context):
        return totals

    def gather_objects(self, name, obj, context):
        return [obj]
