"""Moving statistics between groups: borrowing in the forward, the gradient of what was borrowed
back to its lender in the backward.

One process (the local transport) only re-orders Python lists of device tensors: no copy, no
device sync. Between ranks, everything one exchange needs travels as one buffer: a rank's group
rows (mean, variance), the summed header (agreement.py) and the sums for the running statistics
are staged in ONE copy to where the transport works (host memory for MPI, Gloo and a Horovod
without GPU collectives), and what comes back (borrowed rows, global mean and variance) in ONE
copy to the input's device.
"""
from typing import List, Sequence, Tuple

import torch

from . import plan as plans
from .agreement import Report, raise_if_any_rank_failed
from .waits import WaitContext


class ForwardResult:
    __slots__ = ("means", "variances", "global_mean", "global_var")

    def __init__(self, means, variances, global_mean=None, global_var=None):
        self.means, self.variances = means, variances
        self.global_mean, self.global_var = global_mean, global_var


def borrow_locally(plan: plans.StepPlan, means: List[torch.Tensor],
                   variances: List[torch.Tensor]) -> ForwardResult:
    """Every lender is on this rank: the borrowed statistics are the lenders' own tensors."""
    lenders = [i for _, i in plan.lenders]
    return ForwardResult([means[i] for i in lenders], [variances[i] for i in lenders])


def borrow_across_ranks(transport, layer, plan: plans.StepPlan, means, variances,
                        counts: Sequence[int], report_header: List[float], make_report,
                        context: WaitContext) -> ForwardResult:
    """The forward exchange: send my lending groups' rows, receive my borrowing groups' rows,
    and sum the header and the running statistics' moments over all ranks; every rank raises the
    same error if any rank reported a problem. Returns the borrowed statistics and the global
    mean and unbiased variance, in the accumulation dtype on the input's device."""
    device, acc = means[0].device, means[0].dtype
    where = transport.rows_device(device)
    c = means[0].numel()
    rows, sums = rows_and_sums(means, variances, counts, where)
    header = torch.tensor(report_header + [float(sum(counts))], dtype=torch.float64)
    route = plan.route
    sends = {dest: _rows(rows, groups) for dest, groups in route.sends.items()}
    expect = {source: len(groups) for source, groups in route.receives.items()}

    totals = {}

    def check(summed_header):  # called by the transport before any received row is used
        summed_header = summed_header.tolist()
        totals["count"] = summed_header[-1]
        raise_if_any_rank_failed(transport, layer.name, summed_header[:-1], make_report(),
                                 context)
    received, summed = transport.exchange(
        layer.name, sends, expect, 2 * c, where, context, header.to(where), sums, check,
        match=plans.match_key(layer.key, context.step, "forward", plan))
    incoming = _concat(received, where)
    lenders = [rows[i] if kind == "local" else incoming[i] for kind, i in plan.lenders]
    return borrowed_result(lenders, global_statistics(summed, totals["count"]), device, acc)


def borrowed_result(lenders: List[torch.Tensor], stats: torch.Tensor, device,
                    acc) -> ForwardResult:
    """What a shuffled forward returns: the rows (mean, variance) my groups borrow, one per
    group, and the global statistics, in ONE copy back (copy_back)."""
    k = len(lenders)
    back = copy_back(stack_rows(lenders), stats, device, acc)
    return ForwardResult(list(back[0:2 * k:2]), list(back[1:2 * k:2]), back[2 * k],
                         back[2 * k + 1])


def global_statistics(moments: torch.Tensor, total) -> torch.Tensor:
    """The global batch's mean and unbiased variance, as one (2, C) tensor, from its moments
    summed over all ranks (2C values: S1 = sum M_q m_q, then S2 = sum M_q (v_q + m_q^2)) and
    its count M (a host number, or a device scalar where checks are deferred)."""
    stats = moments.view(2, -1) / total
    mean, var = stats.unbind(0)
    var.addcmul_(mean, mean, value=-1).clamp_min_(0).mul_(total / (total - 1))
    return stats


def copy_back(rows: torch.Tensor, stats: torch.Tensor, device, acc) -> Tuple[torch.Tensor, ...]:
    """ONE copy to the input's device and accumulation dtype: ``rows`` cut into (C,) rows, then
    the global mean and variance (``stats``, from global_statistics)."""
    c = stats.shape[1]
    return torch.cat([rows.reshape(-1, c), stats]).to(device, acc).unbind(0)


