"""Which rank's statistics each rank borrows: the permutation ``p`` (rank r uses rank p[r]).

Every rank derives the same ``p`` from the same inputs (mode, seed, step, size), so agreeing on it
costs no communication. A fingerprint of ``p`` travels with the statistics so that ranks which
disagree anyway (different seeds, a rank-dependent callable) are caught instead of mis-routed.
"""
import functools
import random
from typing import Callable, Sequence, Tuple, Union


PermutationSpec = Union[str, Sequence[int], Callable[[int, int], Sequence[int]]]
MODES = ("derangement", "random", "shift")


def check_spec(spec: PermutationSpec) -> PermutationSpec:
    """Validate what can be validated before the world size is known; raise ValueError otherwise."""
    if isinstance(spec, str):
        if spec not in MODES:
            raise ValueError(f"permutation must be one of {MODES}, a sequence of ints or a callable "
                             f"(step, size) -> sequence, got {spec!r}")
        return spec
    if callable(spec):
        return spec
    try:
        perm = tuple(spec)
    except TypeError:
        raise ValueError(f"permutation must be a mode name, a sequence of ints or a callable, "
                         f"got {spec!r}") from None
    validate(perm, len(perm))
    return perm


def validate(perm, size: int) -> Tuple[int, ...]:
    """Return ``perm`` as a tuple of ints if it is a permutation of range(size), else raise ValueError."""
    try:
        values = tuple(int(v) for v in perm)
        if any(v != w for v, w in zip(values, perm)):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"permutation must be a sequence of ints, got {perm!r}") from None
    if sorted(values) != list(range(size)):
        raise ValueError(f"permutation {values} is not a permutation of range({size})")
    return values


def permutation_for(spec: PermutationSpec, seed: int, step: int, size: int) -> Tuple[int, ...]:
    """The permutation for training step ``step`` on ``size`` ranks; ValueError if ``spec`` gives none."""
    if spec == "shift":
        return tuple((r + 1) % size for r in range(size))
    if spec in ("derangement", "random"):
        return _seeded(seed, step, size, derangement=spec == "derangement")
    if callable(spec):
        return validate(spec(step, size), size)
    return validate(spec, size)


@functools.lru_cache(maxsize=16)  # every layer of a network asks for the same one each step
def _seeded(seed: int, step: int, size: int, derangement: bool) -> Tuple[int, ...]:
    # One generator per (seed, step): the same on every rank (Python's Mersenne Twister seeded by
    # an int is platform independent), independent of anything else the program draws, and
    # pure host work: no tensor op.
    if size == 2 and derangement:
        return (1, 0)  # the only one
    gen = random.Random((seed * 1_000_003 + step) % (2 ** 63))
    perm = list(range(size))
    while True:  # rejection sampling: a random permutation is a derangement with probability ~1/e
        gen.shuffle(perm)
        if not derangement or size < 2 or all(p != r for r, p in enumerate(perm)):
            return tuple(perm)


def inverse(perm: Sequence[int]) -> Tuple[int, ...]:
    inv = [0] * len(perm)
    for r, p in enumerate(perm):
        inv[p] = r
    return tuple(inv)
