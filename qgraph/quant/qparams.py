"""Scale and zero point from an observed range — the one implementation of this math.

Fake-quant modules (QAT), observers (PTQ) and ``convert`` all call
:func:`qparams_from_range`, so a fake-quant graph in eval mode and the converted graph use
bit-identical qparams.

For a range ``[lo, hi]`` widened to contain 0 (so that 0.0 is exactly representable,
which zero padding and ReLU rely on):

* affine:    ``scale = (hi - lo) / (qmax - qmin)``, ``zp = qmin - round(lo / scale)``
* symmetric: ``scale = max(-lo, hi) / ((qmax - qmin) / 2)``, ``zp`` = 0 for signed dtypes,
  ``(qmin + qmax + 1) // 2`` for unsigned ones

``scale`` is clamped below by ``eps`` (a constant tensor would give 0) and rounded to
``spec.scale_dtype`` when the runtime stores it in bf16 / fp16, ``zp`` into ``[qmin, qmax]``.
Per-group specs (int4 weights of LLMs) apply the same formulas to each group of
``group_size`` elements along the last dimension. These are the formulas of ``torch.ao.quantization`` observers, so
qparams agree with theirs for the same range.
"""

from __future__ import annotations

import torch

from qgraph.quant.specs import PerGroup, QuantSpec


def qparams_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale float32, zero_point int32)`` of the same shape as ``min_val``."""
    lo = torch.clamp(min_val, max=0.0).to(torch.float32)
    hi = torch.clamp(max_val, min=0.0).to(torch.float32)
    qmin, qmax = spec.quant_min, spec.quant_max
    eps = torch.tensor(spec.eps, dtype=torch.float32, device=lo.device)
    if spec.symmetric:
        scale = _stored(torch.maximum(torch.maximum(-lo, hi) / ((qmax - qmin) / 2), eps), spec, eps)
        mid = 0 if spec.dtype.is_signed else (qmin + qmax + 1) // 2
        zero_point = torch.full_like(scale, mid, dtype=torch.int32)
    else:
        scale = _stored(torch.maximum((hi - lo) / float(qmax - qmin), eps), spec, eps)
        zero_point = qmin - torch.round(lo / scale).to(torch.int32)
        zero_point = torch.clamp(zero_point, qmin, qmax).to(torch.int32)
    return scale, zero_point


def _stored(scale: torch.Tensor, spec: QuantSpec, eps: torch.Tensor) -> torch.Tensor:
    """The scale as the runtime stores it (``spec.scale_dtype``), back in float32."""
    if spec.scale_dtype == torch.float32:
        return scale
    return torch.maximum(scale.to(spec.scale_dtype).to(torch.float32), eps)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Quantize then dequantize ``x`` with the straight-through estimator for gradients.

    Uses ATen's fused kernels: ``dx = dy`` where ``x / scale`` lands inside the range and 0
    where it was clamped.
    """
    qmin, qmax = spec.quant_min, spec.quant_max
    if isinstance(spec.granularity, PerGroup):
        # Rows of ``group_size`` elements, one (scale, zero point) per row: the per-channel
        # kernel on the regrouped view, so gradients are ATen's clamp-aware STE as well.
        rows = x.reshape(-1, spec.granularity.group_size)
        out = torch.fake_quantize_per_channel_affine(rows, scale.reshape(-1), zero_point.reshape(-1), 0, qmin, qmax)
        return out.reshape(x.shape)
    if scale.numel() == 1 and not spec.is_per_channel:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax)
    axis = spec.granularity.axis  # type: ignore[union-attr]
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
