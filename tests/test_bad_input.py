"""Bad input, one case per class: each ends in exit 2 with one line naming the file (or option)
and a fix, no traceback, inputs unchanged and no temporary file left behind.

The classes: text and recipe files that are not UTF-8 or not text; truncated arrays; option and
override values of the wrong type; counts of 0; a recipe whose top level is not a mapping or
whose aliases explode; a checkpoint with other tensor names or shapes; output paths that are a
folder, lie under a file, or leave the runs folder.
"""

from __future__ import annotations

import numpy as np
import pytest

from contract import assert_no_temp_files, assert_user_error, deploykit, tree_hashes


@pytest.fixture(scope="module")
def work(tiny_bert_dir, tmp_path_factory):
    """A folder with a tiny FP32 export and the bad inputs the cases use."""
    folder = tmp_path_factory.mktemp("bad-input")
    deploykit("-q", "export", str(tiny_bert_dir), "-o", "tiny.onnx", "--option", "max_length=32", cwd=folder)
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait\nsecond line\n".encode("latin-1"))
    (folder / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00binary\x00junk\n")
    (folder / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (folder / "list.yaml").write_text("- name: tiny\n- model: embedded:minilm\n")
    anchors = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
    (folder / "bomb.yaml").write_text("name: bomb\nstudy:\n  notes:\n" +
                                      "".join("    " + line + "\n" for line in anchors.splitlines()))
    good = folder / "feeds.npz"
    ids = np.ones((4, 8), dtype=np.int64)
    np.savez(good, input_ids=ids, attention_mask=ids, token_type_ids=np.zeros_like(ids))
    (folder / "truncated.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "a-folder.onnx").mkdir()
    (folder / "a-file").write_text("not a folder")
    from safetensors.torch import save_file
    import torch

    save_file({"encoder.other.weight": torch.zeros(2, 2)}, str(folder / "other.safetensors"))
    return folder


def _refused(work, tmp_path, *args, fragments):
    before = tree_hashes(work)
    tmpdir = tmp_path / "tmp"
    proc = deploykit(*args, cwd=work, check_rc=None, tmpdir=tmpdir)
    assert_user_error(proc, *fragments)
    assert tree_hashes(work) == before, "an input changed or an output appeared"
    assert_no_temp_files(work, tmpdir=tmpdir)
    return proc


# ----------------------------------------------------------------------------- files that are not text
def test_a_data_file_that_is_not_utf8(work, tmp_path):
    _refused(work, tmp_path, "calibrate", "tiny.onnx", "-o", "x.onnx", "--data", "latin1.txt",
             fragments=("latin1.txt", "UTF-8", "0xe9"))


def test_a_data_file_that_is_binary(work, tmp_path):
    _refused(work, tmp_path, "calibrate", "tiny.onnx", "-o", "x.onnx", "--data", "binary.txt",
             fragments=("binary.txt", "not a text file"))


def test_a_recipe_that_is_not_utf8(work, tmp_path):
    _refused(work, tmp_path, "run", "latin1.yaml", "--out", "runs", fragments=("latin1.yaml",))


def test_a_truncated_npz(work, tmp_path):
    _refused(work, tmp_path, "verify", "tiny.onnx", "--data", "truncated.npz", fragments=("truncated.npz",))


# ----------------------------------------------------------------------------- values of the wrong type
@pytest.mark.parametrize("value", ["abc", "1.5", "[1]"])
def test_a_model_option_of_the_wrong_type(work, tmp_path, tiny_bert_dir, value):
    _refused(work, tmp_path, "export", str(tiny_bert_dir), "-o", "x.onnx", "--option", f"max_length={value}",
             fragments=("max_length", "whole number"))


def test_an_override_that_is_not_valid_yaml(work, tmp_path):
    _refused(work, tmp_path, "run", "--set", "data.seed=[1, 2", "--out", "runs", fragments=("data.seed",))


@pytest.mark.parametrize("key", ["bench.seq_len", "verify.batch_size", "data.calibration"])
def test_a_count_of_zero(work, tmp_path, key):
    _refused(work, tmp_path, "run", "--set", f"{key}=0", "--out", "runs", fragments=(key,))


def test_a_batch_size_of_zero_on_the_command_line(work, tmp_path):
    _refused(work, tmp_path, "calibrate", "tiny.onnx", "-o", "x.onnx", "--batch-size", "0",
             fragments=("--batch-size",))


def test_zero_counts_are_refused_by_the_library_too():
    from deploykit.bench import BenchConfig
    from deploykit.data import Split
    from deploykit.errors import UserError
    from deploykit.verify import run_split

    with pytest.raises(UserError, match="seq_len"):
        BenchConfig(seq_len=0).validate()
    with pytest.raises(UserError, match="batches"):
        BenchConfig(batches=[0]).validate()
    with pytest.raises(UserError, match="batch size"):
        run_split(None, Split("x", {"a": np.zeros((2, 2))}, "0"), batch_size=0)


# ----------------------------------------------------------------------------- recipes of the wrong shape
def test_a_recipe_whose_top_level_is_a_list(work, tmp_path):
    _refused(work, tmp_path, "run", "list.yaml", "--out", "runs", fragments=("list.yaml", "mapping"))


def test_a_recipe_whose_aliases_explode(work, tmp_path):
    _refused(work, tmp_path, "run", "bomb.yaml", "--out", "runs", fragments=("bomb.yaml",))


# ----------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_with_other_tensor_names(work, tmp_path, tiny_bert_dir):
    proc = _refused(work, tmp_path, "export", str(tiny_bert_dir), "-o", "x.onnx", "--option",
                    f"checkpoint={work / 'other.safetensors'}", fragments=("other.safetensors", "does not fit"))
    assert "encoder.other.weight" in proc.stderr


def test_a_checkpoint_that_is_not_a_checkpoint(work, tmp_path, tiny_bert_dir):
    _refused(work, tmp_path, "export", str(tiny_bert_dir), "-o", "x.onnx", "--option",
             f"checkpoint={work / 'latin1.txt'}", fragments=("latin1.txt", "checkpoint"))


def test_checkpoint_shapes_are_checked_in_process(tmp_path):
    import torch

    from deploykit.errors import UserError
    from deploykit.models.weights import apply_state_dict

    module = torch.nn.Linear(3, 2)
    with pytest.raises(UserError, match=r"another shape \(weight \(2, 4\) vs \(2, 3\)\)"):
        apply_state_dict(module, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, tmp_path / "c.pt")
    apply_state_dict(module, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, tmp_path / "c.pt")
    assert float(module.weight.detach().sum()) == 6.0


# ----------------------------------------------------------------------------- output paths
def test_output_onto_an_existing_folder(work, tmp_path):
    _refused(work, tmp_path, "calibrate", "tiny.onnx", "-o", "a-folder.onnx", "--calibration", "4",
             fragments=("a-folder.onnx", "folder"))


def test_output_under_a_file(work, tmp_path):
    _refused(work, tmp_path, "calibrate", "tiny.onnx", "-o", "a-file/x.onnx", "--calibration", "4",
             fragments=("a-file",))


def test_runs_folder_that_is_a_file(work, tmp_path):
    _refused(work, tmp_path, "run", "--out", "a-file", fragments=("a-file",))


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b"])
def test_a_run_name_that_leaves_the_runs_folder(work, tmp_path, name):
    _refused(work, tmp_path, "run", "--out", "runs", "--name", name, fragments=(name,))
