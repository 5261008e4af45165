"""ShuffleBatchNorm benchmark; run on N ranks, e.g.

    mpirun -np 2 --oversubscribe --allow-run-as-root .venv/bin/python benchmarks/bench.py --out r.json

Parts (``--parts``, default all):
  micro  per-layer forward+backward of ShuffleBatchNorm (each transport, in both modes:
         "shuffle-*" borrows from one other group, "others-*" from all the others pooled; and
         without any communication: "shuffle-local", "others-local"), BatchNorm2d and SyncBN on
         one (N, C, H, W) input; the raw primitives the layer's exchanges are made of, alone and
         placed around a BatchNorm2d as in the layer; all interleaved in one loop. Plus the
         tensors each layer keeps for backward. With --no-horovod: the mpi4py ops only (a control).
  macro  training steps (hvd.DistributedOptimizer in every variant) and key-encoder forwards
         (torch.no_grad, train mode, as MoCo's key encoder) of ResNet-18/50-style networks.
  bytes  bytes each rank hands to / gets from collectives per step, counted by wrappers.

Variants: bn (plain BatchNorm2d), shuffle-<transport> (ShuffleBatchNorm, borrow_from=
"permutation"), others-<transport> (borrow_from="others"), syncbn, original, sample-shuffle
(baselines.py); <transport> is mpi or horovod.

Timings: variants are interleaved (A, B, C, A, B, C, ... with the order rotated every round),
each timed block starts after a barrier, and a block's time is that of the SLOWEST rank (what a
synchronous step sees). Rank 0 writes every sample to ``--out`` (JSON); report.py summarises.
``--smoke``: tiny sizes and 2-3 iterations, for CI; it asserts nothing about timings.
"""
import argparse
import gc
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import horovod
import horovod.torch as hvd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
from models import MODELS  # noqa: E402
from hvd_shufflebn import ShuffleBatchNorm, convert_shuffle_batchnorm  # noqa: E402
from hvd_shufflebn.transports import mpi as mpi_transport  # noqa: E402
from hvd_shufflebn.transports.base import Transport  # noqa: E402

SYNC_BN = baselines.load_sync_batchnorm()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="seconds-long run for CI")
    p.add_argument("--parts", default="micro,macro,bytes")
    p.add_argument("--models", default="resnet18,resnet50,thin")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of the macro variants (default: all available)")
    p.add_argument("--micro-shape", default="32,64,8,8", help="per-rank input N,C,H,W")
    p.add_argument("--micro-rounds", type=int, default=40)
    p.add_argument("--micro-inner", type=int, default=10, help="calls per timed block")
    p.add_argument("--batch", default="resnet18:32,resnet50:16,thin:32", help="per-rank batch per model")
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    p.add_argument("--out", default=None, help="JSON file written by rank 0")
    p.add_argument("--no-horovod", action="store_true",
                   help="micro only, mpi4py without hvd.init(): a control for the mpi numbers")
    args = p.parse_args()
    if args.smoke:
        args.micro_shape, args.micro_rounds, args.micro_inner = "4,8,4,4", 3, 2
        args.models, args.batch, args.image, args.warmup, args.steps = "tiny", "tiny:4", 16, 1, 2
    args.parts = args.parts.split(",")
    args.models = args.models.split(",")
    args.batch = {k: int(v) for k, v in (kv.split(":") for kv in args.batch.split(","))}
    args.micro_shape = tuple(int(v) for v in args.micro_shape.split(","))
    return args


# --- variants: every one is a name in a table ----------------------------------------------------

def shuffle_transports():
    """Transports of ShuffleBatchNorm usable in this launch (only Horovod's before the option)."""
    if "transport" not in inspect.signature(ShuffleBatchNorm.__init__).parameters:
        return {"horovod": {}}
    found = {"horovod": {"transport": "horovod"}}
    if mpi_transport.usable():
        found["mpi"] = {"transport": "mpi"}
    return found


def borrows_from_others():
    """Whether this version of the layer has ``borrow_from="others"``."""
    return "borrow_from" in inspect.signature(ShuffleBatchNorm.__init__).parameters


