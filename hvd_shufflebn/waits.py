"""Every wait of the layer for other ranks is bounded.

A rank that never arrives (one in eval mode while the others train, one that skipped a layer or
runs layers in another order, one that stopped calling) must not leave the others waiting
forever. Past the bound each waiting rank raises ShuffleBatchNormError naming the layer, the
step, what it waited for, the ranks it did not hear from and the likely causes; raising ends
that rank, and the launcher then ends the job.

Which ranks are missing is found out only then, on a side channel that does not depend on the
stuck exchange: the waiting ranks post "I wait in layer L at step k" and read each other's
posts for a short grace period (each transport has its ``stall_board``).
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
    message = describe_timeout(context, transport.rank, transport.size, waiting_for, heard, grace)
    transport.broken = message
    return ShuffleBatchNormError(message)


def describe_timeout(context: WaitContext, rank: int, size: int, waiting_for: str,
                     heard: Optional[Dict[int, tuple]], grace: float) -> str:
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
            lines.append(f"Did not hear from ranks {silent} within {grace:g} s: they are not "
                         "waiting in any ShuffleBatchNorm layer, or began waiting later.")
    lines.append(
        "Likely causes: a rank is in eval mode while the others train (call model.train() on "
        "every rank); a rank skipped this layer or calls layers in a different order; a rank "
        "stopped calling (it crashed, ran out of data early, or waits somewhere else). A rank "
        "that is only slow (first step, compilation) needs a longer bound: "
        f"ShuffleBatchNorm(timeout=...) or ${TIMEOUT_ENV}.")
    return " ".join(lines)

