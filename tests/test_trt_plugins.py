"""TensorRT plugin definitions, checked without TensorRT.

* Contract: for every deploykit node an exported (or calibrated) model holds, the plugin
  registered under its name (read from ``plugins/<op>/trt_plugin.py`` with ``ast``, no import)
  lives in the node's namespace, takes as many tensors as the node has inputs, and declares
  exactly the node's attributes with matching types (the parser hands node attributes to
  the plugin by name). Every registered plugin has autotune, aot_impl and impl with the
  same parameters.
* AOT: importing the plugin modules against a recording stand-in for ``tensorrt.plugin``
  (tests/qdp_stub.py) and calling ``aot_impl`` yields PTX for the requested GPU, a launch
  grid and extra int32 arguments that match the kernel's launch contract.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import qdp_stub  # noqa: E402

from deploykit.plugins import DOMAIN, INT8_FORMS, PLUGIN_NAMESPACE  # noqa: E402

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins"
MODULES = {"neighborhood_attention": "deploykit.plugins.neighborhood_attention.trt_plugin",
           "linear_attention": "deploykit.plugins.linear_attention.trt_plugin"}
# ONNX attribute type -> the annotation a QDP attribute must carry to receive it
ANNOTATIONS = {onnx.AttributeProto.INT: "int", onnx.AttributeProto.FLOAT: "float",
               onnx.AttributeProto.STRING: "str", onnx.AttributeProto.INTS: "npt.NDArray[np.int32]",
               onnx.AttributeProto.FLOATS: "npt.NDArray[np.float32]"}
PARSER_ATTRIBUTES = {"plugin_namespace", "plugin_version", "aot"}   # read by TensorRT's parser itself


def definitions() -> dict[str, dict[str, dict]]:
    """{kind: {"ns::Op": {"params": [(name, annotation)], "file": path}}} from the plugin sources."""
    out: dict[str, dict[str, dict]] = {"register": {}, "autotune": {}, "aot_impl": {}, "impl": {}}
    for folder in MODULES:
        path = PLUGIN_DIR / folder / "trt_plugin.py"
        tree = ast.parse(path.read_text())
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef):
                continue
            for dec in fn.decorator_list:
                if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr in out
                        and isinstance(dec.args[0], ast.Constant)):
                    params = [(a.arg, ast.unparse(a.annotation) if a.annotation else None) for a in fn.args.args]
                    out[dec.func.attr][dec.args[0].value] = {"params": params, "file": str(path)}
    return out


@pytest.fixture(scope="module")
def exported_nodes(tmp_path_factory) -> list[onnx.NodeProto]:
    from test_plugin_int8 import exported, split

    from deploykit.quantize import QuantConfig, calibrate

    tmp = tmp_path_factory.mktemp("contract")
    nodes = []
    for kind in ("na1d", "na2d", "linear"):
        fp32 = exported(kind, tmp)
        int8 = calibrate(fp32, split(0, 16), tmp / f"{kind}.int8.onnx", QuantConfig(preset="gpu-trt")).path
        for path in (fp32, int8):
            nodes += [n for n in onnx.load(str(path)).graph.node if n.domain == DOMAIN]
    assert {n.op_type for n in nodes} == set(INT8_FORMS) | set(INT8_FORMS.values())
    return nodes


def test_registered_plugins_match_the_onnx_nodes(exported_nodes):
    defs = definitions()
    for node in exported_nodes:
        attrs = {a.name: a for a in node.attribute}
        namespace = onnx.helper.get_attribute_value(attrs["plugin_namespace"]).decode()
        key = f"{namespace}::{node.op_type}"
        assert namespace == PLUGIN_NAMESPACE and key in defs["register"], key
        params = defs["register"][key]["params"]
        tensors = [p for p, ann in params if ann == "trtp.TensorDesc"]
        plugin_attrs = {p: ann for p, ann in params if ann != "trtp.TensorDesc"}
        assert len(tensors) == len(node.input), (key, tensors, list(node.input))
        node_attrs = {name: ANNOTATIONS[a.type] for name, a in attrs.items() if name not in PARSER_ATTRIBUTES}
        assert plugin_attrs == node_attrs, key


def test_every_plugin_has_autotune_aot_and_python_impl():
    defs = definitions()
    assert set(defs["register"]) == {f"{PLUGIN_NAMESPACE}::{op}" for op in (*INT8_FORMS, *INT8_FORMS.values())}
    for key, reg in defs["register"].items():
        names = [p for p, _ in reg["params"]]
        assert [p for p, _ in defs["autotune"][key]["params"]] == names + ["outputs"], key
        assert [p for p, _ in defs["aot_impl"][key]["params"]] == names + ["outputs", "tactic"], key
        assert [p for p, _ in defs["impl"][key]["params"]] == names + ["outputs", "stream", "tactic"], key


def _na_attrs(kernel, dilation, causal, scale=0.125):
    import numpy as np

    return dict(kernel_size=np.array(kernel, np.int32), dilation=np.array(dilation, np.int32),
                is_causal=np.array(causal, np.int32), scale=scale)


def _linear_attrs(causal, decay):
    import numpy as np

    return dict(feature_map=0, is_causal=int(causal), normalize=1, decay=np.array(decay, np.float32),
                chunk_size=64, eps=1e-6)


@pytest.mark.parametrize("op,shape,attrs,int8", [
    ("NeighborhoodAttention1D", (2, 4, "N", 64), _na_attrs([7], [2], [0]), False),
    ("NeighborhoodAttention2D", (2, 4, "X", "Y", 32), _na_attrs([3, 5], [1, 2], [0, 1]), False),
    ("NeighborhoodAttention1DInt8", (2, 4, "N", 64), _na_attrs([9], [1], [1]), True),
    ("LinearAttention", (2, 4, "N", 64), _linear_attrs(True, [0.9, 0.8, 0.7, 0.6]), False),
    ("LinearAttention", (2, 4, "N", 64), _linear_attrs(False, [1.0]), False),
    ("LinearAttentionInt8", (2, 4, "N", 64), _linear_attrs(True, [0.95]), True),
])
def test_aot_impl_returns_ptx_grid_and_arguments(monkeypatch, op, shape, attrs, int8):
    from deploykit.plugins.linear_attention import triton_kernel as lk
    from deploykit.plugins.neighborhood_attention import triton_kernel as nk

    pytest.importorskip("triton", reason="the AOT implementation compiles Triton kernels")
    registry = qdp_stub.import_plugins(monkeypatch, *MODULES.values())
    monkeypatch.setenv("DEPLOYKIT_CUDA_CC", "87")              # Jetson Orin: built for without its GPU
    dtype = qdp_stub.DataType.INT8 if int8 else qdp_stub.DataType.HALF
    q = qdp_stub.TensorDesc(dtype, shape)
    mask = qdp_stub.TensorDesc(qdp_stub.DataType.BOOL, shape[:1] + shape[2:-1])
    tensors = [q, q.like(), q.like(), mask]
    if int8:
        tensors += [qdp_stub.TensorDesc(qdp_stub.DataType.FLOAT, ()) for _ in range(4)]
    key = f"{PLUGIN_NAMESPACE}::{op}"
    out = registry["register"][key](*tensors, **attrs)
    assert [qdp_stub.value(d) for d in out.shape_expr] == list(shape) and out.dtype == dtype
    combos = registry["autotune"][key](*tensors, **attrs, outputs=(out,))
    tactic = combos[0].tactic_ids[0]
    assert combos[0].positions[3] == "BOOL" and len(combos[0].positions) == len(tensors) + 1
    name, ptx, params, extra = registry["aot_impl"][key](*tensors, **attrs, outputs=(out,), tactic=tactic)
    text = ptx.decode()
    assert f".entry {name.decode()}" in text and ".target sm_87" in text
    assert ".version 8.0" in text                   # loads on CUDA 12.0+ drivers, not only the newest
    assert params.block_x in (128, 256) and params.shared_mem >= 0
    # B, H and the sequence (or grid) axes, between the input and output pointers
    assert [qdp_stub.value(e.expr) for e in extra] == list(shape[:-1])
    if op.startswith("Linear"):
        t = lk.TACTICS[tactic - 1]
        assert qdp_stub.value(params.grid_x) == (64 + t.block_dv - 1) // t.block_dv * 2 * 4
    else:                      # query tiles x dilation groups on x (symbolic), heads on y, batch on z
        assert not params.grid_x.is_constant                          # grows with the sequence / grid
        assert (qdp_stub.value(params.grid_y), qdp_stub.value(params.grid_z)) == (4, 2)
        grid = nk.launch_grid(len(shape) - 3, 2, 4, *[37] * (len(shape) - 3), block_m=nk.TACTICS[tactic - 1][0],
                              dilation=[int(d) for d in attrs["dilation"]])
        assert grid[1:] == (4, 2) and grid[0] >= 1


def test_aot_falls_back_to_a_tactic_within_default_shared_memory(monkeypatch):
    """fp32 at head dim 128 with 64-key chunks needs more than the 48 KiB any launcher grants
    without opting in: the plugin compiles the next tactic that fits, and grids for it."""
    from deploykit.plugins.neighborhood_attention import triton_kernel as nk
    from deploykit.plugins.trt_common import DEFAULT_SHARED_LIMIT

    pytest.importorskip("triton", reason="the AOT implementation compiles Triton kernels")
    registry = qdp_stub.import_plugins(monkeypatch, *MODULES.values())
    monkeypatch.setenv("DEPLOYKIT_CUDA_CC", "86")
    q = qdp_stub.TensorDesc(qdp_stub.DataType.FLOAT, (1, 2, 300, 128))
    mask = qdp_stub.TensorDesc(qdp_stub.DataType.BOOL, (1, 300))
    first = nk.TACTICS[0]
    too_big = nk.compile_kernel(1, "fp32", kernel_size=7, dilation=1, is_causal=False, scale=0.1, head_dim=128,
                                head_dim_v=128, has_mask=True, cc=86, block_m=first.block_m, block_n=first.block_n,
                                num_warps=first.num_warps, num_stages=first.num_stages)
    assert too_big.metadata.shared > DEFAULT_SHARED_LIMIT
    name, ptx, params, _ = registry["aot_impl"]["deploykit::NeighborhoodAttention1D"](
        q, q.like(), q.like(), mask, outputs=(q.like(),), tactic=1, **_na_attrs([7], [1], [0]))
    assert params.shared_mem <= DEFAULT_SHARED_LIMIT and b".target sm_86" in ptx
    assert qdp_stub.value(params.grid_x) in {-(-300 // t.block_m) for t in nk.TACTICS}   # gridded for its tile


@pytest.mark.parametrize("cc", [80, 86, 87, 89, 90])
def test_aot_impl_targets_every_supported_gpu(monkeypatch, cc):
    """The plugin's own aot_impl (not only the kernel module) emits PTX for each target:
    A100 / A10-class / Jetson Orin / Ada / Hopper."""
    pytest.importorskip("triton", reason="the AOT implementation compiles Triton kernels")
    registry = qdp_stub.import_plugins(monkeypatch, *MODULES.values())
    monkeypatch.setenv("DEPLOYKIT_CUDA_CC", str(cc))
    q = qdp_stub.TensorDesc(qdp_stub.DataType.HALF, (1, 2, "N", 64))
    mask = qdp_stub.TensorDesc(qdp_stub.DataType.BOOL, (1, "N"))
    name, ptx, params, _ = registry["aot_impl"]["deploykit::NeighborhoodAttention1D"](
        q, q.like(), q.like(), mask, outputs=(q.like(),), tactic=1, **_na_attrs([7], [1], [0]))
    assert f".target sm_{cc}".encode() in ptx and b".entry " + name in ptx
