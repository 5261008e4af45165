"""borrow_from="others" in one process: every group normalises with the pooled statistics of all
the other groups of the batch, checked against the float64 reference (reference.py, which pools
the other groups' data itself). The distributed checks are dist_worker.py's case_others."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hvd_shufflebn import ShuffleBatchNorm, ShuffleBatchNormError, convert_shuffle_batchnorm
from reference import reference_groups, reference_running

TIGHT = dict(rtol=1e-9, atol=1e-9)


def pooled_layer(c=3, k=2, **kwargs):
    layer = ShuffleBatchNorm(c, borrow_from="others", groups_per_rank=k, transport="local",
                             **{"dtype": torch.float64, **kwargs})
    with torch.no_grad():
        if layer.affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return layer


def check_against_reference(layer, x, dy, y, k, what, tol=TIGHT):
    ys, dxs, dws, dbs = reference_groups([x.detach()], [dy],
                                         [None if layer.weight is None else layer.weight.detach()],
                                         [None if layer.bias is None else layer.bias.detach()],
                                         "others", layer.eps, k)
    torch.testing.assert_close(y.double(), ys[0], **tol, msg=lambda m: f"output, {what}: {m}")
    torch.testing.assert_close(x.grad.double(), dxs[0], **tol,
                               msg=lambda m: f"input gradient, {what}: {m}")
    if layer.affine:
        torch.testing.assert_close(layer.weight.grad.double(), dws[0], **tol,
                                   msg=lambda m: f"weight gradient, {what}: {m}")
        torch.testing.assert_close(layer.bias.grad.double(), dbs[0], **tol,
                                   msg=lambda m: f"bias gradient, {what}: {m}")


@pytest.mark.parametrize("k,shape,channels_last", [
    (2, (6, 3), False), (3, (7, 3, 5), False), (4, (9, 3, 2, 3), True), (2, (5, 3, 2, 2, 2), True),
    (5, (11, 3, 4), False)])
def test_pooled_groups_match_the_reference(k, shape, channels_last):
    """2d-5d, uneven groups (7 in 3, 9 in 4, 11 in 5), channels_last, several steps."""
    layer = pooled_layer(k=k, momentum=0.5)
    torch.manual_seed(k)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
        if channels_last:
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_()
        dy = torch.randn(shape, dtype=torch.float64)
        before = (layer.running_mean.clone(), layer.running_var.clone())
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        y.backward(dy)
        assert layer.last_permutation is None and layer.step == step + 1
        if channels_last:
            assert y.is_contiguous(memory_format=fmt)
        check_against_reference(layer, x, dy, y, k, f"k={k}, shape {shape}, step {step}")
        mean, var = reference_running([x.detach()], *before, 0.5)
        torch.testing.assert_close(layer.running_mean, mean, **TIGHT)
        torch.testing.assert_close(layer.running_var, var, **TIGHT)


def test_pooled_statistics_leave_the_own_group_out():
    """A group whose own values are far off does not move its own normalisation, only the
    others': the defining property, checked on the output directly."""
    layer = pooled_layer(k=2, affine=False)
    x = torch.cat([torch.randn(4, 3, 5, dtype=torch.float64),
                   torch.randn(4, 3, 5, dtype=torch.float64) * 10 + 100])
    y = layer(x)
    other = x[4:]
    expected = (x[:4] - other.mean((0, 2), keepdim=True)) / torch.sqrt(
        other.var((0, 2), unbiased=False, keepdim=True) + layer.eps)
    torch.testing.assert_close(y[:4], expected, **TIGHT)


