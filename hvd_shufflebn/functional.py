"""The shuffled batch norm: the statistics exchange, the autograd Function with its exact
backward, and the running statistics.

Notation (README.md, "What it computes"): rank r normalises with the statistics of rank
u = p[r]. m, v: per-channel mean and biased variance; s = 1/sqrt(v + eps); M: values per channel.

    forward   y_r  = w * (x_r - m_u) * s_u + b
    backward  A_r  = sum(dy_r),  B_r = sum(dy_r * (x_r - m_u))
              dw_r = B_r * s_u,  db_r = A_r
              (g_m, g_v) = (-w s_u A_r, -w s_u^3 B_r / 2)  travel back to rank u, and rank q adds
              what it receives to its direct term:
              dx_q = w s_{p[q]} dy_q + g_m / M_q + g_v * 2 (x_q - m_q) / M_q
"""
from typing import Optional, Sequence, Tuple

import torch

from . import permutation as perms
from .agreement import Report, make_header, raise_if_any_rank_failed
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


def input_error(input: torch.Tensor, num_features: int) -> Optional[str]:
    """Why this rank cannot take part in a training step with ``input``, or None."""
    error = shape_error(input, num_features)
    if error is not None:
        return error
    if input.numel() // num_features < 2:
        return ("expected more than 1 value per channel when training, got input of shape "
                f"{tuple(input.shape)}")
    return None


def local_statistics(input: torch.Tensor, num_features: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean, biased variance (accumulation dtype) and values per channel."""
    # Scratch "running" buffers in the accumulation dtype make the kernel return float32
    # statistics for a float16/bfloat16 input; momentum 0 leaves them untouched.
    scratch = torch.zeros(2, num_features, dtype=accumulation_dtype(input.dtype),
                          device=input.device)
    with torch.no_grad():
        mean, var = torch.batch_norm_update_stats(input, scratch[0], scratch[1], 0.0)
    return mean, var, input.numel() // num_features


def exchange_statistics(transport, report: Report, mean: torch.Tensor, var: torch.Tensor,
                        count: int, context: WaitContext
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Send this rank's statistics to the rank that borrows them, receive the ones it borrows,
    and sum what the running statistics need over all ranks; every rank raises the same error
    if any rank reported a problem. Returns (borrowed mean, borrowed var, summed statistics)."""
    # Packets travel in float64: counts stay exact and the variance of the union of all
    # batches, E[x^2] - E[x]^2, does not cancel catastrophically.
    mean64, var64 = mean.double(), var.double()
    count64 = torch.tensor([float(count)], dtype=torch.float64, device=mean.device)
    packet = torch.cat([mean64, var64, count64]).unsqueeze(0)
    sums = torch.cat([count64, count64 * mean64, count64 * (var64 + mean64 * mean64)])
    perm, rank = report.perm, transport.rank

    def check(summed_header):
        raise_if_any_rank_failed(transport, report.layer, summed_header.cpu(), report, context)
    # My packet goes to the rank that borrows from me; I receive from the one I borrow from.
    received, summed = transport.exchange(report.layer, packet, perms.inverse(perm)[rank],
                                          perm[rank], context,
                                          make_header(report, mean.device), sums, check)
    borrowed_mean, borrowed_var = received[0, :2 * mean.numel()].to(mean.dtype).chunk(2)
    return borrowed_mean, borrowed_var, summed


def update_running_stats(running_mean, running_var, summed: torch.Tensor, factor: float) -> None:
    """Blend in the mean and unbiased variance of the union of all ranks' batches (as torch's
    BatchNorm would on the concatenated global batch); identical on every rank."""
    count, sums, sums_sq = summed[0], *summed[1:].chunk(2)
    mean = sums / count
    var = (sums_sq / count - mean * mean).clamp_min(0) * (count / (count - 1))
    running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1 - factor).add_(var.to(running_var.dtype), alpha=factor)


def _channel_shape(input: torch.Tensor):
    return (1, -1) + (1,) * (input.dim() - 2)


class ShuffleBatchNormFunction(torch.autograd.Function):
    """y = w (x - m_u) s_u + b with the borrowed statistics given; the backward sends the
    gradient of the borrowed statistics back to the lender and adds what comes back.

    Inputs after ``bias`` are not differentiable. The local work runs on ATen's own batch-norm
    kernels (CPU and CUDA alike), used in "eval" form with the borrowed statistics standing in
    for running statistics: that is exactly y = w (x - m_u) s_u + b, and its backward gives the
    direct term w s_u dy together with A = sum(dy) and B s_u = sum(dy (x - m_u)) s_u. Only the
    correction through the statistics is ours.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, own_mean, borrowed_mean, borrowed_var, count: int,
                eps: float, perm: Sequence[int], transport, backward_context: WaitContext):
        acc = own_mean.dtype
        weight_acc = None if weight is None else weight.to(acc)
        bias_acc = None if bias is None else bias.to(acc)
        output = torch.native_batch_norm(input, weight_acc, bias_acc, borrowed_mean, borrowed_var,
                                         False, 0.0, eps)[0]
        ctx.save_for_backward(input, weight_acc, borrowed_mean, borrowed_var, own_mean)
        ctx.count, ctx.perm, ctx.transport, ctx.eps = count, tuple(perm), transport, eps
        ctx.backward_context = backward_context
        ctx.param_dtype = None if weight is None else weight.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, borrowed_mean, borrowed_var, own_mean = ctx.saved_tensors
        needs_input_grad = ctx.needs_input_grad[0]
        # The direct term w s_u dy, sum(dy (x - m_u)) s_u and sum(dy), in one kernel.
        direct, sum_dy_xmu_invstd, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_output.contiguous(memory_format=_memory_format(input)), input, weight,
            borrowed_mean, borrowed_var, None, None, False, ctx.eps,
            [needs_input_grad, True, True])

        grad_weight = grad_bias = grad_input = None
        if ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xmu_invstd.to(ctx.param_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.param_dtype)
        if needs_input_grad:
            invstd = torch.rsqrt(borrowed_var + ctx.eps)
            w_invstd = invstd if weight is None else invstd * weight
            grad_mean = -w_invstd * sum_dy
            grad_var = -0.5 * w_invstd * invstd * sum_dy_xmu_invstd
            # Rank r borrowed from p[r]: that is where the gradient of its statistics belongs.
            packet = torch.cat([grad_mean, grad_var]).double().unsqueeze(0)
            transport, context = ctx.transport, ctx.backward_context
            received, _ = transport.exchange(context.layer + ".grad", packet,
                                             ctx.perm[transport.rank],
                                             perms.inverse(ctx.perm)[transport.rank], context)
            grad_own_mean, grad_own_var = received[0].to(own_mean.dtype).chunk(2)
            # dx = w s_u dy + g_m / M + g_v * 2 (x - m) / M, as direct + x * b + c per channel
            b = 2.0 * grad_own_var / ctx.count
            c = grad_own_mean / ctx.count - own_mean * b
            shape = _channel_shape(input)
            grad_input = direct.addcmul_(input, b.view(shape)).add_(c.view(shape))
        return (grad_input, grad_weight, grad_bias) + (None,) * 8


def _memory_format(input: torch.Tensor) -> torch.memory_format:
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
