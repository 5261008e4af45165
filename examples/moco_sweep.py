"""Sweep examples/moco_digits.py over images per rank x key-encoder BN x seeds, with simulated
ranks (one process per configuration, no Horovod; the same math as R real ranks), into one JSON.

    .venv/bin/python examples/moco_sweep.py --out docs/moco_sweep.json      # the full sweep
    .venv/bin/python examples/plot_moco_sweep.py docs/moco_sweep.json --png docs/moco_sweep.png

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
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64], help="images per rank")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ranks", type=int, default=8, help="simulated ranks")
    p.add_argument("--epochs", type=int, default=100, help="the same for every size")
    p.add_argument("--train-size", type=int, default=None, help="first N training digits")
    p.add_argument("--knn-every", type=int, default=5, help="k-NN curve every N epochs")
    p.add_argument("--probe-draws", type=int, default=None, help="see moco_digits.py")
    p.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    p.add_argument("--out", default="docs/moco_sweep.json")
    args = p.parse_args(argv)

    common = ["--simulate-ranks", str(args.ranks), "--epochs", str(args.epochs),
              "--knn-every", str(args.knn_every)]
    if args.train_size:
        common += ["--train-size", str(args.train_size)]
    if args.probe_draws:
        common += ["--probe-draws", str(args.probe_draws)]
    # Seed by seed: a sweep stopped early still has every size and mode for its first seeds.
    configs = [(size, mode, seed, common) for seed in args.seeds for size in args.sizes
               for mode in args.modes]
    results = {"sweep": {k: v for k, v in vars(args).items() if k != "out"}, "runs": []}
    start = time.time()
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state forked
    with ctx.Pool(min(args.workers, len(configs))) as pool:
        for record in tqdm(pool.imap_unordered(run_one, configs), total=len(configs),
                           desc="moco sweep", unit="run"):
            results["runs"].append(record)
            results["sweep"]["wall_seconds"] = time.time() - start
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:  # after every run: a partial sweep is still readable
                json.dump(results, f, indent=None, separators=(",", ":"))
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
