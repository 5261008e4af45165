"""The examples run end to end (small settings); their own checks decide pass or fail."""
import json
import math
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


MOCO_RUNS = ROOT / "tests" / "moco_runs.py"  # several runs of the example in one launch
QUICK_MODES = ["shuffle", "plain", "sync"]


def exit_codes(stdout, runs):
    """What each run of moco_runs.py would have exited with, by index (every rank agrees)."""
    codes = {}
    for index, code in re.findall(r"MOCO_RUN (\d+) exit (\d+)", stdout):
        assert codes.setdefault(int(index), int(code)) == int(code), stdout
    assert sorted(codes) == list(range(runs)), stdout
    return codes


@pytest.fixture(scope="module")
def quick_runs():
    # The check needs the loss only; 8 epochs (200 steps) are plenty for it to fall.
    done = run("mpirun", 2, MOCO_RUNS, *[f"--quick --bn {bn} --epochs 8 --probe-draws 1 "
                                         "--knn-every 20" for bn in QUICK_MODES])
    assert done.returncode == 0
    return exit_codes(done.stdout, len(QUICK_MODES))


@pytest.mark.mpi
@pytest.mark.parametrize("bn", QUICK_MODES)
def test_moco_quick_loss_falls(quick_runs, bn):
    # --quick exits non-zero if the loss did not fall or diverged.
    assert quick_runs[QUICK_MODES.index(bn)] == 0


@pytest.mark.mpi
def test_moco_others_uses_the_layer_under_horovod():
    """--bn others under Horovod (mpirun) converts the key encoder with borrow_from="others" (the
    real layer, not a simulation, not plain BN), and on the first key forward every rank's
    output is what the pooled statistics of the 2 other ranks give (3 ranks: the pool is no
    single rank's batch, so a permutation would not match either)."""
    done = run("mpirun", 3, ROOT / "examples" / "moco_digits.py", "--bn", "others",
               "--epochs", "1", "--train-size", "96", "--batch-size", "8", "--probe-draws", "1")
    assert done.returncode == 0
    assert ("key encoder normalisation: 4 x ShuffleBatchNorm(borrow_from='others', "
            "groups_per_rank=1") in done.stdout
    gaps = re.findall(r"rank (\d): own mean.* normalised with the pooled mean.* of the 2 other "
                      r"ranks;.*float64 reference from the other ranks' inputs\| = "
                      r"([0-9.e+-]+)\)", done.stdout)
    assert sorted(rank for rank, _ in gaps) == ["0", "1", "2"], done.stdout
    assert all(float(gap) < 1e-5 for _, gap in gaps), gaps


@pytest.mark.mpi
def test_sync_batchnorm_example_matches_float64_reference():
    done = run("mpirun", 2, ROOT / "examples" / "sync_batchnorm.py")
    assert done.returncode == 0 and "SyncBatchNorm check PASSED" in done.stdout


@pytest.mark.mpi
def test_benchmark_smoke_runs_every_variant():
    """`make bench-smoke`: every benchmark variant once on tiny sizes, and one point of the
    shaped two-host network wherever the harness can run (no timing is asserted)."""
    import multihost
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke"],
                          cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    print(done.stdout)
    assert done.returncode == 0 and "wrote " in done.stdout
    if multihost.unusable_reason() is None:
        assert "[network] exit 0" in done.stdout and "10 Gbit/s] exit 0" in done.stdout
    else:
        assert "[network] skipped:" in done.stdout


