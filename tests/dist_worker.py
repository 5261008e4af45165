"""Distributed correctness checks, run on every rank by mpirun, horovodrun or torchrun:

    mpirun -np 4 python tests/dist_worker.py [case ...]      (no case: all of them)
    torchrun --nproc-per-node 3 tests/dist_worker.py         (torch.distributed on Gloo)

Each rank runs the layer on its own data; the inputs, upstream gradients and results of all
ranks are then gathered (with mpi4py under mpirun, through files under horovodrun --gloo, never
through the layer's own transport) and compared on every rank with an independent float64
reference computed by autograd in one process. Under torchrun the data travels through
torch.distributed's key-value store, and Horovod is not even imported. Any failed check raises, so
the rank exits non-zero and the launcher fails the run.
"""
import copy
import os
import pickle
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

TORCHRUN = "TORCHELASTIC_RUN_ID" in os.environ
DEFERRED = os.environ.get("HVD_SHUFFLEBN_DEFER_CHECKS") == "1"  # case_deferred_checks
if not TORCHRUN:
    import horovod.torch as hvd
from hvd_shufflebn import (ShuffleBatchNorm, ShuffleBatchNormError, convert_shuffle_batchnorm,
                           revert_shuffle_batchnorm)
from hvd_shufflebn.transports import make_transport
from reference import reference, reference_groups, reference_running

MPI = None
if "OMPI_COMM_WORLD_SIZE" in os.environ:  # launched by mpirun: mpi4py gathers the test data
    from mpi4py import MPI

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=2e-5),
       torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=6e-2, atol=6e-2)}


class Gatherer:
    """allgather of Python objects that does not go through Horovod."""

    def __init__(self):
        self.comm = MPI.COMM_WORLD.Dup() if MPI is not None else None
        self.store = dist.distributed_c10d._get_default_store() if TORCHRUN else None
        self.calls = 0
        # One directory per launch (the test driver makes it), shared by all ranks of that launch.
        self.dir = os.environ.get("SHUFFLEBN_TEST_DIR") or os.path.join(
            tempfile.gettempdir(), "shufflebn-" + os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT", ""))
        os.makedirs(self.dir, exist_ok=True)

    def __call__(self, obj, ranks=None):
        if self.comm is not None:
            gathered = self.comm.allgather(obj)
        elif self.store is not None:  # torchrun: the rendezvous store, not a process group
            self.calls += 1
            self.store.set(f"test.gather.{self.calls}.{RANK}", pickle.dumps(obj))
            gathered = [pickle.loads(self.store.get(f"test.gather.{self.calls}.{r}"))
                        for r in range(SIZE)]
        else:  # horovodrun --gloo: no MPI; exchange through files on the shared file system
            self.calls += 1
            path = os.path.join(self.dir, f"gather-{self.calls}-{{}}.pkl")
            with open(path.format(hvd.rank()) + ".tmp", "wb") as f:
                pickle.dump(obj, f)
            os.replace(path.format(hvd.rank()) + ".tmp", path.format(hvd.rank()))
            gathered = []
            for r in range(hvd.size()):
                deadline = time.time() + 120
                while not os.path.exists(path.format(r)):
                    assert time.time() < deadline, f"rank {r} never wrote {path.format(r)}"
                    time.sleep(0.001)
                with open(path.format(r), "rb") as f:
                    gathered.append(pickle.load(f))
            hvd.allreduce(torch.zeros(1), name=f"test.gather.{self.calls}")  # all have read
            os.remove(path.format(hvd.rank()))
        return gathered if ranks is None else [gathered[r] for r in ranks]


gather = None
RANK = SIZE = None
# The transports under test, comma-separated (all cases run for each, in one launch: a launch
# costs seconds of start-up): "auto" (MPI under mpirun, Horovod under Gloo), "horovod" or "mpi".
TRANSPORTS = os.environ.get("SHUFFLEBN_TEST_TRANSPORT", "auto").split(",")
TRANSPORT = TRANSPORTS[0]


def ShuffleBN(*args, **kwargs):
    return ShuffleBatchNorm(*args, transport=TRANSPORT, **kwargs)


def current_transport():
    return make_transport(TRANSPORT, "test")


def close(actual, expected, dtype, what):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype],
                               msg=lambda m: f"rank {RANK}: {what}: {m}")


