"""Range calibrators on synthetic tensors with known ranges (numpy only, fast)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from deploykit.calib.calibrators import (
    METHODS,
    CalibrationConfig,
    RangeCollector,
    TensorRange,
    _entropy_kl,
)
from deploykit.errors import UserError

F32_MIN = float(np.finfo(np.float32).min)  # the attention-mask fill value, about -3.4e38


def calibrate(cfg: CalibrationConfig, batches, name: str = "t") -> tuple[TensorRange, RangeCollector]:
    col = RangeCollector(cfg)
    for b in batches:
        col.observe(name, b)
    if col.needs_second_pass:
        for b in batches:
            col.observe_second(name, b)
    return col.compute()[name], col


def with_bad_values(clean: np.ndarray) -> np.ndarray:
    """``clean`` (flat) with inf, -inf, NaN and float32-min sentinels inserted among the data."""
    bad = np.array([np.inf, -np.inf, np.nan, F32_MIN, np.nan, F32_MIN], dtype=clean.dtype)
    positions = np.array([0, 7, 500, 1234, 1234, clean.size])
    return np.insert(clean, positions, bad)


# -- minmax ---------------------------------------------------------------------------------

def test_minmax_recovers_exact_extremes():
    rng = np.random.default_rng(1)
    x = rng.uniform(-2.0, 5.0, size=(3, 17, 40)).astype(np.float32)
    x[1, 3, 5] = -2.5
    x[2, 16, 0] = 7.25

    r, _ = calibrate(CalibrationConfig("minmax", symmetric=False), [x])
    assert (r.lo, r.hi, r.min, r.max) == (-2.5, 7.25, -2.5, 7.25)
    assert r.count == x.size and r.nonfinite == 0 and r.sentinel == 0 and not r.masked

    r, _ = calibrate(CalibrationConfig("minmax", symmetric=True), [x])
    assert (r.lo, r.hi, r.min, r.max) == (-7.25, 7.25, -2.5, 7.25)


def test_asymmetric_ranges_always_contain_zero():
    x = np.linspace(1.0, 3.0, 1001)  # strictly positive data
    for method in METHODS:
        # MSE may clip a sliver of a uniform distribution (finer steps beat the lost tail):
        # a few bins, so 1% of the range; the other methods keep absmax to one bin.
        tol = 0.03 if method == "mse" else 3.0 / 2048
        r, _ = calibrate(CalibrationConfig(method, symmetric=False, percentile=100.0), [x])
        assert r.lo == 0.0 and r.hi == pytest.approx(3.0, abs=tol), method
        r, _ = calibrate(CalibrationConfig(method, symmetric=False, percentile=100.0), [-x])
        assert r.hi == 0.0 and r.lo == pytest.approx(-3.0, abs=tol), method


# -- NaN / inf / attention-mask sentinels ----------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_nonfinite_and_sentinels_are_excluded(method, symmetric):
    rng = np.random.default_rng(2)
    clean = (rng.standard_normal(5000) * 1.5 + 0.3).astype(np.float32)
    dirty = with_bad_values(clean)
    cfg = CalibrationConfig(method, symmetric=symmetric)

    rc, col_clean = calibrate(cfg, [clean])
    rd, col_dirty = calibrate(cfg, [dirty.reshape(2, -1)])  # no exception on any method

    assert (rd.count, rd.nonfinite, rd.sentinel) == (clean.size, 4, 2)
    assert rd.masked and not rc.masked
    # Bad values are dropped before any statistic, so everything else matches exactly.
    assert (rd.lo, rd.hi, rd.min, rd.max) == (rc.lo, rc.hi, rc.min, rc.max)
    assert (rd.min, rd.max) == (float(clean.min()), float(clean.max()))
    if method != "minmax":
        np.testing.assert_array_equal(col_dirty.histogram("t"), col_clean.histogram("t"))
    assert all(math.isfinite(v) for v in (rd.lo, rd.hi))


@pytest.mark.parametrize("method", METHODS)
def test_all_sentinel_tensor_gives_zeros_and_masked(method):
    mask = np.array([[F32_MIN, -np.inf], [np.nan, F32_MIN]], dtype=np.float32)
    r, _ = calibrate(CalibrationConfig(method), [mask, mask])
    assert (r.lo, r.hi, r.min, r.max, r.count) == (0.0, 0.0, 0.0, 0.0, 0)
    assert (r.nonfinite, r.sentinel) == (4, 4)
    assert r.masked
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["masked"] is True and d["lo"] == 0.0 and math.copysign(1.0, d["lo"]) == 1.0


def test_custom_sentinel_threshold():
    x = np.array([-1e4, -2.0, 3.0, 5e3], dtype=np.float32)
    r, _ = calibrate(CalibrationConfig("minmax", symmetric=False, sentinel_abs=1e3), [x])
    assert (r.lo, r.hi, r.count, r.sentinel) == (-2.0, 3.0, 2, 2)


# -- percentile -------------------------------------------------------------------------------

def test_percentile_matches_numpy_on_normal_sample():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(1_000_000)
    ax = np.abs(x)
    absmax = float(ax.max())
    width = absmax / 2048

    r, _ = calibrate(CalibrationConfig("percentile", percentile=99.99), [x])
    t = r.hi
    assert r.lo == -t
    # T is the upper edge of the bin holding the first |x| at which the cumulative count
    # reaches 99.99%, i.e. numpy's "inverted_cdf" percentile; that value lies inside that
    # bin, so 0 <= T - q <= one bin width (the histogram's resolution).
    q_inv = float(np.percentile(ax, 99.99, method="inverted_cdf"))
    assert 0.0 <= t - q_inv <= width * (1 + 1e-9)
    # numpy's default (linear) interpolates between that order statistic and the next one,
    # so it can add at most the spacing to the next value: tolerance max(bin, spacing).
    q_lin = float(np.percentile(ax, 99.99))
    s = np.sort(ax)
    j = int(np.searchsorted(s, q_inv))
    spacing = float(s[j + 1] - s[j])
    assert abs(t - q_lin) <= max(width, spacing) * (1 + 1e-9)
    assert 3.7 < t < 4.0  # sanity: the 99.99% point of |N(0,1)| is 3.89

    r100, _ = calibrate(CalibrationConfig("percentile", percentile=100.0), [x])
    assert r100.hi == pytest.approx(absmax, abs=width)
    assert r100.hi == absmax  # the last bin's upper edge is absmax itself


# -- entropy ------------------------------------------------------------------------------------

def test_entropy_clips_outliers_of_gaussian():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(200_000), [32.0, -32.0, 32.0, -32.0, 32.0]])
    r, _ = calibrate(CalibrationConfig("entropy"), [x])
    t = r.hi
    # absmax is 32; the search starts at 128 of 2048 bins (T >= 2), and keeping the outliers
    # would mean T = 32. Five outliers in 200k values are worth far less than resolving the
    # bulk, so T must sit near the bulk's edge: above 3 sigma (clips < 0.3% of the Gaussian)
    # and below absmax / 4 (the outliers are clipped).
    assert 3.0 < t < 8.0
    assert r.lo == -t


def test_entropy_keeps_full_range_on_uniform_data():
    rng = np.random.default_rng(5)
    x = rng.uniform(-1.0, 1.0, 200_000)
    absmax = float(np.abs(x).max())
    r, _ = calibrate(CalibrationConfig("entropy"), [x])
    # A flat histogram has no tail: clipping at 95% puts 5% of the mass into one bin that Q
    # spreads over its ~15-bin group (KL ~ 0.05 * ln 15 ~ 0.13), while no clipping costs only
    # the sampling noise (~(2048 - 128) / (2 * 200k) ~ 0.005). So T stays within 5% of absmax.
    assert 0.95 * absmax <= r.hi <= absmax


def _reference_kl(hist: np.ndarray, levels: int, eps: float = 1e-10) -> np.ndarray:
    """The KL search written out plainly, one candidate at a time."""
    h = hist.astype(np.float64)
    out = []
    for i in range(levels, h.size + 1):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        sliced = h[:i]
        width = i // levels
        q = np.zeros(i)
        for g in range(levels):
            a, b = g * width, (g + 1) * width if g < levels - 1 else i
            nz = p[a:b] > 0
            if nz.sum():
                q[a:b][nz] = sliced[a:b].sum() / nz.sum()
        pn = p / p.sum()
        qn = q / q.sum() if q.sum() else q
        qn[(qn == 0) & (pn > 0)] = eps
        m = pn > 0
        out.append(float(np.sum(pn[m] * np.log(pn[m] / qn[m]))))
    return np.array(out)


@pytest.mark.parametrize("case", ["gaussian", "sparse"])
def test_vectorised_kl_matches_plain_loop(case):
    rng = np.random.default_rng(6)
    if case == "gaussian":
        hist = np.bincount(np.minimum((np.abs(rng.standard_normal(50_000)) / 5 * 300).astype(int), 299),
                           minlength=300)
    else:  # many empty bins, and tail mass landing where the clipped bin is empty
        hist = np.zeros(300, dtype=np.int64)
        hist[rng.integers(0, 120, 40)] += rng.integers(1, 50, 40)
        hist[[150, 299]] = [3, 1]
    levels = 16
    fast = _entropy_kl(hist, levels)
    slow = _reference_kl(hist, levels)
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)
    assert int(np.argmin(fast)) == int(np.argmin(slow))


def test_entropy_compute_is_fast():
    rng = np.random.default_rng(7)
    x = rng.standard_normal(100_000)
    col = RangeCollector(CalibrationConfig("entropy"))
    col.observe("t", x)
    col.observe_second("t", x)
    t0 = time.perf_counter()
    col.compute()
    assert time.perf_counter() - t0 < 0.5


# -- streaming, determinism ---------------------------------------------------------------------

# running-minmax is a moving average of per-batch extremes: batch order matters by design
# (tested in test_attention_recipes.py against the EMA formula).
@pytest.mark.parametrize("method", [m for m in METHODS if m != "running-minmax"])
def test_batch_split_and_order_do_not_matter(method):
    rng = np.random.default_rng(8)
    data = with_bad_values(rng.standard_normal(30_000).astype(np.float32) * 2.0 - 0.5)
    cuts = [1, 2, 1000, 1001, 9000, 25_000]  # 7 uneven batches, two of size 1
    batches = np.split(data, cuts)
    assert len(batches) == 7
    for symmetric in (True, False):
        cfg = CalibrationConfig(method, symmetric=symmetric)
        whole, col1 = calibrate(cfg, [data])
        split, col7 = calibrate(cfg, batches)
        rev, colr = calibrate(cfg, batches[::-1])
        assert whole == split == rev
        if method not in ("minmax", "running-minmax"):
            np.testing.assert_array_equal(col1.histogram("t"), col7.histogram("t"))
            np.testing.assert_array_equal(col1.histogram("t"), colr.histogram("t"))


def test_bit_for_bit_reproducible_and_sorted():
    rng = np.random.default_rng(9)
    tensors = {name: rng.standard_normal((4, 64)) * s for name, s in [("z", 3.0), ("a", 0.1), ("m", 7.0)]}

    def run(method):
        col = RangeCollector(CalibrationConfig(method))
        for name, arr in tensors.items():
            col.observe(name, arr)
        for name, arr in tensors.items():
            col.observe_second(name, arr)
        return col.compute()

    for method in METHODS:
        a, b = run(method), run(method)
        assert list(a) == ["a", "m", "z"]
        fields = ("lo", "hi", "min", "max")
        assert [[getattr(a[k], f).hex() for f in fields] for k in a] == \
               [[getattr(b[k], f).hex() for f in fields] for k in b]
        assert [r.to_dict() for r in a.values()] == [r.to_dict() for r in b.values()]


def test_histogram_methods_need_the_second_pass():
    col = RangeCollector(CalibrationConfig("percentile"))
    assert col.needs_second_pass and not RangeCollector(CalibrationConfig("minmax")).needs_second_pass
    col.observe("t", np.arange(10.0))
    with pytest.raises(RuntimeError, match="observe_second"):
        col.compute()


# -- configuration errors -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"method": "foo"},
    {"method": "MinMax"},
    {"percentile": 0.0},
    {"percentile": -1.0},
    {"percentile": 100.5},
    {"percentile": float("nan")},
    {"num_bins": 0},
    {"method": "entropy", "num_bins": 64, "num_quant_levels": 128},
    {"sentinel_abs": 0.0},
])
def test_bad_config_raises_user_error(kwargs):
    with pytest.raises(UserError):
        CalibrationConfig(**kwargs)


def test_unknown_method_message_names_the_fix():
    with pytest.raises(UserError) as exc:
        CalibrationConfig(method="foo")
    assert "'foo'" in str(exc.value) and "minmax, percentile, entropy" in str(exc.value)


# -- MSE ---------------------------------------------------------------------------------------

def _brute_force_mse(x: np.ndarray, t: float) -> float:
    """Actual squared error of symmetric int8 fake-quantization with threshold t."""
    step = t / 127.0
    q = np.clip(np.round(x / step), -127, 127) * step
    return float(np.sum((x - q) ** 2))


@pytest.mark.parametrize("kind", ["gaussian+3 outliers", "laplace"])
def test_mse_threshold_matches_brute_force(kind):
    rng = np.random.default_rng(11)
    if kind == "laplace":
        x = rng.laplace(size=200_000)
    else:   # 3 far outliers cost more clipped than the coarser rounding of keeping them
        x = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0, 30.0]])
    r, _ = calibrate(CalibrationConfig("mse"), [x])
    absmax = float(np.abs(x).max())
    # The closed form uses bin centres and uniform rounding noise; compare with the real
    # fake-quantization error over a fine grid: the chosen threshold must be within 2% of
    # the best real error (the model's own error at 2048 bins is well below that).
    grid = np.linspace(absmax / 50, absmax, 500)
    best = min(_brute_force_mse(x, t) for t in grid)
    assert _brute_force_mse(x, r.hi) <= 1.02 * best
    if kind == "laplace":   # heavy tail: the optimum clips the extremes (~0.82 absmax at 200k samples)
        assert r.hi < 0.9 * absmax


def test_compute_other_methods_from_one_collection():
    rng = np.random.default_rng(5)
    batches = [rng.standard_normal(3000) * (1 + i) for i in range(3)]
    collector = RangeCollector(CalibrationConfig("percentile"))
    for b in batches:
        collector.observe("t", b)
    for b in batches:
        collector.observe_second("t", b)
    for method in METHODS:
        for symmetric in (True, False):
            cfg = CalibrationConfig(method, symmetric=symmetric, percentile=99.9)
            direct, _ = calibrate(cfg, batches)
            via = collector.compute(cfg)["t"]
            assert (via.lo, via.hi) == (direct.lo, direct.hi), (method, symmetric)
    with pytest.raises(ValueError, match="num_bins"):
        collector.compute(CalibrationConfig("mse", num_bins=512))
    minmax_only = RangeCollector(CalibrationConfig("minmax"))
    minmax_only.observe("t", batches[0])
    with pytest.raises(ValueError, match="needs histograms"):
        minmax_only.compute(CalibrationConfig("entropy"))
