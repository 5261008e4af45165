"""The examples run end to end (small settings); their own checks decide pass or fail."""
import re
import subprocess
import sys

import pytest

from launch import ROOT, TIMEOUT, launch_env, run


def assert_lines_whole(stdout, expected_lines):
    """Every line the example printed comes out whole: one rank tag at its start, none inside
    (PYTHONUNBUFFERED=1, as the launches here set it, is what used to cut them)."""
    ours = [line for line in stdout.splitlines()
            if any(word in line for word in ("epoch ", "rank ", "First step"))]
    assert len(ours) >= expected_lines, stdout
    for line in ours:
        assert len(re.findall(r"\[\d+(,\d+)?\]<std(out|err)>:", line)) <= 1, line


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["horovodrun-mpi", "horovodrun-gloo"])
def test_demo_trains_and_shows_the_shuffle(launcher):
    done = run(launcher, 2, ROOT / "examples" / "train_cnn.py", "--epochs", "2",
               "--samples", "512")
    assert done.returncode == 0
    assert "normalised with rank 1's mean" in done.stdout  # 2 ranks: the only derangement
    losses = [float(v) for v in re.findall(r"epoch \d+/2: loss ([0-9.]+)", done.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert_lines_whole(done.stdout, 5)


@pytest.mark.mpi
def test_ddp_example_under_torchrun():
    done = run("torchrun", 2, ROOT / "examples" / "ddp_train.py", "--epochs", "2")
    assert done.returncode == 0
    assert "p = (1, 0)" in done.stdout
    losses = [float(v) for v in re.findall(r"epoch \d+/2: loss ([0-9.]+)", done.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0], losses


@pytest.mark.mpi
@pytest.mark.parametrize("bn", ["shuffle", "plain", "sync"])
def test_moco_quick_loss_falls(bn):
    done = run("horovodrun-mpi", 2, ROOT / "examples" / "moco_digits.py", "--quick", "--bn", bn)
    assert done.returncode == 0  # --quick exits non-zero if the loss did not fall or diverged


@pytest.mark.mpi
def test_sync_batchnorm_example_matches_float64_reference():
    done = run("horovodrun-mpi", 2, ROOT / "examples" / "sync_batchnorm.py")
    assert done.returncode == 0 and "SyncBatchNorm check PASSED" in done.stdout


@pytest.mark.mpi
def test_benchmark_smoke_runs_every_variant():
    """`make bench-smoke`: every benchmark variant once on tiny sizes (no timing is asserted)."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke"],
                          cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    print(done.stdout)
    assert done.returncode == 0 and "wrote " in done.stdout


def test_one_process_example_needs_no_launcher():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "one_process.py"),
                           "--epochs", "2"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    print(done.stdout)
    assert done.returncode == 0
    perm = re.search(r"p = \(([\d, ]+)\)", done.stdout)
    assert perm and all(int(v) != g for g, v in enumerate(perm.group(1).split(",")))
    losses = [float(v) for v in re.findall(r"epoch \d+/2: loss ([0-9.]+)", done.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0], losses
