"""The examples run end to end (small settings); their own checks decide pass or fail."""
import re

import pytest

from launch import ROOT, run


@pytest.mark.mpi
def test_demo_trains_and_shows_the_shuffle():
    done = run("horovodrun-mpi", 2, ROOT / "examples" / "train_cnn.py", "--epochs", "2",
               "--samples", "512")
    assert done.returncode == 0
    assert "normalised with rank 1's mean" in done.stdout  # 2 ranks: the only derangement
    losses = [float(v) for v in re.findall(r"epoch \d+/2: loss ([0-9.]+)", done.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0], losses


@pytest.mark.mpi
@pytest.mark.parametrize("bn", ["shuffle", "plain", "sync"])
def test_moco_quick_loss_falls(bn):
    done = run("horovodrun-mpi", 2, ROOT / "examples" / "moco_digits.py", "--quick", "--bn", bn)
    assert done.returncode == 0  # --quick exits non-zero if the loss did not fall or diverged
