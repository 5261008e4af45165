"""The shuffled batch norm: the statistics exchange, the autograd Function with its exact
backward, and the running statistics. Written once for every transport and any number of groups.

Notation (README.md, "What it computes"): group t normalises with the statistics of group
u = p[t] (routing.py: a group is a rank's whole batch, or one of its ``k`` contiguous parts).
m, v: per-channel mean and biased variance; s = 1/sqrt(v + eps); M: values per channel.

    forward   y_t  = w * (x_t - m_u) * s_u + b
    backward  A_t  = sum(dy_t),  B_t = sum(dy_t * (x_t - m_u))
              dw = sum over my groups of B_t * s_u,  db = sum of A_t
              (g_m, g_v) = (-w s_u A_t, -w s_u^3 B_t / 2)  travel back to group u, and group q
              adds what it receives to its direct term:
              dx_q = w s_{p[q]} dy_q + g_m / M_q + g_v * 2 (x_q - m_q) / M_q
"""
import zlib
from typing import List, Optional, Sequence, Tuple

import torch

from .agreement import Report, make_header, raise_if_any_rank_failed
from .routing import Route, group_sizes
from .waits import WaitContext


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
    per_sample = input[0, 0].numel() if input.size(0) else 0
    if min(group_sizes(input.size(0), k)) * per_sample < 2:
        where = "" if k == 1 else f" in each of the {k} groups"
        return (f"expected more than 1 value per channel{where} when training, got input of "
                f"shape {tuple(input.shape)}")
    return None


def local_statistics(input: torch.Tensor, num_features: int, sizes: Sequence[int]
                     ) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Per group: mean and biased variance (k, C) in the accumulation dtype, values per channel."""
    acc = accumulation_dtype(input.dtype)
    chunks = (input,) if len(sizes) == 1 else input.split(list(sizes))
    with torch.no_grad():
        pairs = [_mean_var(chunk, num_features, acc) for chunk in chunks]
    means, variances = zip(*pairs)
    per_sample = input[0, 0].numel()
    return torch.stack(means), torch.stack(variances), [n * per_sample for n in sizes]


def _mean_var(chunk: torch.Tensor, num_features: int, acc: torch.dtype):
    if chunk.device.type == "cpu":
        # Two passes (mean, then the mean of squared deviations) over one temporary: on CPU
        # 3-4x faster than ATen's single-pass kernel at typical shapes (measured, torch 2.13,
        # 32x64x8x8: 49 vs 148 us), with the same float32 accuracy (relative 2e-7).
        dims = [0] + list(range(2, chunk.dim()))
        mean = chunk.mean(dims, dtype=acc, keepdim=True)
        deviation = chunk.to(acc) - mean
        return mean.view(num_features), deviation.square_().mean(dims)
    # Scratch "running" buffers in the accumulation dtype make the kernel return float32
    # statistics for a float16/bfloat16 input; momentum 0 leaves them untouched.
    scratch = torch.zeros(2, num_features, dtype=acc, device=chunk.device)
    return torch.batch_norm_update_stats(chunk, scratch[0], scratch[1], 0.0)


def exchange_statistics(transport, report: Report, route: Route, mean: torch.Tensor,
                        var: torch.Tensor, counts: Sequence[int], context: WaitContext
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Send this rank's group statistics to the groups that borrow them, receive the ones its
    groups borrow, and sum what the running statistics need over all ranks; every rank raises
    the same error if any rank reported a problem. Returns (borrowed means (k, C), borrowed
    variances (k, C), summed statistics)."""
    c = mean.shape[1]
    # Rows travel in float64: counts stay exact and the variance of the union of all batches,
    # E[x^2] - E[x]^2, does not cancel catastrophically.
    count64 = torch.tensor(counts, dtype=torch.float64, device=mean.device).unsqueeze(1)
    packets = torch.cat([mean, var, count64], dim=1).double()  # (k, 2C + 1): m, v, M
    # Over my groups, in one product: sum(M), sum(M m), sum(M (v + m^2)).
    mean64 = packets[:, :c]
    moments = torch.cat([torch.ones_like(count64), mean64,
                         torch.addcmul(packets[:, c:2 * c], mean64, mean64)], dim=1)
    sums = (count64.mT @ moments).view(-1)

    def check(summed_header):
        raise_if_any_rank_failed(transport, report.layer, summed_header.cpu(), report, context)
    rows = {dest: packets[groups] for dest, groups in route.sends.items()}
    expect = {source: len(groups) for source, groups in route.receives.items()}
    received, summed = transport.exchange(report.layer, rows, expect, 2 * c + 1, mean.device,
                                          context, make_header(report, mean.device), sums, check,
                                          match=match_key(report.layer, route.perm, context))
    if len(received) == 1 and not route.local:  # all my groups borrow from one rank, in order
        borrowed = next(iter(received.values()))[:, :2 * c]
    else:
        borrowed = torch.empty(len(counts), 2 * c, dtype=torch.float64, device=mean.device)
        for borrower, lender in route.local:
            borrowed[borrower] = packets[lender, :2 * c]
        for source, groups in route.receives.items():
            borrowed[groups] = received[source][:, :2 * c]
    borrowed_mean, borrowed_var = borrowed.to(mean.dtype).split(c, dim=1)
    return borrowed_mean, borrowed_var, summed


