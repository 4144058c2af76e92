"""Histogram observer: the range that quantizes the calibration data best, not the widest one.

A min-max observer sizes the range to the largest value it ever saw, so one outlier in the
calibration data spreads the 2**bits levels over a range that almost no value uses, and
every typical value is rounded coarsely. A histogram of all calibration values lets the
observer trade a little clipping of rare values for finer steps where the mass is.

The histogram: one bin per bfloat16 value
-----------------------------------------
The bin of a float32 ``x`` is its top 16 bits: sign, 8 exponent bits and 7 mantissa bits
(the bfloat16 that truncation gives). So the bins

* are at most ``2**-7`` (0.8 %) of their magnitude wide, at every magnitude from 1e-38 to
  3e38: an outlier 1000× larger than the typical value does not coarsen the bins of the
  typical values, and the histogram never needs re-binning when the range grows;
* are computed without arithmetic on the values: a view of the tensor as int16 and one
  ``bincount`` over 65,536 bins (one pass, about as fast as ``torch.histc``);
* give exact zeros (ReLU outputs) a bin of their own, ``[0, 2**-133)``.

Each batch also takes one ``aminmax`` pass (a tenth of the histogram's cost): the exact
observed range for ``min_val`` / ``max_val``, and NaN (which propagates) or inf detection.

Counts are int64, exact for any amount of data. Inside a bin ``[l, u)`` of magnitudes the
values are taken as evenly spread, so ``c`` values there have the moments
``S1 = c (l + u) / 2`` and ``S2 = c (l² + l u + u²) / 3``.

Several processes: the histogram of a concatenation is the sum of the histograms, so at
every batch the ranks sum their batch's counts (an exact int64 ``all_reduce``) and reduce
its min / max. Every rank then holds, bit for bit, the histogram one process builds from the
global batch (the concatenation of the ranks' batches), and chooses the same range. Per
batch rather than once at the end: no state to keep between merges, a calibration loop of
your own needs no extra call, and the 512 KiB per observer and batch is small beside a
forward pass.

Choosing the range
------------------
Each method returns ``[lo, hi]`` (``lo <= 0 <= hi``), which
:func:`qgraph.quant.qparams.qparams_from_range` turns into scale and zero point exactly as for a
min-max range. A symmetric spec folds the histogram onto ``|x|`` and chooses one threshold
``t`` (range ``[-t, t]``); an affine spec chooses ``lo`` and ``hi``. Candidate thresholds
are bin edges (steps of 2**-7 relative), from the largest magnitude down to 2**-12 of it.

``percentile`` (``p``, default 99.99)
    symmetric: ``t`` with ``P(|x| <= t) = p / 100``; affine: ``lo`` and ``hi`` at the
    ``100 - p``-th and ``p``-th percentile of ``x``. Linear inside a bin.

``mse`` (the default)
    least expected squared error of quantize → dequantize on the calibration values::

        E(lo, hi) = Σ_{x > hi} (x - hi)²  +  Σ_{x < lo} (x - lo)²   clipping
                  + Σ_{lo <= x <= hi} r(x)                         rounding

    with the step ``Δ = (hi - lo) / (qmax - qmin)`` (affine) or ``t / ((qmax - qmin) / 2)``
    (symmetric), and ``r(x) = x²`` for ``|x| < Δ / 2`` (such values round to the exact
    zero) else ``Δ² / 12`` (the mean squared error of rounding values spread over a step).
    For the bins beyond a threshold ``t``, ``Σ c E[(|x| - t)²] = T2 - 2 t T1 + t² T0`` with
    ``T_k`` suffix sums of the moments ``S_k``, so every candidate costs O(1): symmetric
    specs try all of them, affine specs a coarse grid of ``(lo, hi)`` and then every
    candidate around its best cell.

``entropy``
    TensorRT's calibration: the distribution ``P`` of the values clipped to ``[lo, hi]``, on
    ``F`` fine bins with the clipped mass added to the first and last bin, against ``Q``,
    the unclipped values merged into the quantization levels (each level's mass spread
    evenly over its non-empty fine bins); the range minimizes
    ``KL(P ‖ Q) = Σ P log(P / Q)``. The fine bins are resampled from the histogram's
    cumulative counts (linear inside a bin), so they zoom in on each candidate range
    instead of being fixed at the full range as in TensorRT.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys

import torch

from qgraph.core.distributed import all_reduce_range, all_reduce_sum_, world_size
from qgraph.observers.base import Observer, non_finite_error
from qgraph.quant.qparams import qparams_from_range
from qgraph.quant.specs import QuantSpec

_NBINS = 1 << 16
_HALF = 1 << 15
_INF = 0x7F80
"""Magnitude bits of inf: bins ``m >= _INF`` (exponent 255) hold inf and NaN."""
_BINS_PER_OCTAVE = 128
_OCTAVES = 12
"""Candidate thresholds reach from the largest magnitude down to ``2**-_OCTAVES`` of it."""
_FINE_BINS = 1024
"""Fine bins of the entropy method's ``P`` and ``Q`` for one free threshold (symmetric specs,
non-negative data); a joint search of ``lo`` and ``hi`` uses half as many."""
_SMOOTHING = 1e-4
_CHUNK = 1 << 15
DEFAULT_RANGE_METHOD = "mse"
DEFAULT_PERCENTILE = 99.99


def value_histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts (int64, 65,536) of ``x``'s values by their top 16 bits.

    Index ``i`` counts the values whose top 16 bits, read as int16, equal ``i - 32768``:
    ``i = 32768 + m`` for ``+x`` and ``i = m`` for ``-x`` where ``m`` are the magnitude bits
    (exponent and 7 mantissa bits).
    """
    counts = torch.zeros(_NBINS, dtype=torch.int64, device=x.device)
    _accumulate(counts, x, non_negative=bool(x.numel()) and bool(x.min() >= 0))
    return counts


