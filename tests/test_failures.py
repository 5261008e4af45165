"""No endless wait, and deaths end the job (failure_worker.py runs the misbehaving training loop).

(A) When ranks disagree on train/eval, one skips a layer, or one stops calling (before a forward
    or before a backward), every waiting rank raises ShuffleBatchNormError after the bound,
    naming the layer, the step, the phase, the ranks it did not hear from and the likely causes;
    the launcher then ends the job. Short bound, 3 ranks (the smallest world in which a rank can
    tell "waiting here too" from "did not hear from"), both transports, mpirun, horovodrun --gloo
    and horovodrun --mpi. Each scenario runs once under each transport, the launchers spread
    over them (one launch costs 5-25 s on 2 cores, mostly startup).
(B) A rank SIGKILLed in the middle of a step ends the whole job with a non-zero exit within 30 s,
    under mpirun, horovodrun --gloo and horovodrun --mpi; the layers' own bound is 600 s there,
    so it is the death that ends the job, not the bound.

Every launch runs under a subprocess timeout (launch.run), so a hang fails the test instead of
the run.
"""
import re
import time
from typing import Dict, NamedTuple

import pytest

from failure_worker import KILL_STEP, STALL_STEP
from launch import ROOT, run

WORKER = ROOT / "tests" / "failure_worker.py"
BOUND = 2.0                            # seconds: the layers' timeout in (A)
GRACE = min(5.0, max(0.5, BOUND / 4))  # how long waits.timeout_error listens for the others
LAUNCH_LIMIT = 60                      # seconds per launch (startup is most of it; slow when busy)
WATCHDOG = LAUNCH_LIMIT + 30           # the worker's own end, for ranks a killed launcher left
FIRST, SECOND = "shufflebn.first", "shufflebn.second"
ODD = 2                                # the misbehaving rank (the last of 3)
CAUSES = ("Likely causes: a rank is in eval mode while the others train",
          "a rank skipped this layer or calls layers in a different order",
          "a rank stopped calling")

ERROR_LINE = re.compile(r"SHUFFLEBN_ERROR rank=(\d+) step=(\d+) waited=([\d.]+) t=([\d.]+) :: (.*)")
STEP_LINE = re.compile(r"SHUFFLEBN_STEP rank=(\d+) step=(\d+) perm=([\d,]+)")
KILL_LINE = re.compile(r"SHUFFLEBN_KILL rank=(\d+) step=(\d+) t=([\d.]+)")


class Caught(NamedTuple):
    step: int
    waited: float   # seconds from the start of the step to the error
    at: float       # time.time() of the error
    message: str


class Launch(NamedTuple):
    returncode: int
    output: str
    began: float
    ended: float
    errors: Dict[int, Caught]

    def perm(self, step):
        """The permutation of ``step`` (as rank 0 printed it)."""
        for rank, at, perm in STEP_LINE.findall(self.output):
            if int(rank) == 0 and int(at) == step:
                return tuple(int(p) for p in perm.split(","))
        raise AssertionError(f"no permutation for step {step} in the output")


def launch(launcher, transport, scenario, ranks=3, bound_by="env", bound=BOUND, **extra):
    """Run the worker; the bound comes from $HVD_SHUFFLEBN_TIMEOUT or (bound_by="arg") from the
    layers' timeout= argument, with the environment variable then set to 600 to show it loses."""
    env = dict(SHUFFLEBN_TEST_TRANSPORT=transport, SHUFFLEBN_TEST_WATCHDOG=str(WATCHDOG))
    if bound_by == "env":
        env["HVD_SHUFFLEBN_TIMEOUT"] = f"{bound:g}"
    else:
        env.update(HVD_SHUFFLEBN_TIMEOUT="600", SHUFFLEBN_TEST_TIMEOUT_ARG=f"{bound:g}")
    env.update(extra)
    began = time.time()
    done = run(launcher, ranks, WORKER, scenario, timeout=LAUNCH_LIMIT, **env)
    ended = time.time()
    errors = {}
    for rank, step, waited, at, message in ERROR_LINE.findall(done.stdout):
        assert int(rank) not in errors, f"rank {rank} reported two errors"
        errors[int(rank)] = Caught(int(step), float(waited), float(at), message)
    return Launch(done.returncode, done.stdout, began, ended, errors)


