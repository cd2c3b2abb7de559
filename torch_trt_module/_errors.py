"""One exception root for the whole package.

Every error a user can see derives from :class:`TorchTRTError`, so
``except torch_trt_module.TorchTRTError`` catches all of ours and nothing else.
Some also derive from the matching built-in (``ValueError``, ``TypeError``,
``ImportError``) so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "BuildError",
    "CacheError",
    "EngineLoadError",
    "ExportError",
    "InputError",
    "RuntimeFailure",
    "TorchTRTError",
    "VerificationError",
]


class TorchTRTError(Exception):
    """Root of every error raised by torch_trt_module."""


class ExportError(TorchTRTError):
    """The model could not be exported to ONNX (or the export is wrong)."""


class BuildError(TorchTRTError):
    """The backend could not build an engine from the exported graph."""


class BackendUnavailable(TorchTRTError, ImportError):
    """A backend that was asked for cannot run on this machine."""


class InputError(TorchTRTError, ValueError):
    """The inputs given to a compiled module do not match what it was built for."""


class RuntimeFailure(TorchTRTError, RuntimeError):
    """The backend reported a failure while running the engine."""


class VerificationError(TorchTRTError, AssertionError):
    """Outputs of the compiled module differ from the reference beyond tolerance."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class CacheError(TorchTRTError):
    """A cache operation failed (only raised by explicit cache APIs, never by compile())."""


class EngineLoadError(TorchTRTError):
    """A serialized engine or saved module could not be loaded."""
