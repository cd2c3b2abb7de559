"""Keeping torch's console output out of the user's stderr while the library drives torch.

A failed ``torch.export`` trace prints its partial FX graph to ``sys.stderr`` with ``print``, and
torch's own loggers (``torch.fx.experimental.symbolic_shapes``' "Unable to find user code
corresponding to ...") write through handlers that look ``sys.stderr`` up at each record. Both
reach the user's console beside the library's own logger, which already says what happened.

Inside :func:`quiet_torch`, what the *calling thread* writes to ``sys.stderr`` goes to this
package's logger at DEBUG instead. Other threads' writes pass through untouched, and
``sys.stderr`` is put back when the last scope ends. The user's logging configuration (levels,
handlers) is never touched. Scopes are kept narrow (an export, dynamo's explain), because a
record the library itself logs inside one, with no handler configured, would go the same way.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import Any, Iterator, TextIO

__all__ = ["quiet_torch"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_depth = 0
_router: "_Router | None" = None


class _Router:
    """Stands in for ``sys.stderr``: a thread inside a quiet scope writes to its own buffer, any
    other thread to the stream this replaced."""

    def __init__(self, target: TextIO) -> None:
        self._target = target
        self._sinks: dict[int, list[str]] = {}

    def write(self, text: str) -> int:
        sink = self._sinks.get(threading.get_ident())
        if sink is None:
            return self._target.write(text)
        sink.append(text)
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, ...: the real stream's
        return getattr(self._target, name)


@contextlib.contextmanager
def quiet_torch(what: str) -> Iterator[None]:
    """Route this thread's writes to ``sys.stderr`` to DEBUG for the block (``what`` names the step
    in the DEBUG record). Nested scopes share the outermost one's buffer."""
    global _depth, _router
    me = threading.get_ident()
    with _lock:
        if _router is None:
            _router = _Router(sys.stderr)
            sys.stderr = _router  # type: ignore[assignment]
        _depth += 1
        router = _router
        outer = router._sinks.get(me)
        sink: list[str] = [] if outer is None else outer
        router._sinks[me] = sink
    try:
        yield
    finally:
        with _lock:
            if outer is None:
                del router._sinks[me]
            _depth -= 1
            if _depth == 0:
                if sys.stderr is router:  # someone who replaced it since restores theirs themselves
                    sys.stderr = router._target
                _router = None
        text = "".join(sink).strip() if outer is None else ""
        if text:
            log.debug("%s wrote to stderr (kept off the console):\n%s", what, text)
