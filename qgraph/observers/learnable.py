"""Learnable ranges for QAT: fake quantization whose scale and zero point are trained (LSQ / LSQ+).

A spec with ``learnable=True`` gets a :class:`LearnableFakeQuantize` in ``prepare_qat``: its
scale (and, for affine specs, its zero point) are ``nn.Parameter`` that the optimizer
trains with the weights, as in Esser et al., *Learned Step Size Quantization* (ICLR 2020)
and Bhalgat et al., *LSQ+* (CVPR-W 2020). They start from the range of the first batch
(min-max of that batch, or the histogram's choice for ``observer="histogram"``).

Forward — the very op that eval mode and ``convert`` use::

    x̂ = (clamp(round(x / s) + z, qmin, qmax) - z) · s,    s = max(scale, eps),
                                                           z = clamp(round(ζ), qmin, qmax)

with ``ζ`` the learned, real-valued zero point, so fake-quant in eval mode and the
converted graph agree exactly (:meth:`LearnableFakeQuantize.qparams` is what
``freeze_qparams`` reads).

Backward. ``round`` has derivative 0 almost everywhere; LSQ replaces it by 1 (the
straight-through estimator). With ``v = x / s`` and ``q = round(v) + z``:

====================  ===========  ==================  ===========
element               ∂x̂/∂x        ∂x̂/∂s               ∂x̂/∂ζ
====================  ===========  ==================  ===========
``qmin <= q <= qmax``  1            ``round(v) - v``    0
``q < qmin``           0            ``qmin - z``        ``-s``
``q > qmax``           0            ``qmax - z``        ``-s``
====================  ===========  ==================  ===========

summed over the elements that share a scale and multiplied by LSQ's gradient scale
``g = 1 / sqrt(n · Q_P)``: ``n`` elements per scale, ``Q_P`` the number of steps above
the zero point (``qmax`` for signed symmetric, ``qmax - qmin`` for affine, where the grid
may sit entirely on one side of 0). Without ``g`` a scale, which sums the gradient of
every element it quantizes, would move ``sqrt(n)`` times faster than a weight (LSQ §2.2).

Why these are the gradients of something: they are the exact derivatives of the
*surrogate* in which each ``round(u)`` is replaced by ``u + (round(u₀) - u₀)``, the
rounding residual frozen at the point of evaluation. The surrogate is smooth except where
``q`` meets ``qmin`` or ``qmax``, so ``tests/test_learnable_ranges.py`` checks
:func:`lsq_gradients` against central finite differences of the surrogate
(``torch.autograd.gradcheck``, float64) at points away from the clamp edges. Finite
differences of ``x̂`` itself would measure the staircase (0 almost everywhere, jumps at
the rounding edges), which is not what LSQ differentiates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qgraph.core.distributed import all_reduce_sum_
from qgraph.observers.base import FakeQuantize
from qgraph.observers.histogram import select_range, value_histogram
from qgraph.quant.qparams import fake_quantize, qparams_from_range
from qgraph.quant.specs import PerGroup, QuantSpec


def positive_levels(spec: QuantSpec) -> int:
    """``Q_P`` of LSQ's gradient scale: the steps of the grid above its zero point."""
    if not spec.symmetric:
        return spec.quant_max - spec.quant_min
    mid = 0 if spec.dtype.is_signed else (spec.quant_min + spec.quant_max + 1) // 2
    return spec.quant_max - mid


def _broadcast_shape(x: torch.Tensor, axis: int | None) -> list[int]:
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    return shape


