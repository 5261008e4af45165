"""Recomputed forwards (activation checkpointing) replay the forward they recompute.

``torch.utils.checkpoint`` (reentrant or not) runs a block's forward a second time inside the
backward pass. Left alone, that second forward would draw the next step's permutation, borrow
statistics again and update the running statistics again: the gradient would belong to another
function. So a forward that may be recomputed leaves a record (the permutation, its step and the
statistics it borrowed), and a forward that runs inside a backward pass is a recomputation: it
finds its record by the statistics of its own input (the recomputation sees the same input),
replays it without communicating, and changes no state. Its backward then exchanges gradients
exactly as the original would have.
"""
from collections import deque
from typing import NamedTuple, Optional

import torch

# A layer keeps the records of its last forwards that may be recomputed; enough for several
# forwards of one layer per backward pass (two crops, multi-crop) and an unrecomputed key encoder
# in between. Each record holds 4 * num_features statistics per group.
CAPACITY = 32


# torch.utils.checkpoint itself relies on both (torch >= 2.1, what setup.cfg asks for).
_graph_task_id = torch._C._current_graph_task_id
_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def in_backward() -> bool:
    """Whether we run inside a backward pass: that is where checkpointing recomputes."""
    return _graph_task_id() != -1


def may_be_recomputed() -> bool:
    """Whether this forward could be recomputed later: reentrant checkpointing runs the first
    forward without grad, the non-reentrant kind with saved-tensor hooks in place (if torch
    cannot tell us about hooks, assume it could: records are small and bounded)."""
    if not torch.is_grad_enabled() or _top_saved_tensors_hooks is None:
        return True
    return _top_saved_tensors_hooks(False) is not None


class Record(NamedTuple):
    step: int
    plan: object  # plan.StepPlan: the permutation and who sends what
    sizes: list
    counts: list
    own_means: list  # per group, (C,) tensors, like the three below
    own_vars: list
    borrowed_means: list
    borrowed_vars: list


class Records:
    """The records of one layer, oldest first."""

    def __init__(self):
        self._records = deque(maxlen=CAPACITY)

    def __len__(self):
        return len(self._records)

    def add(self, record: Record) -> None:
        self._records.append(record)

    def take(self, own_means: list, own_vars: list, counts) -> Optional[Record]:
        """Remove and return the record of the forward whose input had these statistics: the
        oldest bit-identical one, else (a recomputation that is not bit-exact, e.g. some GPU
        kernels) the closest within a relative 1e-4, else None."""
        best, best_error = None, None
        own_mean, own_var = torch.stack(own_means), torch.stack(own_vars)
        for index, record in enumerate(self._records):
            if list(record.counts) != list(counts) or len(record.own_means) != len(own_means):
                continue
            record_mean, record_var = torch.stack(record.own_means), torch.stack(record.own_vars)
            if torch.equal(record_mean, own_mean) and torch.equal(record_var, own_var):
                best = index
                break
            error = max(_relative_error(record_mean, own_mean),
                        _relative_error(record_var, own_var))
            if error <= 1e-4 and (best_error is None or error < best_error):
                best, best_error = index, error
        if best is None:
            return None
        record = self._records[best]
        del self._records[best]
        return record


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / (1 + b.abs())).max())
