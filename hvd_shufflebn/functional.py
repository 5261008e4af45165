"""The shuffled batch norm's math: per-group statistics, the autograd Function with its exact
backward, and the input checks. Written once for every transport and any number of groups; what
crosses ranks is exchange.py's business.

Notation (README.md, "What it computes"): group t normalises with the statistics of group
u = p[t] (a group is a rank's whole batch, or one of its ``k`` contiguous parts).
m, v: per-channel mean and biased variance; s = 1/sqrt(v + eps); M: values per channel.

    forward   y_t  = w * (x_t - m_u) * s_u + b
    backward  A_t  = sum(dy_t),  B_t = sum(dy_t * (x_t - m_u))
              dw = sum over my groups of B_t * s_u,  db = sum of A_t
              (w A_t, w B_t s_u) travel back to the lending group u, which adds
              dx_u += b_u * x_u + c_u,  b_u = -s_u^2 (w B_t s_u) / M_u,
                                        c_u = -s_u (w A_t) / M_u - m_u * b_u
              to its direct term w s_{p[u]} dy_u (ATen's batch-norm backward gives that term
              together with A and B s in one kernel per group).

With borrow_from="others" the borrowed statistics are the pooled ones of all groups but t, and
the correction comes from one sum over all groups instead of the lenders (pooled.py).
"""
import functools
import math
import operator
from typing import List, Optional, Sequence

import torch

from . import pooled
from .routing import group_sizes

# Below this many values a single ATen call is cheapest (host time dominates); above it, on CPU,
# two passes beat ATen's single-pass kernel 3-4x (torch 2.13, 32x64x8x8: 67 vs 233 us).
_TWO_PASS_FROM = 1 << 14


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float32 for float32/float16/bfloat16 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def shape_error(input: torch.Tensor, num_features: int) -> Optional[str]:
    """Why ``input`` cannot be batch-normalised over ``num_features`` channels at all, or None."""
    if input.dim() < 2:
        return f"expected input of shape (N, C, *) with at least 2 dims, got shape {tuple(input.shape)}"
    if input.size(1) != num_features:
        return (f"expected {num_features} channels (dim 1), got input of shape "
                f"{tuple(input.shape)}")
    if not input.is_floating_point():
        return f"expected a floating point input, got {input.dtype}"
    return None


def input_error(input: torch.Tensor, num_features: int, k: int = 1) -> Optional[str]:
    """Why this rank cannot take part in a training step with ``input`` in ``k`` groups, or None."""
    error = shape_error(input, num_features)
    if error is not None:
        return error
    if min(group_sizes(input.size(0), k)) * values_per_sample(input) < 2:
        where = "" if k == 1 else f" in each of the {k} groups"
        return (f"expected more than 1 value per channel{where} when training, got input of "
                f"shape {tuple(input.shape)}")
    return None


def values_per_sample(input: torch.Tensor) -> int:
    """Values per channel in one sample (the spatial size), from the shape alone."""
    return math.prod(input.shape[2:])


def split_groups(tensor: torch.Tensor, sizes: Sequence[int]):
    """The groups of a batch, as views along dim 0."""
    return (tensor,) if len(sizes) == 1 else tensor.split_with_sizes(list(sizes))


def group_statistics(chunks, acc: torch.dtype):
    """Per group: the mean and biased variance, lists of (C,) tensors in the accumulation dtype."""
    means, variances = [], []
    for chunk in chunks:
        if chunk.dtype != acc:  # float16/bfloat16: statistics in float32
            chunk = chunk.to(acc)
        if chunk.device.type == "cpu" and chunk.numel() >= _TWO_PASS_FROM:
            dims = [0] + list(range(2, chunk.dim()))
            mean = chunk.mean(dims, keepdim=True)
            variances.append((chunk - mean).square_().mean(dims))
            means.append(mean.view(-1))
        else:
            mean, var = torch.batch_norm_update_stats(chunk, None, None, 0.0)
            means.append(mean)
            variances.append(var)
    return means, variances


