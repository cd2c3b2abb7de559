"""``weights="exact"``: an exact comparison of the source's weights with the values the engine was
last given, at every call.

The cheap signature of :class:`~torch_trt_module._runtime.weights.WeightWatch` (version counters,
addresses, hook counts) misses one kind of write: an in-place write through ``p.data``
(``p.data.mul_(2)``, ``p.data.normal_()``, ``p.data.copy_(w)``) with no optimizer step before the
next call. ``p.data`` has a version counter of its own, over the same memory, so nothing cheap
changes. Only reading the bytes sees it, so this mode keeps a copy of every watched tensor (on the
tensor's own device) and compares the two at every call where the signature says "unchanged".

The comparison is of bytes, not values: a NaN weight that stays NaN is equal to itself (it would
refit at every call under ``==``), and ``-0.0`` written over ``0.0`` is a change. No checksum: two
different contents never compare equal. Each tensor's layout (address, storage size, shape,
strides, offset, dtype) is compared first: ``p.data = p.data.t()`` keeps the memory and its bytes
but not what they mean, and the byte comparison reads memory only where the layout is unchanged.

A dense tensor (contiguous, channels_last, any permutation of a contiguous layout) is copied with
its own strides, so tensor and copy are compared as two spans of memory. Costs, per call:

- on the CPU, libc's ``memcmp`` per tensor (no allocation; it stops at the first tensor that
  differs). Single-threaded on purpose: ``torch.equal`` is parallel, and its OpenMP threads keep
  spinning after it and fight ONNX Runtime's own spinning pool in the run that follows. On this
  project's 2-core machine, with resnet18 on ONNX Runtime, that made a call 11 to 90 ms slower than
  "follow", where ``memcmp`` (2.2 ms alone for resnet18's 47 MB and its copy, as fast as
  ``torch.equal`` on both cores) leaves the call 4.9 ms slower (docs/weights-and-refit.md);
- on any other device, one reduction over all tensors (``torch._foreach_sub`` of their bytes, then
  ``torch._foreach_max``, in chunks of at most 64 MiB so the temporary stays small) and a single
  ``.item()``: one wait for the device per call, not one per tensor.

A tensor that is not dense (a strided slice of a larger tensor) is compared on its own, viewed as
integers of its element size (``torch.equal``, or ``ne().any()`` folded into the device's one wait).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from typing import Callable, Sequence

import torch

__all__ = ["ContentCheck"]

log = logging.getLogger(__name__)

# An integer dtype per element size: viewing a tensor as one of these keeps its shape and strides,
# so it works on any strided tensor (channels_last, transposed, 0-dim).
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# The bytes one chunk of the batched (non-CPU) comparison covers: its temporary is this large.
_CHUNK_BYTES = 64 << 20


@functools.lru_cache(maxsize=1)
def _memcmp() -> Callable[[int, int, int], int] | None:
    """libc's ``memcmp``, or None where it cannot be loaded (then ``torch.equal`` compares)."""
    try:
        libc = ctypes.CDLL("msvcrt" if sys.platform == "win32" else None)
        fn = libc.memcmp
    except (OSError, AttributeError):
        log.info("libc's memcmp is not available: weights='exact' compares CPU weights with torch.equal")
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn  # type: ignore[no-any-return]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory as integers of its element size (a view: it sees later writes to ``t``)."""
    if t.is_complex():
        t = torch.view_as_real(t)  # complex128 has no 16-byte integer: two float64 per element
    return t.view(_INT_OF_SIZE[t.element_size()])


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one span of memory exactly once (its strides are a permutation of
    a contiguous layout's), so that its bytes are the span's."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _span(t: torch.Tensor) -> torch.Tensor:
    """The memory of a dense ``t`` as one run of bytes (a view). Its lowest address is the offset:
    torch strides are never negative."""
    b = _bits(t)
    return b.as_strided((b.numel(),), (1,), b.storage_offset()).view(torch.uint8)


def _comparable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be copied and compared bit for bit: a dense tensor with memory of
    its own (not sparse, quantized or meta), and not empty (nothing to compare)."""
    if t.layout != torch.strided or t.is_quantized or t.is_meta or t.numel() == 0:
        return False
    if t.element_size() not in _INT_OF_SIZE and not t.is_complex():
        return False
    try:
        _bits(t)
        t.untyped_storage()
    except (RuntimeError, TypeError, NotImplementedError):
        return False  # a subclass or an odd view torch refuses to reinterpret: followed by its version
    return True


class ContentCheck:
    """A copy of ``tensors``' values as they are now, and :meth:`differs`: whether any of them holds
    other bytes since. ``copies[i]`` is the copy of ``tensors[i]``, or None for a tensor that is not
    compared (sparse, quantized, empty): those are followed by the cheap signature only.

    ``batched`` picks the comparison: None (the default) the per-tensor one on the CPU and the
    batched one elsewhere; True or False forces one (tests, and the measurement in the docs)."""

    def __init__(self, tensors: Sequence[torch.Tensor], *, batched: bool | None = None) -> None:
        self.copies: list[torch.Tensor | None] = []
        self._tensors: list[torch.Tensor] = []
        # per device: (source, copy) as spans of bytes (dense ones), and as views of their elements
        # as integers (those not dense; every one, for torch.equal, which compares bytes one by one)
        spans: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        apart: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        elements: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for t in tensors:
            if not _comparable(t):
                self.copies.append(None)
                continue
            src = t.detach()  # a copy of a parameter must not join its autograd graph
            # The copy keeps a dense tensor's strides (preserve_format does for dense tensors), so the
            # two are the same bytes in the same order.
            copy = src.clone(memory_format=torch.preserve_format)
            self.copies.append(copy)
            self._tensors.append(t)
            # The views are made once: a call pays for the comparison, not for making views.
            pair = (_bits(src), _bits(copy))
            elements.setdefault(t.device, []).append(pair)
            if _dense(src) and copy.stride() == src.stride():
                spans.setdefault(t.device, []).append((_span(src), _span(copy)))
            else:
                apart.setdefault(t.device, []).append(pair)
        memcmp = self._cmp = _memcmp()
        self._memcmp: list[tuple[torch.Tensor, int, int]] = []  # CPU spans: (source, copy's address, bytes)
        self._equal: list[tuple[torch.Tensor, torch.Tensor]] = []  # CPU pairs for torch.equal
        self._batched: list[_Batch] = []
        for device in elements:
            if batched is False or (batched is None and device.type == "cpu"):
                if memcmp is not None and device.type == "cpu":
                    self._memcmp += [(now, then.data_ptr(), then.numel()) for now, then in spans.get(device, [])]
                    self._equal += apart.get(device, [])
                else:
                    self._equal += elements[device]
            else:
                self._batched.append(_Batch(spans.get(device, []), apart.get(device, [])))
        self._meta = self._layouts()

    def _layouts(self) -> list[tuple[object, ...]]:
        # What the views above assume about each tensor. ``p.data = p.data.t()`` changes it with
        # neither a new address nor a version bump, and the old views would still compare equal. A
        # storage resized in place (``untyped_storage().resize_()``, as FSDP frees parameters) moves
        # or shrinks its memory: checked here, so that no comparison ever reads memory that is gone.
        return [(t.data_ptr(), t.untyped_storage().nbytes(), t.shape, t.stride(), t.storage_offset(), t.dtype)
                for t in self._tensors]

    def differs(self) -> bool:
        """Whether any compared tensor holds other bytes than its copy, or is laid out otherwise."""
        if self._layouts() != self._meta:
            return True
        memcmp = self._cmp
        for now, then_ptr, nbytes in self._memcmp:  # empty where memcmp is None
            # The source's address read now, from the view: the layout check above says it is the
            # storage's memory, of the size the view needs.
            if memcmp(now.data_ptr(), then_ptr, nbytes):  # type: ignore[misc]
                return True
        for now, then in self._equal:
            if not torch.equal(now, then):
                return True
        return any(batch.differs() for batch in self._batched)


class _Batch:
    """The tensors of one device, compared by a few batched kernels and a single ``.item()``."""

    def __init__(self, spans: list[tuple[torch.Tensor, torch.Tensor]],
                 apart: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._chunks: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._apart = apart  # not dense: compared one by one, in the same wait
        now_chunk: list[torch.Tensor] = []
        then_chunk: list[torch.Tensor] = []
        size = 0
        for now, then in spans:
            if now_chunk and size + now.numel() > _CHUNK_BYTES:
                self._chunks.append((now_chunk, then_chunk))
                now_chunk, then_chunk, size = [], [], 0
            now_chunk.append(now)
            then_chunk.append(then)
            size += now.numel()
        if now_chunk:
            self._chunks.append((now_chunk, then_chunk))

    def differs(self) -> bool:
        flags = []
        for now, then in self._chunks:
            # uint8 subtraction wraps: a byte differs exactly where the difference is not 0, and the
            # largest unsigned difference is then > 0. One multi-tensor kernel each, no wait.
            diffs = torch._foreach_sub(now, then)
            flags.append(torch.stack(torch._foreach_max(diffs)).ne(0).any())
        flags.extend(torch.ne(now, then).any() for now, then in self._apart)
        return bool(torch.stack(flags).any().item())  # the one wait for the device
