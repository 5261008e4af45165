"""Elastic Horovod (hvd.elastic.run + TorchState, Gloo) with ShuffleBatchNorm layers, tested the
way Horovod's own elastic integration tests do it (test/integration/elastic_common.py): a
host-discovery script whose output changes on a schedule of training progress, with 'localhost'
and '127.0.0.1' as two hosts of one machine (hence --network-interface lo).

tests/elastic_worker.py checks on every rank at every step that the layers' outputs and
gradients match the float64 reference, that all ranks agree on the permutation and the step, and
that all ranks hold the same state; it writes JSON lines. These tests launch it and read the
lines back: training finished, the world had the scheduled size at every step, every step ran
exactly once on every rank of its world, a joined worker started at the others' step, and the
reference errors are at float64 rounding level.
"""
import json
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from launch import BIN, ROOT, launch_env
from hvd_shufflebn.permutation import permutation_for

WORKER = ROOT / "tests" / "elastic_worker.py"
DISCOVERY = ROOT / "tests" / "elastic_discovery.py"
TIMEOUT = 180  # seconds for one horovodrun; a hang fails the test
# As in elastic_worker.py: (name, permutation, seed); bn2 has track_running_stats=False; bn3
# borrows from all the others (no permutation).
LAYERS = (("bn0", "derangement", 3), ("bn1", "random", 11), ("bn2", "random", 17),
          ("bn3", None, None))
TOLERANCE = 1e-9  # float64


class Run:
    def __init__(self, code, records, report):
        self.code, self.records, self.report = code, records, report


