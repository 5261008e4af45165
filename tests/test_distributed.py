"""The distributed checks of dist_worker.py at several world sizes and with both controllers."""
import pytest

from dist_worker import CASES
from launch import ROOT, run

WORKER = ROOT / "tests" / "dist_worker.py"


@pytest.mark.mpi
@pytest.mark.parametrize("launcher,ranks", [
    ("mpirun", 2), ("mpirun", 3), ("mpirun", 4), ("mpirun", 8),
    ("horovodrun-gloo", 3), ("horovodrun-mpi", 2),
])
def test_layer_matches_float64_reference(launcher, ranks, tmp_path):
    done = run(launcher, ranks, WORKER, SHUFFLEBN_TEST_DIR=str(tmp_path))
    assert done.returncode == 0, f"a rank failed (exit {done.returncode})"
    passed = [line for line in done.stdout.splitlines() if "PASS " in line]
    assert len(passed) == len(CASES), f"expected {len(CASES)} passing cases, saw {len(passed)}"