def _accumulate(counts: torch.Tensor, x: torch.Tensor, non_negative: bool) -> None:
    """Add the histogram of ``x`` to ``counts``.

    Without sign bits (ReLU outputs) the top 16 bits are the bin as they stand: ``bincount``
    reads them straight from memory, a quarter faster than widening and offsetting them
    first as signed data needs. ``-0.0`` has its sign bit set although it is ``>= 0``;
    ``bincount`` refuses the negative number and the signed way counts it.
    """
    flat = x.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    if flat.numel() == 0:
        return
    little = sys.byteorder == "little"
    if non_negative and little:
        try:
            counts[_HALF:] += torch.bincount(flat.view(torch.int16)[1::2], minlength=_HALF)
            return
        except RuntimeError:  # a sign bit after all: -0.0
            pass
    top = flat.view(torch.int16)[1::2].to(torch.int32) if little else flat.view(torch.int32) >> 16
    top += _HALF
    counts += torch.bincount(top, minlength=_NBINS)


@contextlib.contextmanager
def _one_thread():
    """Run small-tensor work on one thread.

    The bookkeeping here works on tensors of at most 65,536 numbers; waking a thread pool for
    each of its many small ops made it 10-25× slower on a busy 2-core machine, with nothing
    gained on an idle one. (``bincount`` counts on one thread anyway.)
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _edges() -> torch.Tensor:
    """float64 ``L[m]``: the smallest magnitude of bin ``m``, for ``m = 0 .. _INF``.

    Bin ``m`` holds magnitudes in ``[L[m], L[m + 1])``; ``L[_INF]`` would be inf and is
    replaced by float32's largest value so that moments stay finite.
    """
    bits = torch.arange(_INF + 1, dtype=torch.int32) << 16
    edges = bits.view(torch.float32).to(torch.float64)
    edges[-1] = torch.finfo(torch.float32).max
    return edges


def _bin_of(t: torch.Tensor) -> torch.Tensor:
    """The magnitude bin ``m`` that holds ``t >= 0``: its top 16 bits (no search needed)."""
    return (t.to(torch.float32).view(torch.int32) >> 16).long()


class _Side:
    """The histogram of ``|x|`` for one sign (or both, folded), with its prefix sums.

    Arrays run over the magnitude bins ``m < M`` (``M``: one past the highest occupied
    bin); ``edge[k]`` is the threshold at the lower edge of bin ``k`` (``k = 0 .. M``), and
    ``P0[k]``, ``P1[k]``, ``P2[k]`` the count and moments of the values below it.
    """

    def __init__(self, counts: torch.Tensor) -> None:
        occupied = torch.nonzero(counts).flatten()
        self.M = int(occupied[-1]) + 1 if occupied.numel() else 1
        edges = _edges()
        self.c = counts[: self.M].to(torch.float64)
        self.edge = edges[: self.M + 1]
        lower, upper = self.edge[:-1], self.edge[1:]
        self.upper = upper
        self.lower = lower
        zero = torch.zeros(1, dtype=torch.float64)
        self.P0 = torch.cat([zero, torch.cumsum(self.c, 0)])
        self.P1 = torch.cat([zero, torch.cumsum(self.c * (lower + upper) / 2, 0)])
        self.P2 = torch.cat([zero, torch.cumsum(self.c * (lower * lower + lower * upper + upper * upper) / 3, 0)])
        self.total = float(self.P0[-1])

    def candidates(self) -> torch.Tensor:
        """Indices ``k`` of the candidate thresholds ``edge[k]``: from no clipping down 12 octaves."""
        if self.total == 0:
            return torch.zeros(1, dtype=torch.long)
        return torch.arange(max(1, self.M - _OCTAVES * _BINS_PER_OCTAVE), self.M + 1)

    def clip_error(self, k: torch.Tensor) -> torch.Tensor:
        """``Σ_{|x| >= edge[k]} (|x| - edge[k])²`` (values clipped to the threshold)."""
        t = self.edge[k]
        t0, t1, t2 = self.P0[-1] - self.P0[k], self.P1[-1] - self.P1[k], self.P2[-1] - self.P2[k]
        return (t2 - 2 * t * t1 + t * t * t0).clamp_min(0)

    def rounding_error(self, k: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``Σ r(x)`` over the values below ``edge[k]``: x² under half a step, else step²/12."""
        small = torch.minimum(_bin_of(step / 2), k)  # bins below bin_of(t) end at or below t
        return self.P2[small] + (self.P0[k] - self.P0[small]) * step * step / 12

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """Count of values with ``|x| < t`` (linear inside a bin), for any shape of ``t >= 0``.

        The bin of ``t`` is its own top 16 bits, so no search is needed.
        """
        m = _bin_of(t).clamp(0, self.M - 1)
        width = self.upper[m] - self.lower[m]
        frac = ((t - self.lower[m]) / width).clamp(0, 1)
        return self.P0[m] + frac * self.c[m]

    def quantile(self, q: float) -> float:
        """The magnitude ``t`` with ``q`` values below it (linear inside a bin)."""
        if self.total == 0 or q <= 0:
            return 0.0
        if q >= self.total:
            return float(self.edge[self.M])
        m = int(torch.searchsorted(self.P0, torch.tensor(q, dtype=torch.float64), right=True)) - 1
        m = min(max(m, 0), self.M - 1)
        frac = (q - float(self.P0[m])) / float(self.c[m]) if self.c[m] > 0 else 0.0
        return float(self.lower[m] + frac * (self.upper[m] - self.lower[m]))


