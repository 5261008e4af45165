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
from typing import List, NamedTuple, Optional, Sequence, Tuple

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
    return _shape_error(input.shape, input.dtype, num_features)


def _shape_error(shape: torch.Size, dtype: torch.dtype, num_features: int) -> Optional[str]:
    if len(shape) < 2:
        return f"expected input of shape (N, C, *) with at least 2 dims, got shape {tuple(shape)}"
    if shape[1] != num_features:
        return f"expected {num_features} channels (dim 1), got input of shape {tuple(shape)}"
    if not dtype.is_floating_point:
        return f"expected a floating point input, got {dtype}"
    return None


class Groups(NamedTuple):
    """What a training forward needs to know about its input's shape, computed once per shape."""
    error: Optional[str]    # why this rank cannot take part with this input, or None
    sizes: Tuple[int, ...]  # samples per group
    counts: Tuple[int, ...]  # values per channel per group
    # The backward's shapes: per-group, per-channel values as (k, 1, C, 1...), and the input
    # grouped along dim 0 as (k, n, C, ...) when the groups are equal (else None).
    coef_shape: Tuple[int, ...] = ()
    grouped: Optional[Tuple[int, ...]] = None


def failed_groups(error: str, k: int) -> Groups:
    """A rank whose input cannot take part: no group counts."""
    return Groups(error, (0,) * k, (0,) * k)


@functools.lru_cache(maxsize=256)
def groups_of(shape: torch.Size, dtype: torch.dtype, num_features: int, k: int) -> Groups:
    """The ``k`` contiguous groups of an input of ``shape`` and ``dtype``, or why there are none."""
    error = _shape_error(shape, dtype, num_features)
    if error is not None:
        return failed_groups(error, k)
    sizes = tuple(group_sizes(shape[0], k))
    per_sample = math.prod(shape[2:])
    if min(sizes) * per_sample < 2:
        where = "" if k == 1 else f" in each of the {k} groups"
        return failed_groups(f"expected more than 1 value per channel{where} when training, got "
                             f"input of shape {tuple(shape)}", k)
    coef_shape = (k, 1, num_features) + (1,) * (len(shape) - 2)
    grouped = (k, sizes[0]) + tuple(shape[1:]) if len(set(sizes)) == 1 else None
    return Groups(None, sizes, tuple(n * per_sample for n in sizes), coef_shape, grouped)


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
    __slots__ = ("chunks", "groups", "own_means", "own_vars", "means", "variances", "eps",
                 "route_back", "pool_counts")

    def __init__(self, chunks, groups: Groups, own_means, own_vars, means, variances, eps,
                 route_back, pool_counts=None):
        self.chunks, self.groups = chunks, groups
        self.own_means, self.own_vars = own_means, own_vars
        self.means, self.variances, self.eps = means, variances, eps
        # Shuffled: exchange.RouteBack. Pooled (borrow_from="others"): pooled.SumBack, and
        # pool_counts holds M_-t per group.
        self.route_back, self.pool_counts = route_back, pool_counts


class ShuffleBatchNormFunction(torch.autograd.Function):
    """y = w (x - m_u) s_u + b per group, with the borrowed statistics given in ``borrowed``;
    the backward sends the gradient of the borrowed statistics back to the lending groups
    (``borrowed.route_back``) and adds what comes back to the direct term, in one pass."""

    @staticmethod
    def forward(ctx, input, weight, bias, borrowed: Borrowed):
        output = normalise(borrowed.chunks, weight, bias, borrowed.means, borrowed.variances,
                           borrowed.eps)
        ctx.save_for_backward(input, weight)
        borrowed.chunks = None  # views of the input: the backward takes them from the saved one
        ctx.borrowed = borrowed
        return output

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is not differentiable
            return _backward_once_differentiable(ctx, grad_output)
        return _backward(ctx, grad_output)


