"""What an exported model is: its tensor specs (names, dtypes, profiles) and :class:`ExportedModel`,
shared by export, build, cache and runtime.

Everything here is JSON-able so that engine metadata, cache entries and saved
modules carry it without pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .dtypes import dtype_from_name, dtype_name
from .signature import Param
from .tree import TreeSpec, flatten, unflatten

__all__ = ["ExportedModel", "TensorSpec", "TreeSpec", "dtype_from_name", "dtype_name", "flatten", "unflatten"]


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output.

    ``min``/``opt``/``max`` are the optimization profile of an input; for an
    output they are ``None`` and ``dims`` holds the (possibly symbolic) shape.

    Example:
        >>> s = TensorSpec("x", "float32", dims=("batch", 3), min=(1, 3), opt=(4, 3), max=(8, 3))
        >>> s.check_shape((9, 3)) is not None
        True
    """

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    min: tuple[int, ...] | None = None
    opt: tuple[int, ...] | None = None
    max: tuple[int, ...] | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.dims)

    def profile_str(self) -> str:
        """``1..8 x 3 x 224 x 224`` style description of the allowed shapes."""
        if self.min is None or self.max is None:
            return " x ".join(str(d) for d in self.dims)
        parts = [str(lo) if lo == hi else f"{lo}..{hi}" for lo, hi in zip(self.min, self.max)]
        return "(" + ", ".join(parts) + ")"

    def check_shape(self, shape: Sequence[int]) -> str | None:
        """Return why ``shape`` is outside this input's profile, or None if it fits."""
        if len(shape) != self.rank:
            return f"has rank {len(shape)} (shape {tuple(shape)}) but the engine expects rank {self.rank}"
        if self.min is None or self.max is None:
            return None
        bad = [i for i, (s, lo, hi) in enumerate(zip(shape, self.min, self.max)) if not lo <= s <= hi]
        if not bad:
            return None
        dims = ", ".join(f"dim {i} = {shape[i]} not in {self.min[i]}..{self.max[i]}" for i in bad)
        return f"has shape {tuple(shape)} outside the engine's profile {self.profile_str()} ({dims})"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims),
                "min": _opt_list(self.min), "opt": _opt_list(self.opt), "max": _opt_list(self.max)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], dims=tuple(d["dims"]),
                   min=_opt_tuple(d.get("min")), opt=_opt_tuple(d.get("opt")), max=_opt_tuple(d.get("max")))


def _opt_list(t: tuple[int, ...] | None) -> list[int] | None:
    return None if t is None else list(t)


def _opt_tuple(t: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(int(v) for v in t)


@dataclass(frozen=True)
class ExportedModel:
    """The result of :func:`export_onnx`: an ONNX graph and everything needed to call it.

    Attributes:
        onnx: the serialized ONNX ``ModelProto``.
        inputs / outputs: the engine's tensors, inputs with their profiles.
        call_tree: the structure of the call, ``{param: value}`` with tensor leaves.
        output_tree: the structure eager returns.
        params: the forward signature.
        exporter: ``"dynamo"`` or ``"torchscript"`` (``"onnx-file"`` for a graph read from a file).
        user_input_dtypes / user_output_dtypes: what the caller passes and gets back
            (they differ from the graph's dtypes under fp16/bf16 precision).
        program: torch.export's program of the same computation, serialized (the PyTorch
            runtime runs it where no engine can); None when the TorchScript exporter made the graph.
        weights: ``{initializer name: (source name, dtype, shape)}``: each of the model's parameters
            and buffers that the graph holds as an initializer of its own (what a refit replaces;
            ``_weights`` says how). Empty when the graph's constants are folded (TorchScript).
        unsaved: the source names among those that a ``state_dict`` does not hold (non-persistent
            buffers, such as BERT's ``position_ids``): a refit from a checkpoint keeps them as they are.
        aliases: ``{source name: other names}`` for a tied tensor (an embedding and the output layer
            that shares it): ``weights`` names it by its first name in ``state_dict`` order, and a
            refit takes it under any of them (a checkpoint that stores it once, as safetensors does).
    """

    onnx: bytes
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    call_tree: TreeSpec
    output_tree: TreeSpec
    params: tuple[Param, ...]
    exporter: str
    precision: str
    user_input_dtypes: tuple[str, ...]
    user_output_dtypes: tuple[str, ...]
    export_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    program: bytes | None = field(default=None, repr=False)  # torch.export's program (_program.save_program)
    weights: dict[str, tuple[str, str, tuple[int, ...]]] = field(default_factory=dict, repr=False)
    unsaved: tuple[str, ...] = ()
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def to_meta(self) -> dict[str, Any]:
        """Everything but the graph, as JSON-able metadata."""
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "call_tree": self.call_tree.to_json(),
            "output_tree": self.output_tree.to_json(),
            "params": [p.to_json() for p in self.params],
            "exporter": self.exporter,
            "precision": self.precision,
            "user_input_dtypes": list(self.user_input_dtypes),
            "user_output_dtypes": list(self.user_output_dtypes),
            "weights": {k: [src, dt, list(shape)] for k, (src, dt, shape) in self.weights.items()},
            "unsaved": list(self.unsaved),
            "aliases": {k: list(v) for k, v in self.aliases.items()},
        }

    @classmethod
    def from_meta(cls, onnx: bytes, meta: dict[str, Any], program: bytes | None = None) -> "ExportedModel":
        return cls(
            onnx=onnx, program=program,
            inputs=tuple(TensorSpec.from_json(d) for d in meta["inputs"]),
            outputs=tuple(TensorSpec.from_json(d) for d in meta["outputs"]),
            call_tree=TreeSpec.from_json(meta["call_tree"]),
            output_tree=TreeSpec.from_json(meta["output_tree"]),
            params=tuple(Param.from_json(p) for p in meta["params"]),
            exporter=meta["exporter"],
            precision=meta["precision"],
            user_input_dtypes=tuple(meta["user_input_dtypes"]),
            user_output_dtypes=tuple(meta["user_output_dtypes"]),
            weights={k: (v[0], v[1], tuple(v[2])) for k, v in meta.get("weights", {}).items()},
            unsaved=tuple(meta.get("unsaved", ())),
            aliases={k: tuple(v) for k, v in meta.get("aliases", {}).items()},
        )
