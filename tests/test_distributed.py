"""The distributed checks of dist_worker.py at several world sizes, with both controllers and both
transports (under mpirun, "auto" is the MPI transport; under Gloo, the Horovod one)."""
import pytest

from dist_worker import CASES
from launch import ROOT, run

WORKER = ROOT / "tests" / "dist_worker.py"


@pytest.mark.mpi
@pytest.mark.parametrize("launcher,ranks,transport", [
    ("mpirun", 2, "auto"), ("mpirun", 3, "auto"), ("mpirun", 4, "auto"), ("mpirun", 8, "auto"),
    ("mpirun", 2, "horovod"), ("mpirun", 4, "horovod"),
    ("horovodrun-gloo", 3, "auto"), ("horovodrun-mpi", 2, "mpi"),
])
def test_layer_matches_float64_reference(launcher, ranks, transport, tmp_path):
    done = run(launcher, ranks, WORKER, SHUFFLEBN_TEST_DIR=str(tmp_path),
               SHUFFLEBN_TEST_TRANSPORT=transport)
    assert done.returncode == 0, f"a rank failed (exit {done.returncode})"
    passed = [line for line in done.stdout.splitlines() if "PASS " in line]
    assert len(passed) == len(CASES), f"expected {len(CASES)} passing cases, saw {len(passed)}"
