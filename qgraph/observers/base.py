"""Observer and fake-quant modules that ``insert_quantizers`` puts on quantized edges.

Both keep a running range ``[min_val, max_val]`` in buffers (so they travel in the
``state_dict``) and compute qparams with :func:`qgraph.quant.qparams.qparams_from_range`.

* :class:`Observer` (PTQ) records the range of what flows through and returns it unchanged.
* :class:`FakeQuantize` (QAT) records the range while its module is in training mode and
  returns ``fake_quantize(x)``; gradients pass straight through inside the range.

Range update rules (``spec.observer``):

* ``minmax``: ``min_val = min(min_val, x.min())`` — every value ever seen.
* ``moving_average_minmax``: ``min_val += c * (x.min() - min_val)`` with ``c =
  spec.averaging_constant``; the first batch sets the range. Per-channel specs reduce over
  every dimension but ``axis``; per-group specs over each group of ``group_size`` elements
  of the last dimension.
* ``histogram``: :class:`qgraph.observers.histogram.HistogramObserver` (PTQ) keeps a histogram and picks
  the range by percentile, least MSE or least KL divergence.

``spec.learnable`` makes QAT use :class:`qgraph.observers.learnable.LearnableFakeQuantize` (LSQ);
:func:`qgraph.observers.factory.make_quantizer` picks the class for a spec.

Several processes (DDP, FSDP2, sharded calibration): a training or calibration step reduces
the batch's ``x.min()`` / ``x.max()`` over the ranks (elementwise for per-channel and
per-group ranges) before the update above, so every rank computes what one process computes
on the global batch — the concatenation of the ranks' batches — bit for bit (``min`` and
``max`` are exact), and ranks never drift apart. Why not average or broadcast afterwards:
a moving average of per-rank ranges is no range of any data, and DDP's broadcast of rank 0's
buffers at each forward leaves every rank its own last update. Cost: one small
``all_reduce`` per observer per step (:func:`qgraph.core.distributed.all_reduce_range`).
Observation outside a step — fake-quant's first call in eval mode, ``convert`` observing a
weight — stays local: not every rank may run it.
"""

from __future__ import annotations

import torch
from torch import nn

from qgraph.core.distributed import all_reduce_range
from qgraph.core.errors import CalibrationError, ConfigError
from qgraph.ops.qdq import dynamic_fake_quantize
from qgraph.quant.qparams import fake_quantize, qparams_from_range
from qgraph.quant.specs import DerivedSpec, PerGroup, QuantSpec