def test_without_affine_or_running_statistics():
    layer = pooled_layer(k=3, affine=False, track_running_stats=False)
    x = torch.randn(9, 3, 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    y = layer(x)
    y.backward(dy)
    check_against_reference(layer, x, dy, y, 3, "affine=False, track_running_stats=False")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_matches_the_reference(dtype):
    tol = {torch.float32: dict(rtol=1e-4, atol=2e-5), torch.float16: dict(rtol=2e-2, atol=2e-2),
           torch.bfloat16: dict(rtol=6e-2, atol=6e-2)}[dtype]
    layer = pooled_layer(c=6, k=2, dtype=torch.float32)
    torch.manual_seed(1)
    x = (torch.randn(8, 6, 3, 3) * 2 + 0.5).to(dtype).requires_grad_()
    dy = torch.randn(x.shape).to(dtype)
    y = layer(x)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype
    check_against_reference(layer, x, dy.double(), y, 2, str(dtype), tol)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_block_matches_the_plain_block(use_reentrant):
    """A pooled and a shuffled layer in one checkpointed block: the recomputation replays the
    pooled statistics (nothing is pooled again, running statistics move once)."""
    def block():
        torch.manual_seed(5)
        return nn.Sequential(nn.Conv1d(3, 4, 3).double(), pooled_layer(4, k=3), nn.Tanh(),
                             nn.Conv1d(4, 2, 1).double(),
                             ShuffleBatchNorm(2, groups_per_rank=3, permutation="random", seed=2,
                                              dtype=torch.float64))
    plain, checkpointed = block(), block()
    for step in range(2):
        results = []
        for model in (plain, checkpointed):
            torch.manual_seed(10 + step)
            x = torch.randn(8, 3, 6, dtype=torch.float64, requires_grad=True)
            dy = torch.randn(8, 2, 4, dtype=torch.float64)
            model.zero_grad()
            y = model(x) if model is plain else checkpoint(model, x, use_reentrant=use_reentrant)
            y.backward(dy)
            results.append([y.detach(), x.grad] + [p.grad for p in model.parameters()]
                           + [model[1].running_mean.clone(), model[1].running_var.clone()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, **TIGHT)
    assert checkpointed[1].step == plain[1].step == 2
    del y, results  # records live as long as the checkpoint call (its graph) does
    assert len(checkpointed[1]._records) == 0


def test_several_forwards_before_one_backward():
    """MoCo v3's symmetric loss, multi-crop: each forward keeps its own pooled statistics."""
    layer = pooled_layer(k=2)
    xs = [torch.randn(n, 3, 4, dtype=torch.float64, requires_grad=True) for n in (4, 6, 5)]
    dys = [torch.randn_like(x) for x in xs]
    ys = [layer(x) for x in xs]
    sum((y * dy).sum() for y, dy in zip(ys, dys)).backward()
    dw = db = 0
    for x, dy, y in zip(xs, dys, ys):
        ref_y, ref_dx, ref_dw, ref_db = reference_groups(
            [x.detach()], [dy], [layer.weight.detach()], [layer.bias.detach()], "others",
            layer.eps, 2)
        torch.testing.assert_close(y, ref_y[0], **TIGHT)
        torch.testing.assert_close(x.grad, ref_dx[0], **TIGHT)
        dw, db = dw + ref_dw[0], db + ref_db[0]
    torch.testing.assert_close(layer.weight.grad, dw, **TIGHT)
    torch.testing.assert_close(layer.bias.grad, db, **TIGHT)


def test_key_encoder_forward_without_grad():
    layer = pooled_layer(k=4)
    x = torch.randn(8, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    ys, _, _, _ = reference_groups([x], [torch.zeros_like(x)], [layer.weight.detach()],
                                   [layer.bias.detach()], "others", layer.eps, 4)
    torch.testing.assert_close(y, ys[0], **TIGHT)
    assert len(layer._records) == 0


def test_option_is_checked_converted_shown_and_kept():
    with pytest.raises(ValueError, match="borrow_from must be one of"):
        ShuffleBatchNorm(3, borrow_from="other")
    with pytest.raises(ValueError, match="borrow_from must be one of"):
        ShuffleBatchNorm(3).borrow_from = "all"
    model = convert_shuffle_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)),
                                      borrow_from="others", groups_per_rank=2)
    layer = model[1]
    assert layer.borrow_from == "others" and "borrow_from='others'" in repr(layer)
    assert "permutation" not in repr(layer)
    for twin in (copy.deepcopy(model)[1], pickle.loads(pickle.dumps(model))[1]):
        assert twin.borrow_from == "others"
    # A layer pickled before the option existed loads as the shuffled kind.
    state = ShuffleBatchNorm(3).__getstate__()
    del state["_borrow_from"]
    old = ShuffleBatchNorm.__new__(ShuffleBatchNorm)
    old.__setstate__(state)
    assert old.borrow_from == "permutation"


def test_a_group_without_values_is_the_same_clear_error():
    layer = pooled_layer(k=3)
    with pytest.raises(ShuffleBatchNormError, match="more than 1 value per channel in each"):
        layer(torch.randn(2, 3, dtype=torch.float64))


def test_two_groups_are_the_shuffled_layer():
    """With two groups the pool of the one is the other: the same function as the swap, in
    forward, backward and running statistics (a cross-check of two independent code paths)."""
    torch.manual_seed(3)
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    dy = torch.randn_like(x)
    results = []
    for kwargs in (dict(borrow_from="others"), dict(permutation=[1, 0])):
        layer = ShuffleBatchNorm(3, groups_per_rank=2, dtype=torch.float64, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        results.append([y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_var])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TIGHT)
