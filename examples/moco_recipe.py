"""The recipe of docs/recipe.md, runnable: a small MoCo-style builder whose momentum KEY encoder is
converted with convert_shuffle_batchnorm (the query encoder keeps ordinary BatchNorm), with no
batch shuffle and unshuffle around the key encoder. The same file runs under every launcher:

    torchrun --nproc-per-node 2 examples/moco_recipe.py      # DDP over the query encoder
    horovodrun -np 2 python examples/moco_recipe.py          # or mpirun -np 2; DistributedOptimizer
    python examples/moco_recipe.py                           # one process: 2 groups per batch

Data are synthetic (no download): smooth random 32x32 colour patterns, two random views each
(shift, flip, contrast, noise). At the end every rank checks that the key encoder's BatchNorms
were converted (and only its), that they borrowed statistics (no group kept its own), that their
running statistics are bit-identical on every rank, and that the key encoder's state_dict loads
strictly into the builder's unconverted encoder and back, with the same outputs in eval mode;
then it prints `PASS recipe <launcher> rank <r>`, or FAIL with the reasons and exits 1.
"""
import argparse
import copy
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import say  # noqa: E402
from hvd_shufflebn import ShuffleBatchNorm, convert_shuffle_batchnorm  # noqa: E402


def make_encoder(dim=32):
    """A tiny conv encoder with BatchNorm2d (3x32x32 -> dim), standing in for MoCo's ResNet."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, dim))


def detect_launcher():
    if "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "MASTER_ADDR"} <= set(os.environ):
        return "torch"
    if any(k in os.environ for k in ("HOROVOD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return "horovod"
    return "none"


class Launcher:
    """What differs between launchers: rank and size, and concat_all_gather (forward only)."""

    def __init__(self, name):
        self.name, self.rank, self.size = name, 0, 1
        if name == "torch":
            import torch.distributed as dist
            dist.init_process_group("gloo")
            self.dist, self.rank, self.size = dist, dist.get_rank(), dist.get_world_size()
        elif name == "horovod":
            import horovod.torch as hvd
            hvd.init()
            self.hvd, self.rank, self.size = hvd, hvd.rank(), hvd.size()

    @torch.no_grad()
    def gather(self, t):
        """Every rank's `t`, concatenated in rank order (MoCo's concat_all_gather)."""
        if self.name == "torch":
            parts = [torch.empty_like(t) for _ in range(self.size)]
            self.dist.all_gather(parts, t.contiguous())
            return torch.cat(parts)
        return self.hvd.allgather(t) if self.name == "horovod" else t


def two_views(images, gen):
    def view():
        shift = torch.randint(-4, 5, (2,), generator=gen).tolist()
        x = images.roll(shift, dims=(2, 3))
        x = x.flip(3) if torch.rand((), generator=gen) < 0.5 else x
        contrast = 0.6 + 0.8 * torch.rand(len(x), 1, 1, 1, generator=gen)
        return x * contrast + 0.3 * torch.randn(x.shape, generator=gen)
    return view(), view()


def check(run, encoder_q, encoder_k, losses, borrow_from):
    """What the recipe promises, checked on this rank; returns the problems found."""
    problems = [] if all(map(math.isfinite, losses)) else ["non-finite loss"]
    shuffled = [m for m in encoder_k.modules() if isinstance(m, ShuffleBatchNorm)]
    if not shuffled or any(isinstance(m, ShuffleBatchNorm) for m in encoder_q.modules()):
        problems.append("the key encoder, and only it, must have ShuffleBatchNorm layers")
    for m in shuffled:
        p = m.last_permutation
        if m.borrow_from != borrow_from:
            problems.append(f"a layer borrows from {m.borrow_from!r}, not {borrow_from!r}")
        if m.borrow_from == "others" and p is not None:
            problems.append("a layer borrowing from all the others used a permutation")
        if m.borrow_from != "others" and (p is None or any(g == u for g, u in enumerate(p))):
            problems.append("a group normalised with its own statistics")
    running = torch.cat([b.double().flatten() for name, b in encoder_k.named_buffers()
                         if name.endswith(("running_mean", "running_var"))])
    every_rank = run.gather(running[None])
    if not torch.equal(every_rank, every_rank[:1].expand_as(every_rank)):
        problems.append("the key encoder's running statistics differ between ranks")
    plain = make_encoder()  # the builder's encoder, unconverted
    try:
        plain.load_state_dict(encoder_k.state_dict())  # strict: the same keys
        encoder_k.load_state_dict(plain.state_dict())  # and back
    except RuntimeError as error:
        return problems + ["state_dict does not load both ways: " + " ".join(str(error).split())]
    probe = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # eval mode: running statistics, nothing exchanged
        gap = (plain.eval()(probe) - encoder_k.eval()(probe)).abs().max().item()
    if gap > 1e-5:
        problems.append(f"the loaded plain encoder gives other outputs (max gap {gap:.1e})")
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launcher", choices=["auto", "torch", "horovod", "none"], default="auto")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--queue", type=int, default=256, help="negative keys")
    p.add_argument("--lr", type=float, default=0.06)
    p.add_argument("--momentum-key", type=float, default=0.99)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--print-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--borrow-from", choices=["permutation", "others"], default="permutation",
                   help="the key encoder's layers borrow from one other group (shuffled) or "
                        "from all the others pooled")
    args = p.parse_args()
    launcher = detect_launcher() if args.launcher == "auto" else args.launcher
    run = Launcher(launcher)
    torch.set_num_threads(1)

    torch.manual_seed(args.seed)  # the same initial weights and queue on every rank
    encoder_q = make_encoder()
    # THE RECIPE: convert the key encoder only, before anything wraps it. One process: 2 groups
    # of each batch lend to each other; under a launcher, transport "auto" finds it.
    layer_kwargs = dict(groups_per_rank=2, transport="local") if launcher == "none" else {}
    layer_kwargs["borrow_from"] = args.borrow_from
    encoder_k = convert_shuffle_batchnorm(copy.deepcopy(encoder_q), seed=args.seed, **layer_kwargs)
    for param in encoder_k.parameters():
        param.requires_grad_(False)  # a moving average of the query encoder
    queue = F.normalize(torch.randn(args.queue, 32), dim=1)
    optimizer = torch.optim.SGD(encoder_q.parameters(), lr=args.lr, momentum=0.9)
    model_q = encoder_q
    if launcher == "torch":
        model_q = nn.parallel.DistributedDataParallel(encoder_q)
    elif launcher == "horovod":
        run.hvd.broadcast_parameters(encoder_q.state_dict(), root_rank=0)
        optimizer = run.hvd.DistributedOptimizer(optimizer,
                                                 named_parameters=encoder_q.named_parameters())
    patterns = F.interpolate(torch.randn(512, 3, 8, 8), size=32, mode="bilinear")
    gen = torch.Generator().manual_seed(args.seed * 1000 + run.rank)  # this rank's batches

    losses = []
    for step in range(1, args.steps + 1):
        images = patterns[torch.randint(0, len(patterns), (args.batch_size,), generator=gen)]
        x_q, x_k = two_views(images, gen)
        q = F.normalize(model_q(x_q), dim=1)
        with torch.no_grad():
            for pk, pq in zip(encoder_k.parameters(), encoder_q.parameters()):  # unchanged
                pk.mul_(args.momentum_key).add_(pq, alpha=1 - args.momentum_key)
            k = F.normalize(encoder_k(x_k), dim=1)  # no batch shuffle / unshuffle around it
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / args.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        queue = torch.cat([run.gather(k), queue])[:args.queue]  # enqueue every rank's keys
        losses.append(run.gather(loss.detach()[None]).mean().item())
        if run.rank == 0 and (step % args.print_every == 0 or step == args.steps):
            say(f"step {step}/{args.steps}: loss {losses[-1]:.4f}")

    problems = check(run, encoder_q, encoder_k, losses, args.borrow_from)
    say(f"{'FAIL' if problems else 'PASS'} recipe {launcher} rank {run.rank}"
        + "".join(f"; {problem}" for problem in problems))
    if launcher == "torch":
        run.dist.destroy_process_group()
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
