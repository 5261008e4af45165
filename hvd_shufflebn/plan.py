"""What is the same for every layer of a training step: the permutation, who sends what where,
and the integers the ranks compare to agree. Computed once per (spec, seed, step, groups, rank)
and shared by all layers that take that step, so a layer's forward does no per-permutation work.
"""
import functools
import zlib
from typing import NamedTuple, Optional, Tuple

from . import permutation as perms
from .routing import Route, route


class StepPlan(NamedTuple):
    # The permutation of all groups (identity when ``error``); None when every group borrows
    # the pooled statistics of all the others (borrow_from="others").
    perm: Optional[Tuple[int, ...]]
    error: Optional[str]     # why the permutation is invalid on this rank, or None
    route: Optional[Route]   # what this rank sends and receives (routing.py)
    perm_key: int            # crc32 of the permutation: part of the agreement fingerprint
    # For my group j: ("local", i) borrows my group i; ("remote", r) row r of what arrives (rows
    # are concatenated in source-rank order).
    lenders: Tuple[Tuple[str, int], ...]
    # For my group i: which borrower's gradient comes back to it, in the same two forms.
    borrowers: Tuple[Tuple[str, int], ...]


@functools.lru_cache(maxsize=64)
def plan_for(spec, seed: int, step: int, n_groups: int, rank: int, k: int) -> StepPlan:
    """The plan of ``rank`` (with ``k`` groups) at ``step``; an invalid permutation (e.g. from a
    callable) is kept as ``error``, so that the rank can still take part and report it."""
    try:
        perm, error = perms.permutation_for(spec, seed, step, n_groups), None
    except ValueError as exc:
        perm, error = tuple(range(n_groups)), f"invalid permutation: {exc}"
    return _plan(perm, error, rank, k)


@functools.lru_cache(maxsize=64)  # a few permutations recur (with 2 groups, always the same)
def _plan(perm: Tuple[int, ...], error: Optional[str], rank: int, k: int) -> StepPlan:
    r = route(perm, rank, k)
    lenders, borrowers = [None] * k, [None] * k
    for borrower, lender in r.local:
        lenders[borrower] = ("local", lender)
        borrowers[lender] = ("local", borrower)
    row = 0
    for source in sorted(r.receives):
        for group in r.receives[source]:
            lenders[group] = ("remote", row)
            row += 1
    row = 0
    for dest in sorted(r.sends):
        for group in r.sends[dest]:
            borrowers[group] = ("remote", row)
            row += 1
    return StepPlan(perm, error, r, zlib.crc32(repr(perm).encode()), tuple(lenders),
                    tuple(borrowers))


# Pooled: nothing moves but sums, and the plan is the same at every step.
POOLED = StepPlan(None, None, None, zlib.crc32(b"borrow_from=others"), (), ())


def layer_key(name: str, num_features: int) -> int:
    """crc32 of what a layer's ranks must agree on besides the permutation."""
    return zlib.crc32(f"{name}:{num_features}".encode())


def fingerprint(layer: int, plan: StepPlan) -> int:
    """A small integer (< 2**20) identifying layer, width and permutation; exact in float64 even
    when squared and summed over ranks."""
    return (layer * 1_000_003 + plan.perm_key) % (1 << 20)


def match_key(layer: int, step: int, phase: str, plan: StepPlan) -> int:
    """Equal on two ranks if they agree on layer, step, direction and permutation (and almost
    surely different otherwise); tuples of ints hash the same in every process."""
    return hash((layer, step, phase == "forward", plan.perm_key)) & 0x7FFFFFFF