def layer_variants():
    """{variant name: ShuffleBatchNorm keyword arguments}: shuffle-<transport> (the default mode,
    a permutation) and others-<transport> (borrow_from="others") for each usable transport."""
    found = {f"shuffle-{t}": kwargs for t, kwargs in shuffle_transports().items()}
    if borrows_from_others():
        found.update({f"others-{t}": dict(kwargs, borrow_from="others")
                      for t, kwargs in shuffle_transports().items()})
    return found


def convert(variant, model):
    """``model`` with its BatchNorm layers replaced as ``variant`` does it."""
    layers = layer_variants()
    if variant in layers:
        return convert_shuffle_batchnorm(model, **layers[variant])
    if variant == "syncbn":
        return SYNC_BN.convert_sync_batchnorm(model)
    if variant == "original":
        return baselines.convert_original(model)
    return model  # "bn" and "sample-shuffle" keep plain BatchNorm


def macro_variants(args):
    names = ["bn"] + list(layer_variants())
    names += (["syncbn"] if SYNC_BN else []) + ["original", "sample-shuffle"]
    if args.variants:
        names = [n for n in names if n in args.variants.split(",")]
    return names


def trains(variant):
    return variant != "sample-shuffle"  # MoCo shuffles samples around the key encoder only


# --- timing --------------------------------------------------------------------------------------

def interleave(ops, rounds, inner, warmup, comm):
    """Per op, ``rounds`` samples of the mean time of ``inner`` calls, slowest rank, interleaved."""
    names = list(ops)
    for _ in range(warmup):
        for name in names:
            ops[name]()
    samples = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            comm.Barrier()
            start = time.perf_counter()
            for _ in range(inner):
                ops[name]()
            samples[name].append((time.perf_counter() - start) / inner)
    everyone = comm.allgather(samples)
    return {name: [max(s[name][i] for s in everyone) for i in range(rounds)] for name in names}


def summary(samples):
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return f"median {q(0.5) * 1e3:9.3f} ms  IQR {q(0.25) * 1e3:.3f}-{q(0.75) * 1e3:.3f}"


# --- micro ---------------------------------------------------------------------------------------