def make_input(shape, dtype, seed, channels_last=False, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_(requires_grad)


def run_and_check(layer, shape, dtype=torch.float32, steps=2, channels_last=False, ranks=None,
                  expected_perm=None, seed=0):
    """Train ``layer`` for ``steps`` steps and compare everything with the reference."""
    ranks = list(range(SIZE)) if ranks is None else ranks
    me = ranks.index(RANK)
    perms = []
    for step in range(steps):
        running_before = None
        if layer.track_running_stats:
            running_before = (layer.running_mean.clone(), layer.running_var.clone(),
                              int(layer.num_batches_tracked))
        x = make_input(shape, dtype, seed=1000 * step + 17 * RANK + seed, channels_last=channels_last)
        dy = make_input(x.shape, dtype, seed=5000 + 1000 * step + RANK + seed, requires_grad=False)
        for p in layer.parameters():
            p.grad = None
        y = layer(x)
        y.backward(dy)
        perm = "others" if layer.borrow_from == "others" else layer.last_permutation
        perms.append(perm)
        if channels_last:
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert y.is_contiguous(memory_format=fmt), "output lost channels_last"
        assert y.dtype == x.dtype and x.grad.dtype == x.dtype

        mine = dict(x=x.detach(), dy=dy, y=y.detach(), dx=x.grad, perm=perm,
                    w=None if layer.weight is None else layer.weight.detach(),
                    b=None if layer.bias is None else layer.bias.detach(),
                    dw=None if layer.weight is None else layer.weight.grad,
                    db=None if layer.bias is None else layer.bias.grad)
        everyone = gather(mine, ranks)
        assert all(e["perm"] == perm for e in everyone), f"permutations differ: {everyone}"
        if expected_perm is not None:
            assert perm == tuple(expected_perm(step, len(ranks))), (perm, step)
        ys, dxs, dws, dbs = reference([e["x"] for e in everyone], [e["dy"] for e in everyone],
                                      [e["w"] for e in everyone], [e["b"] for e in everyone],
                                      perm, layer.eps)
        close(y, ys[me], dtype, f"output, step {step}")
        close(x.grad, dxs[me], dtype, f"input gradient, step {step}")
        if layer.affine:
            close(layer.weight.grad, dws[me], layer.weight.dtype, "weight gradient")
            close(layer.bias.grad, dbs[me], layer.bias.dtype, "bias gradient")
        if running_before is not None:
            mean_before, var_before, tracked = running_before
            momentum = layer.momentum if layer.momentum is not None else 1.0 / (tracked + 1)
            mean, var = reference_running([e["x"] for e in everyone], mean_before, var_before,
                                          momentum)
            close(layer.running_mean, mean, torch.float32, "running_mean")
            close(layer.running_var, var, torch.float32, "running_var")
            assert int(layer.num_batches_tracked) == tracked + 1
            buffers = gather(torch.cat([layer.running_mean, layer.running_var]), ranks)
            assert all(torch.equal(b, buffers[0]) for b in buffers), "running stats differ by rank"
    return perms


def is_derangement(p):
    return all(p[r] != r for r in range(len(p)))


# --- cases ------------------------------------------------------------------------------------

def case_shapes_and_uneven_batches():
    for dims, spatial in ((2, ()), (3, (7,)), (4, (3, 4)), (5, (2, 3, 2))):
        n = 2 + RANK % 3  # uneven batch sizes across ranks
        layer = ShuffleBN(5, momentum=0.3)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
        perms = run_and_check(layer, (n, 5) + spatial, torch.float64, steps=2)
        assert all(is_derangement(p) for p in perms), perms


def case_permutation_modes():
    shift = lambda step, size: [(r + 1) % size for r in range(size)]
    reverse = list(reversed(range(SIZE)))
    rotate = lambda step, size: [(r + step + 1) % size for r in range(size)]
    for spec, expected in (("shift", shift), (reverse, lambda s, n: reverse), (rotate, rotate),
                           ("random", None), ("derangement", None)):
        layer = ShuffleBN(4, momentum=None, permutation=spec, seed=7)
        perms = run_and_check(layer, (3, 4, 5), torch.float32, steps=3, expected_perm=expected)
        if spec == "derangement":
            assert all(is_derangement(p) for p in perms), perms
            if SIZE >= 3:
                assert len(set(perms)) > 1, f"the derangement never changed: {perms}"
        if spec == "random":
            assert all(sorted(p) == list(range(SIZE)) for p in perms), perms


def case_dtypes_and_memory_formats():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        layer = ShuffleBN(6)
        run_and_check(layer, (4, 6, 3, 3), dtype, steps=1)
    for shape in ((3, 6, 4, 5), (2, 6, 3, 4, 2)):
        layer = ShuffleBN(6)
        run_and_check(layer, shape, torch.float32, steps=1, channels_last=True)
    # A float64 layer: parameters and buffers in float64, statistics too.
    run_and_check(ShuffleBN(3, dtype=torch.float64), (3, 3, 4), torch.float64, steps=1)


def case_affine_and_tracking_off():
    layer = ShuffleBN(4, affine=False, track_running_stats=False)
    run_and_check(layer, (3, 4, 6), torch.float64, steps=1)
    # Without running statistics, eval mode normalises each batch with its own statistics and
    # communicates nothing, like SyncBatchNorm: rank 0 alone may evaluate.
    layer.eval()
    step = layer.step
    if RANK == 0:
        x = make_input((3, 4, 6), torch.float64, seed=99)
        expected = torch.nn.functional.batch_norm(x, None, None, training=True, eps=layer.eps)
        close(layer(x), expected, torch.float64, "eval output without running statistics")
    assert layer.step == step


def case_eval_is_local():
    layer = ShuffleBN(4)
    run_and_check(layer, (5, 4, 3), torch.float32, steps=1)
    layer.eval()
    x = make_input((2, 4, 3), torch.float32, seed=RANK, requires_grad=False)
    expected = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                            False, 0.0, layer.eps)
    # A different number of calls per rank: any communication would hang or mismatch.
    for _ in range(1 + 2 * RANK):
        close(layer(x), expected, torch.float32, "eval output")


