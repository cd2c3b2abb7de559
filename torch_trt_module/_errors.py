"""Every exception torch_trt_module raises, under one root.

``except torch_trt_module.TorchTRTError`` catches all of ours and nothing else. Some also
derive from the matching built-in so that generic handlers keep working::

    TorchTRTError
    ├── SettingsError (ValueError)        an option of compile() has a value it cannot take
    │   └── PrecisionError                 a mixed-precision conversion was asked for wrongly
    ├── ExportError                        the model cannot be exported to ONNX, or the export is wrong
    │   └── UnsupportedOutput (TypeError)  the model returns something an engine cannot (a cache, a string)
    ├── BuildError                         the backend cannot build an engine from the graph
    ├── BackendUnavailable (ImportError)   a backend that was asked for cannot run on this machine
    ├── InputError (ValueError)            call inputs that do not match what the module was built for
    ├── RuntimeFailure (RuntimeError)      the backend reported a failure while running
    │   └── EngineNotRefittable            the engine's weights cannot be replaced (built without REFIT)
    ├── VerificationError (AssertionError) outputs differ from the reference beyond tolerance
    ├── EngineLoadError                    a serialized engine or saved module cannot be loaded
    ├── CacheError                         an explicit cache operation failed (compile() never raises it)
    │   └── CacheLockTimeout (TimeoutError)
    ├── TritonExportError (ValueError)     an engine cannot be written as a Triton model as asked
    │   └── TritonRepoExists (FileExistsError)
    └── UsageError (ValueError)            the command line was given something it cannot use (exit 2)

Every message says what was received, what was expected, and how to fix it.

Internal, never raised out of the package (not exported, not a TorchTRTError)::

    Exception
    └── Corrupt                            a cache entry cannot be used: the cache turns it into a miss
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "BuildError",
    "CacheError",
    "CacheLockTimeout",
    "EngineLoadError",
    "EngineNotRefittable",
    "ExportError",
    "InputError",
    "PrecisionError",
    "RuntimeFailure",
    "SettingsError",
    "TorchTRTError",
    "TritonExportError",
    "TritonRepoExists",
    "UnsupportedOutput",
    "UsageError",
    "VerificationError",
]


class TorchTRTError(Exception):
    """Root of every error raised by torch_trt_module."""


class SettingsError(TorchTRTError, ValueError):
    """An option given to compile() (or another entry point) has a value it cannot take."""


class PrecisionError(SettingsError):
    """A mixed-precision conversion was asked for with a value it cannot take."""


class ExportError(TorchTRTError):
    """The model could not be exported to ONNX (or the export is wrong)."""


class UnsupportedOutput(ExportError, TypeError):
    """The model returns a value an engine cannot return: a cache object (a Hugging Face ``DynamicCache``
    holds state that grows from call to call), a constant, or an object that is not a tensor nest."""


class BuildError(TorchTRTError):
    """The backend could not build an engine from the exported graph."""


class BackendUnavailable(TorchTRTError, ImportError):
    """A backend that was asked for cannot run on this machine."""


class InputError(TorchTRTError, ValueError):
    """The inputs given to a compiled module do not match what it was built for."""


class RuntimeFailure(TorchTRTError, RuntimeError):
    """The backend reported a failure while running the engine."""


class EngineNotRefittable(RuntimeFailure):
    """The engine cannot take new weights (a TensorRT plan built without ``BuilderFlag.REFIT``, or one
    that folded a weight); a following module moves to the next runtime with the new weights."""


class VerificationError(TorchTRTError, AssertionError):
    """Outputs of the compiled module differ from the reference beyond tolerance."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class EngineLoadError(TorchTRTError):
    """A serialized engine or saved module could not be loaded."""


class CacheError(TorchTRTError):
    """A cache operation failed (only raised by explicit cache APIs, never by compile())."""


class CacheLockTimeout(CacheError, TimeoutError):
    """:meth:`EngineCache.lock` did not get the lock within its timeout."""


class TritonExportError(TorchTRTError, ValueError):
    """An engine cannot be exported to a Triton model repository as asked."""


class TritonRepoExists(TritonExportError, FileExistsError):
    """The Triton model directory already holds another version or config (pass overwrite=True)."""


class UsageError(TorchTRTError, ValueError):
    """The command line was given something it cannot use (exit code 2)."""


class Corrupt(Exception):
    """Why a cache entry cannot be used. Raised by the cache's file layer
    (:mod:`torch_trt_module._cache.files`) and caught by the cache (:mod:`torch_trt_module._cache.cache`),
    whose API turns it into a miss (get/lookup) or a :class:`CacheError` (explicit operations): it
    never leaves the cache modules."""