def rows_and_sums(means: List[torch.Tensor], variances: List[torch.Tensor],
                  counts: Sequence[int], where) -> Tuple[torch.Tensor, torch.Tensor]:
    """My groups' rows (k, 2C) of mean and biased variance, and the 2C sums over my groups of
    M_j m_j and M_j (v_j + m_j^2) that the running statistics sum over all ranks; in float64 on
    ``where``: the variance of the union of all batches, E[x^2] - E[x]^2, then does not cancel
    catastrophically, and counts are exact."""
    k, c = len(means), means[0].numel()
    table = torch.cat(means + variances).to(where, torch.float64).view(2, k, c)
    mean, var = table[0], table[1]
    rows = torch.cat([mean, var], dim=1)
    moments = torch.cat([mean, torch.addcmul(var, mean, mean)], dim=1)
    if len(set(counts)) == 1:
        sums = moments.sum(0).mul_(counts[0])
    else:
        sums = sum(moments[j] * counts[j] for j in range(k))
    return rows, sums


def _rows(rows: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    if len(groups) == rows.shape[0] and all(g == i for i, g in enumerate(groups)):
        return rows  # all my groups, in order
    return torch.stack([rows[g] for g in groups])


def stack_rows(rows: List[torch.Tensor]) -> torch.Tensor:
    """(C,) rows as one (n, C) tensor; one row as it is (copy_back cuts either)."""
    return rows[0] if len(rows) == 1 else torch.stack(rows)


def _concat(received, where):
    """The received rows, concatenated in source-rank order (the order plan.py numbers them)."""
    if not received:
        return None
    if len(received) == 1:
        return next(iter(received.values()))
    return torch.cat([received[s] for s in sorted(received)])


class RouteBack:
    """The backward exchange of one training forward: the gradient of the borrowed statistics,
    one row per borrowing group, goes back to the group it borrowed from."""
    __slots__ = ("transport", "layer", "plan", "context")

    def __init__(self, transport, layer, plan: plans.StepPlan, context: WaitContext):
        self.transport, self.layer, self.plan, self.context = transport, layer, plan, context

    def __call__(self, sum_dy: List[torch.Tensor], sum_dy_xmu_invstd: List[torch.Tensor],
                 weight):
        """``sum_dy[t]``, ``sum_dy_xmu_invstd[t]``: the sums of my borrowing group t. Returns what
        my lending groups receive, as two lists of (C,) rows in my groups' order, and whether
        they are already weighted by the borrower's weight."""
        plan = self.plan
        self.transport.check_pending()  # deferred checks (deferred.py): the step's one read
        if not plan.route.crosses:  # every rank's lenders are its own: nothing travels
            order = [t for _, t in plan.borrowers]
            return [sum_dy[t] for t in order], [sum_dy_xmu_invstd[t] for t in order], False
        device, acc = sum_dy[0].device, sum_dy[0].dtype
        where = self.transport.rows_device(device)
        c = sum_dy[0].numel()
        # One row (A_t, B_t s) per borrowing group t.
        rows = torch.stack([row for pair in zip(sum_dy, sum_dy_xmu_invstd) for row in pair])
        rows = rows.view(len(sum_dy), 2 * c)
        if weight is not None:  # ranks may hold different weights: the borrower's counts
            rows = rows * weight.repeat(2)
        rows = rows.to(where, torch.float64)
        route = plan.route
        # The forward route reversed: rows go from my borrowing groups back to their lenders.
        sends = {lender: _rows(rows, groups) for lender, groups in route.receives.items()}
        expect = {borrower: len(groups) for borrower, groups in route.sends.items()}
        context = self.context
        received, _ = self.transport.exchange(
            self.layer.name + ".grad", sends, expect, 2 * c, where, context,
            match=plans.match_key(self.layer.key, context.step, "backward", plan))
        incoming = _concat(received, where)
        mine = stack_rows([rows[t] if kind == "local" else incoming[t]
                           for kind, t in plan.borrowers]).to(device, acc)
        mine = mine.view(2 * len(plan.borrowers), c).unbind(0)  # A_0, Bs_0, A_1, Bs_1, ...
        return list(mine[0::2]), list(mine[1::2]), True


def make_report(layer, error, plan, needs_grad):
    perm = "borrow_from='others'" if plan.perm is None else plan.perm
    return Report(layer.name, error, perm, needs_grad, layer.num_features)
