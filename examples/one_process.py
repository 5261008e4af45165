"""Shuffling BatchNorm in ONE process, no launcher (one GPU or a CPU):

    python examples/one_process.py

Every batch is split into 4 contiguous groups, and each group is normalised with the statistics
of another group (``groups_per_rank=4``): the leak MoCo describes stays closed without a second
worker. The data and model are those of the Horovod demo (examples/common.py).
"""
import argparse

import torch

from common import make_data, make_model, say, train_step
from hvd_shufflebn import ShuffleBatchNorm, convert_shuffle_batchnorm


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--groups", type=int, default=4)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = convert_shuffle_batchnorm(make_model(), groups_per_rank=args.groups).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = make_data(1024, seed=1)
    first = next(m for m in model.modules() if isinstance(m, ShuffleBatchNorm))
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        total, count = 0.0, 0
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            batch = order[start:start + args.batch_size]
            loss = train_step(model, optimizer, images[batch].to(device), labels[batch].to(device))
            total, count = total + loss.item(), count + 1
            if epoch == 0 and start == 0:
                say(f"first step, layer {first.name}: group g borrowed the statistics of group "
                    f"p[g], p = {first.last_permutation}")
        say(f"epoch {epoch + 1}/{args.epochs}: loss {total / count:.4f}")


if __name__ == "__main__":
    main()