def case_no_input_grad():
    """Key-encoder style (no_grad), and an input that needs no gradient but parameters do."""
    layer = ShuffleBN(3)
    x = make_input((4, 3, 5), torch.float32, seed=RANK, requires_grad=False)
    with torch.no_grad():
        y = layer(x)
    everyone = gather(x)
    ys, _, _, _ = reference(everyone, [torch.zeros_like(e) for e in everyone],
                            [layer.weight.detach()] * SIZE, [layer.bias.detach()] * SIZE,
                            layer.last_permutation, layer.eps)
    close(y, ys[RANK], torch.float32, "no_grad output")
    layer.weight.grad = None
    dy = make_input(x.shape, torch.float32, seed=99 + RANK, requires_grad=False)
    layer(x).backward(dy)  # only weight/bias need gradients: no backward exchange
    _, _, dws, _ = reference(gather(x), gather(dy), [layer.weight.detach()] * SIZE,
                             [layer.bias.detach()] * SIZE, layer.last_permutation, layer.eps)
    close(layer.weight.grad, dws[RANK], torch.float32, "weight gradient without input gradient")


def case_process_sets():
    if SIZE < 4:
        return
    halves = [list(range(0, SIZE, 2)), list(range(1, SIZE, 2))]
    mine = halves[RANK % 2]
    group = PROCESS_SETS[RANK % 2]
    layer = ShuffleBN(3, **({"process_group": group} if TORCHRUN else {"process_set": group}))
    perms = run_and_check(layer, (3, 3, 4), torch.float64, steps=2, ranks=mine)
    assert all(len(p) == len(mine) for p in perms)


def case_convert_roundtrip_distributed():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1), torch.nn.BatchNorm2d(3))
    model = convert_shuffle_batchnorm(model, permutation="shift", transport=TRANSPORT)
    x = make_input((3, 2, 6, 6), torch.float32, seed=RANK)
    model(x).sum().backward()
    assert all(m.last_permutation == tuple((r + 1) % SIZE for r in range(SIZE))
               for m in model.modules() if isinstance(m, ShuffleBatchNorm))
    reverted = revert_shuffle_batchnorm(model)
    assert type(reverted[1]) is torch.nn.BatchNorm2d and type(reverted[4]) is torch.nn.BatchNorm2d
    states = gather({k: v for k, v in reverted.state_dict().items() if "running" in k})
    assert all(torch.equal(s[k], states[0][k]) for s in states for k in s)


def expect_error(fn, *fragments):
    """``fn`` must raise ShuffleBatchNormError on every rank, with the same message."""
    try:
        fn()
    except ShuffleBatchNormError as error:
        message = str(error)
    else:
        raise AssertionError(f"rank {RANK}: no error raised")
    messages = gather(message)
    assert all(m == message for m in messages), f"messages differ between ranks: {messages}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def case_bad_inputs():
    bad = 2 if SIZE > 2 else SIZE - 1  # the one rank that misbehaves
    layer = ShuffleBN(4)
    good = lambda: make_input((3, 4, 5), torch.float32, seed=RANK)
    run_and_check(layer, (3, 4, 5), torch.float32, steps=1)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    step = layer.step

    def unchanged():
        for k, v in layer.state_dict().items():
            assert torch.equal(v, state[k]), f"{k} changed by a step that raised"
        assert layer.step == step, "the step counter moved in a step that raised"

    cases = [
        ((1, 4), [f"rank {bad}", "more than 1 value per channel"]),
        ((3, 5, 5), [f"rank {bad}", "expected 4 channels"]),
        ((4,), [f"rank {bad}", "at least 2 dims"]),
        ((0, 4, 3), [f"rank {bad}", "more than 1 value per channel"]),
    ]
    for bad_shape, fragments in cases:
        x = make_input(bad_shape, torch.float32, seed=1) if RANK == bad else good()
        expect_error(lambda: layer(x), *fragments)
        unchanged()
    x = good().detach().to(torch.int64) if RANK == bad else good()
    expect_error(lambda: layer(x), f"rank {bad}", "floating point")
    unchanged()

    # The input needs a gradient on some ranks only: a backward would hang.
    x = good().detach().requires_grad_(RANK != bad)
    expect_error(lambda: layer(x), "requires grad on ranks")
    unchanged()

    # Permutations that differ between ranks, or are not permutations on one rank.
    layer.permutation = "shift" if RANK != bad else list(range(SIZE))
    expect_error(lambda: layer(good()), "disagree on the permutation")
    # The same step again, now agreed on "shift": rows sent in the exchange that raised (rank
    # bad+1 -> rank bad) must not be taken for this step's.
    layer.permutation = "shift"
    run_and_check(layer, (3, 4, 5), torch.float32, steps=1, seed=77)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    step = layer.step
    layer.permutation = lambda step, size: list(range(size)) if RANK != bad else [0] * size
    expect_error(lambda: layer(good()), f"rank {bad}", "invalid permutation")
    unchanged()

    # After all that, the layer and Horovod still work.
    layer.permutation = "derangement"
    run_and_check(layer, (3, 4, 5), torch.float32, steps=1)

    # A layer built with a different num_features on one rank.
    other = ShuffleBN(5 if RANK == bad else 4)
    x = make_input((3, other.num_features, 2), torch.float32, seed=RANK)
    expect_error(lambda: other(x), "disagree on num_features", f"rank {bad} has 5")


def case_layers_called_in_different_orders():
    """The MPI transport matches calls by order: ranks in different layers must all raise.
    (Horovod's collectives would wait for each other forever instead: a hang, not testable.)"""
    first, second = ShuffleBN(3), ShuffleBN(3)
    x = make_input((2, 3, 2), torch.float32, seed=RANK)
    run_and_check(first, (2, 3, 2), torch.float32, steps=1)
    run_and_check(second, (2, 3, 2), torch.float32, steps=1)  # both past their first step
    if type(current_transport()).__name__ != "MPITransport":
        return
    expect_error(lambda: (first if RANK == 0 else second)(x), "ranks are in different layers",
                 f"rank 0 in {first.name!r}", f"rank 1 in {second.name!r}")


