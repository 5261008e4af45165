"""MoCo v2-style self-supervised pretraining on sklearn's 8x8 digits, on Horovod, CPU only.

The query encoder keeps ordinary per-rank BatchNorm; the momentum KEY encoder's BatchNorm is
chosen with --bn:
  shuffle  convert_shuffle_batchnorm: rank r normalises with rank p[r]'s batch statistics
           (with --groups k: each rank's batch is k groups, group g borrows from group p[g])
  plain    per-rank BatchNorm, the baseline MoCo calls "cheating" (query and positive key
           share the statistics of the same small batch, which leaks into the logits)
  sync     statistics of the global batch, via examples/sync_batchnorm.py
  others   convert_shuffle_batchnorm(..., borrow_from="others"): rank r normalises with the
           pooled statistics of all the OTHER ranks' batches: no leak, and a lender R-1 times
           larger than shuffle's (with --groups k: group g with those of all groups but g, on
           its own rank and on the others)

Each epoch rank 0 reports the pretext (InfoNCE) loss, the pretext accuracy (is the positive
key ranked first among positive + queue) and the weighted k-NN accuracy of the frozen query
encoder's backbone features on held-out digits. At the end it adds probes that are not
saturated on this data (few-shot nearest centroid, a linear probe on 10 labels per class),
with raw pixels and the untrained encoder as references, and writes everything to --out.

--simulate-ranks R runs the same math in ONE process without Horovod: the process holds all R
ranks' batches (the same shards and augmentation generators as R real ranks), the query
encoder normalises each rank's slice separately, and the gradient is the mean over ranks of the
per-rank mean losses, which is what Horovod's DistributedOptimizer averaging gives. The shuffle
and others key encoders are then the same ShuffleBatchNorm layer with transport="local" and
groups_per_rank=R (R*k with --groups k): R ranks' groups in one process.

    .venv/bin/horovodrun -np 8 .venv/bin/python examples/moco_digits.py --bn shuffle
    .venv/bin/horovodrun -np 2 .venv/bin/python examples/moco_digits.py --quick --bn plain
    .venv/bin/horovodrun -np 8 .venv/bin/python examples/moco_digits.py --bn others --batch-size 8
    .venv/bin/python examples/moco_digits.py --simulate-ranks 8 --bn shuffle --groups 2
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import say  # noqa: E402

hvd = None  # horovod.torch, imported only when running under a launcher (not --simulate-ranks)

N_TEST = 500      # held-out digits; the split is fixed (SPLIT_SEED) so every run sees the same
SPLIT_SEED = 0
QUICK_TRAIN = 640  # --quick trains on this many of the training digits
PROBE_SEED = 0    # the labelled subsets of the probes: the same for every run and reference
FEW_SHOT = (1, 5)  # labels per class of the nearest-centroid probes
FEW_SHOT_DRAWS = 50
LINEAR_SHOT, LINEAR_DRAWS = 10, 20  # the linear probe: 10 labels per class, 20 draws


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bn", choices=["shuffle", "plain", "sync", "others"], default="shuffle",
                   help="normalisation of the key encoder (default: shuffle)")
    p.add_argument("--groups", type=int, default=1,
                   help="shuffle and others: groups_per_rank of the layer (default 1)")
    p.add_argument("--simulate-ranks", type=int, default=0, metavar="R",
                   help="one process, no Horovod, holding R ranks' batches (same math)")
    p.add_argument("--epochs", type=int, default=None, help="default 100, or 20 with --quick")
    p.add_argument("--train-size", type=int, default=None,
                   help="train on the first N training digits (default all; 640 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--queue", type=int, default=256, help="number of negative keys")
    p.add_argument("--lr", type=float, default=0.06, help="SGD learning rate (cosine schedule)")
    p.add_argument("--momentum-key", type=float, default=0.99, help="key encoder EMA momentum")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--width", type=int, default=32, help="channels of the first conv layers")
    p.add_argument("--knn-every", type=int, default=1, help="k-NN accuracy every N epochs")
    p.add_argument("--probe-draws", type=int, default=None, metavar="K",
                   help=f"labelled subsets per probe (default {FEW_SHOT_DRAWS} few-shot, "
                        f"{LINEAR_DRAWS} linear)")
    p.add_argument("--out", default=None, help="JSON file for the per-epoch metrics")
    p.add_argument("--quick", action="store_true",
                   help="short smoke run; exits non-zero if the loss did not fall or diverged")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 20 if args.quick else 100
    if args.train_size is None and args.quick:
        args.train_size = QUICK_TRAIN
    if args.groups < 1:
        p.error("--groups must be >= 1")
    if args.groups != 1 and args.bn not in ("shuffle", "others"):
        p.error("--groups applies to --bn shuffle and --bn others only")
    if args.bn == "others" and args.simulate_ranks == 1 and args.groups == 1:
        p.error("--bn others needs at least 2 groups: --simulate-ranks 2 or more, or --groups")
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


class PerRankBatchNorm2d(nn.BatchNorm2d):
    """Simulated ranks: the batch is `ranks` equal slices in rank order, and each slice is
    normalised with its own statistics, as each rank's BatchNorm would. The running statistics
    follow rank 0's slice only: under Horovod the evaluated encoder is rank 0's."""
    ranks = 1

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        return torch.cat([F.batch_norm(chunk, *((self.running_mean, self.running_var) if r == 0
                                                else (None, None)),
                                       self.weight, self.bias, True, self.momentum, self.eps)
                          for r, chunk in enumerate(x.chunk(self.ranks))])


def replace_batchnorm(module, cls, ranks):
    """Swap every nn.BatchNorm2d for `cls` (same parameters and buffers, same tensors)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = cls  # a subclass that adds no state, so changing the class is enough
            m.ranks = ranks
    return module