def check_timed_out(result, expected, step=STALL_STEP, silent=(ODD,)):
    """``expected``: rank -> (layer, phase, what it waited for, [other text the message must
    contain]); exactly these ranks must have raised, each after the bound."""
    assert result.returncode != 0, "the job ended with exit code 0"
    assert sorted(result.errors) == sorted(expected), (
        f"ShuffleBatchNormError from ranks {sorted(result.errors)}, expected from every waiting "
        f"rank {sorted(expected)}")
    for rank, (layer, phase, waiting_for, more) in expected.items():
        caught = result.errors[rank]
        assert caught.step == step
        assert caught.message.startswith(
            f"ShuffleBatchNorm '{layer}' (process set of 3 ranks), step {step}, {phase}: rank "
            f"{rank} waited {BOUND:g} s for {waiting_for} and gave up."), caught.message
        if silent:
            assert (f"Did not hear from ranks {list(silent)} within {GRACE:g} s: they are not "
                    "waiting in any ShuffleBatchNorm layer, or began waiting later."
                    ) in caught.message, caught.message
        else:
            assert "Did not hear from" not in caught.message, caught.message
        for text in (*more, *CAUSES):
            assert text in caught.message, f"rank {rank}: {text!r} not in {caught.message!r}"
        # Not before the bound; then the diagnosis' grace period, twice at most (a rank stays
        # until the last rank it heard from has listened too), and some scheduling.
        assert BOUND <= caught.waited < BOUND + 2 * GRACE + 2.0, f"rank {rank}: {caught}"
    check_ended_soon(result)


def check_ended_soon(result):
    """The launcher ended the job soon after the first error. Measured from the start of the
    stalled step: the startup before it (imports, mostly) takes from 3 s to over 30 s on a busy
    2-core machine, and the subprocess timeout bounds it anyway."""
    stalled_at = min(c.at - c.waited for c in result.errors.values())
    print(f"TIMING launch {result.ended - result.began:.1f} s, from the stall to the end "
          f"{result.ended - stalled_at:.1f} s")
    assert result.ended - stalled_at < BOUND + 20, (
        f"the job ended {result.ended - stalled_at:.1f} s after the stall began")


# --- (A) no endless wait -----------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("launcher,transport,bound_by", [
    ("horovodrun-mpi", "auto", "env"),  # auto is the MPI transport here
    ("horovodrun-gloo", "horovod", "arg"),
])
def test_rank_in_eval_mode(launcher, transport, bound_by):
    """The odd rank switches to eval mode at step 3 and trains on (then sleeps): the others wait
    in the first layer's forward of step 3 and do not hear from it."""
    result = launch(launcher, transport, "eval", bound_by=bound_by)
    check_timed_out(result, {r: (FIRST, "forward", "the sum over all ranks",
                                 ["Waiting here too: ranks [0, 1]."]) for r in (0, 1)})
    assert "SHUFFLEBN_DONE rank=2" in result.output  # it did run on, in eval mode


@pytest.mark.mpi
@pytest.mark.parametrize("launcher,transport", [
    ("mpirun", "mpi"),
    ("mpirun", "horovod"),
])
def test_rank_stops_calling(launcher, transport):
    """The odd rank leaves its loop before step 3 and sleeps outside Horovod: the launcher must
    end it once the others have raised."""
    result = launch(launcher, transport, "stop")
    check_timed_out(result, {r: (FIRST, "forward", "the sum over all ranks",
                                 ["Waiting here too: ranks [0, 1]."]) for r in (0, 1)})
    assert "SHUFFLEBN_PARK rank=2 step=3" in result.output


@pytest.mark.mpi
@pytest.mark.parametrize("launcher,transport", [
    ("mpirun", "mpi"),
    ("horovodrun-gloo", "horovod"),
])
def test_rank_never_calls_backward(launcher, transport):
    """The odd rank runs the forward of step 3, then sleeps: the others wait in a backward
    exchange, for the gradient of the statistics they lent.

    Horovod's alltoall needs every rank, so both wait in the second layer (the first backward).
    With MPI, the packets are point to point and small ones leave eagerly: only the rank that
    receives from the odd rank (r = p[2]) is stuck in the second layer; the other gets its
    packet, goes on to the first layer's backward and waits there for the stuck one."""
    result = launch(launcher, transport, "backward")
    perm = result.perm(STALL_STEP)
    lender = {r: perm.index(r) for r in range(3)}  # the rank whose gradient r receives
    if transport == "horovod":
        expected = {r: (SECOND, "backward", f"the rows of rank {lender[r]}",
                        ["Waiting here too: ranks [0, 1]."]) for r in (0, 1)}
    else:
        stuck = perm[ODD]
        other = 1 - stuck
        assert lender[stuck] == ODD and lender[other] == stuck
        expected = {
            stuck: (SECOND, "backward", f"the rows of rank {ODD}",
                    ["No other rank is waiting here.",
                     f"rank {other} waits in '{FIRST}' at step {STALL_STEP} (backward)."]),
            other: (FIRST, "backward", f"the rows of rank {stuck}",
                    ["No other rank is waiting here.",
                     f"rank {stuck} waits in '{SECOND}' at step {STALL_STEP} (backward)."])}
    check_timed_out(result, expected)