def case_nan_propagates():
    """Documented behaviour: NaN/Inf statistics propagate (like torch.nn.BatchNorm), no error."""
    layer = ShuffleBN(2, permutation="shift")
    x = make_input((3, 2, 4), torch.float32, seed=RANK, requires_grad=False)
    if RANK == 0:
        x[0, 0, 0] = float("nan")
    y = layer(x)
    borrower = (SIZE - 1)  # rank SIZE-1 borrows from rank 0 under "shift"
    assert torch.isnan(y[:, 0]).all() == (RANK == borrower), f"rank {RANK}: {y}"
    assert not torch.isnan(y[:, 1]).any()
    assert torch.isnan(layer.running_mean[0]) and not torch.isnan(layer.running_mean[1])


def case_statistics_cross_hosts():
    """With "shift", report which borrowed statistics came from another host (a multi-host run
    asserts that some did); the values are checked against the reference as everywhere else."""
    import socket
    layer = ShuffleBN(3, permutation="shift")
    run_and_check(layer, (4, 3, 2), torch.float64, steps=1)
    hosts = gather(socket.gethostname())
    crossing = [f"rank {r} on {hosts[r]} borrowed from rank {p} on {hosts[p]}"
                for r, p in enumerate(layer.last_permutation) if hosts[r] != hosts[p]]
    if RANK == 0:
        print("statistics crossed hosts: " + ("; ".join(crossing) if crossing else "none"))


def case_transport_choice():
    if TORCHRUN:
        expected = {"auto": "TorchDistributedTransport",
                    "torch.distributed": "TorchDistributedTransport"}[TRANSPORT]
        assert type(current_transport()).__name__ == expected
        assert "horovod" not in sys.modules, "Horovod was imported under torchrun"
        return
    on_mpi = hvd.mpi_enabled()
    expected = {"auto": "MPITransport" if on_mpi else "HorovodTransport",
                "horovod": "HorovodTransport", "mpi": "MPITransport"}[TRANSPORT]
    assert type(current_transport()).__name__ == expected
    if not on_mpi:  # asking for MPI under Gloo is the same clear error on every rank
        expect_error(lambda: ShuffleBatchNorm(3, transport="mpi")(torch.randn(4, 3)),
                     "transport='mpi' needs Horovod running on MPI")


def alternating(step, size):
    """Identity on even steps, a shift on odd ones: differs from step to step at every size, so a
    recomputation that used the wrong step cannot go unnoticed."""
    return list(range(size)) if step % 2 == 0 else [(r + 1) % size for r in range(size)]


def case_checkpoint_recompute():
    """Under torch.utils.checkpoint (reentrant and not), the recomputed forward replays the
    original: outputs and gradients equal the float64 reference of the permutation the ORIGINAL
    forward used, running statistics and the step advance once per real forward."""
    from torch.utils.checkpoint import checkpoint
    for reentrant in (False, True):
        for spec in (alternating, "random"):
            layer = ShuffleBN(3, momentum=0.5, permutation=spec, seed=3, dtype=torch.float64)
            with torch.no_grad():
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
            for step in range(3):
                x = make_input((4, 3, 5), torch.float64, seed=100 * step + 7 * RANK)
                dy = make_input(x.shape, torch.float64, seed=300 + 100 * step + RANK,
                                requires_grad=False)
                before = (layer.running_mean.clone(), layer.running_var.clone(), layer.step)
                layer.weight.grad = layer.bias.grad = None
                # The doubling around the layer makes the checkpointed block more than the layer.
                y = checkpoint(lambda t: layer(t * 2.0) * 0.5, x, use_reentrant=reentrant)
                perm = layer.last_permutation
                y.backward(dy)
                assert layer.step == before[2] + 1, "the recomputation advanced the step"
                assert perm == tuple(permutation_for_test(spec, layer.seed, before[2])), perm
                everyone = gather(dict(x=x.detach() * 2.0, dy=dy * 0.5, w=layer.weight.detach(),
                                       b=layer.bias.detach(), perm=perm))
                assert all(e["perm"] == perm for e in everyone)
                ys, dxs, dws, dbs = reference([e["x"] for e in everyone],
                                              [e["dy"] for e in everyone],
                                              [e["w"] for e in everyone],
                                              [e["b"] for e in everyone], perm, layer.eps)
                what = f"checkpoint(use_reentrant={reentrant}), step {step}"
                close(y, ys[RANK] * 0.5, torch.float64, f"output, {what}")
                close(x.grad, dxs[RANK] * 2.0, torch.float64, f"input gradient, {what}")
                close(layer.weight.grad, dws[RANK], torch.float64, f"weight gradient, {what}")
                close(layer.bias.grad, dbs[RANK], torch.float64, f"bias gradient, {what}")
                mean, var = reference_running([e["x"] for e in everyone], before[0], before[1],
                                              layer.momentum)
                close(layer.running_mean, mean, torch.float32, f"running_mean, {what}")
                close(layer.running_var, var, torch.float32, f"running_var, {what}")
            del y  # records live as long as the checkpoint call (its graph) does
            assert len(layer._records) == 0, "a record was left behind"

    # A block of two layers, checkpointed, against the same block without checkpointing.
    def block():
        torch.manual_seed(5)
        conv = torch.nn.Conv1d(3, 4, 3).double()
        model = torch.nn.Sequential(conv, ShuffleBN(4, permutation=alternating, dtype=torch.float64),
                                    torch.nn.Tanh(), torch.nn.Conv1d(4, 2, 1).double(),
                                    ShuffleBN(2, permutation="random", seed=9,
                                              dtype=torch.float64))
        return model
    plain, checkpointed = block(), block()
    for step in range(3):
        outputs = []
        for model, mode in ((plain, None), (checkpointed, False), (checkpointed, True)):
            if mode is not None and step % 2 != int(mode):
                continue  # alternate the two checkpoint flavours over the steps
            x = make_input((3, 3, 6), torch.float64, seed=50 * step + RANK)
            y = model(x) if mode is None else checkpoint(model, x, use_reentrant=mode)
            y.backward(make_input(y.shape, torch.float64, seed=70 * step + RANK,
                                  requires_grad=False))
            outputs.append((y.detach(), x.grad, [p.grad.clone() for p in model.parameters()],
                            [m.running_mean.clone() for m in model if isinstance(m, ShuffleBatchNorm)]))
            for p in model.parameters():
                p.grad = None
        (y0, dx0, g0, r0), (y1, dx1, g1, r1) = outputs
        close(y1, y0, torch.float64, f"checkpointed block output, step {step}")
        close(dx1, dx0, torch.float64, f"checkpointed block input gradient, step {step}")
        for a, b in zip(g1 + r1, g0 + r0):
            close(a, b, torch.float64, f"checkpointed block parameter gradients and running "
                  f"statistics, step {step}")
    assert [m.step for m in checkpointed if isinstance(m, ShuffleBatchNorm)] == [3, 3]


