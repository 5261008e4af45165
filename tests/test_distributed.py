"""The distributed checks of dist_worker.py at several world sizes, with both Horovod controllers,
all three multi-process transports (under mpirun, "auto" is the MPI transport; under Horovod's
Gloo, the Horovod one; under torchrun, torch.distributed on Gloo)."""
import json
import re

import pytest

from dist_worker import CASES, IMMEDIATE_ERRORS
from launch import ROOT, run

WORKER = ROOT / "tests" / "dist_worker.py"


@pytest.mark.mpi
@pytest.mark.parametrize("launcher,ranks,transport", [
    ("mpirun", 2, "auto,horovod"), ("mpirun", 3, "auto"), ("mpirun", 4, "auto,horovod"),
    ("mpirun", 8, "auto"),
    ("horovodrun-gloo", 3, "auto"), ("horovodrun-mpi", 2, "mpi"),
    ("torchrun", 2, "auto"), ("torchrun", 3, "torch.distributed-deferred"),
    ("torchrun", 4, "auto"),
])
def test_layer_matches_float64_reference(launcher, ranks, transport, tmp_path):
    """"-deferred": the agreement check of CUDA tensors under NCCL (deferred.py), forced on Gloo:
    every case whose errors do not come out of the forward that failed, and the deferred one."""
    env = {}
    if transport.endswith("-deferred"):
        transport, env = transport[:-len("-deferred")], {"HVD_SHUFFLEBN_DEFER_CHECKS": "1"}
        expected = sorted(set(CASES) - set(IMMEDIATE_ERRORS) | {"deferred_checks"})
    else:
        expected = sorted(CASES)
    done = run(launcher, ranks, WORKER, SHUFFLEBN_TEST_DIR=str(tmp_path),
               SHUFFLEBN_TEST_TRANSPORT=transport, **env)
    assert done.returncode == 0, f"a rank failed (exit {done.returncode})"
    for one in transport.split(","):  # "a,b": every case with a, then with b, in one launch
        passed = re.findall(rf"PASS (\w+) \(\d+ ranks, transport={one},", done.stdout)
        assert sorted(passed) == expected, (one, passed)


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_resume_replays_the_permutations(launcher, tmp_path):
    """Steps 0-2, save, then a NEW process loads and runs steps 3-5: the same permutations (and
    running statistics) as one uninterrupted run of steps 0-5. 4 ranks: 9 derangements; and a
    layer that borrows from all the others, whose running statistics must continue too."""
    script = ROOT / "tests" / "resume_worker.py"
    for mode in ("full,first", "resume"):  # "resume" in a new process
        done = run(launcher, 4, script, mode, str(tmp_path))
        assert done.returncode == 0, f"{mode} run failed (exit {done.returncode})"
    full, first, resumed = (json.loads((tmp_path / f"{m}.json").read_text())
                            for m in ("full", "first", "resume"))
    assert {**first["permutations"], **resumed["permutations"]} == full["permutations"]
    assert resumed["steps"] == full["steps"] == [6, 6, 6]
    assert resumed["running_mean"] == full["running_mean"]  # the pooled layer's too
    assert len(full["running_mean"]) == 2
    # The check means something: the permutations do change from step to step.
    assert len({str(p) for p in full["permutations"].values()}) > 1


@pytest.mark.mpi
def test_torch_compile_matches_eager():
    done = run("mpirun", 2, ROOT / "tests" / "compile_worker.py")
    assert done.returncode == 0, f"a rank failed (exit {done.returncode})"
    assert "PASS torch.compile matches eager" in done.stdout


@pytest.mark.mpi
def test_lightning_plugin_trains_with_shuffled_statistics():
    """Trainer(strategy="ddp", plugins=[ShuffleBatchNormPlugin()]), 2 CPU processes."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "lightning_worker.py")], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    print(done.stdout)
    assert done.returncode == 0
    assert "PASS lightning rank 0" in done.stdout and "PASS lightning rank 1" in done.stdout
