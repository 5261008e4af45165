"""Every wait of the layer for other ranks is bounded.

A rank that never arrives (one in eval mode while the others train, one that skipped a layer or
runs layers in another order, one that stopped calling) must not leave the others waiting
forever. Past the bound each waiting rank raises ShuffleBatchNormError naming the layer, the
step, what it waited for, the ranks it did not hear from and the likely causes; raising ends
that rank, and the launcher then ends the job.

Which ranks are missing is found out only then, on a side channel that does not depend on the
stuck exchange: the waiting ranks post "I wait in layer L at step k" and read each other's
posts for a short grace period (see ``StallBoard`` implementations in exchange.py).
"""
import os
import time
from typing import Callable, Dict, Optional

from .errors import ShuffleBatchNormError

TIMEOUT_ENV = "HVD_SHUFFLEBN_TIMEOUT"
# Long enough for a slow first step (data loading, cuDNN autotuning, torch.compile), like
# torch.distributed's default collective timeout of ten minutes.
DEFAULT_TIMEOUT = 600.0


def resolve_timeout(timeout: Optional[float]) -> float:
    """Seconds a layer waits for the other ranks: ``timeout`` if given, else $HVD_SHUFFLEBN_TIMEOUT,
    else 600."""
    source = "timeout"
    if timeout is None:
        value = os.environ.get(TIMEOUT_ENV)
        if not value:
            return DEFAULT_TIMEOUT
        source, timeout = f"${TIMEOUT_ENV}", value
    try:
        seconds = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a number of seconds, got {timeout!r}") from None
    if not seconds > 0:
        raise ValueError(f"{source} must be a positive number of seconds, got {timeout!r}")
    return seconds


class WaitContext:
    """What a wait is for, to name it when it times out: the layer, its step, the phase."""

    def __init__(self, layer: str, step: int, phase: str, timeout: float):
        self.layer, self.step, self.phase, self.timeout = layer, step, phase, timeout

    def status(self) -> tuple:
        return (self.layer, self.step, self.phase)


def wait_until(done: Callable[[], bool], context: WaitContext, transport, waiting_for: str,
               pause: float = 0.0) -> None:
    """Poll ``done()`` until it is true; past ``context.timeout`` seconds raise the timeout error.

    ``pause`` 0 yields the core between polls (MPI: microseconds matter); otherwise sleep that long
    (Horovod's own wait sleeps 1 ms between polls)."""
    if done():
        return
    deadline = time.monotonic() + context.timeout
    while not done():
        if time.monotonic() > deadline:
            raise timeout_error(context, transport, waiting_for)
        if pause:
            time.sleep(pause)
        else:
            os.sched_yield()


def timeout_error(context: WaitContext, transport, waiting_for: str) -> ShuffleBatchNormError:
    """The error for a wait that ran past its bound. The transport is marked broken: a message
    that arrives late would otherwise be taken for the answer to a later exchange."""
    grace = min(5.0, max(0.5, context.timeout / 4))
    heard: Optional[Dict[int, tuple]] = None
    board = getattr(transport, "stall_board", None)
    if board is not None:
        try:
            heard = board.post_and_read(context.status(), grace, context.timeout + grace)
        except Exception:  # the diagnosis is best effort; the timeout error is what matters
            heard = None
    message = describe_timeout(context, transport.rank, transport.size, waiting_for, heard)
    transport.broken = message
    return ShuffleBatchNormError(message)


def describe_timeout(context: WaitContext, rank: int, size: int, waiting_for: str,
                     heard: Optional[Dict[int, tuple]]) -> str:
    lines = [f"ShuffleBatchNorm {context.layer!r} (process set of {size} ranks), step "
             f"{context.step}, {context.phase}: rank {rank} waited {context.timeout:g} s for "
             f"{waiting_for} and gave up."]
    if heard is None:
        lines.append("Which ranks are missing could not be found out on this launcher.")
    else:
        heard = dict(heard)
        heard[rank] = context.status()
        same = sorted(r for r, s in heard.items() if tuple(s) == context.status())
        elsewhere = [f"rank {r} waits in {s[0]!r} at step {s[1]} ({s[2]})"
                     for r, s in sorted(heard.items()) if tuple(s) != context.status()]
        silent = [r for r in range(size) if r not in heard]
        lines.append(f"Waiting here too: ranks {same}." if len(same) > 1 else
                     "No other rank is waiting here.")
        if elsewhere:
            lines.append("; ".join(elsewhere) + ".")
        if silent:
            lines.append(f"Did not hear from ranks {silent}: they are not waiting in any "
                         "ShuffleBatchNorm layer.")
    lines.append(
        "Likely causes: a rank is in eval mode while the others train (call model.train() on "
        "every rank); a rank skipped this layer or calls layers in a different order; a rank "
        "stopped calling (it crashed, ran out of data early, or waits somewhere else). A rank "
        "that is only slow (first step, compilation) needs a longer bound: "
        f"ShuffleBatchNorm(timeout=...) or ${TIMEOUT_ENV}.")
    return " ".join(lines)


# --- side channels for the diagnosis ----------------------------------------------------------

class MPIStallBoard:
    """Posts on a communicator of its own (so nothing else can match them): each waiting rank
    sends its status to every other rank, then collects what arrives within the grace period."""

    TAG = 4242

    def __init__(self, comm):
        self.comm = comm

    def post_and_read(self, status: tuple, grace: float, max_age: float) -> Dict[int, tuple]:
        from mpi4py import MPI
        me, size = self.comm.Get_rank(), self.comm.Get_size()
        # Small messages leave eagerly; a rank that never receives does not block us.
        for other in range(size):
            if other != me:
                self.comm.isend(status, dest=other, tag=self.TAG)
        heard, probe = {}, MPI.Status()
        deadline = time.monotonic() + grace
        while len(heard) < size - 1 and time.monotonic() < deadline:
            if self.comm.iprobe(source=MPI.ANY_SOURCE, tag=self.TAG, status=probe):
                source = probe.Get_source()
                heard[source] = self.comm.recv(source=source, tag=self.TAG)
            else:
                time.sleep(0.01)
        return heard


class KVStallBoard:
    """Posts in the key-value store of horovodrun's rendezvous server (Gloo runs, elastic ones
    included), which every worker can reach over HTTP whatever state Horovod is in."""

    SCOPE = "hvd_shufflebn_stall"

    def __init__(self, address: str, port: int, set_id: int, rank: int, size: int):
        self.address, self.port = address, port
        self.set_id, self.rank, self.size = set_id, rank, size

    def post_and_read(self, status: tuple, grace: float, max_age: float) -> Dict[int, tuple]:
        from horovod.runner.http.http_client import (put_data_into_kvstore,
                                                      read_data_from_kvstore)
        key = "{}.{}".format
        started = time.time()
        put_data_into_kvstore(self.address, self.port, self.SCOPE, key(self.set_id, self.rank),
                              (tuple(status), started))
        heard = {}
        deadline = time.monotonic() + grace
        while len(heard) < self.size - 1 and time.monotonic() < deadline:
            for other in range(self.size):
                if other == self.rank or other in heard:
                    continue
                try:
                    other_status, posted = read_data_from_kvstore(
                        self.address, self.port, self.SCOPE, key(self.set_id, other))
                except RuntimeError:  # nothing posted yet
                    continue
                if posted > started - max_age:  # not left over from an earlier stall
                    heard[other] = other_status
            time.sleep(0.05)
        return heard