def normalise(chunks, weight, bias, means, variances, eps: float) -> torch.Tensor:
    """y_j = weight * (x_j - means[j]) / sqrt(variances[j] + eps) + bias for every group j: ATen's
    batch norm in its eval form, the given statistics standing in for the running ones."""
    outputs = [torch.native_batch_norm(x, weight, bias, m, v, False, 0.0, eps)[0]
               for x, m, v in zip(chunks, means, variances)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class Borrowed:
    """What one training forward hands to its backward: the statistics each group used and
    where the gradient of the borrowed statistics goes (``route_back``, from exchange.py)."""
    __slots__ = ("chunks", "sizes", "counts", "own_means", "own_vars", "means", "variances",
                 "eps", "route_back", "pool_counts")

    def __init__(self, chunks, sizes, counts, own_means, own_vars, means, variances, eps,
                 route_back, pool_counts=None):
        self.chunks, self.sizes, self.counts = chunks, sizes, counts
        self.own_means, self.own_vars = own_means, own_vars
        self.means, self.variances, self.eps = means, variances, eps
        # Shuffled: exchange.RouteBack. Pooled (borrow_from="others"): pooled.SumBack, and
        # pool_counts holds M_-t per group.
        self.route_back, self.pool_counts = route_back, pool_counts


class ShuffleBatchNormFunction(torch.autograd.Function):
    """y = w (x - m_u) s_u + b per group, with the borrowed statistics given in ``borrowed``;
    the backward sends the gradient of the borrowed statistics back to the lending groups
    (``borrowed.route_back``) and adds what comes back to the direct term."""

    @staticmethod
    def forward(ctx, input, weight, bias, borrowed: Borrowed):
        output = normalise(borrowed.chunks, weight, bias, borrowed.means, borrowed.variances,
                           borrowed.eps)
        ctx.save_for_backward(input, weight)
        borrowed.chunks = None  # views of the input: the backward takes them from the saved one
        ctx.borrowed = borrowed
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        b = ctx.borrowed
        needs_input_grad = ctx.needs_input_grad[0]
        input_dtype = input.dtype
        acc = b.own_means[0].dtype
        if input_dtype != acc:  # float16/bfloat16: the whole gradient in float32, rounded once
            input, grad_output = input.to(acc), grad_output.to(acc)
        grad_output = grad_output.contiguous(memory_format=_memory_format(input))
        chunks, grad_chunks = split_groups(input, b.sizes), split_groups(grad_output, b.sizes)
        # Per group, one kernel: the direct term w s_u dy, sum(dy (x - m_u)) s_u and sum(dy).
        mask = [needs_input_grad, True, True]
        direct, sum_dy_xmu_invstd, sum_dy = [], [], []
        for dy, x, m, v in zip(grad_chunks, chunks, b.means, b.variances):
            d, bs, a = torch.ops.aten.native_batch_norm_backward(dy, x, weight, m, v, None, None,
                                                                 False, b.eps, mask)
            direct.append(d)
            sum_dy_xmu_invstd.append(bs)
            sum_dy.append(a)
        grad_weight = grad_bias = grad_input = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = _sum(sum_dy_xmu_invstd)
        if ctx.needs_input_grad[2]:
            grad_bias = _sum(sum_dy)
        if needs_input_grad:
            if b.pool_counts is None:
                coef_b, coef_c = _shuffled_correction(b, sum_dy, sum_dy_xmu_invstd, weight)
            else:
                coef_b, coef_c = pooled.correction(b.means, b.variances, b.pool_counts, b.eps,
                                                   sum_dy, sum_dy_xmu_invstd, weight,
                                                   b.route_back)
            grad_input = direct[0] if len(direct) == 1 else torch.cat(direct)
            _add_affine(grad_input, input, coef_b, coef_c, b.sizes)
            grad_input = grad_input.to(input_dtype)
        return grad_input, grad_weight, grad_bias, None


def _shuffled_correction(b: Borrowed, sum_dy, sum_dy_xmu_invstd, weight):
    """The correction dx += coef_b * x + coef_c of my lending groups, from what their borrowers
    send back, as two (k, C) tensors."""
    # What my lending groups get back from their borrowers, weighted by the borrower's weight
    # (or not, when the borrowers are all mine and share my weight).
    grad_a, grad_bs, weighted = b.route_back(sum_dy, sum_dy_xmu_invstd, weight)
    own_mean, own_var = torch.stack(b.own_means), torch.stack(b.own_vars)
    counts = b.counts
    invstd = own_var.add_(b.eps).rsqrt_()
    # u = -w s / M; then b = u s (w B s) and c = u (w A) - m b, per group and channel.
    if len(set(counts)) == 1:
        u = invstd * (-1.0 / counts[0])
    else:  # uneven groups: each row its own count (host numbers, no tensor from them)
        u = torch.stack([row * (-1.0 / m) for row, m in zip(invstd, counts)])
    if not weighted and weight is not None:
        u.mul_(weight)
    coef_b = (u * invstd).mul_(grad_bs)
    return coef_b, grad_a.mul_(u).addcmul_(own_mean, coef_b, value=-1)


def _sum(tensors: List[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(operator.add, tensors)


def _add_affine(grad_input, input, coef_b, coef_c, sizes) -> None:
    """grad_input += coef_b * input + coef_c per group and channel, in place."""
    k, c = coef_b.shape
    shape = (k, 1, c) + (1,) * (input.dim() - 2)
    if len(set(sizes)) == 1:  # equal groups: one pass over the whole batch
        grouped = grad_input.unflatten(0, (k, sizes[0]))
        grouped.addcmul_(input.unflatten(0, (k, sizes[0])), coef_b.view(shape))
        grouped.add_(coef_c.view(shape))
        return
    for j, (dx, x) in enumerate(zip(split_groups(grad_input, sizes), split_groups(input, sizes))):
        view = (c,) + (1,) * (input.dim() - 2)
        dx.addcmul_(x, coef_b[j].view(view)).add_(coef_c[j].view(view))


def _memory_format(input: torch.Tensor) -> torch.memory_format:
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
