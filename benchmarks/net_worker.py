"""One rank of the shaped-network benchmark (benchmarks/network.py launches it over 2 virtual hosts).

Measures, on whatever link the launcher set up:
  link     one-way time of a message between rank 0 and the first rank on the other host
           (ping-pong, half the round trip), 8 B to 16 MiB: the latency and bandwidth the cost
           model (cost_model.py) is fitted to.
  keyfwd   MoCo's key-encoder forward (torch.no_grad, train mode) at each image size, for
             bn              plain per-rank BatchNorm, no communication: the compute alone
             sample-shuffle  MoCo's _batch_shuffle_ddp: gather every rank's images, encode a
                             shuffled slice, gather the outputs, unshuffle (baselines.py)
             shuffle-mpi, shuffle-horovod   ShuffleBatchNorm with each transport
             others-mpi      ShuffleBatchNorm(borrow_from="others"), mpi transport (where the
                             layer has that option)
           interleaved per round, each timed block the slowest rank's. Communication per forward
           = the variant's time - bn's, paired per round.
"""
import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch

import horovod.torch as hvd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
from models import ResNet, BasicBlock  # noqa: E402
from hvd_shufflebn import ShuffleBatchNorm, convert_shuffle_batchnorm  # noqa: E402

OTHERS = "borrow_from" in inspect.signature(ShuffleBatchNorm.__init__).parameters
VARIANTS = ("bn", "sample-shuffle", "shuffle-mpi", "shuffle-horovod") + (
    ("others-mpi",) if OTHERS else ())
PING_BYTES = [8, 1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22, 1 << 24]


def encoder():
    # ResNet-18's layout (the same 20 BatchNorm layers, so the same number of per-layer
    # exchanges) at 1/8 of its width: 1/64 of the compute, so that on 2 shared cores the
    # encoder's CPU time does not drown the communication being measured.
    torch.manual_seed(0)
    return ResNet(BasicBlock, [2, 2, 2, 2], width=8)


def idle_barrier(comm):
    """A barrier that sleeps instead of spinning: ranks not in the ping-pong leave the cores to
    the two that are (4 ranks share 2 cores here)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.0005)


def link(comm, peer, rounds):
    """Median one-way seconds per message size between rank 0 and ``peer`` (others idle)."""
    import numpy as np
    rank, result = comm.Get_rank(), {}
    for size in PING_BYTES:
        buf = np.zeros(size, dtype=np.uint8)
        times = []
        for _ in range(rounds + 1):  # the first round sets up the connection
            start = time.perf_counter()
            if rank == 0:
                comm.Send(buf, peer, 7)
                comm.Recv(buf, peer, 7)
            elif rank == peer:
                comm.Recv(buf, 0, 7)
                comm.Send(buf, 0, 7)
            times.append((time.perf_counter() - start) / 2)
            idle_barrier(comm)
        times = comm.bcast(times[1:], root=0)
        result[size] = sorted(times)[len(times) // 2]
    return result


def key_forwards(args, comm, image):
    gen = torch.Generator().manual_seed(hvd.rank())
    x = torch.randn(args.batch, 3, image, image, generator=gen)
    encoders = {"bn": encoder().train(), "sample-shuffle": baselines.SampleShuffle(encoder().train()),
                "shuffle-mpi": convert_shuffle_batchnorm(encoder().train(), transport="mpi"),
                "shuffle-horovod": convert_shuffle_batchnorm(encoder().train(), transport="horovod")}
    if "others-mpi" in VARIANTS:
        encoders["others-mpi"] = convert_shuffle_batchnorm(encoder().train(), transport="mpi",
                                                           borrow_from="others")
    samples = {name: [] for name in encoders}
    names = list(encoders)
    with torch.no_grad():
        for name in names:  # warm-up: connections, Horovod's response cache, allocations
            encoders[name](x)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                comm.Barrier()
                start = time.perf_counter()
                encoders[name](x)
                samples[name].append(time.perf_counter() - start)
    everyone = comm.allgather(samples)
    return {name: [max(s[name][i] for s in everyone) for i in range(args.rounds)] for name in names}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", default="32,64,128,224")
    p.add_argument("--batch", type=int, default=32, help="images per rank")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--ping-rounds", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    hvd.init()
    from mpi4py import MPI
    comm = MPI.COMM_WORLD.Dup()
    # The first rank on another host than rank 0 (mpirun -H hostA:n,hostB:n fills hosts in order).
    peer = hvd.local_size() if hvd.size() > hvd.local_size() else 1 % hvd.size()
    started = time.perf_counter()
    result = {"ranks": hvd.size(), "local_size": hvd.local_size(), "batch": args.batch,
              "peer": peer, "link": link(comm, peer, args.ping_rounds), "keyfwd": {},
              "bn_channels": [m.num_features for m in encoder().modules()
                              if isinstance(m, torch.nn.BatchNorm2d)]}
    for image in (int(v) for v in args.images.split(",")):
        result["keyfwd"][image] = key_forwards(args, comm, image)
        if hvd.rank() == 0:
            times = {n: sorted(s)[len(s) // 2] * 1e3 for n, s in result["keyfwd"][image].items()}
            print(f"  {image:3d} px: " + ", ".join(f"{n} {t:.1f} ms" for n, t in times.items()),
                  flush=True)
    result["seconds"] = time.perf_counter() - started
    if hvd.rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
    comm.Barrier()


if __name__ == "__main__":
    main()
