"""Optimizer steps, as a weight watch (:mod:`torch_trt_module._runtime.weights`) sees them.

``torch.optim``'s global step hooks (installed once, by the first watch) do two things here:

- **They say which steps are in progress, and in which thread**, so that a weight read never
  catches another thread's step half-done: :func:`wait_for_steps` waits for them, with no lock
  of the caller held. A thread that is itself inside a step never waits: it is the step's own
  closure (``optimizer.step(closure)``, as LBFGS and PyTorch Lightning call every step), and the
  step cannot go on until the closure returns. Waiting there was a hang (issue 20).
- **They mark the watches over an optimizer's parameters changed when its step ends.** Fused
  optimizers (``AdamW(fused=True)``...) write through kernels that do not bump the tensors'
  ``_version`` counters, and older custom optimizers write through ``p.data``, which has a counter
  of its own. Which watches an optimizer covers is worked out once per optimizer and kept until
  its parameter groups or the watched tensors change, so an unrelated optimizer's step costs a
  dictionary lookup.

A step that raises skips torch's post-step hooks, so it would stay "in progress" for ever. Each
entry keeps the frame of torch's step wrapper: a waiter that has waited a while drops the steps
whose frame is no longer on their thread's stack (or whose thread is gone).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from typing import Any, Iterator, Protocol

__all__ = ["install", "quiet", "wait_for_steps", "watched_tensors_changed"]

_cond = threading.Condition()
_in_step: dict[int, list[Any]] = {}  # thread id -> the step wrapper frames in progress there (nested steps)
_installed = False
_install_lock = threading.Lock()
_PRUNE_AFTER_S = 0.25


class _Watch(Protocol):
    tensor_ids: frozenset[int]

    def bump(self) -> None: ...


_watches: "weakref.WeakSet[Any]" = weakref.WeakSet()  # every live watch
_generation = [0]  # bumped when the set of watched tensors changes
_covered: "weakref.WeakKeyDictionary[Any, tuple[int, int, list[weakref.ref[Any]]]]" = weakref.WeakKeyDictionary()


def install(watch: _Watch) -> None:
    """Start counting steps (once per process), and mark ``watch`` changed at the end of a step
    of any optimizer over its tensors."""
    global _installed
    with _install_lock:
        if not _installed:
            from torch.optim import optimizer

            optimizer.register_optimizer_step_pre_hook(_step_started)
            optimizer.register_optimizer_step_post_hook(_step_finished)
            _installed = True
    _watches.add(watch)
    watched_tensors_changed()


def watched_tensors_changed() -> None:
    """The tensors some watch follows changed (a new watch, or a reassigned parameter): work out
    again which watches each optimizer covers, at its next step."""
    _generation[0] += 1


def _on_stack(thread_id: int, frame: Any) -> bool:
    top = sys._getframe() if thread_id == threading.get_ident() else sys._current_frames().get(thread_id)
    while top is not None:
        if top is frame:
            return True
        top = top.f_back
    return False


def _prune(thread_id: int | None = None) -> None:
    """Drop steps that are over without their post hook (the step raised). Call with ``_cond`` held."""
    for tid in [thread_id] if thread_id is not None else list(_in_step):
        frames = [f for f in _in_step.get(tid, ()) if _on_stack(tid, f)]
        if frames:
            _in_step[tid] = frames
        else:
            _in_step.pop(tid, None)


def _step_started(*_: Any) -> None:
    frame = sys._getframe(1)  # torch's step wrapper, which called this hook
    me = threading.get_ident()
    with _cond:  # waits while a weight read is in progress (it holds the lock)
        if me in _in_step:
            _prune(me)  # a nested step, or one that raised earlier in this thread
        _in_step.setdefault(me, []).append(frame)


def _step_finished(optimizer: Any, *_: Any) -> None:
    me = threading.get_ident()
    with _cond:
        frames = _in_step.get(me)
        if frames:
            frames.pop()
            if not frames:
                del _in_step[me]
        _cond.notify_all()
    if _watches:
        for ref in _watches_over(optimizer):
            watch = ref()
            if watch is not None:
                watch.bump()


def _watches_over(optimizer: Any) -> list["weakref.ref[Any]"]:
    groups = optimizer.param_groups
    count = sum(len(g["params"]) for g in groups)
    known = _covered.get(optimizer)
    if known is not None and known[0] == _generation[0] and known[1] == count:
        return known[2]
    ids = {id(p) for g in groups for p in g["params"]}
    refs = [weakref.ref(w) for w in list(_watches) if not ids.isdisjoint(w.tensor_ids)]
    _covered[optimizer] = (_generation[0], count, refs)
    return refs


def wait_for_steps() -> None:
    """Return once no other thread is inside an optimizer step; at once in a thread that is inside
    one itself (its closure: see the module docstring). Never call it holding a lock that a step's
    closure may need."""
    me = threading.get_ident()
    with _cond:
        if me in _in_step:
            _prune(me)
            if me in _in_step:
                return
        while any(t != me for t in _in_step):
            if not _cond.wait(_PRUNE_AFTER_S):
                _prune()


@contextlib.contextmanager
def quiet() -> Iterator[bool]:
    """Hold off steps that would start (their pre hook waits) while the block reads weights. Yields
    whether the weights are whole: no other thread is inside a step, or this one is (its closure)."""
    me = threading.get_ident()
    with _cond:
        yield me in _in_step or not any(t != me for t in _in_step)
