"""What a model takes, input by input, and a check of what a caller passes against it.

A :class:`TensorSpec` is one tensor input: its name, dtype and sizes, ``None`` where any size
is accepted (a dynamic dim). The same check serves a prepared or converted GraphModule (specs
from its placeholders), an ExecuTorch program (the runtime's method meta) and an ONNX model
(the session's inputs), so a wrong input reads the same everywhere: which input, which dim,
what the model takes and what it got, and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from qgraph.core.errors import InputError


@dataclass(frozen=True)
class TensorSpec:
    """A tensor input: ``name``, ``dtype`` (None: any) and ``shape`` (None: any size in that dim)."""

    name: str
    dtype: torch.dtype | None
    shape: tuple[int | None, ...]

    def __str__(self) -> str:
        sizes = ", ".join("*" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {dtype_name(self.dtype)}[{sizes}]"


def dtype_name(dtype: torch.dtype | None) -> str:
    """``torch.float32`` → ``'float32'``; None → ``'any'``."""
    return "any" if dtype is None else str(dtype).removeprefix("torch.")


def signature_text(specs: Sequence[TensorSpec]) -> str:
    """``'(x: float32[*, 3, 8, 8], mask: int64[*, 8])'`` for error messages."""
    return "(" + ", ".join(map(str, specs)) + ")"


def check_count(where: str, specs: Sequence[TensorSpec], got: int, hint: str = "") -> None:
    """Raise :class:`InputError` unless ``got`` inputs is the number ``specs`` lists."""
    if got != len(specs):
        raise InputError(
            f"{where} takes {len(specs)} input{'s' if len(specs) != 1 else ''} "
            f"{signature_text(specs)}, got {got}. {hint}".rstrip()
        )


def check_tensor(
    where: str,
    spec: TensorSpec,
    value: Any,
    shape_hint: Callable[[TensorSpec, list[int]], str] | None = None,
    sizes_are_bounds: bool = False,
) -> None:
    """Raise :class:`InputError` when ``value`` is not a tensor ``spec`` accepts.

    Compared: tensor or not, dtype, number of dims, and every dim ``spec`` fixes — equal, or
    at most that size when ``sizes_are_bounds`` (an upper bound such as an ExecuTorch
    program's planned size). ``shape_hint(spec, dims)`` says how to accept other sizes in
    ``dims``. ``where`` names the model: ``"the model"``, ``"the ONNX model 'm.onnx'"``.
    """
    what = f"input '{spec.name}' of {where}"
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{what} is a {type(value).__name__}, expected a tensor ({spec})")
    got = list(value.shape)
    if spec.dtype is not None and value.dtype != spec.dtype:
        raise InputError(
            f"{what} is {dtype_name(value.dtype)}, but the model takes {dtype_name(spec.dtype)} ({spec}). "
            f"Convert it: x.to(torch.{dtype_name(spec.dtype)})"
        )
    if len(got) != len(spec.shape):
        raise InputError(f"{what} has shape {got} ({len(got)} dims), but the model takes {len(spec.shape)} dims ({spec})")
    dims = [
        d
        for d, (size, want) in enumerate(zip(got, spec.shape))
        if want is not None and size != want and not (sizes_are_bounds and size <= want)
    ]
    if dims:
        sizes = ", ".join(str(got[d]) for d in dims)
        wanted = ", ".join(str(spec.shape[d]) for d in dims)
        takes = f"at most {wanted} (the planned size{'s' if len(dims) > 1 else ''})" if sizes_are_bounds else wanted
        hint = shape_hint(spec, dims) if shape_hint else ""
        raise InputError(
            f"{what} has shape {got}: dim{'s' if len(dims) > 1 else ''} {', '.join(map(str, dims))} "
            f"{'are' if len(dims) > 1 else 'is'} {sizes}, but the model takes {takes} there "
            f"({spec}, * = any size). {hint}".rstrip()
        )
