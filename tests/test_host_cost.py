"""The layer's host cost cannot creep back: aten ops dispatched per call, and calls that would
make the host wait for a GPU (a device sync) when the tensors live on CUDA, counted on CPU.

Budgets are the measured counts of this version (benchmarks/host_cost.py reports them beside
BatchNorm2d's); lower them when the layer gets leaner, never raise them without a reason.
"""
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from hvd_shufflebn import ShuffleBatchNorm, convert_shuffle_batchnorm

# One layer, one process, groups_per_rank=2, transport="local", input 8x16x2x2 (float32).
OPS_FORWARD_BACKWARD = 36  # BatchNorm2d: 7 (3 of them accumulate .grad)
OPS_NO_GRAD_FORWARD = 8    # BatchNorm2d: 3
# The same with borrow_from="others": the pool of each group is computed from summed moments
# (small per-channel ops in float64), the backward adds one per-channel sum.
OPS_FORWARD_BACKWARD_POOLED = 57
OPS_NO_GRAD_FORWARD_POOLED = 24
# Between ranks (tests/dist_worker.py, case_ops_per_call): one layer per rank, groups_per_rank=1,
# input 8x16x2x2, as (forward+backward, no-grad forward) per transport; "-deferred" is
# torch.distributed checking once per step (deferred.py), as it does on CUDA under NCCL.
OPS_ACROSS_RANKS = {"mpi": (69, 35), "horovod": (67, 32), "torch.distributed": (67, 33),
                    "torch.distributed-deferred": (75, 39)}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# What synchronises with a CUDA device (or copies through the host) when called on its tensors.
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
               torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__bool__,
               torch.Tensor.__index__, torch.Tensor.nonzero, torch.tensor}


# The same at the dispatch level: a scalar read, a tensor made from host data.
HOST_OPS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default"}


class CountHostReads(TorchFunctionMode):
    """On CPU, a stand-in for ``torch.cuda.set_sync_debug_mode("error")``: the calls that would
    read a device value on the host, or build a device tensor from host values."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # deferred.host_values: host values copied to a GPU from pinned memory, asynchronously
        # (on CPU it passes pin_memory=False; the keyword says which path it is).
        pinned = func is torch.tensor and "pin_memory" in (kwargs or {})
        if func in _HOST_READS and not pinned:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def one_layer(**kwargs):
    torch.manual_seed(0)
    layer = ShuffleBatchNorm(16, groups_per_rank=2, transport="local", **kwargs)
    x = torch.randn(8, 16, 2, 2, requires_grad=True)
    return layer, x, torch.randn_like(x)


def count_ops(fn, repeat=3):
    for _ in range(repeat):  # steady state: plans and transports are made on the first call
        fn()
    with CountOps() as counter:
        fn()
    return counter.ops


@pytest.mark.parametrize("borrow_from", ["permutation", "others"])
def test_ops_per_call_stay_within_budget(borrow_from):
    layer, x, dy = one_layer(borrow_from=borrow_from)
    pooled = borrow_from == "others"
    ops = count_ops(lambda: layer(x).backward(dy))
    assert len(ops) <= (OPS_FORWARD_BACKWARD_POOLED if pooled else OPS_FORWARD_BACKWARD), ops
    with torch.no_grad():
        ops = count_ops(lambda: layer(x))
    assert len(ops) <= (OPS_NO_GRAD_FORWARD_POOLED if pooled else OPS_NO_GRAD_FORWARD), ops
    # What the count is made of: no reads of a device value, one batch-norm kernel per group.
    assert "aten._local_scalar_dense.default" not in ops
    assert ops.count("aten.native_batch_norm.default") == 2


def small_network(**layer_kwargs):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.BatchNorm1d(5))
    return convert_shuffle_batchnorm(model, **layer_kwargs)


def training_step(model, x, momentum_none=False):
    model.zero_grad()
    model(x).square().mean().backward()


@pytest.mark.parametrize("borrow_from", ["permutation", "others"])
def test_a_steady_state_step_reads_nothing_from_the_device(borrow_from):
    """Groups in one process (MoCo on one GPU): no host read of a device value in any layer,
    forward or backward, equal or uneven groups, momentum or cumulative average."""
    for batch, momentum in ((8, 0.1), (7, None)):
        model = small_network(groups_per_rank=2, transport="local", borrow_from=borrow_from)
        for layer in model.modules():
            if isinstance(layer, ShuffleBatchNorm):
                layer.momentum = momentum
        x = torch.randn(batch, 3, 4, 4)
        training_step(model, x)
        with CountHostReads() as reads, CountOps() as ops:
            for _ in range(3):
                training_step(model, x)
                with torch.no_grad():  # a key encoder's forward
                    model(x)
        assert reads.calls == [], reads.calls
        # The function mode does not reach into the autograd engine: the backward's host reads
        # and tensors built from host values show at the dispatch level.
        assert not HOST_OPS & set(ops.ops), HOST_OPS & set(ops.ops)


def test_the_step_is_read_again_only_after_someone_else_may_have_changed_it():
    model = small_network(groups_per_rank=2, transport="local")
    layers = [m for m in model.modules() if isinstance(m, ShuffleBatchNorm)]
    x = torch.randn(8, 3, 4, 4)
    training_step(model, x)
    state = model.state_dict()  # handed out: a broadcast may write into it without a trace
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            value.data.fill_(41)  # .data: in place, version untouched, like Horovod's broadcast
    with CountOps() as ops:
        training_step(model, x)
    assert ops.ops.count("aten._local_scalar_dense.default") == len(layers)
    assert [layer.step for layer in layers] == [42] * len(layers)
    with CountOps() as ops:
        training_step(model, x)
    assert "aten._local_scalar_dense.default" not in ops.ops
    layers[0].num_batches_tracked.zero_()  # in place, version bumped: seen without state_dict()
    training_step(model, x)
    assert layers[0].step == 1 and layers[1].step == 44