def _reduce_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach()
    if spec.is_per_channel:
        axis = spec.granularity.axis % x.dim()  # type: ignore[union-attr]
        flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
        return torch.aminmax(flat, dim=1)
    if isinstance(spec.granularity, PerGroup):
        return torch.aminmax(_groups(x, spec.granularity.group_size), dim=-1)
    lo, hi = torch.aminmax(x)
    return lo.reshape(1), hi.reshape(1)


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` viewed as ``[..., last // group_size, group_size]``: per-group ranges are
    ``[..., last // group_size]`` (``[out, in // group_size]`` for a linear weight)."""
    if x.dim() == 0 or x.shape[-1] % group_size:
        raise ConfigError(
            f"a per-group spec with group_size={group_size} got a tensor of shape {tuple(x.shape)}: "
            f"its last dimension must be a multiple of {group_size}; choose a group size that divides it"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


class _RangeTracker(nn.Module):
    """Shared state of observers and fake-quant modules: the spec and the running range."""

    def __init__(self, spec: QuantSpec, point: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.point = point
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self.register_buffer("observer_enabled", torch.tensor(1, dtype=torch.uint8))

    def _update_range(self, x: torch.Tensor, across_ranks: bool = False) -> None:
        """Merge ``x``'s range; ``across_ranks``: this is a step every rank runs, so merge the
        range of the global batch (see the module docstring)."""
        lo, hi = _reduce_range(x, self.spec)
        if across_ranks:
            lo, hi = all_reduce_range(lo, hi)
        self._merge_range(lo, hi)

    def _merge_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.min_val.numel() == 0:
            self.min_val = lo.clone()
            self.max_val = hi.clone()
        elif self.spec.observer == "minmax":
            torch.minimum(self.min_val, lo, out=self.min_val)
            torch.maximum(self.max_val, hi, out=self.max_val)
        else:
            c = self.spec.averaging_constant
            self.min_val.add_(lo - self.min_val, alpha=c)
            self.max_val.add_(hi - self.max_val, alpha=c)

    @property
    def has_range(self) -> bool:
        return self.min_val.numel() > 0

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the range seen so far."""
        if not self.has_range:
            raise RuntimeError("no data has been observed yet")
        return qparams_from_range(self.min_val, self.max_val, self.spec)

    def freeze(self) -> None:
        """Stop updating the range; qparams stay as they are."""
        self.observer_enabled.fill_(0)

    def extra_repr(self) -> str:
        rng = f"[{self.min_val.min().item():.4g}, {self.max_val.max().item():.4g}]" if self.has_range else "unobserved"
        return f"{self.spec.short()}, range={rng}"

    def dump_fields(self) -> dict:
        observed = [self.min_val.min().item(), self.max_val.max().item()] if self.has_range else None
        return quantizer_fields(self, observed_range=observed, frozen=not self.observer_enabled.item())


def quantizer_fields(module: nn.Module, **extra) -> dict:
    """What every quantizer module tells :mod:`qgraph.core.dump` about itself: that it is a
    quantizer, its class, the point it quantizes, its spec, and its one-line ``repr``."""
    return {
        "kind": "quantizer",
        "class": type(module).__name__,
        "point": module.point,
        "spec": module.spec.dump_fields(),
        "text": repr(module).replace("\n", " "),
        **extra,
    }


class Observer(_RangeTracker):
    """PTQ observer: watches values, returns them unchanged; NaN or inf is an error.

    Observers run in graph order, so the first one to see a non-finite value names the
    node where it first appears among the quantized points.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled.item():
            lo, hi = _reduce_range(x, self.spec)
            # min and max propagate NaN and show inf, so checking them finds any non-finite
            # value at no extra pass over x
            if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                raise non_finite_error(self.point)
            self._merge_range(*all_reduce_range(lo, hi))
        return x


def non_finite_error(point: str) -> Exception:
    """The error every PTQ observer raises when NaN or inf reaches it."""

    return CalibrationError(
        f"NaN or inf reached the observer of {point or 'a node'} during calibration; "
        "check the calibration data and the layers before this node"
    )


class FakeQuantize(_RangeTracker):
    """QAT fake-quant: observes in training mode, always fake-quantizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.observer_enabled.item():
            self._update_range(x, across_ranks=True)
        if not self.has_range:
            self._update_range(x)  # first call in eval mode: quantize against this batch
        scale, zero_point = self.qparams()
        return fake_quantize(x, scale, zero_point, self.spec)




class DerivedQuantizer(nn.Module):
    """Quantizer of a derived point (an int32 bias): ``scale = prod(source scales)``, zp 0.

    It holds its source quantizers by reference — not as submodules, so the module tree and
    ``state_dict`` list each quantizer once — and fake-quantizes in QAT (so training sees the
    int32 rounding of the bias, negligible but exact) or passes values through in PTQ.
    """

    def __init__(self, spec: DerivedSpec, sources: list[nn.Module], fake_quant: bool, point: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.point = point
        self.fake_quant = fake_quant
        object.__setattr__(self, "_sources", tuple(sources))

    def freeze(self) -> None:
        """Nothing to freeze: the qparams follow the sources, which freeze themselves."""

    @property
    def quant_min(self) -> int:
        return torch.iinfo(self.spec.dtype).min

    @property
    def quant_max(self) -> int:
        return torch.iinfo(self.spec.dtype).max

    @property
    def has_range(self) -> bool:
        return all(s.has_range for s in self._sources)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.ones(1)
        for source in self._sources:
            scale = scale * source.qparams()[0]
        return scale, torch.zeros(scale.shape, dtype=torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant or not self.has_range:
            return x
        scale, zero_point = self.qparams()
        scale = scale.expand(x.shape[0]) if scale.numel() == 1 else scale
        return torch.fake_quantize_per_channel_affine(
            x, scale, zero_point.expand_as(scale), 0, self.quant_min, self.quant_max
        )

    def extra_repr(self) -> str:
        return f"{str(self.spec.dtype).replace('torch.', '')} bias, scale = product of {len(self._sources)} scales"

    def dump_fields(self) -> dict:
        return quantizer_fields(self, sources=[s.point for s in self._sources])


class DynamicQuantizer(nn.Module):
    """Quantizer of a dynamic activation: qparams are chosen per batch at run time.

    Nothing is observed, so a dynamic model needs no calibration. In PTQ it passes values
    through (the prepared model stays float, as observers do); with ``fake_quant=True`` (QAT)
    it quantizes every batch with that batch's own range — the ops ``convert`` emits, see
    :func:`qgraph.ops.qdq.dynamic_fake_quantize`.
    """

    has_range = True  # qparams come from the data at run time: always "ready" for convert

    def __init__(self, spec: QuantSpec, fake_quant: bool = False, point: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.point = point
        self.fake_quant = fake_quant

    def freeze(self) -> None:
        """Nothing to freeze: there is no running range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dynamic_fake_quantize(x, self.spec) if self.fake_quant else x

    def extra_repr(self) -> str:
        return f"{self.spec.short()}, qparams per batch"

    def dump_fields(self) -> dict:
        return quantizer_fields(self)


QUANTIZER_TYPES = (Observer, FakeQuantize, DerivedQuantizer, DynamicQuantizer)