def run_elastic(tmp_path, schedule, np, min_np, max_np, resets, steps=None, **env):
    """horovodrun elastic on Gloo with a discovery script following ``schedule``, allowed
    ``resets`` resets (--reset-limit: one more and horovodrun fails the job). Returns a Run:
    the exit code (None: it hung), the records of every process in time order, and a report
    (horovodrun's output, then the records) that the tests print, so that pytest shows it when
    one fails."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (tmp_path / "schedule.json").write_text(json.dumps(schedule))
    discover = tmp_path / "discover.sh"  # horovodrun runs it through the shell, about once a second
    discover.write_text(f"#!/bin/sh\nexec '{sys.executable}' '{DISCOVERY}' "
                        f"'{tmp_path / 'schedule.json'}' '{log_dir / 'progress'}'\n")
    discover.chmod(0o755)
    command = [str(BIN / "horovodrun"), "-np", str(np), "--min-np", str(min_np),
               "--max-np", str(max_np), "--host-discovery-script", str(discover),
               "--network-interface", "lo", "--elastic-timeout", "60",
               "--reset-limit", str(resets),
               sys.executable, str(WORKER)]
    env = launch_env(SHUFFLEBN_ELASTIC_LOG=str(log_dir),
                     SHUFFLEBN_ELASTIC_SCHEDULE=str(tmp_path / "schedule.json"),
                     # the layer's own bound on a wait: a hang fails fast and says where
                     HVD_SHUFFLEBN_TIMEOUT="60",
                     # the order in which horovodrun assigns ranks to hosts found together
                     # iterates a set of host names: fixed here, so that every run is the same
                     PYTHONHASHSEED="0",
                     **({"SHUFFLEBN_ELASTIC_STEPS": str(steps)} if steps else {}), **env)
    started, started_wall = time.monotonic(), time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
        output, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout
        code = None
    records = []
    for path in sorted(log_dir.glob("worker-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    records.sort(key=lambda r: r["time"])
    timing = (f"; first record after {records[0]['time'] - started_wall:.1f} s, last "
              f"{time.time() - records[-1]['time']:.1f} s before the end" if records else "")
    report = "\n".join([" ".join(command), output or "",
                        f"horovodrun: exit {code} after {time.monotonic() - started:.1f} s"
                        f"{timing}; records:", *map(json.dumps, records)])
    return Run(code, records, report)


def check_run(run):
    print(run.report)  # pytest shows it if the test fails
    assert run.code is not None, f"horovodrun hung for {TIMEOUT} s"
    assert run.code == 0, f"horovodrun failed (exit {run.code})"
    return run.records


def check_training(records, sizes, resets):
    """What every training run must show; ``sizes[step]`` is the scheduled world size and
    ``resets`` the number of resets expected. Returns the step records by step."""
    problems = [r for r in records if r["event"] == "step" and r["problems"]]
    assert not problems, f"a rank's own checks failed: {problems[0]}"
    by_step = defaultdict(list)
    for r in records:
        if r["event"] == "step":
            by_step[r["step"]].append(r)
    assert sorted(by_step) == list(range(len(sizes))), f"steps run: {sorted(by_step)}"
    for step, size in enumerate(sizes):
        rs = by_step[step]
        # Exactly once on every rank of a world of the scheduled size, all in one rendezvous.
        assert sorted(r["rank"] for r in rs) == list(range(size)), (step, rs)
        assert {r["size"] for r in rs} == {size}, (step, rs)
        assert len({r["rendezvous"] for r in rs}) == 1, (step, rs)
        # All ranks agree on every layer's permutation, the one the seed and step give at this
        # size, and on every layer's step (num_batches_tracked; bn2's own), the training step.
        for i, (name, mode, seed) in enumerate(LAYERS):
            expected = [] if mode is None else list(permutation_for(mode, seed, step, size))
            assert all(r["perms"][i] == expected for r in rs), (step, name, rs)
        assert all(r["bn_steps"] == [step] * len(LAYERS) for r in rs), (step, rs)
        # TOLERANCE; for the pooled layer more where its data is ill-conditioned
        # (elastic_worker.py), never loose enough to pass a wrong gradient (errors of O(1)).
        for r in rs:
            for key, error in r["errors"].items():
                tolerance = r["tolerances"][key.split(".")[0]]
                assert error <= tolerance <= (1e-4 if key.startswith("bn3.") else TOLERANCE), \
                    f"step {step}: {key} error {error}, tolerance {tolerance}"
    # The check means something: the "random" layers' permutations change at every size.
    for size in set(sizes):
        for i in (1, 2):
            seen = {tuple(by_step[s][0]["perms"][i]) for s in range(len(sizes))
                    if sizes[s] == size}
            assert len(seen) > 1, f"{LAYERS[i][0]}: one permutation at size {size}: {seen}"
    # Training finished on every rank of the last world.
    done = [r for r in records if r["event"] == "done"]
    assert sorted(r["rank"] for r in done) == list(range(sizes[-1])), done
    assert all(r["step"] == len(sizes) and r["size"] == sizes[-1] for r in done), done
    # The training function ran once, then once again after each reset, and no more often.
    assert all(r["rendezvous"] == resets + 1 for r in done), done
    return by_step


def processes(records):
    by_pid = defaultdict(list)
    for r in records:
        by_pid[r["pid"]].append(r)
    return by_pid


# Grow and shrink in one run, as Horovod's test_hosts_added_and_removed does: 2 ranks on
# 'localhost' for steps 0-3; '127.0.0.1' joins with one slot at step 4 (3 ranks); at step 8
# 'localhost' drops a slot (2 ranks: the worker on 127.0.0.1 goes from rank 2 to rank 1).
GROW_SHRINK = [[0, ["localhost:2"]], [4, ["localhost:2", "127.0.0.1:1"]],
               [8, ["localhost:1", "127.0.0.1:1"]]]
GROW_SHRINK_SIZES = [2] * 4 + [3] * 4 + [2] * 4


@pytest.fixture(scope="module")
def grow_shrink(tmp_path_factory):
    return run_elastic(tmp_path_factory.mktemp("grow_shrink"), GROW_SHRINK, np=2, min_np=2,
                       max_np=3, resets=2, steps=len(GROW_SHRINK_SIZES))


@pytest.mark.mpi
def test_world_grows_and_a_new_worker_joins_with_the_synced_step(grow_shrink):
    records = check_run(grow_shrink)
    by_step = check_training(records, GROW_SHRINK_SIZES, resets=2)
    # The worker that joined at step 4 started from scratch (step 0, its own random weights)
    # and trained its first step with the step and state the others had.
    joined = [rs for rs in processes(records).values() if rs[0]["host"] == "127.0.0.1"]
    assert len(joined) == 1, joined
    joined = joined[0]
    start, = [r for r in joined if r["event"] == "start"]
    assert start["bn_steps"] == [0] * len(LAYERS), start
    first_train = next(r for r in joined if r["event"] == "train")
    assert first_train["step"] == 4 and first_train["bn_steps"] == [4] * len(LAYERS), first_train
    first_step = next(r for r in joined if r["event"] == "step")
    assert (first_step["step"], first_step["rank"], first_step["size"]) == (4, 2, 3), first_step
    others = [r for r in by_step[4] if r["pid"] != first_step["pid"]]
    assert all(r["bn_steps"] == first_step["bn_steps"] and r["perms"] == first_step["perms"]
               for r in others), by_step[4]


@pytest.mark.mpi
def test_world_shrinks_when_discovery_drops_a_slot(grow_shrink):
    records = check_run(grow_shrink)
    check_training(records, GROW_SHRINK_SIZES, resets=2)
    by_pid = processes(records)
    # localhost's second slot was dropped after step 7; its worker ran no step after that.
    dropped, = [rs for rs in by_pid.values() if (rs[0]["host"], rs[0]["slot"]) == ("localhost", 1)]
    assert max(r["step"] for r in dropped if r["event"] == "step") == 7
    # The worker on 127.0.0.1 went on in the same process with a new rank (2 of 3 -> 1 of 2):
    # the layers talk to the new world, not through a transport of the old one.
    moved, = [rs for rs in by_pid.values() if rs[0]["host"] == "127.0.0.1"]
    ranks = {(r["step"], r["rank"], r["size"]) for r in moved if r["event"] == "step"}
    assert (7, 2, 3) in ranks and (8, 1, 2) in ranks, sorted(ranks)


# A worker fails while the others wait for it inside a ShuffleBatchNorm exchange: 3 ranks
# ('localhost' with 2 slots, '127.0.0.1' with 1); the worker on 127.0.0.1 exits with code 1 in
# step 4; Horovod blacklists its host and the job goes on at 2 ranks from the last commit.
#   backward/raise: it raises when the second layer's output gradient is ready, so the others
#     wait in that layer's backward exchange; its clean Horovod shutdown ends their wait at once.
#     The survivors' forwards of step 4 had already counted: the restore rolls every layer back
#     to step 4, the untracked one (bn2, left "bare") through the state dict's metadata.
#   forward/kill: os._exit(1) (a crash: no shutdown) after the first layer's exchange, so the
#     others wait in the second layer's forward exchange. Gloo notices a vanished peer only on
#     the ranks connected to it; the others wait out HOROVOD_GLOO_TIMEOUT_SECONDS (30 s by
#     default, 10 s here), as a plain Horovod allreduce does.
FAILURE_SIZES = [3] * 4 + [2] * 4


@pytest.mark.mpi
@pytest.mark.parametrize("where,mode,untracked", [("backward", "raise", "bare"),
                                                  ("forward", "kill", "kept")])
def test_job_survives_a_worker_that_exits_with_an_error(tmp_path, where, mode, untracked):
    exit_spec = dict(host="127.0.0.1", slot=0, step=4, where=where, mode=mode)
    # Not lower: the same bound applies to the rendezvous of workers that start together.
    gloo_timeout = {"HOROVOD_GLOO_TIMEOUT_SECONDS": "10"} if mode == "kill" else {}
    records = check_run(run_elastic(
        tmp_path, [[0, ["localhost:2", "127.0.0.1:1"]]], np=3, min_np=2, max_np=3, resets=1,
        steps=len(FAILURE_SIZES), SHUFFLEBN_ELASTIC_EXIT=json.dumps(exit_spec),
        SHUFFLEBN_ELASTIC_UNTRACKED=untracked, **gloo_timeout))
    check_training(records, FAILURE_SIZES, resets=1)
    by_pid = processes(records)
    failed, = [rs for rs in by_pid.values() if rs[0]["host"] == "127.0.0.1"]
    assert failed[-1]["event"] == "exit" and failed[-1]["step"] == 4, failed[-1]
    # Each survivor got Horovod's HorovodInternalError out of the layer's exchange (not a
    # ShuffleBatchNormError, not a timeout), which is what hvd.elastic.run recovers from.
    survivors = [rs for rs in by_pid.values() if rs[0]["host"] == "localhost"]
    assert len(survivors) == 2
    layer = {"backward": "hvd_shufflebn/functional.py:backward",
             "forward": "hvd_shufflebn/batchnorm.py:forward"}[where]
    for rs in survivors:
        errors = [r for r in rs if r["event"] == "horovod_internal_error"]
        assert len(errors) == 1 and errors[0]["step"] == 4, errors
        frames = errors[0]["frames"]
        in_layer = layer in frames and "transports/horovod.py:_wait" in frames
        # On a loaded machine the failing rank's shutdown can reach a survivor between two
        # layers' backward exchanges, as it submits the previous layer's gradients: then the
        # same error of the same step comes out of DistributedOptimizer's hook instead.
        in_gradient_hook = where == "backward" and "torch/optimizer.py:hook" in frames
        assert in_layer or in_gradient_hook, frames
        retrain = next(r for r in rs if r["event"] == "train" and r["time"] > errors[0]["time"])
        assert (retrain["step"], retrain["size"], retrain["bn_steps"]) == (4, 2, [4] * len(LAYERS)), \
            retrain


@pytest.mark.mpi
def test_process_sets_under_elastic_raise_a_clear_error(tmp_path):
    """Horovod registers the set (dynamic process sets on); the layer still refuses it, on every
    rank, with the same message, and changes nothing."""
    records = check_run(run_elastic(tmp_path, [[0, ["localhost:2"]]], np=2, min_np=2, max_np=2,
                                    resets=0, SHUFFLEBN_ELASTIC_MODE="process_set",
                                    HOROVOD_DYNAMIC_PROCESS_SETS="1"))
    checks = [r for r in records if r["event"] == "process_set"]
    assert sorted(r["rank"] for r in checks) == [0, 1], checks
    for r in checks:
        assert r["horovod_said"].startswith("registered as id"), r
        assert r["raised"] is not None and "process sets are not supported under elastic " \
            "Horovod" in r["raised"] and "use the global process set" in r["raised"], r
        assert r["step"] == 0 and r["running_mean"] == [0.0, 0.0], r
    assert len({r["raised"] for r in checks}) == 1, checks