def _backward(ctx, grad_output):
    """The exact gradient of ShuffleBatchNormFunction: per group two sums (one kernel), what the
    borrowed statistics' gradient adds to the lending groups, then dx in one pass."""
    input, weight = ctx.saved_tensors
    b = ctx.borrowed
    sizes = b.groups.sizes
    input_dtype, acc = input.dtype, b.own_means[0].dtype
    if input_dtype != acc:  # float16/bfloat16: the whole gradient in float32, rounded once
        input, grad_output = input.to(acc), grad_output.to(acc)
    grad_output = grad_output.contiguous(memory_format=_memory_format(input))
    # Per group, one reduction kernel: A = sum(dy) and B s_u = sum(dy (x - m_u)) s_u.
    sum_dy, sum_dy_xmu_invstd = [], []
    for dy, x, m, v in zip(split_groups(grad_output, sizes), split_groups(input, sizes),
                           b.means, b.variances):
        _, bs, a = _NATIVE_BACKWARD(dy, x, weight, m, v, None, None, False, b.eps, _SUMS_ONLY)
        sum_dy.append(a)
        sum_dy_xmu_invstd.append(bs)
    needs_input_grad, needs_weight_grad, needs_bias_grad = ctx.needs_input_grad[:3]
    grad_weight = _sum(sum_dy_xmu_invstd) if needs_weight_grad and weight is not None else None
    grad_bias = _sum(sum_dy) if needs_bias_grad else None
    grad_input = None
    if needs_input_grad:
        coef_a, coef_b, coef_c = _coefficients(b, sum_dy, sum_dy_xmu_invstd, weight)
        grad_input = _affine_input_gradient(grad_output, input, coef_a, coef_b, coef_c, b.groups)
        if input_dtype != acc:
            grad_input = grad_input.to(input_dtype)
    return grad_input, grad_weight, grad_bias, None


_backward_once_differentiable = torch.autograd.function.once_differentiable(_backward)


# The backward's per-group kernel computes only the two sums; the input gradient is one pass.
_SUMS_ONLY = [False, True, True]
_NATIVE_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def _coefficients(b: Borrowed, sum_dy, sum_dy_xmu_invstd, weight):
    """The input gradient dx = coef_a * dy + coef_b * x + coef_c per group and channel, as three
    tensors of shape (k, 1, C, 1...): the direct term w s_u, and what the borrowed
    statistics' gradient adds to the groups that lent them."""
    shape = b.groups.coef_shape
    k = shape[0]
    # ONE stack of every per-group row, viewed as per-group, per-channel values.
    if b.pool_counts is None:
        # What my lending groups get back from their borrowers, weighted by the borrower's
        # weight (or not, when the borrowers are all mine and share my weight); the lenders'
        # means, and the invstd of the lenders' and of the borrowed variances.
        grad_a, grad_bs, weighted = b.route_back(sum_dy, sum_dy_xmu_invstd, weight)
        rows = torch.stack([*grad_a, *grad_bs, *b.own_means, *b.own_vars, *b.variances])
        rows[3 * k:].add_(b.eps).rsqrt_()
        grad_a, grad_bs, mean, lender_invstd, invstd = rows.view((5,) + shape).unbind(0)
        counts = b.groups.counts
    else:  # each group's pool lends to it: each group's own terms, summed over the others below
        rows = torch.stack([*sum_dy, *sum_dy_xmu_invstd, *b.means, *b.variances])
        grad_a, grad_bs, mean, invstd = rows.view((4,) + shape).unbind(0)
        lender_invstd = invstd.add_(b.eps).rsqrt_()
        weighted, counts = False, b.pool_counts
    weight = None if weight is None else weight.view(shape[2:])
    # z = -w s / M and p = s (w B s) per group and channel; then b = z p, c = z (w A) - m b.
    z = pooled.scale_rows(lender_invstd, [-1.0 / m for m in counts])
    if not weighted and weight is not None:
        z.mul_(weight)
    p = grad_bs.mul_(lender_invstd)
    coef_b = z * p
    coef_c = grad_a.addcmul_(mean, p, value=-1).mul_(z)
    if b.pool_counts is not None:
        coef_b, coef_c = pooled.all_but_own(coef_b, coef_c, b.route_back)
    return (invstd if weight is None else invstd * weight), coef_b, coef_c


def _sum(tensors: List[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(operator.add, tensors)


def _affine_input_gradient(grad_output, input, coef_a, coef_b, coef_c, groups: Groups):
    """dx = coef_a * dy + coef_b * x + coef_c per group and channel (coefficients of shape
    (k, 1, C, 1...)): one fused pass over the input, no intermediate of its size besides dx."""
    if groups.grouped is not None:  # equal groups: the whole batch at once, grouped along dim 0
        grad = torch.addcmul(coef_c, input.view(groups.grouped), coef_b)
        grad.addcmul_(grad_output.view(groups.grouped), coef_a)
        return grad.reshape(input.shape)  # a view, unless the input's strides are unusual
    grads = [torch.addcmul(c, x, b).addcmul_(dy, a) for a, b, c, dy, x in zip(
        coef_a, coef_b, coef_c, split_groups(grad_output, groups.sizes),
        split_groups(input, groups.sizes))]
    return torch.cat(grads)


def _memory_format(input: torch.Tensor) -> torch.memory_format:
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
