"""Sweep examples/moco_digits.py over images per rank x key-encoder BN x seeds, with simulated
ranks (one process per configuration, no Horovod; the same math as R real ranks), into one JSON.
With --launcher horovodrun every configuration is instead one `horovodrun -np R` launch of the
example on R real ranks, one after another; the records have the same format.

    .venv/bin/python examples/moco_sweep.py --out docs/moco_sweep.json      # the full sweep
    .venv/bin/python examples/plot_moco_sweep.py docs/moco_sweep.json --png docs/moco_sweep.png
    # the others row on 8 real Horovod ranks, to check the simulation against
    .venv/bin/python examples/moco_sweep.py --launcher horovodrun --modes others --sizes 8 32 \
        --out docs/moco_others_real.json

Modes: plain, shuffle, shuffle-g2 (shuffle with groups_per_rank=2: each rank's batch is two
groups that lend to each other and to other ranks' groups), sync, others (every rank borrows
the pooled statistics of all other ranks). Every configuration trains for the same number of
epochs (the same images seen, the same compute), with the example's hyperparameters.
"""
import argparse
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MODES = {"plain": ["--bn", "plain"], "shuffle": ["--bn", "shuffle"],
         "shuffle-g2": ["--bn", "shuffle", "--groups", "2"], "sync": ["--bn", "sync"],
         "others": ["--bn", "others"]}


def run_one(config):
    """One configuration, in a worker process: returns the record without per-step losses."""
    import torch
    import moco_digits
    torch.set_num_threads(1)
    size, mode, seed, common = config
    args = moco_digits.parse_args(common + MODES[mode] + ["--batch-size", str(size),
                                                          "--seed", str(seed)])
    start = time.time()
    record = moco_digits.train(args, log=lambda *lines: None, progress=False)
    record.pop("step_losses")
    record.update(mode=mode, images_per_rank=size, seed=seed, wall_seconds=time.time() - start)
    return record


def launch_one(config, ranks, log_dir):
    """One configuration as a `horovodrun -np ranks` launch; rank 0's record, without per-step
    losses. The launch's output goes to a log file in log_dir (tail it to follow the epochs)."""
    size, mode, seed, common = config
    name = f"{mode}_{size}_seed{seed}"
    out, log = os.path.join(log_dir, name + ".json"), os.path.join(log_dir, name + ".log")
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [horovodrun, "-np", str(ranks), sys.executable, os.path.join(HERE, "moco_digits.py"),
           *common, *MODES[mode], "--batch-size", str(size), "--seed", str(seed), "--out", out]
    # More ranks than cores: let Open MPI place them (the example sets yield_when_idle itself).
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONUNBUFFERED="1")
    start = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name}: horovodrun exited with {done.returncode}; see {log}")
    with open(out) as f:
        record = json.load(f)
    record.pop("step_losses")
    record.update(mode=mode, images_per_rank=size, seed=seed, wall_seconds=time.time() - start,
                  launcher="horovodrun")
    return record


def summary(record):
    final = record["final"]
    return (f"{record['mode']} {record['images_per_rank']} images/rank seed {record['seed']}: "
            f"{record['wall_seconds']:.0f} s; pretext acc {final['pretext_acc']:.3f}, "
            f"k-NN {final['knn_acc']:.3f}, 1-shot {final['1shot']['mean']:.3f}, "
            f"5-shot {final['5shot']['mean']:.3f}, linear {final['linear']['mean']:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64], help="images per rank")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--launcher", choices=["simulate", "horovodrun"], default="simulate",
                   help="simulate: --simulate-ranks in worker processes (default); horovodrun: "
                        "one horovodrun launch per configuration, one at a time")
    p.add_argument("--ranks", type=int, default=8, help="simulated (or horovodrun) ranks")
    p.add_argument("--epochs", type=int, default=100, help="the same for every size")
    p.add_argument("--train-size", type=int, default=None, help="first N training digits")
    p.add_argument("--knn-every", type=int, default=5, help="k-NN curve every N epochs")
    p.add_argument("--probe-draws", type=int, default=None, help="see moco_digits.py")
    p.add_argument("--workers", type=int, default=2,
                   help="processes, one thread each (simulate only)")
    p.add_argument("--log-dir", default=None,
                   help="horovodrun: per-run logs and records (default: a new temporary folder)")
    p.add_argument("--out", default="docs/moco_sweep.json")
    args = p.parse_args(argv)

    common = ["--epochs", str(args.epochs), "--knn-every", str(args.knn_every)]
    if args.launcher == "simulate":
        common = ["--simulate-ranks", str(args.ranks)] + common
    if args.train_size:
        common += ["--train-size", str(args.train_size)]
    if args.probe_draws:
        common += ["--probe-draws", str(args.probe_draws)]
    # Seed by seed: a sweep stopped early still has every size and mode for its first seeds.
    configs = [(size, mode, seed, common) for seed in args.seeds for size in args.sizes
               for mode in args.modes]
    sweep = {k: v for k, v in vars(args).items() if k not in ("out", "log_dir", "workers")}
    if args.launcher == "simulate":
        sweep["workers"] = args.workers
    results = {"sweep": sweep, "runs": []}
    start = time.time()

    def add(record):
        results["runs"].append(record)
        results["sweep"]["wall_seconds"] = time.time() - start
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:  # after every run: a partial sweep is still readable
            json.dump(results, f, indent=None, separators=(",", ":"))

    if args.launcher == "horovodrun":
        log_dir = args.log_dir or tempfile.mkdtemp(prefix="moco_sweep_")
        os.makedirs(log_dir, exist_ok=True)
        print(f"{len(configs)} horovodrun launches of {args.ranks} ranks; logs in {log_dir}",
              flush=True)
        bar = tqdm(configs, desc="moco sweep", unit="run")
        for i, config in enumerate(bar):
            record = launch_one(config, args.ranks, log_dir)
            add(record)
            bar.write(f"run {i + 1}/{len(configs)}: {summary(record)}")
    else:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state forked
        with ctx.Pool(min(args.workers, len(configs))) as pool:
            for record in tqdm(pool.imap_unordered(run_one, configs), total=len(configs),
                               desc="moco sweep", unit="run"):
                add(record)
            pool.close()  # let the workers exit by themselves: a terminated worker leaves
            pool.join()   # scikit-learn's semaphores behind, with a warning at shutdown
    bad = [(r["mode"], r["images_per_rank"], r["seed"]) for r in results["runs"]
           if not all(math.isfinite(v["mean"] if isinstance(v, dict) else v)
                      for v in r["final"].values())]
    print(f"wrote {args.out}: {len(results['runs'])} runs in {time.time() - start:.0f} s"
          + (f"; NON-FINITE metrics in {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
