"""The CNN of train_cnn.py under torchrun and DistributedDataParallel, no Horovod:

    torchrun --nproc-per-node 4 examples/ddp_train.py

Gloo on CPU (NCCL when CUDA is available). ShuffleBatchNorm takes its statistics over the default
process group (transport "auto" picks torch.distributed); convert before wrapping in DDP.
"""
import argparse
import os

import torch
import torch.distributed as dist

from common import make_data, make_model, say, train_step
from hvd_shufflebn import ShuffleBatchNorm, convert_shuffle_batchnorm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = convert_shuffle_batchnorm(make_model()).to(device)
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = make_data(1024, seed=1)
    mine = torch.arange(rank, len(labels), size)  # this rank's shard
    first = next(m for m in model.modules() if isinstance(m, ShuffleBatchNorm))
    for epoch in range(args.epochs):
        model.train()
        order = mine[torch.randperm(len(mine), generator=torch.Generator().manual_seed(epoch))]
        total = torch.zeros(2, device=device)
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            batch = order[start:start + args.batch_size]
            loss = train_step(model, optimizer, images[batch].to(device), labels[batch].to(device))
            total += torch.stack([loss, torch.ones((), device=device)])
            if epoch == 0 and start == 0 and rank == 0:
                say(f"first step, layer {first.name}: rank r borrowed the statistics of rank "
                    f"p[r], p = {first.last_permutation}")
        dist.all_reduce(total)
        if rank == 0:
            say(f"epoch {epoch + 1}/{args.epochs}: loss {float(total[0] / total[1]):.4f}")
    dist.barrier()


if __name__ == "__main__":
    main()
