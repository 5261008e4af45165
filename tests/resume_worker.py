"""Resuming from a checkpoint replays the permutations of the run it continues.

    mpirun -np 4 python tests/resume_worker.py full   DIR   # 6 steps in one go
    mpirun -np 4 python tests/resume_worker.py first  DIR   # steps 0-2, then save
    mpirun -np 4 python tests/resume_worker.py resume DIR   # a new process loads, steps 3-5
    mpirun -np 4 python tests/resume_worker.py full,first DIR  # both, each with a model of its own

(or torchrun --nproc-per-node 4 ...: torch.distributed instead of Horovod)

Each run writes, from rank 0, the permutation every layer used at every step and the final
running statistics (DIR/<mode>.json); test_distributed.py compares them.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from hvd_shufflebn import ShuffleBatchNorm, convert_shuffle_batchnorm


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 1), torch.nn.BatchNorm1d(4),
                                torch.nn.Conv1d(4, 3, 1),
                                torch.nn.BatchNorm1d(3, track_running_stats=False))
    model = convert_shuffle_batchnorm(model, permutation="derangement", seed=5)
    # And one layer that borrows the pooled statistics of all the others (no permutation).
    return model.extend([torch.nn.Conv1d(3, 3, 1),
                         ShuffleBatchNorm(3, borrow_from="others", name="pooled")])


def main(modes, directory):
    torch.set_num_threads(1)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    else:
        import horovod.torch as hvd
        hvd.init()
        rank = hvd.rank()
    for mode in modes.split(","):
        run(mode, directory, rank)


def run(mode, directory, rank):
    model = build()
    steps = {"full": range(6), "first": range(3), "resume": range(3, 6)}[mode]
    checkpoint = os.path.join(directory, f"rank{rank}.pt")
    if mode == "resume":
        model.load_state_dict(torch.load(checkpoint), strict=True)
    layers = [m for m in model.modules() if isinstance(m, ShuffleBatchNorm)]
    used = {}
    for step in steps:
        g = torch.Generator().manual_seed(100 * step + rank)
        model(torch.randn(5, 2, 3, generator=g)).sum().backward()
        used[step] = [None if layer.last_permutation is None else list(layer.last_permutation)
                      for layer in layers]
    # Every rank is done before any leaves: a rank that leaves early shuts Horovod down for all.
    if "TORCHELASTIC_RUN_ID" in os.environ:
        dist.barrier()
    else:
        import horovod.torch as hvd
        hvd.allreduce(torch.zeros(1), name=f"resume.done.{mode}")
    if mode == "first":
        torch.save(model.state_dict(), checkpoint)
    if rank == 0:
        with open(os.path.join(directory, f"{mode}.json"), "w") as f:
            json.dump({"permutations": used, "steps": [layer.step for layer in layers],
                       "running_mean": [layer.running_mean.tolist() for layer in layers
                                        if layer.running_mean is not None]}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
