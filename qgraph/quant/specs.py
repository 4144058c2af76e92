"""Quantization specs: what a quantized edge of the graph means.

A *spec* says how a float tensor ``x`` maps to integers ``q``:

    q = clamp(round(x / scale) + zero_point, quant_min, quant_max)
    x ≈ (q - zero_point) * scale

with ``scale`` and ``zero_point`` one per tensor, per channel (along ``axis``), per group of
``group_size`` elements along the last dimension, or per token (all but the last dim).
The range ``[quant_min, quant_max]`` follows from the dtype and bit width; a *symmetric*
spec fixes ``zero_point`` at the middle of the range so that 0.0 maps to it exactly.

Besides plain :class:`QuantSpec` there are three explicit relations between edges, so that
nothing is a convention hidden in a string:

* :class:`SharedSpec` – this edge uses the very same qparams as another edge or output
  (cat inputs, max-pool and reshape outputs).
* :class:`DerivedSpec` – qparams computed from other edges' qparams
  (bias scale = input scale × weight scale, zero point 0, int32).
* :class:`FixedSpec` – qparams known ahead of time (sigmoid output: scale 1/256, zp -128).

Specs are frozen dataclasses: hashable, comparable, safe to share between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Union

import torch

from qgraph.core.errors import ConfigError

ObserverKind = Literal["minmax", "moving_average_minmax", "histogram"]
_OBSERVERS = ("minmax", "moving_average_minmax", "histogram")
RangeMethod = Literal["percentile", "mse", "entropy"]
_RANGE_METHODS = ("percentile", "mse", "entropy")
_DTYPE_RANGES = {
    torch.int8: (-128, 127),
    torch.uint8: (0, 255),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
}


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""

    def dump_fields(self) -> dict:
        return {"granularity": "per_tensor"}


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per slice along ``axis`` (output channels of a weight)."""

    axis: int = 0

    def dump_fields(self) -> dict:
        return {"granularity": "per_channel", "axis": self.axis}


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` consecutive elements of the last dimension.

    For a linear weight ``[out, in]`` the scales have shape ``[out, in // group_size]``
    (ExecuTorch's and torchao's ``per_channel_group`` layout); ``in`` must be a multiple of
    ``group_size``, which the annotate pass checks per layer.
    """

    group_size: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ConfigError(f"PerGroup.group_size={self.group_size!r} must be an integer of at least 2")

    def dump_fields(self) -> dict:
        return {"granularity": "per_group", "group_size": self.group_size}


@dataclass(frozen=True)
class PerToken:
    """One scale per row: every dimension but the last (dynamic activations of LLMs)."""

    def dump_fields(self) -> dict:
        return {"granularity": "per_token"}


Granularity = Union[PerTensor, PerChannel, PerGroup, PerToken]


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``bits`` may be below the dtype's width (int4 values stored in int8): the range is then
    ``[-2**(bits-1), 2**(bits-1)-1]`` for signed and ``[0, 2**bits-1]`` for unsigned dtypes.
    ``narrow_range`` drops the most negative value (int8 weights in ``[-127, 127]``) so
    that a symmetric range is symmetric. ``eps`` is the smallest scale an observer returns.

    ``observer="histogram"`` (per-tensor, static) keeps a histogram of every calibration
    value and picks the range by ``range_method``: ``"mse"`` (default: least expected squared
    error), ``"entropy"`` (least KL divergence, TensorRT's calibration) or ``"percentile"``
    (clip at the ``percentile``-th percentile, default 99.99); see :mod:`qgraph.observers.histogram`.
    ``learnable=True`` makes QAT learn scale (and zero point for affine specs) by LSQ, starting
    from the first batch's range; see :mod:`qgraph.observers.learnable`.
    """

    dtype: torch.dtype = torch.int8
    bits: int = 8
    symmetric: bool = False
    narrow_range: bool = False
    granularity: Granularity = field(default_factory=PerTensor)
    dynamic: bool = False
    observer: ObserverKind = "moving_average_minmax"
    averaging_constant: float = 0.01
    eps: float = 2.0**-12
    learnable: bool = False
    range_method: RangeMethod | None = None
    percentile: float | None = None
    scale_dtype: torch.dtype = torch.float32
    """Scales are rounded to this dtype (kept in float32): ``torch.bfloat16`` for XNNPACK's
    int4 group-wise weights, whose kernels store group scales in bf16, so that the converted
    graph computes with exactly the scales the runtime will use."""

    def __post_init__(self) -> None:
        if self.scale_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"QuantSpec.scale_dtype={self.scale_dtype} must be float32, bfloat16 or float16")
        if self.dtype not in _DTYPE_RANGES:
            raise ConfigError(
                f"QuantSpec.dtype={self.dtype} is not supported; use one of "
                f"{sorted(str(d) for d in _DTYPE_RANGES)}"
            )
        width = torch.iinfo(self.dtype).bits
        if not 2 <= self.bits <= width:
            raise ConfigError(f"QuantSpec.bits={self.bits} must be in [2, {width}] for dtype {self.dtype}")
        if self.observer not in _OBSERVERS:
            raise ConfigError(f"QuantSpec.observer={self.observer!r} must be one of {_OBSERVERS}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ConfigError(f"QuantSpec.averaging_constant={self.averaging_constant} must be in (0, 1]")
        if self.eps <= 0:
            raise ConfigError(f"QuantSpec.eps={self.eps} must be positive")
        if self.narrow_range and not self.symmetric:
            raise ConfigError("QuantSpec.narrow_range=True only makes sense with symmetric=True")
        if self.dynamic:
            _check_dynamic(self)
        _check_histogram(self)
        if self.learnable and self.dynamic:
            raise ConfigError("QuantSpec.learnable=True with dynamic=True: a dynamic range is chosen per batch, not learned")

    @property
    def quant_min(self) -> int:
        signed = self.dtype.is_signed
        low = -(2 ** (self.bits - 1)) if signed else 0
        return low + 1 if self.narrow_range and signed else low

    @property
    def quant_max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.dtype.is_signed else 2**self.bits - 1

    @property
    def is_per_channel(self) -> bool:
        return isinstance(self.granularity, PerChannel)

    def with_(self, **changes) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def short(self) -> str:
        """Compact text for dumps: ``int8[-128,127] affine per_tensor``."""
        kind = "sym" if self.symmetric else "affine"
        gran = type(self.granularity).__name__
        if isinstance(self.granularity, PerChannel):
            gran += f"(axis={self.granularity.axis})"
        elif isinstance(self.granularity, PerGroup):
            gran += f"({self.granularity.group_size})"
        extra = " dynamic" if self.dynamic else ""
        return f"{self.dtype}[{self.quant_min},{self.quant_max}] {kind} {gran}{extra}".replace("torch.", "")

    def dump_fields(self) -> dict:
        """The spec as plain data for :mod:`qgraph.core.dump` (see its self-description protocol)."""
        return {
            "type": "QuantSpec",
            "dtype": _dtype_name(self.dtype),
            "bits": self.bits,
            "quant_min": self.quant_min,
            "quant_max": self.quant_max,
            "scheme": "symmetric" if self.symmetric else "affine",
            "narrow_range": self.narrow_range,
            **self.granularity.dump_fields(),
            "dynamic": self.dynamic,
            "observer": self.observer,
            "range_method": self.range_method,
            "learnable": self.learnable,
            "scale_dtype": _dtype_name(self.scale_dtype),
            "text": self.short(),
        }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _point_fields(point: "Point") -> str | list[str]:
    return point if isinstance(point, str) else list(point)


def _check_dynamic(spec: QuantSpec) -> None:
    """Dynamic specs are what the runtimes quantize per batch: 8-bit affine, per tensor or per token.

    XNNPACK's dynamic kernels and ONNX Runtime's ``DynamicQuantizeLinear`` both compute an
    8-bit affine range at run time; any other choice would be a graph no runtime executes
    as written.
    """
    if spec.dtype not in (torch.int8, torch.uint8):
        raise ConfigError(f"QuantSpec.dtype={spec.dtype} with dynamic=True: dynamic activations are int8 or uint8")
    if spec.bits != 8:
        raise ConfigError(f"QuantSpec.bits={spec.bits} with dynamic=True: runtimes quantize dynamic activations to 8 bits")
    if spec.symmetric:
        raise ConfigError("QuantSpec.symmetric=True with dynamic=True: dynamic activations are affine (symmetric=False)")
    if not isinstance(spec.granularity, (PerTensor, PerToken)):
        raise ConfigError(
            f"QuantSpec.granularity={type(spec.granularity).__name__}() with dynamic=True: "
            "use PerTensor() or PerToken()"
        )
    if isinstance(spec.granularity, PerToken) and spec.dtype != torch.int8:
        raise ConfigError(
            f"QuantSpec.dtype={spec.dtype} with PerToken dynamic activations: per-token ranges are "
            "int8 (quantized_decomposed.choose_qparams_per_token_asymmetric, XNNPACK's qd8)"
        )


def _check_histogram(spec: QuantSpec) -> None:
    """The histogram observer's fields: only with ``observer="histogram"``, and only where a
    histogram can choose the range (one static range per tensor)."""
    if spec.range_method is not None and spec.observer != "histogram":
        raise ConfigError(
            f"QuantSpec.range_method={spec.range_method!r} needs observer='histogram' (got observer={spec.observer!r})"
        )
    if spec.range_method is not None and spec.range_method not in _RANGE_METHODS:
        raise ConfigError(f"QuantSpec.range_method={spec.range_method!r} must be one of {_RANGE_METHODS}")
    if spec.percentile is not None:
        if spec.range_method != "percentile":
            raise ConfigError(
                f"QuantSpec.percentile={spec.percentile} needs range_method='percentile' (got {spec.range_method!r})"
            )
        if not 50.0 < spec.percentile <= 100.0:
            raise ConfigError(f"QuantSpec.percentile={spec.percentile} must be in (50, 100]")
    if spec.observer != "histogram":
        return
    if not isinstance(spec.granularity, PerTensor):
        raise ConfigError(
            f"QuantSpec.observer='histogram' with granularity={type(spec.granularity).__name__}(): the histogram "
            "observer picks one range per tensor; use PerTensor() or observer='minmax'"
        )
    if spec.dynamic:
        raise ConfigError("QuantSpec.observer='histogram' with dynamic=True: a dynamic spec observes nothing")


Edge = tuple[str, str]
"""(producer node name, consumer node name): one input of one node."""

Point = Union[Edge, str]
"""A place that can carry qparams: an edge, or a node name meaning that node's output."""


@dataclass(frozen=True)
class SharedSpec:
    """Use exactly the qparams of ``point`` (an edge ``(producer, consumer)`` or a node's output)."""

    point: Point

    def dump_fields(self) -> dict:
        return {"type": "SharedSpec", "shares": _point_fields(self.point), "text": f"shared with {self.point}"}


@dataclass(frozen=True)
class DerivedSpec:
    """Qparams derived from other points: ``scale = prod(scales)``, ``zero_point = 0``.

    The usual case is an int32 bias whose scale is input scale × weight scale, so that the
    bias adds straight into the int32 accumulator of a conv or linear.
    """

    points: tuple[Point, ...]
    dtype: torch.dtype = torch.int32

    def dump_fields(self) -> dict:
        """Zero point 0 over the dtype's whole range; the scale is the product of the
        scales at ``points``."""
        info = torch.iinfo(self.dtype)
        return {
            "type": "DerivedSpec",
            "dtype": _dtype_name(self.dtype),
            "bits": info.bits,
            "quant_min": info.min,
            "quant_max": info.max,
            "scheme": "symmetric",
            "dynamic": False,
            "derived_from": [_point_fields(p) for p in self.points],
            "text": f"{_dtype_name(self.dtype)} derived: scale = product of the scales at "
            + ", ".join(str(p) for p in self.points),
        }


@dataclass(frozen=True)
class Int32Bias:
    """In a :class:`~qgraph.quant.rules.QuantScheme`: quantize a bias to int32 with
    ``scale = input scale × weight scale`` (per output channel), zero point 0.

    The annotate pass turns it into a :class:`DerivedSpec` naming the op's input and weight
    edges. Integer kernels (ONNX Runtime's QLinearConv, x86 oneDNN) add such a bias straight
    into their int32 accumulator.
    """

    dtype: torch.dtype = torch.int32


@dataclass(frozen=True)
class FixedSpec:
    """Qparams known without observing: outputs of sigmoid, softmax, tanh."""

    scale: float
    zero_point: int
    dtype: torch.dtype = torch.int8
    quant_min: int = -128
    quant_max: int = 127

    def dump_fields(self) -> dict:
        dtype = _dtype_name(self.dtype)
        return {
            "type": "FixedSpec",
            "dtype": dtype,
            "bits": (self.quant_max - self.quant_min).bit_length(),
            "quant_min": self.quant_min,
            "quant_max": self.quant_max,
            "scheme": "affine",
            "granularity": "per_tensor",
            "dynamic": False,
            "scale": self.scale,
            "zero_point": self.zero_point,
            "text": f"{dtype}[{self.quant_min},{self.quant_max}] fixed scale={self.scale:.6g} "
            f"zero_point={self.zero_point}",
        }


AnySpec = Union[QuantSpec, SharedSpec, DerivedSpec, FixedSpec]


@dataclass
class QuantAnnotation:
    """What a backend rule decided for one node; lives in ``node.meta[ANNOTATION_KEY]``.

    ``inputs`` maps an input node's name to the spec on that edge; ``output`` is the spec of
    the node's own output. ``rule`` names the backend rule that matched, ``anchor`` the node
    that anchors the matched pattern (a fused ReLU points at its conv); nodes inside a fused
    pattern carry no spec on their internal edges.
    """

    rule: str
    anchor: str
    inputs: dict[str, AnySpec] = field(default_factory=dict)
    output: AnySpec | None = None


    def dump_fields(self) -> dict:
        return {
            "rule": self.rule,
            "anchor": self.anchor,
            "inputs": {name: spec.dump_fields() for name, spec in self.inputs.items()},
            "output": self.output.dump_fields() if self.output is not None else None,
        }
