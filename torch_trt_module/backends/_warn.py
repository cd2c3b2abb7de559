"""One WARNING per cause and process, for the PyTorch runtime's fallbacks (``_inductor_store`` and
``_torch_opt``): a module that falls back on every call must not log on every call.

Example:
    >>> import logging
    >>> warn_once(logging.getLogger("demo"), "demo:key", "said once")
    >>> warn_once(logging.getLogger("demo"), "demo:key", "not said again")
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["warn_once", "warned", "why"]

#: The keys of the WARNINGs already given in this process.
warned: set[str] = set()


def warn_once(logger: logging.Logger, key: str, msg: str, *args: Any) -> None:
    """``logger.warning(msg, *args)``, the first time ``key`` is seen in this process."""
    if key not in warned:
        warned.add(key)
        logger.warning(msg, *args)


def why(error: BaseException) -> tuple[str, str]:
    """An error's type and the first line of its message (at most 300 characters), for a WARNING."""
    text = str(error)
    return type(error).__name__, text.splitlines()[0][:300] if text else ""
