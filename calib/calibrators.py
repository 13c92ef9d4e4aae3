"""Per-tensor range calibration for INT8 Q/DQ: streaming, deterministic, numpy only.

The caller runs the float model over calibration batches and hands each intermediate
activation to a :class:`RangeCollector`; :meth:`RangeCollector.compute` then returns one
:class:`TensorRange` per tensor, whose ``lo``/``hi`` feed QuantizeLinear's scale and
zero point. Five methods: ``minmax`` (observed extremes), ``running-minmax`` (a moving
average, momentum 0.9, of each batch's extremes: less sensitive to one extreme batch,
and the estimator of the outlier paper's W8A8 setting), ``percentile`` (clip a share of
the largest ``|x|``), ``entropy`` (TensorRT-style KL-divergence threshold) and ``mse``
(the threshold that minimises the expected squared quantization error: rounding noise
inside the range plus clipping error outside it). Every histogram method can be computed
from the same collected statistics (``compute(config)``), so a search over methods does
not repeat the passes.

Histogram methods take two passes over the same batches: pass 1 (``observe``) records
min/max/counts, pass 2 (``observe_second``) fills an integer histogram of ``|x|`` over the
fixed range ``[0, absmax]`` from pass 1. Every statistic is an exact min/max or an integer
count, so the result does not depend on batch order or batch size and is bit-identical
from run to run.

Sentinel rule: attention masks are built as ``(1 - mask) * torch.finfo(float32).min``
(about -3.4e38), and some graphs produce ``-inf``/NaN there. Those values are not data; a
single one would blow the range up to 1e38 (minmax) or crash a histogram (ONNX Runtime's
own percentile/entropy calibrators fail on an attention mask's ``-inf``). Here non-finite
values and values with ``|x| >= sentinel_abs`` are counted and left out of every
statistic, and the tensor is reported ``masked`` so the quantizer keeps it in float.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from deploykit.errors import UserError

METHODS = ("minmax", "running-minmax", "percentile", "entropy", "mse")
# Exponential moving average of per-batch extremes (the "running min-max" range estimator of
# Bondarenko et al. 2023 and of Qualcomm's AIMET): x_t = m * x_{t-1} + (1 - m) * batch_t.
RUNNING_MOMENTUM = 0.9

# Q's value where Q == 0 but P > 0 (normalised distributions). Only reached when the
# clipped tail lands in a group of Q with no unclipped mass.
_KL_EPS = 1e-10
# Upper bound on the elements of one (candidates x levels) block in the vectorised KL search.
_KL_BLOCK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class CalibrationConfig:
    method: str = "percentile"
    percentile: float = 99.99
    num_bins: int = 2048
    symmetric: bool = True
    num_quant_levels: int = 128
    sentinel_abs: float = 1e30

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise UserError(f"unknown calibration method {self.method!r}",
                            fix="use one of " + ", ".join(METHODS))
        if (not _is_real(self.percentile) or not math.isfinite(self.percentile)
                or not 0.0 < self.percentile <= 100.0):
            raise UserError(f"calibration percentile {self.percentile!r} is outside (0, 100]",
                            fix="use a percentage such as 99.99 (100 keeps the absolute maximum)")
        if not _is_int(self.num_bins) or self.num_bins < 1:
            raise UserError(f"calibration num_bins {self.num_bins!r} is not a positive integer",
                            fix="use e.g. 2048")
        if not _is_int(self.num_quant_levels) or self.num_quant_levels < 1:
            raise UserError(f"calibration num_quant_levels {self.num_quant_levels!r} is not a "
                            "positive integer", fix="use 128 for symmetric int8")
        if self.method == "entropy" and self.num_quant_levels > self.num_bins:
            raise UserError(f"calibration num_quant_levels ({self.num_quant_levels}) exceeds "
                            f"num_bins ({self.num_bins})",
                            fix="use more bins than quantization levels, e.g. 2048 bins, 128 levels")
        if not isinstance(self.symmetric, (bool, np.bool_)):
            raise UserError(f"calibration symmetric {self.symmetric!r} is not a boolean",
                            fix="use true or false")
        if not _is_real(self.sentinel_abs) or math.isnan(self.sentinel_abs) or self.sentinel_abs <= 0:
            raise UserError(f"calibration sentinel_abs {self.sentinel_abs!r} is not a positive number",
                            fix="use e.g. 1e30 (inf disables the sentinel rule)")


@dataclass
class TensorRange:
    name: str
    lo: float
    hi: float
    min: float
    max: float
    count: int
    nonfinite: int
    sentinel: int

    @property
    def masked(self) -> bool:
        """True when NaN/inf or sentinel values were seen: keep this tensor in float."""
        return self.nonfinite > 0 or self.sentinel > 0

    def to_dict(self) -> dict:
        return {
            "name": str(self.name),
            "lo": float(self.lo),
            "hi": float(self.hi),
            "min": float(self.min),
            "max": float(self.max),
            "count": int(self.count),
            "nonfinite": int(self.nonfinite),
            "sentinel": int(self.sentinel),
            "masked": bool(self.masked),
        }


@dataclass
class _Stats:
    min: float = math.inf
    max: float = -math.inf
    count: int = 0
    nonfinite: int = 0
    sentinel: int = 0
    count2: int = 0  # values histogrammed in pass 2 (must end equal to count)
    run_min: float | None = None   # running (EMA) min / max of per-batch extremes
    run_max: float | None = None
    hist: np.ndarray | None = field(default=None, repr=False)

    @property
    def absmax(self) -> float:
        return max(-self.min, self.max) if self.count else 0.0


class RangeCollector:
    """Collects per-tensor statistics over calibration batches and turns them into ranges.

    Call :meth:`observe` for every batch, then (if :attr:`needs_second_pass`)
    :meth:`observe_second` for the same batches, then :meth:`compute`.
    """

    def __init__(self, config: CalibrationConfig):
        if not isinstance(config, CalibrationConfig):
            raise TypeError(f"config must be a CalibrationConfig, not {type(config).__name__}")
        self.config = config
        self._stats: dict[str, _Stats] = {}
        self._second_started = False

    @property
    def needs_second_pass(self) -> bool:
        return self.config.method not in ("minmax", "running-minmax")

    def observe(self, name: str, array: np.ndarray) -> None:
        """Pass 1: min, max and counts of one batch of tensor ``name``."""
        if self._second_started:
            raise RuntimeError("observe() called after observe_second(): pass 1 must see "
                               "every batch before pass 2 starts")
        st = self._stats.setdefault(name, _Stats())
        x = _as_float64(array, name)
        good, n_nonfinite, n_sentinel = self._split(x)
        st.nonfinite += n_nonfinite
        st.sentinel += n_sentinel
        if good.size:
            st.count += int(good.size)
            lo, hi = float(good.min()), float(good.max())
            st.min = min(st.min, lo)
            st.max = max(st.max, hi)
            m = RUNNING_MOMENTUM
            st.run_min = lo if st.run_min is None else m * st.run_min + (1.0 - m) * lo
            st.run_max = hi if st.run_max is None else m * st.run_max + (1.0 - m) * hi

    def observe_second(self, name: str, array: np.ndarray) -> None:
        """Pass 2: histogram of ``|x|`` over ``[0, absmax]`` fixed by pass 1. No-op for minmax."""
        if not self.needs_second_pass:
            return
        st = self._stats.get(name)
        if st is None:
            raise ValueError(f"tensor {name!r} reached observe_second() without being seen "
                             "by observe(); feed the same arrays to both passes")
        self._second_started = True
        nb = self.config.num_bins
        if st.hist is None:
            st.hist = np.zeros(nb, dtype=np.int64)
        x = _as_float64(array, name)
        good, _, _ = self._split(x)
        if not good.size:
            return
        ax = np.abs(good)
        absmax = st.absmax
        if float(ax.max()) > absmax:
            raise ValueError(f"tensor {name!r}: pass 2 saw |x| = {float(ax.max())!r} beyond pass "
                             f"1's absmax {absmax!r}; feed the same arrays to both passes")
        st.count2 += int(ax.size)
        if absmax == 0.0:
            st.hist[0] += ax.size
            return
        # ax / absmax <= 1, so no overflow even for tiny absmax; the cast truncates (= floor).
        idx = (ax / absmax * nb).astype(np.int64)
        np.minimum(idx, nb - 1, out=idx)
        st.hist += np.bincount(idx, minlength=nb)

    def histogram(self, name: str) -> np.ndarray | None:
        """Copy of the pass-2 integer histogram of ``|x|`` (None before pass 2 / for minmax)."""
        st = self._stats[name]
        return None if st.hist is None else st.hist.copy()

    def compute(self, config: CalibrationConfig | None = None) -> dict[str, TensorRange]:
        """One :class:`TensorRange` per observed tensor, keys sorted by name.

        ``config`` computes another method (or percentile, symmetry) from the same collected
        statistics; it must use the collector's ``num_bins`` and ``sentinel_abs``, and a
        histogram method needs a collector that ran pass 2.
        """
        cfg = config or self.config
        if cfg.num_bins != self.config.num_bins or cfg.sentinel_abs != self.config.sentinel_abs:
            raise ValueError("compute(config) must keep the collector's num_bins and sentinel_abs")
        if cfg.method not in ("minmax", "running-minmax") and not self.needs_second_pass:
            raise ValueError(f"method {cfg.method!r} needs histograms; collect with a histogram method")
        out: dict[str, TensorRange] = {}
        for name in sorted(self._stats):
            st = self._stats[name]
            lo, hi = self._range(name, st, cfg)
            seen = st.count > 0
            out[name] = TensorRange(
                name=name,
                lo=_clean(lo),
                hi=_clean(hi),
                min=_clean(st.min if seen else 0.0),
                max=_clean(st.max if seen else 0.0),
                count=st.count,
                nonfinite=st.nonfinite,
                sentinel=st.sentinel,
            )
        return out

    # -- internals ---------------------------------------------------------------------

    def _split(self, x: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(finite non-sentinel values, #non-finite, #sentinel) of a flat float64 array."""
        finite = np.isfinite(x)
        n_finite = int(np.count_nonzero(finite))
        good = finite & (np.abs(x) < self.config.sentinel_abs)
        n_good = int(np.count_nonzero(good))
        values = x if n_good == x.size else x[good]
        return values, x.size - n_finite, n_finite - n_good

    def _range(self, name: str, st: _Stats, cfg: CalibrationConfig) -> tuple[float, float]:
        if st.count == 0:
            return 0.0, 0.0
        absmax = st.absmax
        if cfg.method == "minmax":
            if cfg.symmetric:
                return -absmax, absmax
            return min(st.min, 0.0), max(st.max, 0.0)
        if cfg.method == "running-minmax":
            lo, hi = float(st.run_min), float(st.run_max)
            if cfg.symmetric:
                t = max(-lo, hi)
                return -t, t
            return min(lo, 0.0), max(hi, 0.0)

        if st.count2 != st.count:
            raise RuntimeError(
                f"tensor {name!r}: pass 2 histogrammed {st.count2} values but pass 1 saw "
                f"{st.count}; method {cfg.method!r} needs observe_second() on the same batches")
        if absmax == 0.0:
            return 0.0, 0.0
        if cfg.method == "percentile":
            t = _percentile_threshold(st.hist, st.count, cfg.percentile, absmax)
        elif cfg.method == "mse":
            t = _mse_threshold(st.hist, absmax, cfg.symmetric, st.min, st.max)
        else:
            t = _entropy_threshold(st.hist, cfg.num_quant_levels, absmax)
        if cfg.symmetric:
            return -t, t
        # Clip the observed extremes to the threshold; keep 0 inside the range.
        return min(max(st.min, -t), 0.0), max(min(st.max, t), 0.0)


