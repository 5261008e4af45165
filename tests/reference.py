"""The independent float64 reference: plain autograd on all ranks' (or groups') data in one
process, written from the formula in README.md ("What it computes"), sharing no code with the
library."""
import torch


def reference(xs, dys, weights, biases, perm, eps):
    """float64 autograd on all ranks' data in one process: outputs and gradients per rank.
    ``perm="others"``: rank r normalises with the statistics of all the other ranks' data
    concatenated."""
    xs = [x.double().requires_grad_() for x in xs]
    ws = [None if w is None else w.double().requires_grad_() for w in weights]
    bs = [None if b is None else b.double().requires_grad_() for b in biases]
    outs = []
    for r, x in enumerate(xs):
        if perm == "others":
            source = torch.cat([x for q, x in enumerate(xs) if q != r])
        else:
            source = xs[perm[r]]
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = source.mean(dims)
        var = source.var(dims, unbiased=False)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
        if ws[r] is not None:
            y = y * ws[r].view(shape) + bs[r].view(shape)
        outs.append(y)
    sum((y * dy.double()).sum() for y, dy in zip(outs, dys)).backward()
    return ([y.detach() for y in outs], [x.grad for x in xs],
            [None if w is None else w.grad for w in ws], [None if b is None else b.grad for b in bs])


def reference_running(xs, running_mean, running_var, momentum):
    """What torch.nn.BatchNorm tracks on the concatenation of all ranks' batches."""
    flat = [x.double().transpose(0, 1).reshape(x.size(1), -1) for x in xs]
    union = torch.cat(flat, dim=1)
    mean, var = union.mean(1), union.var(1, unbiased=True)
    return ((1 - momentum) * running_mean.double() + momentum * mean,
            (1 - momentum) * running_var.double() + momentum * var)


def reference_groups(xs, dys, ws, bs, perm, eps, k):
    """reference() with every rank's batch cut into k contiguous groups (torch.tensor_split),
    each group a lender of its own; results put back together per rank."""
    gx, gdy, gw, gb = [], [], [], []
    for x, dy, w, b in zip(xs, dys, ws, bs):
        gx += torch.tensor_split(x, k)
        gdy += torch.tensor_split(dy, k)
        gw += [None if w is None else w.clone() for _ in range(k)]  # own tensors: own gradients
        gb += [None if b is None else b.clone() for _ in range(k)]
    ys, dxs, dws, dbs = reference(gx, gdy, gw, gb, perm, eps)
    per_rank = lambda values: [values[r * k:(r + 1) * k] for r in range(len(xs))]  # noqa: E731
    return ([torch.cat(v) for v in per_rank(ys)], [torch.cat(v) for v in per_rank(dxs)],
            [None if v[0] is None else sum(v) for v in per_rank(dws)],
            [None if v[0] is None else sum(v) for v in per_rank(dbs)])
