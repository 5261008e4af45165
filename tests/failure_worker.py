"""A small training loop in which one rank misbehaves, run on every rank by mpirun or horovodrun
(test_failures.py):

    HVD_SHUFFLEBN_TIMEOUT=2 mpirun -np 3 python tests/failure_worker.py SCENARIO

The model is Linear -> ShuffleBatchNorm 'first' -> ReLU -> Linear -> ShuffleBatchNorm 'second'
(both of CHANNELS features, so that their exchanges have the same shapes). All ranks train
normally; then the last rank ("the odd rank") does, at step STALL_STEP:

    eval      switches the model to eval mode and trains on (eval layers do not communicate),
              then sleeps after its last step
    skip      calls only the second layer (skips 'first' and the Linear before it)
    stop      leaves its training loop before the step and sleeps (in no Horovod call)
    exit      leaves its training loop before the step and the process ends normally
              (Horovod shuts down at exit)
    backward  runs the forward of the step, then sleeps instead of calling backward
    kill      (at step KILL_STEP) SIGKILLs itself between the forwards of the two layers

Lines for test_failures.py, each written with a single write() so that ranks' lines do not mix
(the launchers may prefix them with the rank; a line may follow another rank's unfinished one):

    SHUFFLEBN_STEP rank=R step=K perm=p0,p1,..     after each forward (the step's permutation)
    SHUFFLEBN_ERROR rank=R step=K waited=S t=T :: MESSAGE
        a ShuffleBatchNormError caught in step K, S seconds after the step began, at time.time()
        T; it is then raised again, so the rank exits non-zero
    SHUFFLEBN_PARK rank=R step=K       the odd rank stops taking part and sleeps
    SHUFFLEBN_EXIT rank=R step=K       the odd rank leaves (scenario exit)
    SHUFFLEBN_KILL rank=R step=K t=T   just before the SIGKILL (T: time.time())
    SHUFFLEBN_DONE rank=R              the loop ended without an error

Settings (environment):
    HVD_SHUFFLEBN_TIMEOUT        the layers' bound (the library reads it)
    SHUFFLEBN_TEST_TIMEOUT_ARG   if set, passed as the layers' timeout= argument instead
    SHUFFLEBN_TEST_TRANSPORT     the layers' transport (default auto)
    SHUFFLEBN_TEST_BORROW        the layers' borrow_from (default "permutation")
    SHUFFLEBN_TEST_LAG           "rank:seconds,..": these ranks reach step STALL_STEP late
    SHUFFLEBN_TEST_WATCHDOG      seconds after which the process ends itself whatever it does
                                 (default 150), so that ranks left behind by a launcher killed
                                 on a test's timeout do not run forever
"""
import os
import signal
import sys
import threading
import time

STALL_STEP = 3
KILL_STEP = 5
STEPS = 8
CHANNELS = 4
SCENARIOS = ("eval", "skip", "stop", "exit", "backward", "kill")


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def start_watchdog():
    seconds = float(os.environ.get("SHUFFLEBN_TEST_WATCHDOG", "150"))

    def expire():
        time.sleep(seconds)
        say(f"SHUFFLEBN_WATCHDOG pid={os.getpid()} after {seconds:g} s")
        os._exit(97)
    threading.Thread(target=expire, daemon=True).start()


def park(rank, step):
    """Stop taking part: sleep outside any Horovod or ShuffleBatchNorm call until the launcher
    ends the job (or the watchdog does)."""
    say(f"SHUFFLEBN_PARK rank={rank} step={step}")
    while True:
        time.sleep(1)


def main(scenario):
    assert scenario in SCENARIOS, scenario
    start_watchdog()
    import torch
    import horovod.torch as hvd
    from hvd_shufflebn import ShuffleBatchNorm, ShuffleBatchNormError

    torch.set_num_threads(1)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    odd = size - 1
    timeout = os.environ.get("SHUFFLEBN_TEST_TIMEOUT_ARG")
    kwargs = dict(transport=os.environ.get("SHUFFLEBN_TEST_TRANSPORT", "auto"),
                  borrow_from=os.environ.get("SHUFFLEBN_TEST_BORROW", "permutation"),
                  timeout=float(timeout) if timeout else None)
    lags = dict(item.split(":") for item in os.environ.get("SHUFFLEBN_TEST_LAG", "").split(",")
                if item)
    lag = float(lags.get(str(rank), 0))

    torch.manual_seed(0)  # the same initial weights on every rank
    lin1, lin2 = torch.nn.Linear(CHANNELS, CHANNELS), torch.nn.Linear(CHANNELS, CHANNELS)
    first = ShuffleBatchNorm(CHANNELS, name="first", **kwargs)
    second = ShuffleBatchNorm(CHANNELS, name="second", **kwargs)
    model = torch.nn.ModuleList([lin1, first, lin2, second])

    def sgd_step():  # plain SGD: torch.optim would import torch._dynamo, seconds per rank
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(p.grad, alpha=0.01)
                    p.grad = None
    say(f"SHUFFLEBN_LAYERS rank={rank} first={first.name} second={second.name} "
        f"timeout={first.timeout:g}")
    hvd.allreduce(torch.zeros(1), name="failure_worker.start")  # every rank is up

    data = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        odd_now = rank == odd and step == (KILL_STEP if scenario == "kill" else STALL_STEP)
        if odd_now and scenario == "stop":
            park(rank, step)
        if odd_now and scenario == "exit":
            say(f"SHUFFLEBN_EXIT rank={rank} step={step}")
            return
        if odd_now and scenario == "eval":
            model.eval()
        if step == STALL_STEP and lag:
            time.sleep(lag)
        x = torch.randn(8, CHANNELS, generator=data)
        began = time.time()
        try:
            h = x if odd_now and scenario == "skip" else torch.relu(first(lin1(x)))
            if odd_now and scenario == "kill":
                say(f"SHUFFLEBN_KILL rank={rank} step={step} t={time.time():.3f}")
                os.kill(os.getpid(), signal.SIGKILL)
            y = second(lin2(h))
            perm = ",".join(map(str, second.last_permutation or [-1]))  # -1: pooled
            say(f"SHUFFLEBN_STEP rank={rank} step={step} perm={perm}")
            if odd_now and scenario == "backward":
                park(rank, step)
            (y * y).mean().backward()
        except ShuffleBatchNormError as error:
            now = time.time()
            say(f"SHUFFLEBN_ERROR rank={rank} step={step} waited={now - began:.3f} t={now:.3f} "
                f":: {error}")
            raise
        sgd_step()
    say(f"SHUFFLEBN_DONE rank={rank}")
    if rank == odd and scenario == "eval":
        park(rank, STEPS)  # leaving would shut Horovod down under the others' feet


if __name__ == "__main__":
    main(sys.argv[1])