def test_gpu_benchmark_rehearses_on_cpu():
    """scripts/gpu_bench.py with --rehearse-on-cpu: its checks against the float64 reference and
    its ResNet-50-style timing loop (bfloat16 autocast, channels_last) run on the CPU, so the
    first run on a GPU machine is not the script's first run."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"),
                           "--rehearse-on-cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    print(done.stdout)
    assert done.returncode == 0
    assert done.stdout.count("PASS groups on one process") == 5 and "FAIL" not in done.stdout
    for what in ("training step", "key-encoder forward"):
        for mode in ("permutation", "others"):
            assert re.search(rf"TIME .*cpu.*{what}: .*borrow_from='{mode}'.* ratio [0-9.]+x",
                             done.stdout), (what, mode)


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


SIM_MODES = {"plain": "--bn plain", "shuffle": "--bn shuffle",
             "shuffle-g2": "--bn shuffle --groups 2", "sync": "--bn sync"}


@pytest.fixture(scope="module")
def real_and_simulated(tmp_path_factory):
    """Every mode of SIM_MODES under 2 Horovod ranks (one launch) and simulated in one process
    (beside it): the per-step losses of each, by mode."""
    out = tmp_path_factory.mktemp("moco_sim")
    common = "--epochs 2 --train-size 256 --knn-every 2 --probe-draws 1"
    runs = {kind: [f"{common} {args} --out {out}/{kind}-{mode}.json{extra}"
                   for mode, args in SIM_MODES.items()]
            for kind, extra in (("real", ""), ("sim", " --simulate-ranks 2"))}
    with subprocess.Popen([sys.executable, str(MOCO_RUNS), *runs["sim"]], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as sim:
        try:
            real = run("mpirun", 2, MOCO_RUNS, *runs["real"])
            sim_out, _ = sim.communicate(timeout=TIMEOUT)
        finally:
            sim.kill()
    print(sim_out)
    assert real.returncode == 0 and sim.returncode == 0
    assert set(exit_codes(real.stdout, len(SIM_MODES)).values()) == {0}
    assert set(exit_codes(sim_out, len(SIM_MODES)).values()) == {0}
    return {mode: [json.loads((out / f"{kind}-{mode}.json").read_text())["step_losses"]
                   for kind in ("real", "sim")] for mode in SIM_MODES}


@pytest.mark.mpi
@pytest.mark.parametrize("mode", list(SIM_MODES))
def test_moco_simulated_ranks_match_horovod(real_and_simulated, mode):
    """--simulate-ranks 2 in one process gives the per-step losses of 2 Horovod ranks: the same
    shards, views, normalisation, gradient averaging and queue. Float32 rounding differs (one
    convolution over both slices, another summation order for the gradient) and training
    amplifies it: the first 4 steps agree to 1e-6, the 8th to ~3e-5 (sync). A wrong shard, view,
    statistic or gradient scale moves the loss by 1e-3 or more from the second step on."""
    losses = real_and_simulated[mode]
    assert len(losses[0]) == len(losses[1]) == 8
    gaps = [abs(a - b) for a, b in zip(*losses)]
    assert max(gaps[:4]) < 1e-5 and max(gaps) < 2e-4, gaps


def test_moco_sweep_tiny(tmp_path):
    """The sweep command end to end on a tiny configuration: every (size, mode) has a record
    with finite metrics, and the key encoder's normalisation is the mode's."""
    out = tmp_path / "sweep.json"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "moco_sweep.py"),
                           "--sizes", "4", "8", "--seeds", "0", "--ranks", "2", "--epochs", "1",
                           "--train-size", "64", "--probe-draws", "2", "--out", str(out)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    print(done.stdout[-3000:])
    assert done.returncode == 0
    runs = {(r["images_per_rank"], r["mode"]): r for r in json.loads(out.read_text())["runs"]}
    modes = ["plain", "shuffle", "shuffle-g2", "sync", "others"]
    assert sorted(runs) == sorted((size, mode) for size in (4, 8) for mode in modes)
    for (size, mode), r in runs.items():
        assert r["ranks"] == 2 and r["args"]["batch_size"] == size and r["args"]["epochs"] == 1
        for name, probe in [("final", r["final"]), ("raw pixels", r["raw_pixels"]),
                            ("untrained", r["untrained"])]:
            for metric in ("knn_acc", "1shot", "5shot", "linear"):
                value = probe[metric]["mean"] if isinstance(probe[metric], dict) else probe[metric]
                assert math.isfinite(value) and 0.0 <= value <= 1.0, (size, mode, name, metric)
        assert math.isfinite(r["final"]["loss"]) and 0.0 <= r["final"]["pretext_acc"] <= 1.0
        assert r["raw_pixels"]["knn_acc"] > 0.9  # fixed split: 0.970
        for lender, d in r["stat_distances"].items():
            assert len(d["mean_shift"]) == 4 and all(math.isfinite(v) for v in d["mean_shift"])
        # Plain BN normalises each rank's keys with their own statistics; every other mode
        # with someone else's (or the global batch's), so the per-rank means move off zero.
        offset = r["first_step_key_offset"]
        assert (offset < 1e-4) if mode == "plain" else (offset > 1e-3), (size, mode, offset)


RECIPE = ROOT / "examples" / "moco_recipe.py"
RECIPE_CONVERSION = ("convert_shuffle_batchnorm(copy.deepcopy(encoder_q), seed=args.seed, "
                     "**layer_kwargs)")


def assert_recipe_passed(done, launcher, ranks):
    """Exit 0, the loss printed, and every rank's own check passed (docs/recipe.md's promises:
    only the key encoder converted, borrowed statistics, running statistics bit-identical on
    every rank, state_dict loads strictly into the unconverted encoder and back)."""
    assert done.returncode == 0
    assert re.search(r"step 4/4: loss [0-9.]+", done.stdout)
    for rank in range(ranks):
        assert re.search(rf"PASS recipe {launcher} rank {rank}$", done.stdout, re.M), rank
    assert "FAIL recipe" not in done.stdout
    assert_lines_whole(done.stdout, ranks)


@pytest.mark.mpi
@pytest.mark.parametrize("launcher", ["torchrun", "horovodrun-gloo"])
def test_moco_recipe_under_launcher(launcher):
    """The recipe's script, unchanged, under DDP and Horovod (Gloo: the horovod transport; the
    mpi transport's path is the demo's); --launcher auto finds which from the environment.
    Under DDP the key encoder borrows from all the others (the recipe's one-keyword variant)."""
    extra = ["--borrow-from", "others"] if launcher == "torchrun" else []
    done = run(launcher, 2, RECIPE, "--steps", "4", *extra, timeout=60)
    assert_recipe_passed(done, "torch" if launcher == "torchrun" else "horovod", 2)


def test_moco_recipe_one_process():
    """No launcher: groups_per_rank=2, transport="local"."""
    done = subprocess.run([sys.executable, str(RECIPE), "--steps", "4"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    print(done.stdout)
    assert_recipe_passed(done, "none", 1)
