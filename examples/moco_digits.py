"""MoCo v2-style self-supervised pretraining on sklearn's 8x8 digits, on Horovod, CPU only.

The query encoder keeps ordinary per-rank BatchNorm; the momentum KEY encoder's BatchNorm is
chosen with --bn:
  shuffle  convert_shuffle_batchnorm: rank r normalises with rank p[r]'s batch statistics
  plain    per-rank BatchNorm, the baseline MoCo calls "cheating" (query and positive key
           share the statistics of the same small batch, which leaks into the logits)
  sync     statistics of the global batch, via examples/sync_batchnorm.py

Each epoch rank 0 reports the pretext (InfoNCE) loss, the pretext accuracy (is the positive
key ranked first among positive + queue) and the weighted k-NN accuracy of the frozen query
encoder's backbone features on held-out digits, and writes them to --out as JSON.

    .venv/bin/horovodrun -np 8 .venv/bin/python examples/moco_digits.py --bn shuffle
    .venv/bin/horovodrun -np 2 .venv/bin/python examples/moco_digits.py --quick --bn plain
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

# With more ranks than cores, Open MPI's default busy-polling makes every collective
# take hundreds of milliseconds; yielding keeps them at a few milliseconds.
os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
import horovod.torch as hvd  # noqa: E402
from common import say  # noqa: E402

N_TEST = 500      # held-out digits; the split is fixed (SPLIT_SEED) so every run sees the same
SPLIT_SEED = 0
QUICK_TRAIN = 640  # --quick trains on this many of the training digits


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bn", choices=["shuffle", "plain", "sync"], default="shuffle",
                   help="normalisation of the key encoder (default: shuffle)")
    p.add_argument("--epochs", type=int, default=None, help="default 100, or 20 with --quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--queue", type=int, default=256, help="number of negative keys")
    p.add_argument("--lr", type=float, default=0.06, help="SGD learning rate (cosine schedule)")
    p.add_argument("--momentum-key", type=float, default=0.99, help="key encoder EMA momentum")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--width", type=int, default=32, help="channels of the first conv layers")
    p.add_argument("--out", default=None, help="JSON file for the per-epoch metrics")
    p.add_argument("--quick", action="store_true",
                   help="short smoke run; exits non-zero if the loss did not fall or diverged")
    args = p.parse_args()
    if args.epochs is None:
        args.epochs = 20 if args.quick else 100
    return args


# ---------------------------------------------------------------------------------------- data

def load_digits_split():
    from sklearn.datasets import load_digits  # imported here: only rank 0 needs it
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # pixels are 0..16
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = perm[:N_TEST], perm[N_TEST:]
    return x[train], y[train], x[test], y[test]


def augment(x, gen):
    """Random view of a batch of 8x8 digits. No flips: a mirrored 2 or 5 is another glyph."""
    b = x.shape[0]

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(b, *shape, generator=gen)

    # Affine: rotation +-15 deg, zoom 0.9-1.15 (a crop when > 1), shear +-0.15, shift +-1 px;
    # pixels coming from outside the image are zero, i.e. padding with background.
    angle = uniform(-15, 15) * math.pi / 180
    scale = uniform(0.9, 1.15)
    shear = uniform(-0.15, 0.15)
    shift = uniform(-0.25, 0.25, 2)  # 1 px = 2/8 in grid_sample's [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)

    x = x * uniform(0.7, 1.3, 1, 1, 1)                          # stroke intensity
    x = x + 0.05 * torch.randn(x.shape, generator=gen)          # gaussian noise

    # Random erasing of a 3x3 patch (14% of the image) for half of the batch.
    rows = torch.arange(8).view(1, 8, 1)
    cols = torch.arange(8).view(1, 1, 8)
    top = torch.randint(0, 6, (b, 1, 1), generator=gen)
    left = torch.randint(0, 6, (b, 1, 1), generator=gen)
    patch = (rows >= top) & (rows < top + 3) & (cols >= left) & (cols < left + 3)
    erase = (torch.rand(b, 1, 1, generator=gen) < 0.5) & patch
    return x.masked_fill(erase.unsqueeze(1), 0.0)


# --------------------------------------------------------------------------------------- model

def conv_bn_relu(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """4-conv CNN (8x8 -> 4x4 -> 2*width-d features) plus MoCo v2's 2-layer MLP head."""

    def __init__(self, width=32, dim=32):
        super().__init__()
        self.backbone = nn.Sequential(
            conv_bn_relu(1, width), conv_bn_relu(width, width), nn.MaxPool2d(2),
            conv_bn_relu(width, 2 * width), conv_bn_relu(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.ReLU(inplace=True),
                                  nn.Linear(2 * width, dim))

    def forward(self, x):
        return F.normalize(self.head(self.backbone(x)), dim=1)


def make_key_encoder(query_encoder, bn, seed):
    key = copy.deepcopy(query_encoder)
    if bn == "shuffle":
        from hvd_shufflebn import convert_shuffle_batchnorm
        key = convert_shuffle_batchnorm(key, seed=seed)  # seeds the derangements
    elif bn == "sync":
        from sync_batchnorm import convert_sync_batchnorm
        key = convert_sync_batchnorm(key)
    for p in key.parameters():
        p.requires_grad_(False)  # updated only as a moving average of the query encoder
    q_names = [n for n, _ in query_encoder.named_parameters()]
    assert [n for n, _ in key.named_parameters()] == q_names, "conversion changed parameters"
    return key


@torch.no_grad()
def momentum_update(key, query, m):
    for pk, pq in zip(key.parameters(), query.parameters()):
        pk.mul_(m).add_(pq.detach(), alpha=1 - m)


def report_first_step(key_encoder, bn):
    """On the first key forward, print per rank the own batch mean at the first BN layer and
    the mean that layer normalised with (rank p[r]'s mean in shuffle mode)."""
    layer = next(m for m in key_encoder.modules()
                 if isinstance(m, _BatchNorm) or hasattr(m, "last_permutation"))
    rank = hvd.rank()

    def fmt(t):
        return "[" + ", ".join(f"{v:+.4f}" for v in t[:3].tolist()) + "]"

    def hook(module, inputs, output):
        handle.remove()
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        own_mean, own_var = x.mean(dims), x.var(dims, unbiased=False)
        out_mean = output.mean(dims)
        means = hvd.allgather(own_mean[None])  # (ranks, C); every rank's batch is equal-sized
        if bn == "shuffle":
            src = module.last_permutation[rank]
            used = means[src]
            used_var = hvd.allgather(own_var[None])[src]
            # If the layer really used rank src's stats, its output mean is predictable:
            expected = ((own_mean - used) / torch.sqrt(used_var + module.eps)
                        * module.weight + module.bias)
            gap = (out_mean - expected).abs().max().item()
            say(f"rank {rank}: own mean[0:3]={fmt(own_mean)} normalised with rank {src}'s "
                f"mean[0:3]={fmt(used)}; output mean[0:3]={fmt(out_mean)} "
                f"(max |output mean - expected from rank {src}'s stats| = {gap:.1e})")
        else:
            used = means.mean(0) if bn == "sync" else own_mean
            say(f"rank {rank}: own mean[0:3]={fmt(own_mean)} ({bn} BN: normalised with "
                f"{'the global' if bn == 'sync' else 'its own'} mean[0:3]={fmt(used)}); "
                f"output mean[0:3]={fmt(out_mean)}")

    handle = layer.register_forward_hook(hook)


# ------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def knn_accuracy(train_feats, train_y, test_feats, test_y, k=20, t=0.07, classes=10):
    """Weighted k-NN on cosine similarity (Wu et al. 2018), train features as the memory bank."""
    train_feats, test_feats = F.normalize(train_feats, dim=1), F.normalize(test_feats, dim=1)
    sim, idx = (test_feats @ train_feats.T).topk(k, dim=1)
    votes = torch.zeros(len(test_y), classes).scatter_add_(1, train_y[idx], (sim / t).exp())
    return (votes.argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def evaluate(encoder, data):
    x_tr, y_tr, x_te, y_te = data
    was_training = encoder.training
    encoder.eval()  # frozen encoder: BN uses this rank's running statistics
    acc = knn_accuracy(encoder.backbone(x_tr), y_tr, encoder.backbone(x_te), y_te)
    encoder.train(was_training)
    return acc


# -------------------------------------------------------------------------------------- training

def save(record, path):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)


def main():
    args = parse_args()
    torch.set_num_threads(1)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(args.seed)

    # Only rank 0 imports scikit-learn: eight concurrent imports cost ~20 s on two cores.
    data = hvd.broadcast_object(load_digits_split() if rank == 0 else None, root_rank=0,
                                name="digits")  # the default name differs between ranks
    x_train = data[0][:QUICK_TRAIN] if args.quick else data[0]
    steps_per_epoch = len(x_train) // (size * args.batch_size)
    if steps_per_epoch == 0:
        sys.exit(f"{len(x_train)} training digits are fewer than one global batch "
                 f"({size} ranks x {args.batch_size})")
    total_steps = steps_per_epoch * args.epochs

    query = Encoder(args.width)
    hvd.broadcast_parameters(query.state_dict(), root_rank=0)
    key = make_key_encoder(query, args.bn, args.seed)
    optimizer = torch.optim.SGD(query.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=query.named_parameters())
    # Same random initial queue on every rank; it is refilled with all ranks' keys each step.
    queue = F.normalize(torch.randn(args.queue, query.head[-1].out_features,
                                    generator=torch.Generator().manual_seed(args.seed)), dim=1)
    queue_ptr = 0
    aug_gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # distinct views per rank

    record = {"args": vars(args), "ranks": size, "steps_per_epoch": steps_per_epoch,
              "train_size": len(x_train), "test_size": len(data[3]), "epochs": []}
    if rank == 0:
        # Reference points for the k-NN numbers: raw pixels and the untrained encoder.
        record["knn_raw_pixels"] = knn_accuracy(data[0].flatten(1), data[1],
                                                data[2].flatten(1), data[3])
        record["epochs"].append({"epoch": 0, "knn_acc": evaluate(query, data)})
        say(f"{args.bn} BN key encoder, {size} ranks x batch {args.batch_size}, "
            f"{len(x_train)} train / {len(data[3])} test digits, {steps_per_epoch} steps/epoch; "
            f"k-NN acc: raw pixels {record['knn_raw_pixels']:.3f}, "
            f"untrained encoder {record['epochs'][0]['knn_acc']:.3f}")

    report_first_step(key, args.bn)
    bar = tqdm(total=total_steps, disable=rank != 0, mininterval=2, desc=f"moco[{args.bn}]")
    start = time.time()
    step = 0
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.time()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(
            args.seed * 1000 + epoch))  # same on every rank; each rank takes its own shard
        shard = order[rank::size]
        loss_sum = acc_sum = 0.0
        for i in range(steps_per_epoch):
            lr = 0.5 * args.lr * (1 + math.cos(math.pi * step / total_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = x_train[shard[i * args.batch_size:(i + 1) * args.batch_size]]
            x_q, x_k = augment(images, aug_gen), augment(images, aug_gen)

            q = query(x_q)
            with torch.no_grad():
                momentum_update(key, query, args.momentum_key)
                k = key(x_k)
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / args.temperature
            labels = torch.zeros(len(q), dtype=torch.long)  # the positive is column 0
            loss = F.cross_entropy(logits, labels)

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            keys = hvd.allgather(k)[-args.queue:]  # every rank enqueues the same global keys
            slots = (queue_ptr + torch.arange(len(keys))) % args.queue
            queue[slots] = keys
            queue_ptr = (queue_ptr + len(keys)) % args.queue

            loss_sum += loss.item()
            acc_sum += (logits.argmax(1) == 0).float().mean().item()
            step += 1
            bar.update(1)

        stats = hvd.allreduce(torch.tensor([loss_sum, acc_sum]) / steps_per_epoch,
                              op=hvd.Average, name="epoch_stats")
        if rank == 0:
            knn = evaluate(query, data)
            now = time.time()
            record["epochs"].append({
                "epoch": epoch, "loss": stats[0].item(), "pretext_acc": stats[1].item(),
                "knn_acc": knn, "lr": lr, "epoch_seconds": now - epoch_start,
                "elapsed_seconds": now - start})
            bar.set_postfix(loss=f"{stats[0]:.3f}", knn=f"{knn:.3f}")
            say(f"epoch {epoch:3d}/{args.epochs}: loss {stats[0]:.4f}  pretext acc "
                f"{stats[1]:.3f}  kNN acc {knn:.3f}  ({now - epoch_start:.1f}s)")
            save(record, args.out)
    bar.close()

    verdict = None
    if rank == 0:
        record["train_seconds"] = time.time() - start
        save(record, args.out)
        epochs = record["epochs"][1:]
        finite = all(math.isfinite(e[k]) for e in epochs for k in ("loss", "pretext_acc", "knn_acc"))
        # The random initial queue makes the first steps artificially easy, so the reference is
        # the first epoch that starts with a queue full of real keys.
        fill_steps = math.ceil(args.queue / (size * args.batch_size))
        ref = epochs[min(math.ceil(fill_steps / steps_per_epoch), len(epochs) - 1)]
        fell = epochs[-1]["loss"] < ref["loss"]
        say(f"done in {record['train_seconds']:.1f}s: final loss {epochs[-1]['loss']:.4f}, "
            f"pretext acc {epochs[-1]['pretext_acc']:.3f}, kNN acc {epochs[-1]['knn_acc']:.3f}")
        if args.quick:
            verdict = None if finite and fell else (
                "diverged (NaN/inf in the metrics)" if not finite else
                f"loss did not fall (epoch {ref['epoch']} {ref['loss']:.4f} -> "
                f"epoch {epochs[-1]['epoch']} {epochs[-1]['loss']:.4f})")
    verdict = hvd.broadcast_object(verdict, root_rank=0, name="verdict")
    if verdict:
        if rank == 0:
            say(f"--quick check FAILED: {verdict}", stream=sys.stderr)
        sys.exit(1)
    if args.quick and rank == 0:
        say("--quick check passed: the loss fell and stayed finite")


if __name__ == "__main__":
    main()
