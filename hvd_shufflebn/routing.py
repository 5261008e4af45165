"""Who borrows from whom, and what travels between ranks.

Each rank's batch is split into ``k`` contiguous groups (``groups_per_rank``; 1 by default, so a
group is a rank's whole batch). Group ``g = rank * k + j`` normalises with the statistics of group
``p[g]``, ``p`` a permutation of all ``size * k`` groups. A lender on the same rank costs nothing;
one on another rank costs a row of statistics in the forward exchange, and a row of gradients
back in the backward one. Rows between two ranks travel in the order of the borrowing group's
index, which both sides know, so no row needs a label.
"""
from typing import Dict, List, NamedTuple, Tuple


class Route(NamedTuple):
    """What rank ``rank`` does with permutation ``perm`` (over ``size * k`` groups)."""
    perm: Tuple[int, ...]         # the whole permutation, the same on every rank
    local: Tuple[Tuple[int, int], ...]  # (my borrowing group j, my lending group i) pairs
    sends: Dict[int, List[int]]   # forward: rank -> my lending groups whose rows go there, in order
    receives: Dict[int, List[int]]  # forward: rank -> my borrowing groups whose rows come from it
    crosses: bool                 # whether any group of ANY rank borrows from another rank


def route(perm: Tuple[int, ...], rank: int, k: int) -> Route:
    """The route of ``rank``. The backward exchange takes it in reverse: gradient rows go from the
    borrowing groups (``receives``) back to the lending ones (``sends``)."""
    local, sends, receives, crosses = [], {}, {}, False
    for t in range(len(perm)):  # ascending borrower index: the order rows travel in
        lender = perm[t]
        t_rank, l_rank = t // k, lender // k
        crosses = crosses or t_rank != l_rank
        if t_rank == rank and l_rank == rank:
            local.append((t % k, lender % k))
        elif l_rank == rank:
            sends.setdefault(t_rank, []).append(lender % k)
        elif t_rank == rank:
            receives.setdefault(l_rank, []).append(t % k)
    return Route(tuple(perm), tuple(local), sends, receives, crosses)


def group_sizes(batch: int, k: int) -> List[int]:
    """Contiguous groups as equal as possible (the first ``batch % k`` one sample larger)."""
    return [batch // k + (1 if j < batch % k else 0) for j in range(k)]