def _sides(counts: torch.Tensor) -> tuple[_Side, _Side]:
    counts = counts.detach().to("cpu")
    return _Side(counts[:_INF]), _Side(counts[_HALF : _HALF + _INF])


def _search(cands_a: torch.Tensor, cands_b: torch.Tensor, objective, grid: int) -> tuple[int, int]:
    """``argmin objective(a[:, None], b[None, :])`` over two sorted candidate lists.

    Coarse to fine: about ``grid`` candidates per side (``grid**2`` when one side has a
    single candidate), then the same number between the neighbours of the best cell, until
    every candidate of the last window was tried.
    """
    if len(cands_a) == 1 or len(cands_b) == 1:
        grid = grid * grid
    window_a, window_b = (0, len(cands_a) - 1), (0, len(cands_b) - 1)

    def positions(lo: int, hi: int) -> tuple[torch.Tensor, bool]:
        if hi - lo + 1 <= grid:
            return torch.arange(lo, hi + 1), True
        return torch.linspace(lo, hi, grid).round().long().unique(), False

    while True:
        pos_a, done_a = positions(*window_a)
        pos_b, done_b = positions(*window_b)
        err = objective(cands_a[pos_a][:, None], cands_b[pos_b][None, :])
        i, j = divmod(int(torch.argmin(err)), err.shape[1])
        if done_a and done_b:
            return int(cands_a[pos_a[i]]), int(cands_b[pos_b[j]])
        window_a = (int(pos_a[max(i - 1, 0)]), int(pos_a[min(i + 1, len(pos_a) - 1)]))
        window_b = (int(pos_b[max(j - 1, 0)]), int(pos_b[min(j + 1, len(pos_b) - 1)]))