def match_key(layer: str, perm: Sequence[int], context: WaitContext) -> int:
    """Equal on two ranks if they agree on layer, step, direction and permutation (and almost
    surely different otherwise)."""
    return zlib.crc32(f"{layer}:{context.step}:{context.phase}:{list(perm)}".encode())


def update_running_stats(running_mean, running_var, summed: torch.Tensor, factor: float) -> None:
    """Blend in the mean and unbiased variance of the union of all ranks' batches (as torch's
    BatchNorm would on the concatenated global batch); identical on every rank."""
    count = summed[0]
    mean, mean_sq = (summed[1:] / count).chunk(2)
    var = torch.addcmul(mean_sq, mean, mean, value=-1).clamp_min_(0).mul_(count / (count - 1))
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_(var.to(running_var.dtype), factor)


def _channel_shape(input: torch.Tensor):
    return (1, -1) + (1,) * (input.dim() - 2)


def _chunks(tensor: torch.Tensor, sizes: Sequence[int]):
    return (tensor,) if len(sizes) == 1 else tensor.split(list(sizes))


class ShuffleBatchNormFunction(torch.autograd.Function):
    """y = w (x - m_u) s_u + b per group, with the borrowed statistics given; the backward sends
    the gradient of the borrowed statistics back to the lending groups and adds what comes back.

    Inputs after ``bias`` are not differentiable. The local work runs on ATen's own batch-norm
    kernels (CPU and CUDA alike), used in "eval" form with the borrowed statistics standing in
    for running statistics: that is exactly y = w (x - m_u) s_u + b, and its backward gives the
    direct term w s_u dy together with A = sum(dy) and B s_u = sum(dy (x - m_u)) s_u. Only the
    correction through the statistics is ours.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, own_mean, borrowed_mean, borrowed_var,
                sizes: Sequence[int], counts: Sequence[int], eps: float, route: Route,
                transport, backward_context: WaitContext):
        acc = own_mean.dtype
        weight_acc = None if weight is None else weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        if len(sizes) == 1:
            output = torch.native_batch_norm(input, weight_acc, bias_acc, borrowed_mean[0],
                                             borrowed_var[0], False, 0.0, eps)[0]
        else:  # empty_like keeps the memory format; the chunks along dim 0 are views
            output = torch.empty_like(input)
            for j, (x, y) in enumerate(zip(_chunks(input, sizes), _chunks(output, sizes))):
                y.copy_(torch.native_batch_norm(x, weight_acc, bias_acc, borrowed_mean[j],
                                                borrowed_var[j], False, 0.0, eps)[0])
        ctx.save_for_backward(input, weight_acc, borrowed_mean, borrowed_var, own_mean)
        ctx.sizes, ctx.counts, ctx.eps, ctx.route = tuple(sizes), tuple(counts), eps, route
        ctx.transport, ctx.backward_context = transport, backward_context
        ctx.param_dtype = None if weight is None else weight.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, borrowed_mean, borrowed_var, own_mean = ctx.saved_tensors
        needs_input_grad = ctx.needs_input_grad[0]
        sizes = ctx.sizes
        grad_output = grad_output.contiguous(memory_format=_memory_format(input))
        # Per group, in one kernel: the direct term w s_u dy, sum(dy (x - m_u)) s_u, sum(dy).
        mask = [needs_input_grad, True, True]
        if len(sizes) == 1:
            direct, sum_dy_xmu_invstd, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_output, input, weight, borrowed_mean[0], borrowed_var[0], None, None, False,
                ctx.eps, mask)
            sum_dy_xmu_invstd, sum_dy = sum_dy_xmu_invstd.unsqueeze(0), sum_dy.unsqueeze(0)
        else:
            direct = torch.empty_like(input) if needs_input_grad else None
            sums = []
            for j, (dy, x) in enumerate(zip(_chunks(grad_output, sizes), _chunks(input, sizes))):
                d, b, a = torch.ops.aten.native_batch_norm_backward(
                    dy, x, weight, borrowed_mean[j], borrowed_var[j], None, None, False, ctx.eps,
                    mask)
                if direct is not None:
                    _chunks(direct, sizes)[j].copy_(d)
                sums.append((b, a))
            sum_dy_xmu_invstd = torch.stack([b for b, _ in sums])
            sum_dy = torch.stack([a for _, a in sums])

        grad_weight = grad_bias = grad_input = None
        if ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xmu_invstd.sum(0).to(ctx.param_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.sum(0).to(ctx.param_dtype)
        if needs_input_grad:
            grad_own = _gradient_of_own_statistics(ctx, weight, borrowed_var, sum_dy,
                                                   sum_dy_xmu_invstd)
            grad_own_mean, grad_own_var = grad_own.to(own_mean.dtype).chunk(2, dim=1)
            # dx = w s_u dy + g_m / M + g_v * 2 (x - m) / M, as direct + x * b + c per channel
            counts = torch.tensor(ctx.counts, dtype=own_mean.dtype,
                                  device=own_mean.device).unsqueeze(1)
            b = 2.0 * grad_own_var / counts
            c = grad_own_mean / counts - own_mean * b
            shape = _channel_shape(input)
            for j, (dx, x) in enumerate(zip(_chunks(direct, sizes), _chunks(input, sizes))):
                dx.addcmul_(x, b[j].view(shape)).add_(c[j].view(shape))
            grad_input = direct
        return (grad_input, grad_weight, grad_bias) + (None,) * 9


def _gradient_of_own_statistics(ctx, weight, borrowed_var, sum_dy, sum_dy_xmu_invstd):
    """(g_m, g_v) per group of mine, (k, 2C) in float64: what the groups that borrowed my
    groups' statistics send back (a borrower on this rank sends nothing over the wire)."""
    invstd = torch.rsqrt(borrowed_var + ctx.eps)
    w_invstd = invstd if weight is None else invstd * weight
    grad_borrowed = torch.cat([-w_invstd * sum_dy, -0.5 * w_invstd * invstd * sum_dy_xmu_invstd],
                              dim=1).double()
    route = ctx.route
    grad_own = torch.zeros_like(grad_borrowed)
    for borrower, lender in route.local:
        grad_own[lender] = grad_borrowed[borrower]
    if route.crosses:  # every rank knows whether any row crosses; then all take part
        # The forward route reversed: rows go from my borrowing groups back to their lenders.
        rows = {lender_rank: grad_borrowed[groups] for lender_rank, groups in route.receives.items()}
        expect = {borrower_rank: len(groups) for borrower_rank, groups in route.sends.items()}
        context = ctx.backward_context
        received, _ = ctx.transport.exchange(context.layer + ".grad", rows, expect,
                                             grad_borrowed.shape[1], grad_borrowed.device,
                                             context,
                                             match=match_key(context.layer, route.perm, context))
        for borrower_rank, groups in route.sends.items():
            grad_own[groups] = received[borrower_rank]
    return grad_own


def _memory_format(input: torch.Tensor) -> torch.memory_format:
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
