"""A small CNN trained with ShuffleBatchNorm on every rank (CPU), the way `make demo` runs it:

    horovodrun -np 8 python examples/train_cnn.py

The data are synthetic 16x16 images of 4 classes (a bright bar in one of four orientations, in
noise), generated from a seed, so nothing is downloaded. On the first step rank 0 prints, for the
first batch-norm layer, each rank's own batch mean and the mean it actually normalised with:
the second column is the first column permuted, which is the whole point of the layer.
"""
import argparse

import torch

import horovod.torch as hvd
from hvd_shufflebn import ShuffleBatchNorm, convert_shuffle_batchnorm
from common import make_data, make_model, say, train_step


def show_shuffle_once(layer):
    """On the first training step, print each rank's own mean and the mean it borrowed."""
    def hook(module, inputs, output):
        handle.remove()
        x = inputs[0].detach()
        own = x.mean(dim=[0, 2, 3])[:3]
        everyone = hvd.allgather(own.unsqueeze(0), name="demo.means")
        if hvd.rank() == 0:
            say(f"First step, layer {module.name}: permutation p = {module.last_permutation}")
            for r, mean in enumerate(everyone):
                u = module.last_permutation[r]
                say(f"  rank {r}: own mean[:3] = {fmt(mean)}   normalised with rank {u}'s "
                    f"mean[:3] = {fmt(everyone[u])}")
    handle = layer.register_forward_hook(hook)


def fmt(values):
    return "[" + ", ".join(f"{v:+.3f}" for v in values.tolist()) + "]"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--samples", type=int, default=2048, help="in the whole training set")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, labels = make_data(args.samples, seed=0)
    # Each rank trains on its own shard, as with a DistributedSampler.
    images, labels = images[hvd.rank()::hvd.size()], labels[hvd.rank()::hvd.size()]

    model = convert_shuffle_batchnorm(make_model())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=args.lr,
                                                         momentum=0.9),
                                         named_parameters=model.named_parameters())
    show_shuffle_once(next(m for m in model.modules() if isinstance(m, ShuffleBatchNorm)))

    steps = len(labels) // args.batch_size  # the same on every rank, up to one sample
    steps = int(hvd.allreduce(torch.tensor(steps), op=hvd.Min, name="demo.steps"))
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        total = torch.zeros(2)
        for step in range(steps):
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            loss = train_step(model, optimizer, images[batch], labels[batch])
            total += torch.tensor([loss.item(), 1.0])
        total = hvd.allreduce(total, op=hvd.Sum, name="demo.loss")
        model.eval()
        with torch.no_grad():
            correct = (model(images).argmax(1) == labels).float().sum()
        accuracy = hvd.allreduce(torch.stack([correct, torch.tensor(float(len(labels)))]),
                                 op=hvd.Sum, name="demo.accuracy")
        if hvd.rank() == 0:
            say(f"epoch {epoch + 1}/{args.epochs}: loss {total[0] / total[1]:.4f}, "
                f"train accuracy (eval mode, running statistics) "
                f"{accuracy[0] / accuracy[1]:.3f}")


if __name__ == "__main__":
    main()
