"""Transform settings are checked by kind before any model is touched: a value of the wrong
type is one line naming the transform, the setting and the kind it takes (exit 2 through the
CLI), never a ``float()``/``int()`` traceback from deep inside the transform."""

from __future__ import annotations

import pytest

from contract import assert_user_error, deploykit
from deploykit.errors import UserError
from deploykit.recipes.transforms import KINDS, TRANSFORMS, check_transforms

# A value each kind takes and one it refuses (a string is right only for "str").
GOOD = {"number": 0.5, "int": 3, "bool": True, "str": "mlp", "ints": [3, 3], "bools": [True, False],
        "numbers": [0.9, 0.99], "any": {"0": [1]}}
BAD = {"number": "abc", "int": 2.5, "bool": "yes", "str": 3, "ints": "x", "bools": 1, "numbers": [0.9, "x"]}

SETTINGS = [(name, key, kind) for name, (_, kinds) in TRANSFORMS.items() for key, kind in kinds.items()]


def test_every_setting_has_a_known_kind():
    assert len(SETTINGS) > 20                   # the registry really was read (all three modules)
    assert {kind.rstrip("?") for _, _, kind in SETTINGS} <= set(KINDS)


@pytest.mark.parametrize("name,key,kind", [s for s in SETTINGS if s[2].rstrip("?") != "any"])
def test_a_setting_of_the_wrong_kind_is_refused(name, key, kind):
    with pytest.raises(UserError) as caught:
        check_transforms([{"name": name, key: BAD[kind.rstrip("?")]}], "recipe.yaml")
    message = str(caught.value)
    assert f"'{name}'" in message and f"setting {key}" in message and caught.value.path == "recipe.yaml"
    assert caught.value.fix and key in caught.value.fix


@pytest.mark.parametrize("name,key,kind", SETTINGS)
def test_a_setting_of_its_kind_passes(name, key, kind):
    assert check_transforms([{"name": name, key: GOOD[kind.rstrip("?")]}]) == [{"name": name,
                                                                                key: GOOD[kind.rstrip("?")]}]
    if kind.endswith("?"):                      # null is the transform's own default
        check_transforms([{"name": name, key: None}])
    else:
        with pytest.raises(UserError):
            check_transforms([{"name": name, key: None}])


def test_booleans_are_not_numbers():
    # YAML reads `alpha: yes` as True; float(True) would silently give alpha = 1.
    with pytest.raises(UserError, match="alpha"):
        check_transforms([{"name": "clipped-softmax", "alpha": True}])


def test_a_name_that_is_not_a_string_is_an_unknown_transform():
    with pytest.raises(UserError, match="unknown transform"):
        check_transforms([{"name": ["clipped-softmax"]}])


def test_the_cli_refuses_a_wrong_setting_in_one_line(tmp_path):
    proc = deploykit("export", "timm:vit_tiny_patch16_224", "-o", "m.onnx", "--option",
                     "transforms=[{name: clipped-softmax, alpha: abc}]", cwd=tmp_path, check_rc=None)
    assert_user_error(proc, "clipped-softmax", "alpha", "a number")
    assert not (tmp_path / "m.onnx").exists()
