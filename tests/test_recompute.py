"""Activation checkpointing in one process (groups lend to each other): every recomputation
replays exactly the forward it recomputes, gradients equal those without checkpointing, and
forwards outside any checkpoint leave nothing behind."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hvd_shufflebn import ShuffleBatchNorm, ShuffleBatchNormError


def alternating(step, n):
    """A permutation that changes every step (3 groups)."""
    return (1, 2, 0) if step % 2 == 0 else (2, 0, 1)


def block(seed=0):
    torch.manual_seed(seed)
    layers = nn.Sequential(nn.Conv1d(3, 4, 1), ShuffleBatchNorm(4, groups_per_rank=3,
                                                                permutation=alternating),
                           nn.Tanh(), nn.Conv1d(4, 4, 1),
                           ShuffleBatchNorm(4, groups_per_rank=3, permutation=alternating))
    return layers.double()


def run(model, inputs, checkpointed, use_reentrant):
    """Several forwards of the same block (the same input twice among them), one backward."""
    outputs = []
    for x in inputs:
        if checkpointed:
            outputs.append(checkpoint(model, x, use_reentrant=use_reentrant))
        else:
            outputs.append(model(x))
    loss = sum((y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum()
               for y in outputs)
    loss.backward()
    return [x.grad for x in inputs], [p.grad for p in model.parameters()]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_recomputations_replay_their_own_forward(use_reentrant):
    torch.manual_seed(3)
    base = torch.randn(6, 3, 5, dtype=torch.float64)
    other = torch.randn(6, 3, 5, dtype=torch.float64)

    def inputs():  # the same input at steps 0 and 3, another at 1 and 2: other permutations
        return [t.clone().requires_grad_() for t in (base, other, other, base)]
    plain, checked = block(), block()
    expected = run(plain, inputs(), checkpointed=False, use_reentrant=use_reentrant)
    actual = run(checked, inputs(), checkpointed=True, use_reentrant=use_reentrant)
    for e, a in zip(expected[0] + expected[1], actual[0] + actual[1]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    for p, c in zip(plain.modules(), checked.modules()):
        if isinstance(p, ShuffleBatchNorm):
            assert c.step == p.step == 4  # recomputations do not move the step
            torch.testing.assert_close(c.running_mean, p.running_mean)
            assert len(c._records) == 0  # freed with the checkpoint calls


def test_forwards_outside_checkpoints_keep_no_records():
    model = block()
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    with torch.no_grad():  # MoCo's key encoder
        for _ in range(40):
            model(x)
    model(x.requires_grad_()).sum().backward()
    assert all(len(m._records) == 0 for m in model.modules() if isinstance(m, ShuffleBatchNorm))


def test_a_forward_inside_backward_that_is_no_recomputation_is_refused():
    layer = ShuffleBatchNorm(4, groups_per_rank=2)

    class CallsTheLayerInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            layer(torch.randn(4, 4))
            return grad

    x = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(ShuffleBatchNormError, match="recomputation"):
        CallsTheLayerInBackward.apply(x).sum().backward()


def test_double_backward_is_a_clear_error():
    layer = ShuffleBatchNorm(3, groups_per_rank=2).double()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_low_precision_gradient_is_rounded_once():
    """bfloat16/float16 at an input mean of 8 sd: the input gradient's error against float64 is
    no worse than BatchNorm2d's on the same input (identity permutation: the same function)."""
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        x64 = torch.randn(16, 8, 4, 4, dtype=torch.float64) + 8.0
        dy64 = torch.randn_like(x64)
        errors = {}
        for name, layer in (("bn", nn.BatchNorm2d(8)),
                            ("shuffle", ShuffleBatchNorm(8, groups_per_rank=2,
                                                         permutation=[0, 1]))):
            ref = copy.deepcopy(layer).double()
            halves = []
            for chunk, dchunk in zip(x64.chunk(2), dy64.chunk(2)):
                xr = chunk.clone().requires_grad_()
                (nn.BatchNorm2d(8).double() if name == "shuffle" else ref)(xr).backward(dchunk)
                halves.append(xr.grad)
            if name == "bn":  # BatchNorm2d normalises the whole batch
                xr = x64.clone().requires_grad_()
                ref(xr).backward(dy64)
                expected = xr.grad
            else:
                expected = torch.cat(halves)
            x = x64.to(dtype).requires_grad_()
            layer(x).backward(dy64.to(dtype))
            errors[name] = ((x.grad.double() - expected).norm() / expected.norm()).item()
        assert errors["shuffle"] <= 1.2 * errors["bn"], (dtype, errors)