def micro(args, comm):
    """With ``--no-horovod`` (Horovod not initialised) only BatchNorm2d and the mpi4py ops run: the
    control that tells Horovod's background thread apart from the machine's scheduling."""
    from mpi4py import MPI
    n, c, h, w = args.micro_shape
    rank, size, with_hvd = comm.Get_rank(), comm.Get_size(), hvd.is_initialized()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(n, c, h, w, generator=gen).requires_grad_()
    dy = torch.randn(n, c, h, w, generator=gen)

    bn = nn.BatchNorm2d(c)
    layers = {"bn": bn}
    if with_hvd:
        for variant, kwargs in layer_variants().items():
            layers[variant] = ShuffleBatchNorm(c, name=f"micro.{variant}", **kwargs)
        if SYNC_BN:
            layers["syncbn"] = SYNC_BN.SyncBatchNorm(c)

    def fwd_bwd(layer):
        inputs = [x] + list(layer.parameters())

        def run():
            torch.autograd.grad(layer(x), inputs, dy)
        return run
    ops = {name: fwd_bwd(layer) for name, layer in layers.items()}
    local = shuffle_without_communication(c, x, dy) if with_hvd else None
    if local:
        ops["shuffle-local"] = local
    local = (shuffle_without_communication(c, x, dy, borrow_from="others")
             if with_hvd and borrows_from_others() else None)
    if local:
        ops["others-local"] = local

    # The raw primitives, with the layer's packet sizes: forward sends 2C+1 float64 to one rank and
    # sums 2C+5 over all ranks; backward sends 2C back. A fixed shift: same bytes per rank.
    # borrow_from="others": forward sums the same 2C+5, backward sums 2C over all ranks.
    dest, source = (rank + 1) % size, (rank - 1) % size
    fwd, fwd_in = torch.randn(1, 2 * c + 1, dtype=torch.float64), torch.empty(1, 2 * c + 1, dtype=torch.float64)
    bwd, bwd_in = torch.randn(1, 2 * c, dtype=torch.float64), torch.empty(1, 2 * c, dtype=torch.float64)
    sums, sums_out = torch.randn(2 * c + 5, dtype=torch.float64), torch.empty(2 * c + 5, dtype=torch.float64)
    bwd_sum = torch.empty(2 * c, dtype=torch.float64)
    gathered = torch.empty(size, 2 * c + 1, dtype=torch.float64)
    mpi = MPI.COMM_WORLD.Dup()  # as the mpi transport does: its own communicator
    splits = torch.zeros(size, dtype=torch.int32)
    splits[dest] = 1

    # Each transport's exchanges as raw calls: forward (mpi: Allreduce then Sendrecv; horovod:
    # alltoall + allreduce submitted together, one cycle) and backward (one move).
    def mpi_fwd():
        mpi.Allreduce(sums.numpy(), sums_out.numpy())
        mpi.Sendrecv(fwd.numpy(), dest, 0, fwd_in.numpy(), source, 0)

    def mpi_bwd():
        mpi.Sendrecv(bwd.numpy(), source, 1, bwd_in.numpy(), dest, 1)

    def mpi_bwd_sum():
        mpi.Allreduce(bwd.numpy(), bwd_sum.numpy())

    def hvd_fwd():
        handles = (hvd.alltoall_async(fwd, splits=splits, name="raw.fwd.alltoall"),
                   hvd.allreduce_async(sums, op=hvd.Sum, name="raw.fwd.allreduce"))
        for handle in handles:
            hvd.synchronize(handle)

    def hvd_bwd():
        hvd.alltoall(bwd, splits=splits, name="raw.bwd.alltoall")

    # borrow_from="others": one sum each way, no move.
    def mpi_fwd_sum():
        mpi.Allreduce(sums.numpy(), sums_out.numpy())

    def hvd_fwd_sum():
        hvd.allreduce(sums, op=hvd.Sum, name="raw.fwd.allreduce")

    def hvd_bwd_sum():
        hvd.allreduce(bwd[0], op=hvd.Sum, name="raw.bwd.allreduce")

    # The same raw calls between a BatchNorm2d's forward and backward, as in the layer: how much of
    # a layer's cost is waiting for the partner rank (scheduling), not the library's own work.
    def around_bn(exchange_fwd, exchange_bwd):
        def run():
            y = bn(x)
            exchange_fwd()
            torch.autograd.grad(y, [x, *bn.parameters()], dy)
            exchange_bwd()
        return run

    ops.update({
        "bn+mpi.floor": around_bn(mpi_fwd, mpi_bwd),
        "mpi.Sendrecv": lambda: mpi.Sendrecv(fwd.numpy(), dest, 0, fwd_in.numpy(), source, 0),
        "mpi.Allreduce": lambda: mpi.Allreduce(sums.numpy(), sums_out.numpy()),
        "mpi.Allgather": lambda: mpi.Allgather(fwd.numpy(), gathered.numpy()),
        "mpi.floor": lambda: (mpi_fwd(), mpi_bwd()),
    })
    if with_hvd and borrows_from_others():
        ops.update({
            "bn+mpi.floor-others": around_bn(mpi_fwd_sum, mpi_bwd_sum),
            "mpi.floor-others": lambda: (mpi_fwd_sum(), mpi_bwd_sum()),
        })
    if with_hvd:
        ops.update({
            "bn+hvd.floor": around_bn(hvd_fwd, hvd_bwd),
            "hvd.alltoall": lambda: hvd.alltoall(fwd, splits=splits, name="raw.alltoall"),
            "hvd.allreduce": lambda: hvd.allreduce(sums, op=hvd.Sum, name="raw.allreduce"),
            "hvd.allgather": lambda: hvd.allgather(fwd, name="raw.allgather"),
            "hvd.floor": lambda: (hvd_fwd(), hvd_bwd()),
        })
        if borrows_from_others():
            ops.update({
                "bn+hvd.floor-others": around_bn(hvd_fwd_sum, hvd_bwd_sum),
                "hvd.floor-others": lambda: (hvd_fwd_sum(), hvd_bwd_sum()),
            })
    samples = interleave(ops, args.micro_rounds, args.micro_inner, min(3, args.warmup), comm)
    memory = {name: saved_tensors(layer, x) for name, layer in layers.items()}
    return {"shape": args.micro_shape, "inner": args.micro_inner, "samples": samples,
            "memory": memory}