@pytest.mark.mpi
def test_rank_never_calls_backward_when_borrowing_from_all_the_others():
    """borrow_from="others": the backward is one sum over all ranks, so both other ranks wait in
    the second layer's backward, for that sum, and raise after the bound."""
    result = launch("mpirun", "mpi", "backward", SHUFFLEBN_TEST_BORROW="others")
    check_timed_out(result, {r: (SECOND, "backward", "the sum over all ranks",
                                 ["Waiting here too: ranks [0, 1]."]) for r in (0, 1)})


@pytest.mark.mpi
def test_rank_skips_a_layer_horovod_transport():
    """The odd rank calls only the second layer at step 3. Horovod matches collectives by name:
    all three wait, past the bound, and each names where the others wait."""
    result = launch("horovodrun-gloo", "horovod", "skip")
    where = f"at step {STALL_STEP} (forward)"
    check_timed_out(result, {
        0: (FIRST, "forward", "the sum over all ranks",
            ["Waiting here too: ranks [0, 1].", f"rank 2 waits in '{SECOND}' {where}."]),
        1: (FIRST, "forward", "the sum over all ranks",
            ["Waiting here too: ranks [0, 1].", f"rank 2 waits in '{SECOND}' {where}."]),
        2: (SECOND, "forward", "the sum over all ranks",
            ["No other rank is waiting here.",
             f"rank 0 waits in '{FIRST}' {where}; rank 1 waits in '{FIRST}' {where}."]),
    }, silent=())


@pytest.mark.mpi
def test_rank_skips_a_layer_mpi_transport():
    """The same with the MPI transport, which matches messages by order: the odd rank's sum for
    the second layer meets the others' for the first (same shapes), the header's fingerprints
    differ, and every rank raises at once that the ranks are in different layers."""
    result = launch("mpirun", "mpi", "skip")
    assert result.returncode != 0
    assert sorted(result.errors) == [0, 1, 2]
    for rank, caught in result.errors.items():
        assert caught.step == STALL_STEP
        assert caught.message.startswith(
            f"ShuffleBatchNorm: ranks are in different layers: rank 0 in '{FIRST}', rank 1 in "
            f"'{FIRST}', rank 2 in '{SECOND}'. Likely causes: "), caught.message
        assert "a layer built on some ranks only" in caught.message
        assert caught.waited < BOUND, "found out at once, not by the bound"
    check_ended_soon(result)


@pytest.mark.mpi
def test_late_waiter_still_raises_under_mpi():
    """Without lingering: rank 1 reaches the stall 0.25 s after rank 0 (less than the 0.5 s the
    diagnosis listens), so it has timed out and is finding out who is missing when rank 0,
    done, raises and exits. Both are waiting ranks: both must raise ShuffleBatchNormError."""
    result = launch("mpirun", "mpi", "stop", SHUFFLEBN_TEST_LAG="1:0.25")
    assert result.returncode != 0
    assert "Segmentation fault" not in result.output
    assert "after MPI_FINALIZE" not in result.output
    assert sorted(result.errors) == [0, 1]
    assert "Waiting here too: ranks [0, 1]." in result.errors[1].message


# --- (B) deaths end the job --------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun-gloo", "horovodrun-mpi"])
def test_killed_rank_ends_the_job(launcher):
    """Rank 1 of 2 SIGKILLs itself between the two layers' forwards of step 5; rank 0 then waits
    in the second layer, with a bound of 600 s: the launcher (or Horovod, seeing the peer gone)
    must end the job, with a non-zero exit, within 30 s of the kill. Transport auto: MPI under
    the MPI launchers, Horovod's collectives under Gloo."""
    result = launch(launcher, "auto", "kill", ranks=2, bound=600)
    kills = KILL_LINE.findall(result.output)
    assert [(int(r), int(s)) for r, s, _ in kills] == [(1, KILL_STEP)], kills
    killed_at = float(kills[0][2])
    print(f"TIMING launch {result.ended - result.began:.1f} s, from the kill to the end "
          f"{result.ended - killed_at:.1f} s")
    assert result.returncode != 0, "the job ended with exit code 0"
    assert result.ended - killed_at < 30, (
        f"the job ended {result.ended - killed_at:.1f} s after the kill")
    assert "SHUFFLEBN_DONE" not in result.output
    assert not result.errors, "the survivor timed out instead of being ended"
    # The launcher saw the death: the killed rank's signal or exit status.
    assert ("signal 9" in result.output if launcher != "horovodrun-gloo"
            else "Process 1 exit with status code 137" in result.output), result.output[-2000:]