def _percentile_threshold(hist: np.ndarray, count: int, percentile: float, absmax: float) -> float:
    """Smallest bin upper edge where the cumulative histogram reaches ``percentile``% of count."""
    nb = hist.size
    cum = np.cumsum(hist)
    # count * p / 100 rather than count * (p / 100): exact for e.g. 1e6 values at 99.99.
    k = int(np.searchsorted(cum, count * percentile / 100.0, side="left"))
    if k >= nb - 1:
        return absmax
    return absmax * (k + 1) / nb


def mse_curve(hist: np.ndarray, absmax: float, symmetric: bool = True, lo: float | None = None,
              hi: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Expected squared error of 8-bit quantization for every threshold T = bin upper edge.

    With step d(T) (T / 127 symmetric; the clipped [max(lo, -T), min(hi, T)] over 255 steps
    otherwise), values inside the range carry rounding noise d^2 / 12 and values beyond T
    the clipping error (|x| - T)^2, with |x| taken at its bin centre. Prefix sums make all
    thresholds one O(num_bins) pass. Returns (thresholds, total squared error).
    """
    h = np.asarray(hist, dtype=np.float64)
    n = h.size
    width = absmax / n
    centres = (np.arange(n) + 0.5) * width
    thresholds = (np.arange(n) + 1) * width
    inside = np.cumsum(h)                                   # values with centre < T
    # Clipping error of bins j >= i (centre beyond T_i): sum h (c - T)^2, expanded.
    rev = lambda v: np.cumsum(v[::-1])[::-1]  # noqa: E731 - suffix sums
    s0, s1, s2 = rev(h), rev(h * centres), rev(h * centres ** 2)
    s0, s1, s2 = (np.append(v[1:], 0.0) for v in (s0, s1, s2))
    clip = s2 - 2 * thresholds * s1 + thresholds ** 2 * s0
    if symmetric:
        step = thresholds / 127.0
    else:
        low = -thresholds if lo is None else np.maximum(lo, -thresholds)
        high = thresholds if hi is None else np.minimum(hi, thresholds)
        step = (np.maximum(high, 0.0) - np.minimum(low, 0.0)) / 255.0
    return thresholds, inside * step ** 2 / 12.0 + np.maximum(clip, 0.0)


def _mse_threshold(hist: np.ndarray, absmax: float, symmetric: bool, lo: float, hi: float) -> float:
    thresholds, err = mse_curve(hist, absmax, symmetric, lo, hi)
    return float(thresholds[int(np.argmin(err))])  # first minimum on ties


def _entropy_threshold(hist: np.ndarray, num_levels: int, absmax: float) -> float:
    kl = _entropy_kl(hist, num_levels)
    i = num_levels + int(np.argmin(kl))  # first minimum on ties
    return absmax * i / hist.size


def _entropy_kl(hist: np.ndarray, num_levels: int, eps: float = _KL_EPS) -> np.ndarray:
    """KL(P || Q) for every candidate bin count i in [num_levels, num_bins] (index i - num_levels).

    For candidate i (TensorRT's calibration as in MXNet's ``_get_optimal_threshold``):
    P = hist[:i] with the clipped tail sum(hist[i:]) added to its last bin; the unclipped
    hist[:i] is merged into ``num_levels`` groups of i // num_levels bins (the remainder
    joins the last group), and each group's mass is spread evenly over the bins where P is
    non-zero, giving Q. P and Q are normalised; Q = eps where Q == 0 < P.

    Vectorised over all candidates with prefix sums: within a group Q is constant, so
    sum P log Q collapses to sum over groups of (P-mass of group) * log Q_group, and
    sum P log P comes from a prefix sum of h log h plus P's last bin.
    """
    h = np.asarray(hist, dtype=np.float64)
    n = h.size
    total = float(h.sum())
    csum = np.concatenate(([0.0], np.cumsum(h)))
    cnz = np.concatenate(([0], np.cumsum(h > 0)))
    hlogh = np.concatenate(([0.0], np.cumsum(_xlogx(h))))
    log_total = math.log(total)
    log_eps = math.log(eps)
    levels = np.arange(num_levels)

    out = np.empty(n - num_levels + 1, dtype=np.float64)
    step = max(1, _KL_BLOCK_ELEMENTS // num_levels)
    for b0 in range(num_levels, n + 1, step):
        cand = np.arange(b0, min(b0 + step, n + 1))  # candidate i values
        width = cand // num_levels
        starts = levels[None, :] * width[:, None]
        ends = starts + width[:, None]
        ends[:, -1] = cand
        gsum = csum[ends] - csum[starts]  # unclipped mass per group (Q before spreading)
        gnz = cnz[ends] - cnz[starts]     # non-zero bins of P per group
        tail = total - csum[cand]
        last = h[cand - 1]
        gnz[:, -1] += (tail > 0) & (last == 0)  # P's last bin becomes non-zero via the tail
        pmass = gsum.copy()
        pmass[:, -1] += tail
        sum_plogp = (hlogh[cand - 1] + _xlogx(last + tail)) / total - log_total
        with np.errstate(divide="ignore", invalid="ignore"):
            qval = gsum / (gnz * csum[cand][:, None])  # normalised Q on each non-zero bin
        logq = np.where(qval > 0, np.log(np.where(qval > 0, qval, 1.0)), log_eps)
        sum_plogq = (pmass * logq).sum(axis=1) / total
        out[cand - num_levels] = sum_plogp - sum_plogq
    return out


def _xlogx(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def _as_float64(array, name: str) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype.kind in "cOSUMm":
        raise TypeError(f"tensor {name!r}: cannot calibrate dtype {a.dtype}")
    return a.astype(np.float64, copy=False).reshape(-1)


def _clean(v: float) -> float:
    return float(v) + 0.0  # python float, no negative zero


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
