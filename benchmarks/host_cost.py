"""What one layer call costs the host: ShuffleBatchNorm beside BatchNorm2d on a tiny input, where
the kernels cost next to nothing and what is left is the host's own work (on a GPU, the time
the Python thread needs to queue the kernels). Also the aten ops each call dispatches.

    .venv/bin/python benchmarks/host_cost.py --out r.json                  # one process
    mpirun -np 2 .venv/bin/python benchmarks/host_cost.py --out r.json     # each transport

One process: ``groups_per_rank=2``, ``transport="local"``. Several ranks: every transport this
launch can run (mpi and horovod under Horovod on MPI; torch.distributed on Gloo, initialised
from Open MPI's environment), ``groups_per_rank=1``. Rounds interleave the variants; a ratio is
taken per round (BatchNorm2d and the variant back to back) and summarised by its median.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hvd_shufflebn import ShuffleBatchNorm  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="8,16,2,2", help="per-rank input N,C,H,W")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=50, help="calls per timed block")
    p.add_argument("--smoke", action="store_true", help="a few rounds, for CI")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.calls = 3, 5
    args.shape = tuple(int(v) for v in args.shape.split(","))
    return args


def launch():
    """Initialise what this launch offers; returns (rank, size, barrier, transports)."""
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
    if size == 1:
        return 0, 1, lambda: None, {"local": {"groups_per_rank": 2, "transport": "local"}}
    import horovod.torch as hvd
    import torch.distributed as dist
    from hvd_shufflebn.transports import mpi
    hvd.init()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=hvd.rank(), world_size=hvd.size())
    transports = {"horovod": {"transport": "horovod"},
                  "torch.distributed": {"transport": "torch.distributed"}}
    if mpi.usable():
        transports["mpi"] = {"transport": "mpi"}
    return hvd.rank(), hvd.size(), dist.barrier, transports


def main():
    args = parse_args()
    torch.set_num_threads(1)
    rank, size, barrier, transports = launch()
    c = args.shape[1]
    torch.manual_seed(rank)
    x = torch.randn(args.shape, requires_grad=True)
    dy = torch.randn(args.shape)
    layers = {"bn": torch.nn.BatchNorm2d(c)}
    layers.update({name: ShuffleBatchNorm(c, name=f"host-cost-{name}", **kwargs)
                   for name, kwargs in transports.items()})

    def train(layer):
        layer(x).backward(dy)

    def key_forward(layer):
        with torch.no_grad():
            layer(x)

    samples = {(name, what): [] for name in layers for what in ("train", "no_grad")}
    ops = {}
    for name, layer in layers.items():
        for what, call in (("train", train), ("no_grad", key_forward)):
            for _ in range(3):  # warm: plans, transports, first-exchange agreement
                call(layer)
            with CountOps() as counter:
                call(layer)
            ops[f"{name}/{what}"] = counter.count
    order = list(samples)
    for round_ in range(args.rounds):
        shift = round_ % len(order)
        for name, what in order[shift:] + order[:shift]:
            call = train if what == "train" else key_forward
            barrier()
            start = time.perf_counter()
            for _ in range(args.calls):
                call(layers[name])
            samples[(name, what)].append((time.perf_counter() - start) / args.calls)
    if rank == 0:
        result = {"meta": {"ranks": size, "shape": args.shape, "rounds": args.rounds,
                           "calls": args.calls, "torch": torch.__version__,
                           "machine": f"{platform.processor() or platform.machine()}, "
                                      f"{os.cpu_count()} cores", "threads": 1},
                  "ops": ops,
                  "seconds": {f"{n}/{w}": s for (n, w), s in samples.items()}}
        for name in transports:
            for what in ("train", "no_grad"):
                ratios = [a / b for a, b in zip(samples[(name, what)], samples[("bn", what)])]
                print(f"[host-cost] {size} rank(s), {name:17s} {what:7s}: "
                      f"{statistics.median(samples[(name, what)]) * 1e6:7.1f} us per call "
                      f"({statistics.median(ratios):.2f}x BatchNorm2d), "
                      f"{ops[f'{name}/{what}']} aten ops (BatchNorm2d: {ops[f'bn/{what}']})",
                      flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    if size > 1:
        import torch.distributed as dist
        dist.barrier()


if __name__ == "__main__":
    main()
