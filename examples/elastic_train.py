"""Elastic Horovod with ShuffleBatchNorm: a small CNN on scikit-learn's 8x8 digits that keeps
training while workers join, leave or fail (hvd.elastic.run, TorchState, ElasticSampler).

Elastic Horovod runs on Gloo and asks a host-discovery script, about once a second, which hosts
(and how many slots on each) it may use; the job grows and shrinks with the script's answer.

On one machine, playing two hosts ('localhost' and '127.0.0.1' are the same machine;
--network-interface lo keeps Horovod from waiting for a second real host):

    printf '#!/bin/sh\\ncat /tmp/hosts.txt\\n' > /tmp/discover_hosts.sh
    chmod +x /tmp/discover_hosts.sh
    echo localhost:2 > /tmp/hosts.txt
    .venv/bin/horovodrun -np 2 --min-np 2 --max-np 4 --network-interface lo \\
        --host-discovery-script /tmp/discover_hosts.sh \\
        .venv/bin/python examples/elastic_train.py --pause 1

    # meanwhile, in another shell:
    printf 'localhost:2\\n127.0.0.1:1\\n' > /tmp/hosts.txt    # grow to 3 ranks
    printf 'localhost:1\\n127.0.0.1:1\\n' > /tmp/hosts.txt    # shrink to 2 (a slot dropped)

On several hosts (passwordless ssh between them, the same Python environment at the same path),
the script prints the hosts your scheduler gives you, one "host:slots" a line, e.g. "node1:4":

    horovodrun -np 8 --min-np 4 --max-np 16 --host-discovery-script ./discover_hosts.sh \\
        python examples/elastic_train.py

What keeps the ranks in agreement: the model's state_dict (which holds every layer's
num_batches_tracked, the step its permutation is drawn from), the optimizer and the sampler are in
the TorchState, committed every step and broadcast to every worker after each reset; a worker
that joins therefore draws the same permutations as the others from its first step on. Only rank 0
prints.
"""
import argparse
import time

import torch
from torch import nn

import horovod.torch as hvd
from common import train_step
from hvd_shufflebn import ShuffleBatchNorm, convert_shuffle_batchnorm

HELD_OUT = 297  # of the 1,797 digits; the split is fixed


def load_digits_split():
    """Every worker loads the data itself (it ships with scikit-learn): no collective may run
    before hvd.elastic.run's function, and a joining worker needs the data too."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:HELD_OUT], perm[HELD_OUT:]
    return x[train], y[train], x[test], y[test]


def make_model():
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(block(1, 16), block(16, 32), nn.Flatten(), nn.Linear(32 * 2 * 2, 64),
                         nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.02, help="per rank (scaled by the size)")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds to sleep after each epoch (time to change the hosts)")
    args = parser.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits_split()
    dataset = torch.utils.data.TensorDataset(x_train, y_train)
    # Repartitions what is left of the epoch among the ranks after every reset. drop_last: every
    # rank gets full batches (a batch norm needs more than one value per channel).
    sampler = hvd.elastic.ElasticSampler(dataset, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         drop_last=True)

    torch.manual_seed(0)  # the same start everywhere (the first sync would make it so anyway)
    model = convert_shuffle_batchnorm(make_model())  # every BatchNorm*d -> ShuffleBatchNorm
    first_bn = next(m for m in model.modules() if isinstance(m, ShuffleBatchNorm))
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9),
        named_parameters=model.named_parameters())

    def say(text):
        if hvd.rank() == 0:
            print(text, flush=True)

    @hvd.elastic.run
    def train(state):
        # Runs again after every reset, once the state is synced from rank 0.
        say(f"{'start' if state.resets == 0 else 'reset'}: {hvd.size()} ranks, epoch "
            f"{state.epoch + 1}, batch norm step {first_bn.step}")
        state.resets += 1
        while state.epoch < args.epochs:
            model.train()
            losses = torch.zeros(2)
            for images, labels in loader:  # what this rank has left of the epoch
                loss = train_step(model, optimizer, images, labels)
                losses += torch.tensor([loss.item(), 1.0])
                sampler.record_batch(0, args.batch_size)
                state.commit()  # cheap for this model; raises HostsUpdatedInterrupt on changes
            losses = hvd.allreduce(losses, op=hvd.Sum, name="example.loss")
            model.eval()  # running statistics: no communication
            with torch.no_grad():
                mine = slice(hvd.rank(), None, hvd.size())
                correct = (model(x_test[mine]).argmax(1) == y_test[mine]).sum()
            correct = int(hvd.allreduce(correct, op=hvd.Sum, name="example.correct"))
            # (No batch left when a reset came at the epoch's last commit.)
            ran = losses[1] > 0
            say(f"epoch {state.epoch + 1:2d}/{args.epochs}: {hvd.size()} ranks, loss "
                f"{f'{losses[0] / losses[1]:.3f}' if ran else '-'}, held-out accuracy "
                f"{correct / len(y_test):.3f}, batch norm step {first_bn.step}, last "
                f"permutation {first_bn.last_permutation if ran else '-'}")
            if args.pause:
                time.sleep(args.pause)
            state.epoch += 1
            sampler.set_epoch(state.epoch)
            state.commit()

    def on_reset():
        # After Horovod re-initialised with the new world, before the state is synced.
        for group in optimizer.param_groups:
            group["lr"] = args.lr * hvd.size()
        sampler.reset()  # the new size and rank (a removal skips the sync that would do it)

    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, sampler=sampler, epoch=0,
                                   resets=0)
    state.register_reset_callbacks([on_reset])
    train(state)
    say(f"finished {args.epochs} epochs on {hvd.size()} ranks")


if __name__ == "__main__":
    main()
