"""Recipe files: built-in default, validation, overrides, acceptance rules."""

from __future__ import annotations

import pytest

from deploykit.errors import UserError
from deploykit.recipe import builtin_recipes, evaluate_acceptance, load_recipe


def test_default_recipe_is_shipped_and_valid():
    assert "minilm-int8" in builtin_recipes()
    recipe = load_recipe()
    assert recipe.model.source == "embedded:minilm"
    assert recipe.data.calibration >= 256 and recipe.data.evaluation >= 1000
    assert recipe.export.opset >= 17
    assert recipe.bench.batches == [1, 8, 32] and recipe.bench.seq_len == 128
    resolved = recipe.quantize.resolved()
    assert resolved.preset == "gpu-trt" and resolved.per_channel and resolved.activation_type == "int8"
    assert resolved.activation_symmetric is True


def test_every_shipped_recipe_loads_and_resolves():
    for name, path in builtin_recipes().items():
        recipe = load_recipe(path)
        assert recipe.name == name, f"{path}: name must match the file name"
        recipe.quantize.resolved(recipe.preset())


def test_overrides_are_typed():
    recipe = load_recipe(None, ["data.evaluation=64", "bench.batches=[1, 2]", "quantize.method=entropy",
                                "quantize.percentile=99"])
    assert recipe.data.evaluation == 64 and recipe.bench.batches == [1, 2]
    assert recipe.quantize.method == "entropy" and recipe.quantize.percentile == 99.0


def test_unknown_key_names_the_file_and_the_allowed_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nquantize:\n  methd: minmax\n")
    with pytest.raises(UserError) as err:
        load_recipe(bad)
    message = str(err.value)
    assert str(bad) in message and "quantize.methd" in message and "method" in message


def test_wrong_type_and_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  evaluation: many\n")
    with pytest.raises(UserError, match="data.evaluation' must be int"):
        load_recipe(bad)
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_acceptance_rules():
    accuracy = {"int8": {"cosine_mean": 0.97}, "fp32": {"cosine_min": 0.999999}}
    results = evaluate_acceptance({"int8.cosine_mean": ">= 0.99", "fp32.cosine_min": ">= 0.99999",
                                   "int8.nn_agreement": ">= 0.5"}, accuracy)
    assert [r["passed"] for r in results] == [False, True, False]   # a missing metric fails
    with pytest.raises(UserError, match="acceptance rule"):
        load_recipe(None, ["acceptance={'int8': '>= 1'}"])