def make_key_encoder(query_encoder, bn, seed, groups=1, simulate_ranks=0):
    key = copy.deepcopy(query_encoder)
    if bn in ("shuffle", "others"):
        from hvd_shufflebn import convert_shuffle_batchnorm
        borrow_from = "others" if bn == "others" else "permutation"
        # Simulated: R ranks of k groups = R*k groups of one batch, in rank order.
        where = (dict(transport="local", groups_per_rank=simulate_ranks * groups)
                 if simulate_ranks else dict(groups_per_rank=groups))
        key = convert_shuffle_batchnorm(key, seed=seed, borrow_from=borrow_from, **where)
    elif bn == "sync" and not simulate_ranks:
        from sync_batchnorm import convert_sync_batchnorm
        key = convert_sync_batchnorm(key)
    elif bn == "plain" and simulate_ranks:
        replace_batchnorm(key, PerRankBatchNorm2d, simulate_ranks)
    # (sync with simulated ranks: ordinary BatchNorm over the whole global batch)
    for p in key.parameters():
        p.requires_grad_(False)  # updated only as a moving average of the query encoder
    q_names = [n for n, _ in query_encoder.named_parameters()]
    assert [n for n, _ in key.named_parameters()] == q_names, "conversion changed parameters"
    return key


@torch.no_grad()
def momentum_update(key, query, m):
    for pk, pq in zip(key.parameters(), query.parameters()):
        pk.mul_(m).add_(pq.detach(), alpha=1 - m)


def describe_key_norms(key_encoder):
    """The key encoder's normalisation layers, e.g. "4 x ShuffleBatchNorm(borrow_from='others',
    groups_per_rank=1, transport='auto')" (what --bn made of them)."""
    kinds = []
    for m in key_encoder.modules():
        if isinstance(m, _BatchNorm):
            kind = type(m).__name__
            if hasattr(m, "borrow_from"):
                kind += (f"(borrow_from={m.borrow_from!r}, groups_per_rank={m.groups_per_rank}, "
                         f"transport={m.transport!r})")
            kinds.append(kind)
    return ", ".join(f"{kinds.count(k)} x {k}" for k in dict.fromkeys(kinds))


