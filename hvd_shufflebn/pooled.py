"""Borrowing from all the others (``borrow_from="others"``): group t normalises with the pooled
statistics of every group but t, on its own rank and on all the others.

Notation as in functional.py; over all groups of all ranks M = sum M_q, S1 = sum M_q m_q and
S2 = sum M_q (v_q + m_q^2), the sums the running statistics reduce anyway. Group t uses

    M_-t = M - M_t,  m_-t = (S1 - M_t m_t) / M_-t,  v_-t = (S2 - M_t (v_t + m_t^2)) / M_-t - m_-t^2

in float64 (the subtraction cancels). The forward needs one sum of 2C values (with the
agreement header) and no all-to-all. In the backward every value x_i of group q is part of the
pool of every t != q, so with, per group t and channel,

    P_t = (g_m^t - 2 g_v^t m_-t) / M_-t,   Q_t = 2 g_v^t / M_-t
    (g_m^t = -w s_-t A_t, g_v^t = -w s_-t^2 (B_t s_-t) / 2)

and P, Q their sums over all groups of all ranks (one sum of 2C values):

    dx_i = w s_-q dy_i + (P - P_q) + (Q - Q_q) x_i

as in the shuffled mode one fused pass over the input; only the coefficients differ.
"""
from typing import List, Sequence, Tuple

import torch

from .agreement import raise_if_any_rank_failed
from .deferred import header_and_count, leave_for_the_check
from .exchange import ForwardResult, copy_back, global_statistics
from .waits import WaitContext


def borrow_pooled(transport, layer, means: List[torch.Tensor], variances: List[torch.Tensor],
                  counts: Sequence[int], report_header: List[float], make_report,
                  context: WaitContext) -> Tuple[ForwardResult, List[float]]:
    """The pooled statistics of all groups but each of mine, and (between ranks) the global
    mean and unbiased variance, in the accumulation dtype on the input's device; and M_-t for
    each of my groups. Between ranks: one sum of the header and 2C moments, checked first."""
    device, acc = means[0].device, means[0].dtype
    k, c = len(means), means[0].numel()
    across = transport.size > 1
    where = transport.rows_device(device) if across else device
    # Per group: M_t m_t and M_t (v_t + m_t^2), the group's share of S1 and S2, as (2, k, C).
    shares = torch.stack([*means, *variances]).to(where, torch.float64).view(2, k, c)
    mean, second = shares.unbind(0)
    second.addcmul_(mean, mean)
    shares = scale_rows(shares, counts, dim=1)
    mine = shares.sum(1)  # (2, C): S1 and S2 of my groups
    if across and transport.defers_checks(device):  # no read: the step's check (deferred.py)
        header = header_and_count(report_header, counts, where)
        summed = transport.sum(layer.name, torch.cat([header, mine.view(-1)]), context)
        total, totals = leave_for_the_check(transport, layer, summed, make_report, context)
        totals = totals.view(2, c)  # and M, the global count: a device scalar
    elif across:
        header = torch.tensor(report_header + [float(sum(counts))], dtype=torch.float64)
        summed_count = []

        def check(summed_header):  # host memory, or the one device read of the layer
            summed_header = summed_header.tolist()
            summed_count.append(summed_header[-1])
            raise_if_any_rank_failed(transport, layer.name, summed_header[:-1], make_report(),
                                     context)
        totals = transport.sum_and_check(layer.name, header.to(where), mine.view(-1), check,
                                         context)
        total, totals = summed_count[0], totals.to(where).view(2, c)
    else:
        total, totals = float(sum(counts)), mine
    pool_counts = [total - m for m in counts]  # host numbers, or device scalars when deferred
    # (2, k, C): m_-t and E_-t[x^2], then the variance in place of the latter.
    pools = scale_rows(totals.unsqueeze(1) - shares, [1.0 / m for m in pool_counts], dim=1)
    pool_mean, pool_var = pools.unbind(0)
    pool_var.addcmul_(pool_mean, pool_mean, value=-1).clamp_min_(0)
    if not across:  # one process: the running statistics take the whole batch themselves
        rows = pools.to(device, acc).view(2 * k, c).unbind(0)
        return ForwardResult(list(rows[:k]), list(rows[k:])), pool_counts
    # ONE copy back: k pooled means, k pooled variances and the global statistics.
    rows = copy_back(pools, global_statistics(totals, total), device, acc)
    return ForwardResult(list(rows[:k]), list(rows[k:2 * k]), rows[2 * k],
                         rows[2 * k + 1]), pool_counts


def all_but_own(q: torch.Tensor, p: torch.Tensor, sum_back) -> Tuple[torch.Tensor, torch.Tensor]:
    """Q - Q_q and P - P_q per group and channel, from each group's own Q_t and P_t (the
    shuffled mode's b and c with the pool's statistics and count); ``sum_back`` sums over all
    ranks. In float64: the difference cancels when one group's terms dominate."""
    terms = torch.stack([q, p]).to(torch.float64)
    return (sum_back(terms.sum(1, keepdim=True)) - terms).to(q.dtype).unbind(0)


class SumBack:
    """The backward's one exchange in the pooled mode: 2C float64 values summed over all ranks
    (nothing to do in one process)."""
    __slots__ = ("transport", "name", "context")

    def __init__(self, transport, name: str, context: WaitContext):
        self.transport, self.name, self.context = transport, name, context

    def __call__(self, terms: torch.Tensor) -> torch.Tensor:
        if self.transport.size == 1:
            return terms
        self.transport.check_pending()  # deferred checks (deferred.py): the step's one read
        where = self.transport.rows_device(terms.device)
        summed = self.transport.sum(self.name + ".pool.grad", terms.reshape(-1).to(where),
                                    self.context)
        return summed.to(terms.device).view(terms.shape)


def scale_rows(table: torch.Tensor, factors: Sequence[float], dim: int = 0) -> torch.Tensor:
    """Row t of ``table`` along ``dim`` times ``factors[t]`` (host numbers: no tensor made
    from them)."""
    if len(set(factors)) == 1:
        return table * factors[0]
    return torch.stack([row * f for row, f in zip(table.unbind(dim), factors)], dim)