class Loopback(Transport):
    """A transport that communicates nothing: rank 0 of 2 whose partner holds the same batch.
    (What it does not define, e.g. the others mode's forward sum, it inherits from the base
    class, which builds it from ``exchange``.)"""
    rank, size, broken, kind, reason = 0, 2, None, "loopback", "benchmark"

    def current(self, requested):
        return True

    def rows_device(self, device):
        return torch.device("cpu")  # as the host-staged transports

    def exchange(self, name, rows, expect, width, device, context, header=None, sums=None,
                 check=None, match=0):
        if header is not None:
            check(header * 2)
            sums = sums * 2
        return {source: rows[source] for source in expect}, sums

    def sum(self, name, totals, context):  # borrow_from="others"
        return totals * 2


def shuffle_without_communication(c, x, dy, **kwargs):
    """ShuffleBatchNorm's forward+backward with the Loopback transport: the layer's own math and
    Python, i.e. the part of its overhead that is not the exchange. Sets the layer's transport
    (an internal attribute); None if that has changed. ``kwargs``: e.g. borrow_from="others"."""
    try:
        layer = ShuffleBatchNorm(c, name="local-" + kwargs.get("borrow_from", "permutation"),
                                 **kwargs)
        layer._transport = Loopback()

        def run():
            layer(x).backward(dy)
        run()
        return run
    except Exception as error:  # noqa: BLE001 (internal API moved: skip this one measurement)
        print(f"shuffle-local skipped: {error!r}", flush=True)
        return None


def saved_tensors(layer, x):
    """What ``layer`` keeps alive between forward and backward: every saved tensor, and the bytes of
    those that are new (not the input, a parameter or a buffer, which exist anyway)."""
    existing = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters(), *layer.buffers()]}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.backward(torch.ones_like(y))  # every rank must run the backward exchange too
    new = [t for ptr, t in saved.items() if ptr not in existing]
    return {"saved": [list(t.shape) for t in saved.values()],
            "new": [list(t.shape) for t in new],
            "new_bytes": sum(t.untyped_storage().nbytes() for t in new)}


# --- macro ---------------------------------------------------------------------------------------

def build(variant, model_name):
    torch.manual_seed(0)  # the same weights on every rank and in every variant
    model = convert(variant, MODELS[model_name]()).train()
    # The same gradient allreduce names in every variant (their steps never overlap): distinct
    # names would overflow Horovod's response cache (1024 entries) with ResNet-50's 161 tensors
    # per variant, and evictions would slow every variant.
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-4),
                                         named_parameters=model.named_parameters())
    encoder = baselines.SampleShuffle(model) if variant == "sample-shuffle" else model
    return model, optimizer, encoder


def macro(args, comm, model_name):
    batch = args.batch[model_name]
    gen = torch.Generator().manual_seed(hvd.rank())
    x = torch.randn(batch, 3, args.image, args.image, generator=gen)
    built = {v: build(v, model_name) for v in macro_variants(args)}

    def train_step(model, optimizer):
        def run():
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        return run

    def key_forward(encoder):
        def run():
            with torch.no_grad():
                encoder(x)
        return run
    train = {v: train_step(m, o) for v, (m, o, _) in built.items() if trains(v)}
    keyfwd = {v: key_forward(e) for v, (_, _, e) in built.items()}
    result = {"batch": batch, "image": args.image,
              "bn_layers": sum(isinstance(m, nn.BatchNorm2d) for m in MODELS[model_name]().modules()),
              "train": interleave(train, args.steps, 1, args.warmup, comm),
              "keyfwd": interleave(keyfwd, args.steps, 1, args.warmup, comm)}
    del built
    return result