def report_first_step(key_encoder, bn):
    """On the first key forward, print per rank the own batch mean at the first BN layer and
    the mean that layer normalised with (rank p[r]'s mean in shuffle mode, the pooled mean of
    all other ranks in others mode)."""
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
        if bn == "shuffle" and module.groups_per_rank == 1:
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
        elif bn == "shuffle":
            say(f"rank {rank}: groups p = {module.last_permutation}")
        elif bn == "others" and module.groups_per_rank == 1:
            # The float64 reference from every rank's input: rank r's batch normalised with the
            # mean and biased variance of the union of all the other ranks' batches.
            xs = hvd.allgather(x.detach().double().contiguous(), name="first_step_inputs")
            chunks = xs.split(hvd.allgather(torch.tensor([len(x)]), name="first_step_n").tolist())
            others = torch.cat([c for q, c in enumerate(chunks) if q != rank])
            used = others.mean(dims)
            used_var = others.var(dims, unbiased=False)
            shape = [1, -1] + [1] * (x.dim() - 2)
            expected = ((x.double() - used.view(shape)) / torch.sqrt(used_var.view(shape)
                                                                     + module.eps)
                        * module.weight.double().view(shape) + module.bias.double().view(shape))
            gap = (output.double() - expected).abs().max().item()
            say(f"rank {rank}: own mean[0:3]={fmt(own_mean)} normalised with the pooled "
                f"mean[0:3]={fmt(used)} of the {len(chunks) - 1} other ranks; output mean[0:3]="
                f"{fmt(out_mean)} (max |output - float64 reference from the other ranks' "
                f"inputs| = {gap:.1e})")
        elif bn == "others":
            say(f"rank {rank}: each of {module.groups_per_rank} groups normalised with the "
                f"pooled statistics of all other groups; output mean[0:3]={fmt(out_mean)}")
        else:
            used = means.mean(0) if bn == "sync" else own_mean
            say(f"rank {rank}: own mean[0:3]={fmt(own_mean)} ({bn} BN: normalised with "
                f"{'the global' if bn == 'sync' else 'its own'} mean[0:3]={fmt(used)}); "
                f"output mean[0:3]={fmt(out_mean)}")

    handle = layer.register_forward_hook(hook)


def record_first_step(key_encoder, ranks, record):
    """Simulated ranks: on the first key forward, record how far from 0 each rank slice's mean
    is at the output of the first BN layer, before its affine part (root mean square over ranks
    and channels). Own statistics (plain) give 0; borrowed or global ones do not."""
    layer = next(m for m in key_encoder.modules() if isinstance(m, _BatchNorm))

    def hook(module, inputs, output):
        handle.remove()
        means = torch.stack([c.mean((0, 2, 3)) for c in output.chunk(ranks)])
        normalised = (means - module.bias) / module.weight
        record["first_step_key_offset"] = normalised.pow(2).mean().sqrt().item()

    handle = layer.register_forward_hook(hook)


# ------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def knn_accuracy(train_feats, train_y, test_feats, test_y, k=20, t=0.07, classes=10):
    """Weighted k-NN on cosine similarity (Wu et al. 2018), train features as the memory bank."""
    train_feats, test_feats = F.normalize(train_feats, dim=1), F.normalize(test_feats, dim=1)
    sim, idx = (test_feats @ train_feats.T).topk(k, dim=1)
    votes = torch.zeros(len(test_y), classes).scatter_add_(1, train_y[idx], (sim / t).exp())
    return (votes.argmax(1) == test_y).float().mean().item()


def labelled_subsets(train_y, shots, draws, classes=10):
    """`draws` index sets of `shots` training images per class, from a generator fixed by
    PROBE_SEED (and shots), so every run and every reference is probed on the same subsets."""
    gen = torch.Generator().manual_seed(PROBE_SEED * 1000 + shots)
    by_class = [torch.nonzero(train_y == c).flatten() for c in range(classes)]
    return [torch.cat([idx[torch.randperm(len(idx), generator=gen)[:shots]] for idx in by_class])
            for _ in range(draws)]


def mean_sd(values):
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1
            else 0.0}


@torch.no_grad()
def few_shot_accuracy(train_feats, train_y, test_feats, test_y, shots, draws):
    """Nearest centroid on cosine similarity: the class centroid is the mean of its `shots`
    L2-normalised labelled features; mean and sd of the test accuracy over `draws` subsets."""
    train_feats, test_feats = F.normalize(train_feats, dim=1), F.normalize(test_feats, dim=1)
    accs = []
    for idx in labelled_subsets(train_y, shots, draws):
        centroids = torch.stack([train_feats[idx][train_y[idx] == c].mean(0) for c in range(10)])
        pred = (test_feats @ F.normalize(centroids, dim=1).T).argmax(1)
        accs.append((pred == test_y).float().mean().item())
    return mean_sd(accs)


