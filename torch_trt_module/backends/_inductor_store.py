"""TorchInductor's compiled programs, kept between processes, so that a warm start runs no Dynamo.

``torch.compile`` reaches Inductor's on-disk caches only after Dynamo has traced the graph again
and AOTAutograd has hashed it, in every new process. That is most of a warm start's first call:
resnet50's first call on this project's 2-core CPU with torch 2.14, 1.89–2.01 s through
``torch.compile`` with every cache warm, 1.18–1.20 s from a stored artifact (torch 2.11's Dynamo
path is cheaper: 1.36–1.44 s against 1.27–1.41 s; benchmarks/RESULTS.md, issue 21). A call costs
the host less too: no Dynamo guards check the weight arguments. Here each input signature the
module meets (shapes, strides, dtypes) is compiled once by ``torch._inductor.standalone_compile``,
statically, and its artifact is stored; a later process loads it and calls it, with no tracing.

An artifact has no guards, so this class checks what they would: the call's exact input
signature picks the artifact. The process-wide numerics flags that Inductor's own cache key holds
(TF32, reduced-precision reductions, deterministic algorithms) are in the key of the artifact
that a signature loads or compiles; the cuBLAS and cuDNN calls in its code read them at each
call. The weights are arguments, never constants, so a refit swaps tensors of the shapes and
strides the artifact was compiled for
(:meth:`Artifacts.check_weights` clears everything if they ever differ). After
:data:`MAX_STATIC` signatures (four on a GPU, two on the CPU), ``torch.compile`` serves the
others, compiled once with the dims that changed marked dynamic (then every batch size), through
Inductor's own caches.

Where: under Inductor's own cache directory (``$TORCHINDUCTOR_CACHE_DIR``, else
``/tmp/torchinductor_<user>``), in ``torch_trt_module/``; never in this library's engine cache
or saved files. An artifact is Inductor's serialization, and reading it unpickles, which this
library's own files never do: so it is wrapped in the checksummed container (damage is found
before anything is read) and, with ``$TORCH_TRT_MODULE_CACHE_KEY`` set, signed, so that an
artifact someone else wrote is refused unread. Without a key it is trusted as Inductor's own
cache files in that directory are. The key (:func:`artifact_key`) holds everything the compile
depends on: the graph's code and constants, the source of the Python functions it calls and the
passes' version, the weights' and inputs' layouts, Inductor's options
and configuration, the numerics flags, torch, Triton, Python, and the GPU (its name and compute
capability) or the CPU, so another machine or another torch compiles its own. A damaged or
unloadable artifact is compiled again (one WARNING), never a failed call.

Example:
    >>> fn = Artifacts.make(gm, n_weights=len(weights), options={}, device=torch.device("cuda"))  # doctest: +SKIP
    >>> outs = fn(*weights, x)  # compiled, or loaded from a stored artifact, at the first call  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .._core.io import atomic_write, pack, unpack
from .._core.numerics import tf32_state
from .._core.settings import OPTIMIZE_VERSION
from .._core.sign import canonical_json
from ._fx_inline import calls_python, inline_python_calls, python_calls
from ._warn import warn_once, warned, why

__all__ = ["ARTIFACT_FORMAT", "Artifacts", "MAX_STATIC", "PRECOMPILED_HEADERS_ON_LOAD", "STATS", "artifact_key",
           "store_dir", "warn_once", "warned", "why"]

log = logging.getLogger(__name__)

#: In every key: bump when what is stored, or how it is compiled, changes.
ARTIFACT_FORMAT = 1
#: Input signatures compiled statically (and stored) per module, by device type; ``torch.compile``
#: takes the rest, dynamic in the dims that changed. On a GPU four: a server's few batch sizes (1,
#: 8, 32, 128) each get a program specialized to their sizes. With two, mobilenet_v3_small at batch
#: 32 after batches 1 and 8 ran the dynamic program, on an H100 in one process beside torch.compile's
#: rows: fp16 0.549 and 0.552 ms a call against 0.501 and 0.522 static; fp32 0.669 against 0.650
#: static alone (benchmarks/RESULTS.md, issue 21). A workload of ever-changing shapes pays three
#: compiles more than ``torch.compile``'s two, once: each is stored. Elsewhere (the CPU, where a
#: compile builds C++ and takes longer, and no gain was measured) two: the batch a user runs and a
#: last, smaller batch.
MAX_STATIC: dict[str, int] = {"cuda": 4, "cpu": 2}
#: What happened in this process (the tests' and the benchmarks' view): artifacts compiled,
#: loaded, stored, and refused (damaged, or failing to load).
STATS = {"compiled": 0, "loaded": 0, "stored": 0, "refused": 0}
#: Whether a load runs Inductor's precompiled-header step (a preprocessor run in every process, 0.8 s
#: on the H100, even where the library is built). False skips it, but finds no library built with
#: it (benchmarks/RESULTS.md): an experiment (``bench_compile_gpu.py``'s ``ttm-nopch`` row).
PRECOMPILED_HEADERS_ON_LOAD = True
_KIND = "inductor-artifact"


def available() -> bool:
    """Whether this torch has ``standalone_compile`` and ``CompiledArtifact`` (torch >= 2.8)."""
    try:
        import torch._inductor as inductor
    except ImportError:
        return False
    return hasattr(inductor, "standalone_compile") and hasattr(inductor, "CompiledArtifact")


def store_dir() -> Path | None:
    """Where artifacts are kept (Inductor's cache directory, ``torch_trt_module/``), or None where
    this torch does not say where its cache is."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:
        return None
    return Path(cache_dir()) / "torch_trt_module"


def _numerics() -> list[Any]:
    """The process-wide flags that decide what a compiled program computes (Inductor keys them too).

    TF32 is read through :func:`tf32_state`: the legacy ``allow_tf32`` getters raise once a process
    has used both TF32 APIs, and a user's flags must never fail a call."""
    state = tf32_state()
    m = torch.backends.cuda.matmul
    try:
        reduced = [m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction]
    except RuntimeError:  # a torch that refuses to read them: they are not keyed
        reduced = []
    return [state["cudnn_conv"], state["cuda_matmul"], *reduced, torch.are_deterministic_algorithms_enabled()]


def _layout(t: torch.Tensor) -> list[Any]:
    return [list(t.shape), list(t.stride()), str(t.dtype)]


def _machine(device: torch.device) -> list[Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return ["cuda", props.name, list(torch.cuda.get_device_capability(device)), torch.version.cuda]
    flags = ""
    with contextlib.suppress(OSError):  # the CPU's vector ISA decides what C++ Inductor writes
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return [device.type, platform.machine(), hashlib.sha256(flags.encode()).hexdigest()[:16]]


def _device_name(device: torch.device) -> str:
    """``cuda:<index>`` for a GPU ("cuda" alone is the current one: Inductor's code names the index)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _graph_digest(graph: torch.fx.GraphModule) -> str:
    """The code of the graph and of every graph nested in it, the source of the Python functions
    they call, and the values of the tensors it holds as attributes (constants that Inductor may
    bake into its code)."""
    h = hashlib.sha256()
    for name, gm in graph.named_modules():
        # A call_module target that is no graph (torch.export's graphs have none) is keyed by its
        # type and repr: the code that calls it does not say what it computes.
        kind = type(gm)
        text = gm.code if isinstance(gm, torch.fx.GraphModule) else f"{kind.__module__}.{kind.__qualname__}: {gm!r}"
        h.update(f"{name}\n{text}\n".encode())
    for name, source in _called_sources(graph):
        h.update(f"{name}\n{source}\n".encode())
    tensors = {**dict(graph.named_parameters()), **dict(graph.named_buffers())}
    for gm in graph.modules():
        for key, value in vars(gm).items():
            if isinstance(value, torch.Tensor) and key not in tensors:
                tensors[f"{id(gm)}.{key}"] = value
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{_layout(t)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _called_sources(graph: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """``(name, source)`` of the Python functions the graph calls (the passes' helpers): the code
    names them, but an edited body must not load the old program. No source: the bytecode."""
    found: dict[str, str] = {}
    for fn in python_calls(graph):
        name = f"{fn.__module__}.{fn.__qualname__}"
        if name not in found:
            try:
                found[name] = inspect.getsource(fn)
            except (OSError, TypeError):
                found[name] = fn.__code__.co_code.hex() + repr(fn.__code__.co_consts)
    return sorted(found.items())


def _inductor_config() -> str:
    """A digest of Inductor's configuration (the user's own changes to it included)."""
    import torch._inductor.config as config

    try:
        digest = config.get_hash()
        return digest.hex() if isinstance(digest, bytes) else str(digest)
    except Exception:  # noqa: BLE001 - a torch without get_hash: the portable config, hashed
        return hashlib.sha256(repr(sorted(config.save_config_portable().items())).encode()).hexdigest()


def artifact_key(graph: torch.fx.GraphModule, weights: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                 options: dict[str, Any], device: torch.device) -> str:
    """The content key of the artifact for this graph, these layouts, options and machine.

    Example:
        >>> artifact_key(gm, weights, [x], {}, torch.device("cpu"))   # doctest: +SKIP
        '5f0c...'
    """
    return _key(_base(graph, weights, options, device), inputs)


def _base(graph: torch.fx.GraphModule, weights: Sequence[torch.Tensor], options: dict[str, Any],
          device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {"format": ARTIFACT_FORMAT, "passes": OPTIMIZE_VERSION, "torch": torch.__version__, "triton": triton_version,
            "python": list(sys.version_info[:2]), "machine": _machine(device), "device": _device_name(device),
            "options": {k: repr(v) for k, v in sorted(options.items())}, "config": _inductor_config(),
            "graph": _graph_digest(graph), "weights": [_layout(w) for w in weights]}


def _key(base: dict[str, Any], inputs: Sequence[torch.Tensor]) -> str:
    doc = {**base, "inputs": [_layout(t) for t in inputs], "numerics": _numerics()}
    return hashlib.sha256(canonical_json(doc)).hexdigest()[:40]


class Artifacts:
    """Calls ``graph`` (weights first, then inputs) through Inductor, one static artifact per input
    signature, stored and loaded as the module docstring says."""

    def __init__(self, graph: torch.fx.GraphModule, n_weights: int, options: dict[str, Any], device: torch.device,
                 root: Path | None) -> None:
        self._graph = graph
        self._n = n_weights
        self._options = dict(options)
        self._device = device
        self._root = root
        self._base: dict[str, Any] | None = None  # derived at the first compile (it hashes the graph)
        self._fns: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._static = 0
        self._seen: list[list[torch.Size]] = []  # the input shapes of the static artifacts
        self._dynamic: Callable[..., Any] | None = None
        self._lock = threading.Lock()

    @classmethod
    def make(cls, graph: torch.fx.GraphModule, *, n_weights: int, options: dict[str, Any],
             device: torch.device) -> "Artifacts | None":
        """The store for this graph, or None where this torch cannot compile standalone artifacts."""
        if not available():
            return None
        return cls(graph, n_weights, options, device, store_dir())

    def __call__(self, *args: torch.Tensor) -> Any:
        fn = self._fns.get(self._signature(args))
        if fn is not None:
            return fn(*args)
        return self._first(args)

    def _signature(self, args: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        # The numerics flags are in the key (read when an artifact is loaded or compiled), not here:
        # reading TF32's takes microseconds a call, and the cuBLAS and cuDNN calls in Inductor's
        # code read them at run time anyway.
        return (*((t.shape, t.stride(), t.dtype) for t in args[self._n:]),)

    def check_weights(self, weights: Sequence[torch.Tensor]) -> None:
        """After a refit: artifacts are compiled for the weights' layouts; if these differ (they do not
        where the weights were derived by the same plan), every artifact is dropped from memory."""
        with self._lock:
            if self._base is not None and self._base["weights"] != [_layout(w) for w in weights]:
                log.info("the weights' layouts changed; TorchInductor's programs are compiled again")
                self._base, self._fns, self._static, self._seen, self._dynamic = None, {}, 0, [], None

    def _first(self, args: tuple[torch.Tensor, ...]) -> Any:
        """A signature's first call: its artifact, loaded or compiled, called; else torch.compile's."""
        sig = self._signature(args)
        with self._lock:
            fn = self._fns.get(sig)
            if fn is not None:
                return fn(*args)
            if self._static >= (most := MAX_STATIC.get(self._device.type, 2)):
                first = self._dynamic is None
                if first:
                    log.info("more than %d input shapes: torch.compile, dynamic in the dims that changed, takes "
                             "the others", most)
                    self._dynamic = torch.compile(self._graph.forward, fullgraph=True, dynamic=None,
                                                  options=self._options or None)
                self._fns[sig] = self._dynamic
                return self._dynamic(*(self._marked(args) if first else args))
            if self._base is None:
                self._base = _base(self._graph, args[:self._n], self._options, self._device)
            key = _key(self._base, args[self._n:])
            path = self._root / f"{key}.ttmia" if self._root is not None else None
            loaded = self._load(path, key, args) if path is not None and path.is_file() else None
            if loaded is not None:
                fn, out = loaded
            else:
                fn, out = self._compile(path, key, args)
            self._fns[sig] = fn
            self._static += 1
            self._seen.append([t.shape for t in args[self._n:]])
            return out

    def _marked(self, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """``args`` for torch.compile's first call, with each input dim whose size differed between
        the shapes seen marked dynamic: one compile serves every later size (where the graph
        allows; ``maybe_mark_dynamic`` specializes quietly where it does not). The marks go on
        detached aliases, never on the caller's tensors."""
        import torch._dynamo

        out = list(args)
        for j, t in enumerate(args[self._n:]):
            shapes = [seen[j] for seen in self._seen if len(seen[j]) == t.dim()]
            dims = [d for d in range(t.dim()) if any(shape[d] != t.shape[d] for shape in shapes)]
            if dims:
                out[self._n + j] = alias = t.detach()
                for d in dims:
                    torch._dynamo.maybe_mark_dynamic(alias, d)
        return out

    def _shapes(self, args: Sequence[torch.Tensor]) -> str:
        return ", ".join(str(tuple(t.shape)) for t in args[self._n:])

    def _load(self, path: Path, key: str, args: tuple[torch.Tensor, ...]) -> tuple[Callable[..., Any], Any] | None:
        """The stored artifact and its output for ``args``; None (and the file removed) where it is
        damaged, unsigned under a key, from another key, or fails to load or run."""
        t0 = time.perf_counter()
        try:
            header, blobs = unpack(path.read_bytes(), kind=_KIND, source=str(path), what="stored TorchInductor program")
            if header.get("key") != key:
                raise ValueError(f"it holds the program of key {header.get('key')!r}, not {key!r}")
            with tempfile.TemporaryDirectory(prefix="ttm-artifact-") as tmp:
                (Path(tmp) / "artifact.bin").write_bytes(blobs["artifact"])
                art = _load_artifact(str(Path(tmp) / "artifact.bin"), self._options)
            out = art(*args)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with it, it is compiled again
            STATS["refused"] += 1
            warn_once(log, f"load:{type(e).__name__}", "the stored TorchInductor program %s could not be used "
                      "(%s: %s); it is compiled again", path, *why(e))
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        STATS["loaded"] += 1
        log.info("TorchInductor's program for input shapes %s loaded from %s in %.2f s (no Dynamo, no compile)",
                 self._shapes(args), path, time.perf_counter() - t0)
        return art, out

    def _compile(self, path: Path | None, key: str, args: tuple[torch.Tensor, ...]) -> tuple[Callable[..., Any], Any]:
        """Compile the artifact (Inductor's errors propagate: the caller moves on without Inductor),
        call it, and store it (a failure to store costs only the next process's warm start)."""
        t0 = time.perf_counter()
        art = _compile_artifact(self._graph, list(args), self._options)
        out = art(*args)
        STATS["compiled"] += 1
        if path is None:
            log.info("TorchInductor compiled the program for input shapes %s in %.1f s (not stored: this torch does "
                     "not say where its cache is)", self._shapes(args), time.perf_counter() - t0)
            return art, out
        try:
            with tempfile.TemporaryDirectory(prefix="ttm-artifact-") as tmp:
                art.save(path=str(Path(tmp) / "artifact.bin"), format="binary")
                data = (Path(tmp) / "artifact.bin").read_bytes()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, pack(_KIND, {"key": key, "torch": torch.__version__}, {"artifact": data}))
        except Exception as e:  # noqa: BLE001 - the program runs; only the next process compiles it again
            warn_once(log, f"save:{type(e).__name__}", "TorchInductor's compiled program could not be stored "
                      "(%s: %s); a new process compiles it again", *why(e))
            return art, out
        STATS["stored"] += 1
        log.info("TorchInductor compiled the program for input shapes %s in %.1f s; stored at %s (%.1f MB)",
                 self._shapes(args), time.perf_counter() - t0, path, len(data) / 1e6)
        return art, out


def _compile_artifact(graph: torch.fx.GraphModule, args: list[torch.Tensor], options: dict[str, Any]) -> Any:
    """Inductor's static compile of ``graph`` for ``args`` (the seam the tests replace)."""
    from torch._inductor import standalone_compile

    if calls_python(graph):  # else Inductor cannot store it (see ._fx_inline)
        try:
            graph = inline_python_calls(graph, args)
        except Exception as e:  # noqa: BLE001 - compiled as it is: it runs, only the next process compiles again
            warn_once(log, f"inline:{type(e).__name__}", "the optimized program could not be traced into ATen ops "
                      "(%s: %s); TorchInductor compiles it as it is, and cannot store it", *why(e))
    return standalone_compile(graph, args, dynamic_shapes="from_example_inputs",
                              options={"config_patches": dict(options)} if options else None)


def _load_artifact(path: str, options: dict[str, Any]) -> Any:
    import torch._inductor.config as config
    from torch._inductor import CompiledArtifact

    patches = dict(options)
    if not PRECOMPILED_HEADERS_ON_LOAD:
        patches["cpp_cache_precompile_headers"] = False
    with config.patch(patches) if patches else contextlib.nullcontext():
        return CompiledArtifact.load(path=path, format="binary")