def lsq_gradients(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
    grad: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dscale, dzero_point)`` of the table in the module docstring, without ``g``.

    ``zero_point`` is the rounded, clamped integer zero point (as a float tensor);
    ``dscale`` and ``dzero_point`` have the shape of ``scale``. ``v`` is computed as
    ``x * (1 / s)`` like ATen's fake-quant kernels, so the in-range mask is theirs.
    """
    shape = _broadcast_shape(x, axis)
    s, z = scale.reshape(shape), zero_point.reshape(shape)
    v = x * (1.0 / s)
    r = torch.round(v)
    q = r + z
    below, above = q < quant_min, q > quant_max
    inside = ~(below | above)
    dx = grad * inside
    ds = torch.where(inside, r - v, torch.where(below, quant_min - z, quant_max - z))
    dz = torch.where(inside, torch.zeros_like(x), -s.expand_as(x))
    dims = [d for d in range(x.dim()) if axis is None or d != axis % x.dim()]
    ds = (grad * ds).sum(dims).reshape(scale.shape)
    dz = (grad * dz).sum(dims).reshape(scale.shape)
    return dx, ds, dz


class _LsqFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, grad_factor):
        z = zero_point.detach().round().clamp(quant_min, quant_max)
        ctx.save_for_backward(x, scale, z)
        ctx.args = (quant_min, quant_max, axis, grad_factor)
        zi = z.to(torch.int32)
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zi.reshape(()), quant_min, quant_max)
        return torch.fake_quantize_per_channel_affine(x, scale, zi, axis, quant_min, quant_max)

    @staticmethod
    def backward(ctx, grad):
        x, scale, z = ctx.saved_tensors
        quant_min, quant_max, axis, grad_factor = ctx.args
        dx, ds, dz = lsq_gradients(x, scale, z, quant_min, quant_max, axis, grad)
        dz = dz * grad_factor if ctx.needs_input_grad[2] else None
        return dx, ds * grad_factor, dz, None, None, None, None


def lsq_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec, grad_factor: float | None = None
) -> torch.Tensor:
    """Fake-quantize ``x`` with LSQ gradients for ``scale`` and (float) ``zero_point``.

    ``grad_factor`` defaults to LSQ's ``1 / sqrt(n · Q_P)``; the scale is clamped below at
    ``spec.eps`` (no gradient through the clamp), as :func:`qgraph.quant.qparams.qparams_from_range` does.
    """
    if grad_factor is None:
        grad_factor = 1.0 / math.sqrt(max(1, x.numel() // scale.numel()) * positive_levels(spec))
    s = scale.clamp_min(spec.eps)
    if isinstance(spec.granularity, PerGroup):
        # One scale per row of ``group_size`` elements: per channel on the regrouped view
        # (the layout :func:`qgraph.quant.qparams.fake_quantize` uses), then back to x's shape.
        rows = x.reshape(-1, spec.granularity.group_size)
        out = _LsqFakeQuantize.apply(
            rows, s.reshape(-1), zero_point.reshape(-1), spec.quant_min, spec.quant_max, 0, grad_factor
        )
        return out.reshape(x.shape)
    axis = spec.granularity.axis if spec.is_per_channel else None  # type: ignore[union-attr]
    return _LsqFakeQuantize.apply(x, s, zero_point, spec.quant_min, spec.quant_max, axis, grad_factor)


class LearnableFakeQuantize(FakeQuantize):
    """QAT fake-quant with a trained scale (and zero point for affine specs).

    ``channels`` is the number of scales (the size of the quantized axis for per-channel
    specs, ``(rows, groups)`` for per-group ones, 1 otherwise); parameters exist from construction so an optimizer built right
    after ``prepare_qat`` holds them. The first batch sets their values. In training mode
    the gradients are LSQ's; in eval mode, or after :meth:`freeze`, the qparams are fixed
    and only ``x`` gets the straight-through gradient.
    """

    def __init__(self, spec: QuantSpec, point: str = "", channels: int | tuple[int, ...] = 1) -> None:
        super().__init__(spec, point)
        shape = (channels,) if isinstance(channels, int) else tuple(channels)
        self.scale = nn.Parameter(torch.ones(shape))
        if spec.symmetric:
            mid = 0 if spec.dtype.is_signed else (spec.quant_min + spec.quant_max + 1) // 2
            self.register_buffer("zero_point", torch.full(shape, float(mid)))
        else:
            self.zero_point = nn.Parameter(torch.zeros(shape))

    def _update_range(self, x: torch.Tensor, across_ranks: bool = False) -> None:
        """Initialize from the first data seen; afterwards the range is learned, not observed.

        ``across_ranks`` (the first training step): from the global batch's histogram or
        range, so that every rank starts from the same parameters."""
        if self.has_range:
            return
        if self.spec.observer == "histogram":
            counts = value_histogram(x)
            lo, hi = select_range(all_reduce_sum_(counts) if across_ranks else counts, self.spec)
            self.min_val = torch.tensor([lo], dtype=torch.float32, device=x.device)
            self.max_val = torch.tensor([hi], dtype=torch.float32, device=x.device)
        else:
            super()._update_range(x, across_ranks)  # the first batch: its min and max
        scale, zero_point = qparams_from_range(self.min_val, self.max_val, self.spec)
        with torch.no_grad():
            self.scale.copy_(scale.to(self.scale.device).reshape(-1).expand(self.scale.numel()).reshape(self.scale.shape))
            zero_point = zero_point.to(self.zero_point).reshape(-1).expand(self.zero_point.numel())
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_range:
            self._update_range(x, across_ranks=self.training)
        if self.training and self.observer_enabled.item():
            return lsq_fake_quantize(x, self.scale, self.zero_point, self.spec)
        scale, zero_point = self.qparams()
        return fake_quantize(x, scale, zero_point, self.spec)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned ``(scale float32, zero_point int32)``, as the forward pass uses them."""
        if not self.has_range:
            raise RuntimeError("no data has been observed yet")
        scale = self.scale.detach().clamp_min(self.spec.eps).to(torch.float32)
        zero_point = self.zero_point.detach().round().clamp(self.spec.quant_min, self.spec.quant_max)
        return scale, zero_point.to(torch.int32)

    def freeze(self) -> None:
        """Stop learning: scale and zero point keep their values (no gradient reaches them)."""
        super().freeze()

    def learned_range(self) -> tuple[float, float] | None:
        """``(lo, hi)``: the float range the learned qparams represent (``(q - zp) * scale``
        at ``quant_min`` and ``quant_max``, widest over channels); None before the first batch."""
        if not self.has_range:
            return None
        scale, zero_point = self.qparams()
        lo = ((self.spec.quant_min - zero_point) * scale).min().item()
        hi = ((self.spec.quant_max - zero_point) * scale).max().item()
        return lo, hi

    def extra_repr(self) -> str:
        learned = self.learned_range()
        if learned is None:
            return f"{self.spec.short()}, learnable, uninitialized"
        return f"{self.spec.short()}, learnable, range=[{learned[0]:.4g}, {learned[1]:.4g}]"

    def dump_fields(self) -> dict:
        learned = self.learned_range()
        return {**super().dump_fields(), "learned_range": list(learned) if learned is not None else None}
