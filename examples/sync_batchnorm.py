"""A small CPU SyncBatchNorm on Horovod (``hvd.SyncBatchNorm`` refuses CPU tensors).

In training mode every rank normalises its batch with the per-channel mean and (biased)
variance of the *global* batch, the concatenation of all ranks' batches; batches may differ
in size between ranks. The backward is exact: the gradient each rank gets for its own slice
equals the gradient of (sum over ranks of the ranks' losses) computed on the concatenated
batch, as with ``torch.nn.SyncBatchNorm``. weight/bias gradients are per-rank contributions;
Horovod's DistributedOptimizer averages them like any other parameter gradient.

Self-check (gradient against single-process float64 autograd on the concatenated batch):

    .venv/bin/horovodrun -np 2 .venv/bin/python examples/sync_batchnorm.py
"""
import itertools
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import horovod.torch as hvd
from common import say


_layer_ids = itertools.count()


def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


class SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with global batch statistics.

    Returns (y, mean, unbiased var); the last two are for the running statistics only.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, name):
        dims = _reduce_dims(x)
        count = x.numel() // x.shape[1]
        # Sums accumulate in float64: sum(x^2)/n - mean^2 cancels badly in float32.
        local = torch.cat([
            torch.tensor([float(count)], dtype=torch.float64),
            x.sum(dims, dtype=torch.float64),
            (x * x).sum(dims, dtype=torch.float64),
        ])
        total = hvd.allreduce(local, op=hvd.Sum, name=name)  # sums, not averages
        n = total[0].item()
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)}")
        mean64, sumsq = torch.chunk(total[1:] / n, 2)
        var64 = (sumsq - mean64 * mean64).clamp_(min=0)

        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = mean64.to(x.dtype)
        invstd = torch.rsqrt(var64 + eps).to(x.dtype)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        y = xhat if weight is None else xhat * weight.view(shape) + bias.view(shape)

        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count, ctx.name = n, name
        var_unbiased = (var64 * (n / (n - 1))).to(x.dtype)
        ctx.mark_non_differentiable(mean, var_unbiased)
        return y, mean, var_unbiased

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        xhat, weight, invstd = ctx.saved_tensors
        dims = _reduce_dims(dy)
        shape = [1, -1] + [1] * (dy.dim() - 2)
        sum_dy = dy.sum(dims, dtype=torch.float64)
        sum_dy_xhat = (dy * xhat).sum(dims, dtype=torch.float64)
        # Every rank must join this allreduce, whatever it needs, or the ranks deadlock.
        total = hvd.allreduce(torch.cat([sum_dy, sum_dy_xhat]), op=hvd.Sum, name=ctx.name + ".grad")
        mean_dy, mean_dy_xhat = (t.to(dy.dtype) for t in torch.chunk(total / ctx.count, 2))

        scale = invstd if weight is None else invstd * weight
        dx = scale.view(shape) * (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape))
        if weight is None:
            return dx, None, None, None, None
        return dx, sum_dy_xhat.to(dy.dtype), sum_dy.to(dy.dtype), None, None


class SyncBatchNorm(_BatchNorm):
    """Drop-in for BatchNorm1d/2d/3d whose training statistics span all Horovod ranks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A fixed name per layer, the same on every rank, lets Horovod's response cache hit.
        self.name = f"syncbn.{next(_layer_ids)}"

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x):
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)

        if not (self.training or self.running_mean is None):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)

        y, mean, var = SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, self.name)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var, factor)
        return y


def convert_sync_batchnorm(module):
    """Return `module` with every nn.BatchNorm1d/2d/3d replaced by SyncBatchNorm (shared params)."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child))
    return out


def _check_against_single_process():
    """Compare forward, dx, summed weight/bias grads and running stats with float64 autograd
    of nn.BatchNorm on the concatenated batch. Rank r holds 3 + 2r samples (unequal on purpose)."""
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    worst = 0.0
    for shape_tail in [(), (5,), (3, 4)]:  # BatchNorm1d (N,C), (N,C,L), BatchNorm2d (N,C,H,W)
        gen = torch.Generator().manual_seed(1234 + len(shape_tail))
        C = 6
        xs = [torch.randn((3 + 2 * r, C) + shape_tail, generator=gen, dtype=torch.float64) * 3 + 1
              for r in range(size)]
        dys = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in xs]
        w0 = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
        b0 = torch.randn(C, generator=gen, dtype=torch.float64)

        # Reference: one process, plain BatchNorm, the whole global batch.
        ref = torch.nn.BatchNorm1d(C, momentum=0.3).double() if len(shape_tail) < 2 \
            else torch.nn.BatchNorm2d(C, momentum=0.3).double()
        with torch.no_grad():
            ref.weight.copy_(w0)
            ref.bias.copy_(b0)
        x_all = torch.cat(xs).requires_grad_()
        y_all = ref(x_all)
        (y_all * torch.cat(dys)).sum().backward()
        lo = sum(x.shape[0] for x in xs[:rank])
        hi = lo + xs[rank].shape[0]

        # Under test: this rank's slice only, through convert_sync_batchnorm.
        bn = convert_sync_batchnorm(torch.nn.Sequential(
            type(ref)(C, momentum=0.3).double()))[0]
        with torch.no_grad():
            bn.weight.copy_(w0)
            bn.bias.copy_(b0)
        x = xs[rank].clone().requires_grad_()
        y = bn(x)
        (y * dys[rank]).sum().backward()
        grad_w = hvd.allreduce(bn.weight.grad, op=hvd.Sum)
        grad_b = hvd.allreduce(bn.bias.grad, op=hvd.Sum)

        errors = {
            "y": (y - y_all[lo:hi]).abs().max().item(),
            "dx": (x.grad - x_all.grad[lo:hi]).abs().max().item(),
            "dweight": (grad_w - ref.weight.grad).abs().max().item(),
            "dbias": (grad_b - ref.bias.grad).abs().max().item(),
            "running_mean": (bn.running_mean - ref.running_mean).abs().max().item(),
            "running_var": (bn.running_var - ref.running_var).abs().max().item(),
        }
        gathered = hvd.allgather_object(errors)
        maxes = {k: max(e[k] for e in gathered) for k in errors}
        worst = max(worst, *maxes.values())
        if rank == 0:
            say(f"input (N,{C}{''.join(',' + str(s) for s in shape_tail)}), {size} ranks, "
                "max abs error over ranks: "
                + ", ".join(f"{k}={v:.2e}" for k, v in maxes.items()))
    ok = worst < 1e-10
    if rank == 0:
        say(f"SyncBatchNorm check {'PASSED' if ok else 'FAILED'}: max abs error {worst:.2e} "
            "(float64, tolerance 1e-10)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")  # ranks may share cores
    torch.set_num_threads(1)
    _check_against_single_process()