def permutation_for_test(spec, seed, step):
    from hvd_shufflebn.permutation import permutation_for
    return permutation_for(spec, seed, step, SIZE)


def case_several_forwards_before_backward():
    """MoCo v3's symmetric loss, multi-crop: the same layer on several inputs, one backward."""
    layer = ShuffleBN(3, permutation=alternating, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    xs = [make_input((n, 3, 4), torch.float64, seed=10 * i + RANK) for i, n in enumerate((4, 2, 3))]
    dys = [make_input(x.shape, torch.float64, seed=40 + 10 * i + RANK, requires_grad=False)
           for i, x in enumerate(xs)]
    ys, perms = [], []
    for x in xs:
        ys.append(layer(x))
        perms.append(layer.last_permutation)
    sum((y * dy).sum() for y, dy in zip(ys, dys)).backward()
    assert len(set(perms)) > 1, perms
    dw = db = 0
    for i, (x, dy, y, perm) in enumerate(zip(xs, dys, ys, perms)):
        everyone = gather(dict(x=x.detach(), dy=dy, w=layer.weight.detach(),
                               b=layer.bias.detach()))
        ref_y, ref_dx, ref_dw, ref_db = reference([e["x"] for e in everyone],
                                                  [e["dy"] for e in everyone],
                                                  [e["w"] for e in everyone],
                                                  [e["b"] for e in everyone], perm, layer.eps)
        close(y, ref_y[RANK], torch.float64, f"output of forward {i}")
        close(x.grad, ref_dx[RANK], torch.float64, f"input gradient of forward {i}")
        dw, db = dw + ref_dw[RANK], db + ref_db[RANK]
    close(layer.weight.grad, dw, torch.float64, "weight gradient summed over the forwards")
    close(layer.bias.grad, db, torch.float64, "bias gradient summed over the forwards")


def case_autocast_bfloat16():
    """torch.autocast with bfloat16 (CPU here): a conv's bfloat16 output into the layer."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(2, 3, 1)
    layer = ShuffleBN(3)
    x = make_input((3, 2, 4, 4), torch.float32, seed=RANK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        h.retain_grad()
        y = layer(h)
    assert y.dtype == torch.bfloat16, y.dtype
    dy = make_input(y.shape, torch.float32, seed=9 + RANK, requires_grad=False)
    y.float().backward(dy)
    everyone = gather(dict(h=h.detach(), dy=dy, w=layer.weight.detach(), b=layer.bias.detach()))
    ref_y, ref_dh, _, _ = reference([e["h"] for e in everyone], [e["dy"] for e in everyone],
                                    [e["w"] for e in everyone], [e["b"] for e in everyone],
                                    layer.last_permutation, layer.eps)
    close(y, ref_y[RANK], torch.bfloat16, "autocast output")
    close(h.grad, ref_dh[RANK], torch.bfloat16, "autocast input gradient")


def case_deepcopy_and_whole_model_save():
    """MoCo builds the key encoder with copy.deepcopy; whole models are torch.save'd."""
    import copy
    import io
    model = convert_shuffle_batchnorm(torch.nn.Sequential(torch.nn.Conv1d(2, 3, 1),
                                                          torch.nn.BatchNorm1d(3)),
                                      transport=TRANSPORT, permutation=alternating)
    model[0].double()
    model[1].double()
    key = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copy_ in (key, loaded):
        layer = copy_[1]
        assert layer.process_set is model[1].process_set
        assert layer.step == model[1].step and layer.name == model[1].name
    for i, net in enumerate((model, key, loaded)):
        layer = net[1]
        x = make_input((4, 2, 3), torch.float64, seed=20 * i + RANK)
        if net is key:
            with torch.no_grad():  # the key encoder's way
                y = net(x.detach())
        else:
            y = net(x)
        h = net[0](x.detach()).detach()
        everyone = gather(dict(h=h, w=layer.weight.detach(), b=layer.bias.detach()))
        ref_y, _, _, _ = reference([e["h"] for e in everyone], [torch.zeros_like(h)] * SIZE,
                                   [e["w"] for e in everyone], [e["b"] for e in everyone],
                                   layer.last_permutation, layer.eps)
        close(y, ref_y[RANK], torch.float64, f"output of model {i} (original, deepcopy, loaded)")


def check_groups_step(layer, x, dy, y, before, perm, k, what):
    """One float64 training step of a layer with ``k`` groups per rank (momentum 0.3), against
    the reference for ``perm`` (a permutation every rank must agree on, or "others")."""
    everyone = gather(dict(x=x.detach(), dy=dy, w=layer.weight.detach(), b=layer.bias.detach(),
                           perm=perm))
    assert all(e["perm"] == perm for e in everyone)
    ys, dxs, dws, dbs = reference_groups(
        [e["x"] for e in everyone], [e["dy"] for e in everyone],
        [e["w"] for e in everyone], [e["b"] for e in everyone], perm, layer.eps, k)
    close(y, ys[RANK], torch.float64, f"output, {what}")
    close(x.grad, dxs[RANK], torch.float64, f"input gradient, {what}")
    close(layer.weight.grad, dws[RANK], torch.float64, f"weight gradient, {what}")
    close(layer.bias.grad, dbs[RANK], torch.float64, f"bias gradient, {what}")
    mean, var = reference_running([e["x"] for e in everyone], before[0], before[1], 0.3)
    close(layer.running_mean, mean, torch.float64, f"running_mean, {what}")
    close(layer.running_var, var, torch.float64, f"running_var, {what}")


def case_groups():
    """groups_per_rank=k: every rank's batch in k contiguous groups, the permutation over all
    size * k groups; uneven batches and groups; a lender on the same rank or another."""
    from torch.utils.checkpoint import checkpoint
    configs = [(2, "derangement", (3,), False), (3, "random", (3, 4), False),
               (2, "shift", (3, 2, 3), True), (2, alternating, (3, 5), False)]
    for k, spec, feature_shape, channels_last in configs:
        layer = ShuffleBN(3, groups_per_rank=k, permutation=spec, momentum=0.3, seed=4,
                          dtype=torch.float64)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
        for step in range(3):
            n = 2 * k + (RANK + step) % 3  # uneven batches, uneven groups
            x = make_input((n,) + feature_shape, torch.float64, seed=100 * step + RANK,
                           channels_last=channels_last)
            dy = make_input(x.shape, torch.float64, seed=900 + 100 * step + RANK,
                            requires_grad=False)
            before = (layer.running_mean.clone(), layer.running_var.clone())
            layer.weight.grad = layer.bias.grad = None
            if step == 2:  # and once under activation checkpointing
                y = checkpoint(layer, x, use_reentrant=False)
            else:
                y = layer(x)
            perm = layer.last_permutation
            y.backward(dy)
            assert len(perm) == SIZE * k, perm
            if channels_last:
                assert y.is_contiguous(memory_format=torch.channels_last)
            check_groups_step(layer, x, dy, y, before, perm, k,
                              f"groups_per_rank={k}, permutation={spec}, step {step}")
        if spec == "derangement" and SIZE * k > 2:
            assert len({tuple(p) for p in [perm]}) == 1
    if DEFERRED:  # the errors come out of the step's check: case_deferred_checks
        return
    # A group with fewer than 2 values per channel on one rank: the same error everywhere.
    bad = SIZE - 1
    layer = ShuffleBN(3, groups_per_rank=3)
    x = make_input((2 if RANK == bad else 6, 3), torch.float32, seed=RANK)
    expect_error(lambda: layer(x), f"rank {bad}", "more than 1 value per channel in each of the 3 "
                 "groups")


def case_deferred_checks():
    """$HVD_SHUFFLEBN_DEFER_CHECKS=1 (torchrun): the check CUDA tensors get under NCCL, forced on
    Gloo. A steady-state step reads the device once for the whole model (the step's check),
    never in a layer; every rank raises the same error in the same step: in backward, or (a step
    without backward) at the layer's next forward."""
    from hvd_shufflebn import deferred
    from test_host_cost import CountHostReads, CountOps
    assert DEFERRED and current_transport().defers_checks(torch.device("cpu"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        ShuffleBN(3, groups_per_rank=2), torch.nn.Conv2d(3, 4, 3, padding=1),
        ShuffleBN(4), torch.nn.ReLU(inplace=True), ShuffleBN(4, borrow_from="others")).double()
    key_encoder = copy.deepcopy(model)

    def forward(x):  # MoCo's order: the query encoder, then the key encoder without grad
        model.zero_grad()
        y = model(x)
        with torch.no_grad():
            key_encoder(x)
        return y

    def step(x):
        forward(x).square().mean().backward()

    x = make_input((4, 3, 4, 4), torch.float64, seed=RANK)
    # The first steps: each layer agrees on num_features, groups_per_rank and borrow_from once.
    for _ in range(2):
        step(x)
    checks = []  # the reads of the step's check (on CPU, tolist() shows in no mode)
    check_all = deferred.PendingChecks.check_all

    def counted(self, transport):
        checks.append(len(self._entries))
        return check_all(self, transport)
    deferred.PendingChecks.check_all = counted
    try:
        with CountHostReads() as reads, CountOps() as ops:
            for _ in range(3):
                step(x)
    finally:
        deferred.PendingChecks.check_all = check_all
    assert reads.calls == [], f"rank {RANK}: host reads {reads.calls}"
    assert "aten._local_scalar_dense.default" not in ops.ops, f"rank {RANK}: a scalar read"
    # One check per step that reads the headers of all 6 layers (the first backward exchange);
    # the later backward exchanges find nothing left.
    assert [n for n in checks if n] == [6] * 3, checks

    bad = SIZE - 1
    layers = [m for m in model.modules() if isinstance(m, ShuffleBatchNorm)]
    # One rank's batch is too small: no rank raises in the forward, every rank in backward.
    tiny = make_input((1, 3, 1, 1), torch.float64, seed=RANK) if RANK == bad else x
    y = forward(tiny)
    expect_error(lambda: y.square().mean().backward(), f"rank {bad}",
                 "more than 1 value per channel")
    # The permutations differ on one rank: every rank raises in backward.
    layers[1].permutation = "shift" if RANK != bad else list(range(SIZE))
    y = forward(x)
    expect_error(lambda: y.square().mean().backward(), "disagree on the permutation")
    layers[1].permutation = "derangement"
    # The input needs a gradient on some ranks only: the ranks with a backward raise there, the
    # others at their next forward of that layer.
    x_grad = x.detach().requires_grad_(RANK != bad)
    y = layers[0](x_grad)
    expect_error(lambda: y.sum().backward() if RANK != bad else layers[0](x_grad),
                 "requires grad on ranks")
    # Under activation checkpointing the failed forward keeps no record to replay: its rank's
    # recomputation raises the step's error, like the others' backward.
    from torch.utils.checkpoint import checkpoint
    t = make_input((1, 4, 1) if RANK == bad else (4, 4, 3), torch.float64, seed=RANK)
    y = checkpoint(layers[1], t, use_reentrant=True)  # recomputes the whole forward
    expect_error(lambda: y.sum().backward(), f"rank {bad}", "more than 1 value per channel")
    # A key encoder alone (no backward in the step): checked at its next forward.
    with torch.no_grad():
        key_encoder(tiny)
        expect_error(lambda: key_encoder(x), f"rank {bad}", "more than 1 value per channel")
    # What decides the all-gather's size is agreed at a layer's first forward, there and then.
    x3 = make_input((4, 4, 3), torch.float64, seed=RANK)
    odd = ShuffleBN(4, groups_per_rank=2 if RANK == bad else 1)
    expect_error(lambda: odd(x3), "disagree on groups_per_rank", f"rank {bad} has 2")
    odd = ShuffleBN(4, borrow_from="others" if RANK == bad else "permutation")
    expect_error(lambda: odd(x3), "disagree on borrow_from='others'", f"rank {bad} has 1")
    # Afterwards the layers still match the reference, the pooled one too (groups: case_groups).
    for layer in layers[1:]:
        run_and_check(layer, (3 + RANK % 2, 4, 3), torch.float64, steps=2)


def case_ops_per_call():
    """The aten ops of one layer call between ranks stay within their transport's budget
    (test_host_cost.py), in the steady state of MoCo's order: a training step, then a no-grad
    forward."""
    from test_host_cost import OPS_ACROSS_RANKS, CountOps
    layer = ShuffleBN(16)
    x = make_input((8, 16, 2, 2), torch.float32, seed=RANK)
    dy = make_input(x.shape, torch.float32, seed=100 + RANK, requires_grad=False)

    def train():
        layer(x).backward(dy)

    def key_forward():
        with torch.no_grad():
            layer(x)
    for _ in range(3):  # the first exchanges agree on num_features; plans are made
        train()
        key_forward()
    counts = []
    for call in (train, key_forward):
        with CountOps() as ops:
            call()
        counts.append(len(ops.ops))
    kind = layer.resolved_transport + ("-deferred" if DEFERRED else "")
    budget = OPS_ACROSS_RANKS[kind]
    assert counts[0] <= budget[0] and counts[1] <= budget[1], \
        f"rank {RANK}, {kind}: {counts} ops (forward+backward, no-grad forward), budget {budget}"


def case_others():
    """borrow_from="others": every rank (group) normalises with the pooled statistics of all the
    other ranks (groups): 2d-5d, uneven batches, low precision, channels_last, groups on this
    rank and elsewhere, checkpoint of both kinds, several forwards before one backward, a
    key-encoder forward, process sets, and bad input giving the same error on every rank."""
    from torch.utils.checkpoint import checkpoint
    for spatial in ((), (7,), (3, 4), (2, 3, 2)):
        layer = ShuffleBN(5, borrow_from="others", momentum=0.3)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
        run_and_check(layer, (2 + RANK % 3, 5) + spatial, torch.float64, steps=2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        run_and_check(ShuffleBN(6, borrow_from="others"), (4, 6, 3, 3), dtype, steps=1)
    run_and_check(ShuffleBN(6, borrow_from="others"), (3, 6, 4, 5), torch.float32, steps=1,
                  channels_last=True)

    for k in (2, 3):  # uneven groups; steps 1 and 2 checkpointed (non-reentrant, reentrant)
        layer = ShuffleBN(3, borrow_from="others", groups_per_rank=k, momentum=0.3,
                          dtype=torch.float64)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
        for step in range(3):
            x = make_input((2 * k + (RANK + step) % 3, 3, 4), torch.float64, seed=70 * step + RANK)
            dy = make_input(x.shape, torch.float64, seed=900 + 70 * step + RANK,
                            requires_grad=False)
            before = (layer.running_mean.clone(), layer.running_var.clone())
            layer.weight.grad = layer.bias.grad = None
            y = layer(x) if step == 0 else checkpoint(layer, x, use_reentrant=step == 2)
            y.backward(dy)
            check_groups_step(layer, x, dy, y, before, "others", k,
                              f"borrow_from='others', groups_per_rank={k}, step {step}")
        assert layer.step == 3, layer.step

    # Several forwards before one backward, then a key-encoder forward.
    layer = ShuffleBN(3, borrow_from="others", dtype=torch.float64)
    xs = [make_input((n, 3, 4), torch.float64, seed=10 * i + RANK) for i, n in enumerate((4, 2, 3))]
    dys = [make_input(x.shape, torch.float64, seed=40 + 10 * i + RANK, requires_grad=False)
           for i, x in enumerate(xs)]
    ys = [layer(x) for x in xs]
    sum((y * dy).sum() for y, dy in zip(ys, dys)).backward()
    dw = db = 0
    for i, (x, dy, y) in enumerate(zip(xs, dys, ys)):
        everyone = gather(dict(x=x.detach(), dy=dy, w=layer.weight.detach(),
                               b=layer.bias.detach()))
        ref_y, ref_dx, ref_dw, ref_db = reference(
            [e["x"] for e in everyone], [e["dy"] for e in everyone], [e["w"] for e in everyone],
            [e["b"] for e in everyone], "others", layer.eps)
        close(y, ref_y[RANK], torch.float64, f"output of forward {i}")
        close(x.grad, ref_dx[RANK], torch.float64, f"input gradient of forward {i}")
        dw, db = dw + ref_dw[RANK], db + ref_db[RANK]
    close(layer.weight.grad, dw, torch.float64, "weight gradient summed over the forwards")
    close(layer.bias.grad, db, torch.float64, "bias gradient summed over the forwards")
    x = make_input((3, 3, 4), torch.float64, seed=60 + RANK, requires_grad=False)
    with torch.no_grad():
        y = layer(x)
    everyone = gather(x)
    ref_y, _, _, _ = reference(everyone, [torch.zeros_like(e) for e in everyone],
                               [layer.weight.detach()] * SIZE, [layer.bias.detach()] * SIZE,
                               "others", layer.eps)
    close(y, ref_y[RANK], torch.float64, "key-encoder (no_grad) output")

    if SIZE >= 4:  # two process sets of alternate ranks, each pooling over its own
        mine = [list(range(0, SIZE, 2)), list(range(1, SIZE, 2))][RANK % 2]
        group = PROCESS_SETS[RANK % 2]
        layer = ShuffleBN(3, borrow_from="others",
                          **({"process_group": group} if TORCHRUN else {"process_set": group}))
        run_and_check(layer, (3, 3, 4), torch.float64, steps=1, ranks=mine)

    if DEFERRED:  # the errors come out of the step's check: case_deferred_checks
        return
    # Bad input on one rank, a rank that borrows differently: the same error everywhere.
    bad = SIZE - 1
    layer = ShuffleBN(4, borrow_from="others")
    good = lambda: make_input((3, 4, 5), torch.float32, seed=RANK)  # noqa: E731
    x = make_input((3, 5, 5), torch.float32, seed=1) if RANK == bad else good()
    expect_error(lambda: layer(x), f"rank {bad}", "expected 4 channels")
    x = good().detach().requires_grad_(RANK != bad)
    expect_error(lambda: layer(x), "requires grad on ranks")
    assert layer.step == 0, "a step that raised moved the step"
    layer.borrow_from = "permutation" if RANK == bad else "others"
    expect_error(lambda: layer(good()), "disagree on the permutation", "borrow_from='others'")
    layer.borrow_from = "others"
    run_and_check(layer, (3, 4, 5), torch.float32, steps=1)  # and it still works


CASES = {name[len("case_"):]: fn for name, fn in sorted(globals().items())
         if name.startswith("case_")}
# Cases whose errors must come out of the forward that failed: with deferred checks they come
# out of the step's check, which case_deferred_checks tests.
IMMEDIATE_ERRORS = ("bad_inputs", "layers_called_in_different_orders")
for name in (IMMEDIATE_ERRORS if DEFERRED else ("deferred_checks",)):
    del CASES[name]
PROCESS_SETS = []


def main(names):
    global gather, RANK, SIZE, TRANSPORT
    torch.set_num_threads(1)
    if TORCHRUN:
        dist.init_process_group("gloo")
        RANK, SIZE = dist.get_rank(), dist.get_world_size()
        if SIZE >= 4:  # every rank takes part in creating every group
            PROCESS_SETS.extend(dist.new_group(list(range(start, SIZE, 2))) for start in (0, 1))
    else:
        size = int(os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("HOROVOD_SIZE") or 1)
        if size >= 4:
            PROCESS_SETS.extend(hvd.ProcessSet(list(range(start, size, 2))) for start in (0, 1))
        hvd.init(process_sets=PROCESS_SETS or None)
        RANK, SIZE = hvd.rank(), hvd.size()
    gather = Gatherer()
    for TRANSPORT in TRANSPORTS:
        for name in names or CASES:
            started = time.time()
            CASES[name]()
            gather(None)  # every rank finished this case before the next begins
            if RANK == 0:
                print(f"PASS {name} ({SIZE} ranks, transport={TRANSPORT}, "
                      f"{time.time() - started:.1f} s)", flush=True)
    if TORCHRUN:
        gather(None)
        # Leave without destroy_process_group(): with Gloo it can abort a worker at exit.


if __name__ == "__main__":
    main(sys.argv[1:])