def _symmetric_half_levels(spec: QuantSpec) -> float:
    return (spec.quant_max - spec.quant_min) / 2


def _mse(neg: _Side, pos: _Side, spec: QuantSpec) -> tuple[float, float]:
    if spec.symmetric:
        both = _fold(neg, pos)
        half = _symmetric_half_levels(spec)
        k = both.candidates()
        err = both.clip_error(k) + both.rounding_error(k, both.edge[k] / half)
        t = float(both.edge[k[int(torch.argmin(err))]])
        return -t, t
    levels = spec.quant_max - spec.quant_min

    def objective(kn: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        step = (neg.edge[kn] + pos.edge[kp]) / levels
        return neg.clip_error(kn) + pos.clip_error(kp) + neg.rounding_error(kn, step) + pos.rounding_error(kp, step)

    kn, kp = _search(neg.candidates(), pos.candidates(), objective, grid=48)
    return -float(neg.edge[kn]), float(pos.edge[kp])


def _fold(neg: _Side, pos: _Side) -> _Side:
    M = max(neg.M, pos.M)
    counts = torch.zeros(M, dtype=torch.float64)
    counts[: neg.M] += neg.c
    counts[: pos.M] += pos.c
    return _Side(counts)


def _percentile(neg: _Side, pos: _Side, spec: QuantSpec) -> tuple[float, float]:
    p = (spec.percentile if spec.percentile is not None else DEFAULT_PERCENTILE) / 100
    if spec.symmetric:
        both = _fold(neg, pos)
        t = both.quantile(p * both.total)
        return -t, t
    total = neg.total + pos.total

    def signed_quantile(q: float) -> float:
        """The value with ``q`` values below it; negatives come first, largest magnitude first."""
        if q <= neg.total:
            return -neg.quantile(neg.total - q)
        return pos.quantile(q - neg.total)

    return min(signed_quantile((1 - p) * total), 0.0), max(signed_quantile(p * total), 0.0)


def _kl(cdf, total: float, lo: torch.Tensor, hi: torch.Tensor, levels: int, fine_bins: int) -> torch.Tensor:
    """``KL(P ‖ Q)`` for candidate ranges ``[lo, hi]`` (same shape), see the module docstring.

    Rows are evaluated in chunks of at most ``_CHUNK`` numbers: small tensors stay on one
    thread, which on a busy machine is many times faster than waking a thread pool.
    """
    sub = max(1, fine_bins // levels)
    rows = max(1, _CHUNK // (levels * sub + 1))
    lo_flat, hi_flat = lo.reshape(-1), hi.reshape(-1)
    parts = [
        _kl_rows(cdf, total, lo_flat[i : i + rows], hi_flat[i : i + rows], levels, sub)
        for i in range(0, lo_flat.numel(), rows)
    ]
    return torch.cat(parts).reshape(lo.shape)


def _kl_rows(cdf, total: float, lo: torch.Tensor, hi: torch.Tensor, levels: int, sub: int) -> torch.Tensor:
    fine = levels * sub
    frac = torch.linspace(0, 1, fine + 1, dtype=torch.float64)
    edges = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * frac  # [rows, fine + 1]
    cum = cdf(edges)
    p = cum[..., 1:] - cum[..., :-1]
    below, above = cum[..., 0], total - cum[..., -1]
    grouped = p.reshape(*p.shape[:-1], levels, sub)
    nonzero = (grouped > 0).sum(-1, keepdim=True).clamp_min(1)
    q = torch.where(grouped > 0, grouped.sum(-1, keepdim=True) / nonzero, torch.zeros_like(grouped))
    q = q.reshape(p.shape)
    p = p.clone()
    p[..., 0] += below
    p[..., -1] += above
    p = p / total
    q_mass = q.sum(-1, keepdim=True)
    q = q / q_mass.clamp_min(1e-300)
    # TensorRT's smoothing: empty bins of Q get 1e-4, taken evenly from the others, so that
    # clipped mass landing where Q is empty costs a finite amount
    empty = q == 0
    n_empty = empty.sum(-1, keepdim=True)
    q = torch.where(empty, torch.full_like(q, _SMOOTHING), q - _SMOOTHING * n_empty / (fine - n_empty).clamp_min(1))
    q = q.clamp_min(1e-12)
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.log(q)), torch.zeros_like(p)).sum(-1)
    return torch.where(q_mass.squeeze(-1) > 0, kl, torch.full_like(kl, float("inf")))


def _entropy(neg: _Side, pos: _Side, spec: QuantSpec) -> tuple[float, float]:
    # exact zeros (ReLU) quantize without error: a spike of them in the first fine bin
    # would otherwise dominate KL(P || Q) whatever the range
    neg, pos = _without_zeros(neg), _without_zeros(pos)
    if neg.total + pos.total == 0:
        return 0.0, 0.0
    if spec.symmetric:
        both = _fold(neg, pos)
        levels = math.floor(_symmetric_half_levels(spec)) + 1  # the levels of [0, t]: 0, Δ, ..., t
        zero = torch.zeros(1, dtype=torch.long)

        def objective_sym(_: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            t = both.edge[k].expand(1, -1)
            return _kl(both.cdf, both.total, torch.zeros_like(t), t, levels, _FINE_BINS)

        _, k = _search(zero, both.candidates(), objective_sym, grid=8)
        t = float(both.edge[k])
        return -t, t
    total = neg.total + pos.total
    levels = spec.quant_max - spec.quant_min + 1

    signed_cdf = _SignedCdf(neg, pos)
    fine_bins = _FINE_BINS // 2 if neg.total and pos.total else _FINE_BINS

    def objective(kn: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.broadcast_tensors(-neg.edge[kn], pos.edge[kp])
        return _kl(signed_cdf, total, lo, hi, levels, fine_bins)

    kn, kp = _search(neg.candidates(), pos.candidates(), objective, grid=12)
    return -float(neg.edge[kn]), float(pos.edge[kp])


class _SignedCdf:
    """Count of values ``x < v`` for signed ``v``: one table over both signs' bins.

    For ``v >= 0`` in positive bin ``m``: ``N_neg + P0+[m] + f c+[m]``; for ``v < 0`` with
    ``|v|`` in negative bin ``m``: ``N_neg - P0-[m] - f c-[m]``, ``f`` the position of
    ``|v|`` inside its bin.
    """

    def __init__(self, neg: _Side, pos: _Side) -> None:
        self.offset, self.neg_top, self.pos_top = neg.M, neg.M - 1, pos.M - 1
        self.base = torch.cat([neg.total - neg.P0[:-1], neg.total + pos.P0[:-1]])
        self.slope = torch.cat([-neg.c, pos.c])
        self.lower = torch.cat([neg.lower, pos.lower])
        self.width = torch.cat([neg.upper - neg.lower, pos.upper - pos.lower])

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        a = v.abs()
        m = _bin_of(a)
        m = torch.where(v >= 0, m.clamp(max=self.pos_top) + self.offset, m.clamp(max=self.neg_top))
        frac = ((a - self.lower[m]) / self.width[m]).clamp(0, 1)
        return self.base[m] + frac * self.slope[m]


def _without_zeros(side: _Side) -> _Side:
    counts = side.c.clone()
    counts[0] = 0
    return _Side(counts)


_METHODS = {"mse": _mse, "percentile": _percentile, "entropy": _entropy}


def select_range(counts: torch.Tensor, spec: QuantSpec) -> tuple[float, float]:
    """``(lo, hi)`` chosen from a :func:`value_histogram` by ``spec.range_method``.

    Runs on one thread (see :func:`_one_thread`): every tensor here is small.
    """
    with _one_thread():
        neg, pos = _sides(counts)
        if neg.total + pos.total == 0:
            return 0.0, 0.0
        method = spec.range_method or DEFAULT_RANGE_METHOD
        return _METHODS[method](neg, pos, spec)


class HistogramObserver(Observer):
    """PTQ observer that keeps a histogram of every value and picks the range from it.

    ``min_val`` / ``max_val`` hold the observed range (exact); :meth:`qparams` uses
    :meth:`chosen_range`, the range that ``spec.range_method`` picks, computed once per
    change of the histogram.
    """

    def __init__(self, spec: QuantSpec, point: str = "") -> None:
        super().__init__(spec, point)
        self.register_buffer("counts", torch.zeros(0, dtype=torch.int64))
        self._observed = 0
        self._cache: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled.item():
            self._update_range(x, across_ranks=True)
        return x

    def _update_range(self, x: torch.Tensor, across_ranks: bool = False) -> None:
        across_ranks = across_ranks and world_size() > 1
        if x.numel() == 0 and not across_ranks:
            return
        with _one_thread():
            lo, hi = (v.item() for v in torch.aminmax(x.detach())) if x.numel() else (math.inf, -math.inf)
            if x.numel() and not (math.isfinite(lo) and math.isfinite(hi)):  # NaN propagates through aminmax
                raise non_finite_error(self.point)
            merged = None
            if across_ranks:  # the global batch (module docstring); an empty batch takes part too
                merged = all_reduce_sum_(value_histogram(x))
                lo_t, hi_t = all_reduce_range(torch.tensor([lo]), torch.tensor([hi]))
                lo, hi = lo_t.item(), hi_t.item()
                if lo > hi:  # no rank had data
                    return
            if self.counts.numel() == 0 or not self.has_range:  # first data, or the range was reset
                self.counts = torch.zeros(_NBINS, dtype=torch.int64, device=x.device)
                self.min_val = torch.tensor([lo], dtype=torch.float32, device=x.device)
                self.max_val = torch.tensor([hi], dtype=torch.float32, device=x.device)
            else:
                self.min_val.clamp_(max=lo)
                self.max_val.clamp_(min=hi)
            if merged is None:
                _accumulate(self.counts, x, non_negative=lo >= 0)
            else:
                self.counts += merged.to(self.counts.device)
            self._observed += 1

    @property
    def range_method(self) -> str:
        return self.spec.range_method or DEFAULT_RANGE_METHOD

    def chosen_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` float32 tensors of shape (1,) that ``spec.range_method`` picks."""
        if not self.has_range:
            raise RuntimeError("no data has been observed yet")
        key = (self.counts.data_ptr(), self.counts._version, self._observed, self.spec)
        if self._cache is None or self._cache[0] != key:
            lo, hi = select_range(self.counts, self.spec)
            device = self.min_val.device
            rng = (torch.tensor([lo], dtype=torch.float32, device=device),
                   torch.tensor([hi], dtype=torch.float32, device=device))  # fmt: skip
            self._cache = (key, rng)
        return self._cache[1]

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.chosen_range()
        return qparams_from_range(lo, hi, self.spec)

    def extra_repr(self) -> str:
        if not self.has_range:
            return f"{self.spec.short()}, histogram {self.range_method}, unobserved"
        lo, hi = self.chosen_range()
        return (f"{self.spec.short()}, histogram {self.range_method}: range=[{lo.item():.4g}, {hi.item():.4g}] "
                f"of observed [{self.min_val.item():.4g}, {self.max_val.item():.4g}]")  # fmt: skip

    def dump_fields(self) -> dict:
        chosen = [v.item() for v in self.chosen_range()] if self.has_range else None
        return {**super().dump_fields(), "range_method": self.range_method, "chosen_range": chosen}
