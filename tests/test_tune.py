"""The accuracy-driven search: stops on target with the fewest float nodes it found,
respects the trial budget, reproduces itself, and the per-node error it ranks by."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from deploykit.data import DataSpec, make_splits
from deploykit.quantize import QuantConfig, SmoothQuantConfig, TuneConfig, calibrate
from deploykit.quantize.tune import criteria_score


@pytest.fixture(scope="module")
def splits(tiny_bundle):
    return make_splits(tiny_bundle, DataSpec(source="docstrings", calibration=32, evaluation=64, seed=0, tuning=48))


def _config(criteria, budget=12, alphas=(None,), methods=("percentile",)):
    return QuantConfig(smoothquant=SmoothQuantConfig(targets="all"),
                       tune=TuneConfig(enabled=True, criteria=criteria, budget=budget, alphas=list(alphas),
                                       methods=list(methods), percentiles=[99.99], samples=48))


def _grid_best_metric(tiny_onnx, splits, tmp_path, metric="cosine_mean"):
    result = calibrate(tiny_onnx, splits.calibration, tmp_path / "probe.onnx",
                       _config({metric: ">= 2.0"}, budget=1), tuning_split=splits.tuning)
    return result.tuning["trials"][0]["metrics"][metric]


def test_stops_at_the_first_configuration_that_passes(tiny_onnx, splits, tmp_path):
    result = calibrate(tiny_onnx, splits.calibration, tmp_path / "q.onnx",
                       _config({"cosine_mean": ">= 0.5"}, alphas=(None, 0.8)), tuning_split=splits.tuning)
    log = result.tuning
    assert log["met"] and log["trials_run"] == 1 and result.fallback_nodes == []
    assert log["chosen"]["trial"] == 1


def test_falls_back_worst_nodes_until_the_target_then_narrows(tiny_onnx, splits, tmp_path):
    # A target just above what full quantization reaches forces fallback; full fallback
    # (every node float) reaches cosine 1.0, so the target is reachable.
    unaided = _grid_best_metric(tiny_onnx, splits, tmp_path)
    target = unaided + (1.0 - unaided) * 0.5
    result = calibrate(tiny_onnx, splits.calibration, tmp_path / "q.onnx",
                       _config({"cosine_mean": f">= {target:.8f}"}, budget=30), tuning_split=splits.tuning)
    log = result.tuning
    assert log["met"], log["trials"]
    trials = log["trials"]
    fallback = [t for t in trials if t["phase"] == "fallback"]
    assert fallback and fallback[0]["float_node_count"] == 1
    passing = [t["float_node_count"] for t in trials if t["passed"]]
    failing = [t["float_node_count"] for t in fallback if not t["passed"]]
    assert len(result.fallback_nodes) == min(passing)
    # no tested count between the best failing and the chosen one is left unexplored
    assert all(k < min(passing) for k in failing) or min(passing) - max(k for k in failing if k < min(passing)) == 1
    # fallback order is the per-node ranking, worst first
    ranking = [r["node"] for r in log["ranking"]]
    assert result.fallback_nodes == ranking[: len(result.fallback_nodes)]
    model = onnx.load(str(result.path))
    producers = {o: n for n in model.graph.node for o in n.output}
    for name in result.fallback_nodes:
        node = next(n for n in model.graph.node if n.name == name)
        assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)


def test_budget_is_respected_and_best_trial_is_kept(tiny_onnx, splits, tmp_path):
    result = calibrate(tiny_onnx, splits.calibration, tmp_path / "q.onnx",
                       _config({"cosine_mean": ">= 1.5"}, budget=3, alphas=(None, 0.8)), tuning_split=splits.tuning)
    log = result.tuning
    assert log["trials_run"] == 3 and not log["met"]
    # the chosen trial has the best score (scores are logged rounded, so compare values, not indices)
    assert log["chosen"]["score"] == max(t["score"] for t in log["trials"])


def test_tuning_is_reproducible(tiny_onnx, splits, tmp_path):
    config = _config({"cosine_mean": ">= 0.9999", "nn_agreement": ">= 0.99"}, budget=6, alphas=(None, 0.8),
                     methods=("percentile", "mse"))
    a = calibrate(tiny_onnx, splits.calibration, tmp_path / "a.onnx", config, tuning_split=splits.tuning)
    b = calibrate(tiny_onnx, splits.calibration, tmp_path / "b.onnx", config, tuning_split=splits.tuning)
    strip = lambda log: [{k: v for k, v in t.items() if k != "seconds"} for t in log["trials"]]  # noqa: E731
    assert strip(a.tuning) == strip(b.tuning)
    ia = {i.name: i.SerializeToString() for i in onnx.load(str(a.path)).graph.initializer}
    ib = {i.name: i.SerializeToString() for i in onnx.load(str(b.path)).graph.initializer}
    assert ia == ib
    ranges = json.loads(a.ranges_path.read_text())
    assert ranges["config"]["method"] == a.config.method and ranges["float_nodes"] == a.float_nodes


def test_criteria_score():
    ok, score = criteria_score({"cosine_mean": 0.996, "nn_agreement": 0.94},
                               {"cosine_mean": ">= 0.995", "nn_agreement": ">= 0.95"})
    assert not ok and score == pytest.approx((0.94 - 0.95) / 0.05)
    ok, score = criteria_score({"cosine_mean": 0.999}, {"cosine_mean": ">= 0.995"})
    assert ok and score == pytest.approx(0.8)
    assert criteria_score({}, {"cosine_mean": ">= 0.9"}) == (False, -np.inf)
