"""Recomputed forwards (activation checkpointing) replay the forward they recompute.

``torch.utils.checkpoint`` (reentrant or not) runs a block's forward a second time inside the
backward pass. Left alone, that second forward would draw the next step's permutation, borrow
statistics again and update the running statistics again: the gradient would belong to another
function. So a forward that runs inside a checkpointed block leaves a record (its plan, step and
the statistics it used), and a forward that runs inside a backward pass is a recomputation: it
replays its record without communicating and changes no state. Its backward then exchanges
gradients exactly as the original would have.

A recomputation is tied to its forward by construction, never by comparing statistics: both run
inside the same checkpoint call (the non-reentrant kind's ``_CheckpointFrame``, found in the
saved-tensor hooks it installs; the reentrant kind's ``CheckpointFunction`` context, found on
the call stack), and within one call the layer runs in the same order both times, so the n-th
forward of the layer inside a call is replayed by the n-th recomputation of that call. Records
live as long as the checkpoint call does (weak keys), so nothing accumulates: a forward outside
any checkpoint (MoCo's key encoder under ``torch.no_grad()``) leaves none.
"""
import sys
import weakref
from typing import NamedTuple, Optional

import torch
from torch.utils import checkpoint as _checkpoint

_graph_task_id = torch._C._current_graph_task_id
_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_REENTRANT_CODES = (_checkpoint.CheckpointFunction.forward.__code__,
                    _checkpoint.CheckpointFunction.backward.__code__)
_FRAME_TYPE = getattr(_checkpoint, "_CheckpointFrame", None)
_STACK_DEPTH = 48  # how far up a reentrant checkpoint's Function is looked for


def in_backward() -> bool:
    """Whether we run inside a backward pass: that is where checkpointing recomputes."""
    return _graph_task_id() != -1


def checkpoint_call() -> Optional[object]:
    """The checkpoint call this forward runs in (first run or recomputation), or None."""
    if _top_saved_tensors_hooks is not None and _FRAME_TYPE is not None:
        hooks = _top_saved_tensors_hooks(False)
        if hooks is not None:
            frame = _frame_of(hooks[0])
            if frame is not None:
                return frame
    if torch.is_grad_enabled() and not in_backward():
        return None  # a reentrant checkpoint runs its first forward without grad
    frame = sys._getframe(2)
    for _ in range(_STACK_DEPTH):
        if frame is None:
            return None
        if frame.f_code in _REENTRANT_CODES:
            return frame.f_locals.get("ctx")
        frame = frame.f_back
    return None


def _frame_of(hook, depth: int = 3) -> Optional[object]:
    """The _CheckpointFrame a non-reentrant checkpoint's pack hook closes over (directly in the
    first forward, through a weak reference in the recomputation, whose hook may be wrapped)."""
    for cell in getattr(hook, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, weakref.ReferenceType):
            value = value()
        if isinstance(value, _FRAME_TYPE):
            return value
        if depth > 1 and callable(value):
            frame = _frame_of(value, depth - 1)
            if frame is not None:
                return frame
    return None


class Record(NamedTuple):
    step: int
    plan: object  # plan.StepPlan: the permutation and who sends what
    groups: object  # functional.Groups: sizes and counts of the groups
    own_means: list  # per group, (C,) tensors, like the three below
    own_vars: list
    borrowed_means: list
    borrowed_vars: list
    pool_counts: Optional[list] = None  # borrow_from="others": M_-t per group


class Records:
    """One layer's records, by checkpoint call, in call order."""

    def __init__(self):
        self._calls = weakref.WeakKeyDictionary()  # call -> (records, {backward run: replayed})

    def __len__(self):
        return sum(len(records) for records, _ in self._calls.values())

    def __getstate__(self):  # a copy of the layer (deepcopy, pickling) starts without records
        return {}

    def __setstate__(self, state):
        self.__init__()

    def add(self, call, record: Record) -> None:
        self._calls.setdefault(call, ([], {}))[0].append(record)

    def take(self, call) -> Optional[Record]:
        """The record of the forward that this recomputation (in ``call``, during the current
        backward run) recomputes: the n-th of the call for its n-th recomputation."""
        if call is None or call not in self._calls:
            return None
        records, replayed = self._calls[call]
        run = _graph_task_id()
        n = replayed.get(run, 0)
        replayed[run] = n + 1
        return records[n] if n < len(records) else None
