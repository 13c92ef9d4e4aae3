"""Cross-backend verification pieces: SNR, threshold rules over variant@backend, backend choice,
the exclusion heuristic."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from deploykit.errors import UserError
from deploykit.verify import (choose_backends, classification_metrics, embedding_metrics, evaluate_checks, snr_db,
                              suggest_exclusions)


def test_snr_matches_its_definition_and_is_null_when_exact():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((16, 8))
    noise = 0.01 * rng.standard_normal((16, 8))
    expected = 10 * np.log10(np.sum(ref ** 2) / np.sum(noise ** 2))
    assert snr_db(ref, ref + noise) == pytest.approx(expected, rel=1e-12)
    assert snr_db(ref, ref) is None
    assert embedding_metrics(ref, ref + noise)[0]["snr_db"] == pytest.approx(expected, rel=1e-12)
    assert classification_metrics(ref, ref, None)[0]["snr_db"] is None


def test_rules_apply_per_backend_and_a_rule_with_nothing_to_check_fails():
    parity = {"fp32@torch": {"cosine_min": 1.0, "snr_db": None, "max_abs_diff": 0.0},
              "fp32@ort-cpu": {"cosine_min": 0.999999, "snr_db": 120.0},
              "int8@ort-cpu": {"cosine_mean": 0.97, "snr_db": 18.0},
              "int8@tensorrt": {"cosine_mean": 0.95, "snr_db": 15.0}}
    checks = evaluate_checks({"int8.cosine_mean": ">= 0.96", "fp32.cosine_min": ">= 0.99999",
                              "int8@tensorrt.snr_db": "> 10", "fp32@torch.snr_db": ">= 200",
                              "fp16.cosine_mean": ">= 0.9"}, parity)
    by_check = {c["check"]: c["passed"] for c in checks}
    assert by_check == {"int8@ort-cpu.cosine_mean": True, "int8@tensorrt.cosine_mean": False,
                        "fp32@ort-cpu.cosine_min": True,            # torch is the reference, not checked
                        "int8@tensorrt.snr_db": True,
                        "fp32@torch.snr_db": True,                  # identical outputs: infinite SNR
                        "fp16.cosine_mean": False}                  # no result: a gate must not pass by absence
    assert next(c for c in checks if c["check"] == "fp16.cosine_mean")["value"] is None


def test_backends_auto_runs_what_is_usable_and_names_the_rest():
    run, skipped = choose_backends(["auto"])
    assert run[:2] == ["torch", "ort-cpu"]
    assert set(run) | set(skipped) == {"torch", "ort-cpu", "ort-cuda", "tensorrt"}
    assert all(reason for reason in skipped.values())
    with pytest.raises(UserError, match="unknown backend"):
        choose_backends(["ort-gpu"])


def test_exclusions_pick_the_nodes_that_stand_out():
    errors = [SimpleNamespace(node=f"n{i}", added_snr_db=snr) for i, snr in enumerate([40, 41, 39, 12, 42, 30, 38])]
    assert suggest_exclusions(errors) == ["n3", "n5"]          # 6 dB or more below the median (39)
    flat = [SimpleNamespace(node=f"n{i}", added_snr_db=30.0 + 0.1 * i) for i in range(5)]
    assert suggest_exclusions(flat) == ["n0"]                  # none stands out: the worst one
    assert suggest_exclusions([]) == []


def test_a_tensorrt_stub_is_a_skipped_backend_not_a_crash(monkeypatch):
    """PyPI's `tensorrt` placeholder imports as a module: verify must skip TensorRT with the
    reason require_tensorrt gives, not pick it and fail on the first engine."""
    import importlib.util

    import deploykit.engine as engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorrt" else real(name, *a))

    def stub(where=None, plugins=True):
        raise UserError("TensorRT is not usable here: 'tensorrt' is a placeholder stub, not TensorRT", fix="install it")

    monkeypatch.setattr(engine, "require_tensorrt", stub)
    run, skipped = choose_backends(["auto"])
    assert "tensorrt" not in run and "placeholder stub" in skipped["tensorrt"]