def linear_probe_accuracy(train_feats, train_y, test_feats, test_y, draws, shots=LINEAR_SHOT):
    """Multinomial logistic regression (scikit-learn defaults: L2, C=1, lbfgs) on `shots`
    labelled images per class, features standardised with the labelled subset's mean and sd;
    mean and sd of the test accuracy over `draws` subsets."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    accs = []
    for idx in labelled_subsets(train_y, shots, draws):
        scaler = StandardScaler().fit(train_feats[idx].numpy())
        clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train_feats[idx].numpy()),
                                                    train_y[idx].numpy())
        accs.append(float((clf.predict(scaler.transform(test_feats.numpy()))
                           == test_y.numpy()).mean()))
    return mean_sd(accs)


def probes(train_feats, train_y, test_feats, test_y, draws=None):
    """k-NN, few-shot and linear probes; `draws` subsets per probe (None: the defaults)."""
    out = {"knn_acc": knn_accuracy(train_feats, train_y, test_feats, test_y)}
    for shots in FEW_SHOT:
        out[f"{shots}shot"] = few_shot_accuracy(train_feats, train_y, test_feats, test_y, shots,
                                                draws or FEW_SHOT_DRAWS)
    out["linear"] = linear_probe_accuracy(train_feats, train_y, test_feats, test_y,
                                          draws or LINEAR_DRAWS)
    return out


@torch.no_grad()
def backbone_features(encoder, data):
    x_tr, _, x_te, _ = data
    was_training = encoder.training
    encoder.eval()  # frozen encoder: BN uses this rank's running statistics
    feats = encoder.backbone(x_tr), encoder.backbone(x_te)
    encoder.train(was_training)
    return feats


def evaluate(encoder, data):
    f_tr, f_te = backbone_features(encoder, data)
    return knn_accuracy(f_tr, data[1], f_te, data[3])


@torch.no_grad()
def statistics_distances(encoder, batches, ranks, eps=1e-5):
    """How far the statistics a rank's keys could be normalised with are from the rank's own,
    at the input of every BatchNorm layer of `encoder` (run as the query encoder is trained:
    per-rank BN), over `batches` of R equal rank slices. For a lender u and the own rank r the
    normalised output differs from what the own statistics give by a shift of the mean,
    (m_r - m_u) / sqrt(v_u + eps), and a scale, sqrt((v_r + eps) / (v_u + eps)); reported: the
    root mean square over channels, ranks and batches of the shift and of (scale - 1). Lenders:
    another rank (shuffle), the other half of another rank's batch (shuffle, 2 groups per rank),
    the global batch (sync), all the other ranks together (others)."""
    probe = replace_batchnorm(copy.deepcopy(encoder).train(), PerRankBatchNorm2d, ranks)
    layers = [m for m in probe.modules() if isinstance(m, nn.BatchNorm2d)]
    sums = {}

    def add(layer, lender, m_r, v_r, m_u, v_u):
        shift = ((m_r - m_u) / torch.sqrt(v_u + eps)).pow(2).mean().item()
        scale = (torch.sqrt((v_r + eps) / (v_u + eps)) - 1).pow(2).mean().item()
        s = sums.setdefault((layer, lender), [0.0, 0.0, 0])
        s[0] += shift
        s[1] += scale
        s[2] += 1

    def stats(x):
        return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)

    def hook(module, inputs, output):
        x = inputs[0].double()
        i = layers.index(module)
        own = [stats(c) for c in x.chunk(ranks)]
        glob = stats(x)
        for r in range(ranks):
            u = (r + 1) % ranks  # any other rank: slices are exchangeable
            add(i, "other rank", *own[r], *own[u])
            add(i, "half of another rank", *own[r], *stats(x.chunk(ranks)[u].chunk(2)[1]))
            add(i, "global batch", *own[r], *glob)
            others = torch.cat([c for q, c in enumerate(x.chunk(ranks)) if q != r])
            add(i, "all other ranks", *own[r], *stats(others))

    for layer in layers:
        layer.register_forward_hook(hook)
    for batch in batches:
        probe(batch)
    out = {}
    for (layer, lender), (shift, scale, n) in sorted(sums.items()):
        out.setdefault(lender, {"mean_shift": [], "scale_error": []})
        out[lender]["mean_shift"].append(math.sqrt(shift / n))
        out[lender]["scale_error"].append(math.sqrt(scale / n))
    return out  # lender -> {"mean_shift": [per layer], "scale_error": [per layer]}


# -------------------------------------------------------------------------------------- training

def save(record, path):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)


def train(args, log=say, progress=True):
    """Train one configuration; return the record (on rank 0; None on the other ranks)."""
    global hvd
    torch.set_num_threads(1)
    sim = args.simulate_ranks
    if sim:
        rank, size = 0, sim
        data = load_digits_split()
    else:
        # With more ranks than cores, Open MPI's default busy-polling makes every collective
        # take hundreds of milliseconds; yielding keeps them at a few milliseconds.
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        import horovod.torch
        hvd = horovod.torch
        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        # Only rank 0 imports scikit-learn: eight concurrent imports cost ~20 s on two cores.
        data = hvd.broadcast_object(load_digits_split() if rank == 0 else None, root_rank=0,
                                    name="digits")  # the default name differs between ranks
    my_ranks = list(range(size)) if sim else [rank]  # the ranks whose batches this process holds
    torch.manual_seed(args.seed)

    x_train = data[0][:args.train_size] if args.train_size else data[0]
    batch = args.batch_size
    steps_per_epoch = len(x_train) // (size * batch)
    if steps_per_epoch == 0:
        sys.exit(f"{len(x_train)} training digits are fewer than one global batch "
                 f"({size} ranks x {batch})")
    total_steps = steps_per_epoch * args.epochs

    query = Encoder(args.width)
    if not sim:
        hvd.broadcast_parameters(query.state_dict(), root_rank=0)
    key = make_key_encoder(query, args.bn, args.seed, args.groups, sim)
    if sim:
        replace_batchnorm(query, PerRankBatchNorm2d, sim)
    optimizer = torch.optim.SGD(query.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    if not sim:
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=query.named_parameters())
    # Same random initial queue on every rank; it is refilled with all ranks' keys each step.
    queue = F.normalize(torch.randn(args.queue, query.head[-1].out_features,
                                    generator=torch.Generator().manual_seed(args.seed)), dim=1)
    queue_ptr = 0
    aug_gens = {r: torch.Generator().manual_seed(args.seed * 1000 + r)  # distinct views per rank
                for r in my_ranks}

    record = {"args": vars(args), "ranks": size, "steps_per_epoch": steps_per_epoch,
              "train_size": len(x_train), "test_size": len(data[3]), "epochs": [],
              "step_losses": []}
    if rank == 0:
        # Reference points: raw pixels and the untrained encoder, with every probe.
        record["raw_pixels"] = probes(data[0].flatten(1), data[1], data[2].flatten(1), data[3],
                                      args.probe_draws)
        f_tr, f_te = backbone_features(query, data)
        record["untrained"] = probes(f_tr, data[1], f_te, data[3], args.probe_draws)
        record["knn_raw_pixels"] = record["raw_pixels"]["knn_acc"]
        record["epochs"].append({"epoch": 0, "knn_acc": record["untrained"]["knn_acc"]})
        log(f"{args.bn} BN key encoder{f' ({args.groups} groups per rank)' * (args.groups > 1)}, "
            f"{size} {'simulated ' * bool(sim)}ranks x batch {batch}, {len(x_train)} train / "
            f"{len(data[3])} test digits, {steps_per_epoch} steps/epoch; "
            f"k-NN acc: raw pixels {record['knn_raw_pixels']:.3f}, "
            f"untrained encoder {record['epochs'][0]['knn_acc']:.3f}")
        log(f"key encoder normalisation: {describe_key_norms(key)}")

    if sim:
        record_first_step(key, sim, record)
    else:
        report_first_step(key, args.bn)
    bar = tqdm(total=total_steps, disable=rank != 0 or not progress, mininterval=2,
               desc=f"moco[{args.bn}]")
    start = time.time()
    step = 0
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.time()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(
            args.seed * 1000 + epoch))  # same on every rank; each rank takes its own shard
        loss_sum = acc_sum = 0.0
        for i in range(steps_per_epoch):
            lr = 0.5 * args.lr * (1 + math.cos(math.pi * step / total_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            views_q, views_k = [], []
            for r in my_ranks:  # rank r's shard, views from rank r's generator, in rank order
                images = x_train[order[r::size][i * batch:(i + 1) * batch]]
                views_q.append(augment(images, aug_gens[r]))
                views_k.append(augment(images, aug_gens[r]))
            x_q, x_k = torch.cat(views_q), torch.cat(views_k)

            q = query(x_q)
            with torch.no_grad():
                momentum_update(key, query, args.momentum_key)
                k = key(x_k)
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / args.temperature
            labels = torch.zeros(len(q), dtype=torch.long)  # the positive is column 0
            # Equal slices: the mean over the global batch is the mean over ranks of the
            # per-rank mean losses, whose gradient is what Horovod's averaging gives.
            loss = F.cross_entropy(logits, labels)

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            keys = (k if sim else hvd.allgather(k))[-args.queue:]  # global keys, rank order
            slots = (queue_ptr + torch.arange(len(keys))) % args.queue
            queue[slots] = keys
            queue_ptr = (queue_ptr + len(keys)) % args.queue

            loss_sum += loss.item()
            acc_sum += (logits.argmax(1) == 0).float().mean().item()
            if sim:
                record["step_losses"].append(loss.item())
            else:
                record["step_losses"].append(
                    hvd.allreduce(loss.detach(), op=hvd.Average, name="step_loss").item())
            step += 1
            bar.update(1)

        stats = torch.tensor([loss_sum, acc_sum]) / steps_per_epoch
        if not sim:
            stats = hvd.allreduce(stats, op=hvd.Average, name="epoch_stats")
        if rank == 0:
            now = time.time()
            entry = {"epoch": epoch, "loss": stats[0].item(), "pretext_acc": stats[1].item(),
                     "lr": lr, "epoch_seconds": now - epoch_start, "elapsed_seconds": now - start}
            if epoch % args.knn_every == 0 or epoch == args.epochs:
                entry["knn_acc"] = evaluate(query, data)
            record["epochs"].append(entry)
            bar.set_postfix(loss=f"{stats[0]:.3f}", knn=f"{entry.get('knn_acc', float('nan')):.3f}")
            if progress:
                log(f"epoch {epoch:3d}/{args.epochs}: loss {stats[0]:.4f}  pretext acc "
                    f"{stats[1]:.3f}  kNN acc {entry.get('knn_acc', float('nan')):.3f}  "
                    f"({now - epoch_start:.1f}s)")
            save(record, args.out)
    bar.close()
    if rank != 0:
        return None

    record["train_seconds"] = time.time() - start
    f_tr, f_te = backbone_features(query, data)
    record["final"] = probes(f_tr, data[1], f_te, data[3], args.probe_draws)
    record["final"]["loss"] = record["epochs"][-1]["loss"]
    record["final"]["pretext_acc"] = record["epochs"][-1]["pretext_acc"]
    if sim:
        # Key views of the last epoch's first (up to) 5 global batches, in rank order.
        gen = torch.Generator().manual_seed(PROBE_SEED)
        batches = [torch.cat([augment(x_train[order[r::size][i * batch:(i + 1) * batch]], gen)
                              for r in range(size)]) for i in range(min(5, steps_per_epoch))]
        record["stat_distances"] = statistics_distances(query, batches, size)
    save(record, args.out)
    return record


def main():
    args = parse_args()
    record = train(args)
    rank = 0 if args.simulate_ranks else hvd.rank()

    verdict = None
    if rank == 0:
        epochs = record["epochs"][1:]
        final = record["final"]
        finite = all(math.isfinite(e[k]) for e in epochs for k in ("loss", "pretext_acc")) and \
            all(math.isfinite(v["mean"] if isinstance(v, dict) else v) for v in final.values())
        # The random initial queue makes the first steps artificially easy, so the reference is
        # the first epoch that starts with a queue full of real keys.
        fill_steps = math.ceil(args.queue / (record["ranks"] * args.batch_size))
        ref = epochs[min(math.ceil(fill_steps / record["steps_per_epoch"]), len(epochs) - 1)]
        fell = epochs[-1]["loss"] < ref["loss"]
        say(f"done in {record['train_seconds']:.1f}s: final loss {epochs[-1]['loss']:.4f}, "
            f"pretext acc {epochs[-1]['pretext_acc']:.3f}, kNN acc {final['knn_acc']:.3f}, "
            f"1-shot {final['1shot']['mean']:.3f}, 5-shot {final['5shot']['mean']:.3f}, "
            f"linear probe ({LINEAR_SHOT}/class) {final['linear']['mean']:.3f}; references "
            f"raw pixels / untrained encoder: 1-shot {record['raw_pixels']['1shot']['mean']:.3f} / "
            f"{record['untrained']['1shot']['mean']:.3f}, linear "
            f"{record['raw_pixels']['linear']['mean']:.3f} / "
            f"{record['untrained']['linear']['mean']:.3f}")
        if args.quick:
            verdict = None if finite and fell else (
                "diverged (NaN/inf in the metrics)" if not finite else
                f"loss did not fall (epoch {ref['epoch']} {ref['loss']:.4f} -> "
                f"epoch {epochs[-1]['epoch']} {epochs[-1]['loss']:.4f})")
    if not args.simulate_ranks:
        verdict = hvd.broadcast_object(verdict, root_rank=0, name="verdict")
    if verdict:
        if rank == 0:
            say(f"--quick check FAILED: {verdict}", stream=sys.stderr)
        sys.exit(1)
    if args.quick and rank == 0:
        say("--quick check passed: the loss fell and stayed finite")


if __name__ == "__main__":
    main()