def count_bytes(args, model_name):
    """Bytes per rank for one training step and one key-encoder forward of each variant, counted
    after a warm-up step (the first step also runs one-time checks and creates the transports)."""
    counter = baselines.ByteCounter().install()
    batch = args.batch[model_name]
    x = torch.randn(batch, 3, args.image, args.image)
    result = {}
    try:
        for variant in macro_variants(args):
            model, optimizer, encoder = build(variant, model_name)
            result[variant] = {}
            wrapped = []
            for what in (["train"] if trains(variant) else []) + ["keyfwd"]:
                for counting in (False, True):
                    if counting and variant.endswith("-mpi") and not wrapped:
                        wrapped = wrap_mpi_comms(counter)
                    counter.reset()
                    optimizer.zero_grad()
                    if what == "train":
                        model(x).square().mean().backward()
                        optimizer.step()
                    else:
                        with torch.no_grad():
                            encoder(x)
                result[variant][what] = dict(counter.counts)
            for owner, comm in wrapped:
                owner.comm = comm
            del model, optimizer, encoder
    finally:
        counter.uninstall()
    return result


def wrap_mpi_comms(counter):
    """Make every mpi4py communicator held by an hvd_shufflebn object (an attribute ``comm`` of
    its transports, wherever they are kept) count its calls; return what to restore."""
    from mpi4py import MPI
    wrapped = []
    for obj in gc.get_objects():
        if (str(getattr(type(obj), "__module__", "")).startswith("hvd_shufflebn")
                and isinstance(getattr(obj, "comm", None), MPI.Comm)):
            wrapped.append((obj, obj.comm))
            obj.comm = counter.wrap_comm(obj.comm)
    return wrapped


# --- main ----------------------------------------------------------------------------------------

def meta(args, comm):
    launcher = ("OMPI_MCA_orte_", "OMPI_MCA_ess", "OMPI_MCA_pmix", "OMPI_MCA_initial_wdir",
                "OMPI_MCA_shmem_")  # set by mpirun itself, not by us
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("HOROVOD_", "OMPI_MCA_")) and not k.startswith(launcher)}
    with_hvd = hvd.is_initialized()
    return {"ranks": comm.Get_size(), "argv": sys.argv, "smoke": args.smoke, "env": env,
            "horovod_initialised": with_hvd,
            "transports": list(shuffle_transports()) if with_hvd else [],
            "syncbn": SYNC_BN is not None,
            "torch": torch.__version__, "horovod": horovod.__version__, "python": platform.python_version(),
            "mpi_enabled": with_hvd and hvd.mpi_enabled(), "threads": torch.get_num_threads(),
            "cpu": cpu_model(), "cores": os.cpu_count(), "library": library_digest(),
            "loadavg_start": open("/proc/loadavg").read().split()[:3]}


def library_digest():
    """A short hash of hvd_shufflebn's sources: which version of the layer a result measured."""
    import hashlib
    import hvd_shufflebn
    digest = hashlib.sha1()
    for path in sorted(Path(hvd_shufflebn.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    args = parse_args()
    torch.set_num_threads(1)  # ranks share 2 cores; intra-op threads would fight each other
    if args.no_horovod:
        args.parts, args.models = ["micro"], []
    else:
        hvd.init()
    from mpi4py import MPI
    comm = MPI.COMM_WORLD.Dup()  # barriers and result gathering, apart from what is measured
    rank0 = comm.Get_rank() == 0
    log = (lambda *a: print(*a, flush=True)) if rank0 else (lambda *a: None)
    result = {"meta": meta(args, comm)}
    log(f"{comm.Get_size()} ranks, transports {result['meta']['transports']}, "
        f"env {result['meta']['env']}")
    started = time.perf_counter()
    if "micro" in args.parts:
        result["micro"] = micro(args, comm)
        log(f"micro: {time.perf_counter() - started:.1f} s")
        for name, s in result["micro"]["samples"].items():
            log(f"  micro {name:20s} {summary(s)}")
    for model_name in args.models:
        if "macro" in args.parts:
            result.setdefault("macro", {})[model_name] = r = macro(args, comm, model_name)
            for what in ("train", "keyfwd"):
                for name, s in r[what].items():
                    log(f"  {model_name} {what:6s} {name:16s} {summary(s)}")
        if "bytes" in args.parts:
            result.setdefault("bytes", {})[model_name] = count_bytes(args, model_name)
        log(f"{model_name}: {time.perf_counter() - started:.1f} s")
    result["meta"]["seconds"] = time.perf_counter() - started
    result["meta"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if rank0 and args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    log(f"done in {result['meta']['seconds']:.1f} s")


if __name__ == "__main__":
    main()
