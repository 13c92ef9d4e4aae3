"""Both attention ops in ONNX: one deploykit node each, with attributes and plugin_namespace,
plus a local function that ONNX Runtime runs; ORT must match reference.py at lengths other
than the exported one (dynamic batch and sequence).

Tolerance: fp32 through a different summation order (gather + MatMul vs einsum, chunked
vs loop): normalised outputs are O(1), so 1e-5 absolute is ~100 ulps; the unnormalised
linear-attention sums grow with N, so they are compared relatively (1e-5).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from deploykit.plugins import attach_functions
from deploykit.plugins.linear_attention import linear_attention
from deploykit.plugins.linear_attention.onnx_function import linear_attention_op
from deploykit.plugins.neighborhood_attention import neighborhood_attention
from deploykit.plugins.neighborhood_attention.onnx_function import na_op


class NA(torch.nn.Module):
    def __init__(self, *args):
        super().__init__()
        self.args = args

    def forward(self, q, k, v):
        return na_op(q, k, v, *self.args)


class Linear(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v):
        return linear_attention_op(q, k, v, **self.kwargs)


def export(module, shape, dynamic):
    import io
    import contextlib
    import warnings

    q, k, v = (torch.randn(*shape) for _ in range(3))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (q, k, v), dynamo=True, input_names=["q", "k", "v"],
                                    dynamic_shapes=(dynamic,) * 3, opset_version=18)
    model = program.model_proto
    attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_run(model, q, k, v):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})[0]


def custom_node(model):
    nodes = [n for n in model.graph.node if n.domain == "deploykit"]
    assert len(nodes) == 1, [n.op_type for n in model.graph.node]
    return nodes[0], {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}


@pytest.mark.parametrize("shape,args,lengths", [
    ((2, 3, 13, 8), (4, 2, False), [13, 30, 8]),                 # even k, dilation
    ((1, 2, 17, 16), (5, 3, True), [17, 40]),                    # causal, dilation
    ((1, 2, 9, 11, 8), ((3, 4), (2, 1), (False, True)), [(9, 11), (14, 8)]),
])
def test_neighborhood_attention_node_and_function(shape, args, lengths):
    ndim = len(shape) - 3
    dynamic = {0: "batch", 2: "n"} if ndim == 1 else {0: "batch", 2: "x", 3: "y"}
    model = export(NA(*args), shape, dynamic)
    node, attrs = custom_node(model)
    assert node.op_type == f"NeighborhoodAttention{ndim}D" and attrs["plugin_namespace"] == b"deploykit"
    kernel = args[0] if isinstance(args[0], tuple) else (args[0],)
    assert list(attrs["kernel_size"]) == list(kernel) and attrs["scale"] == pytest.approx(shape[-1] ** -0.5)
    assert {f.name for f in model.functions} >= {node.op_type, "AxisWindow", "AttendNeighbours"}
    for length in lengths:
        spatial = length if isinstance(length, tuple) else (length,)
        q, k, v = (torch.randn(2, shape[1], *spatial, shape[-1]) for _ in range(3))
        expected = neighborhood_attention(q, k, v, *args).numpy()
        np.testing.assert_allclose(ort_run(model, q, k, v), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    {},
    {"causal": True, "chunk_size": 16},
    {"causal": True, "decay": [0.9, 0.99, 0.5], "chunk_size": 16, "feature": "relu"},
    {"causal": True, "normalize": False, "feature": "sigmoid", "chunk_size": 8},
])
def test_linear_attention_node_and_function(kwargs):
    model = export(Linear(**kwargs), (2, 3, 40, 8), {0: "batch", 2: "n"})
    node, attrs = custom_node(model)
    assert node.op_type == "LinearAttention" and attrs["plugin_namespace"] == b"deploykit"
    assert {f.name for f in model.functions} == {"LinearAttention", "FeatureMap"}   # only what it calls
    assert attrs["is_causal"] == int(kwargs.get("causal", False))
    for n in (40, 1, 17, 77):                     # below, at and across chunk boundaries
        q, k, v = (torch.randn(2, 3, n, 8) for _ in range(3))
        expected = linear_attention(q, k, v, **kwargs).numpy()
        got = ort_run(model, q, k, v)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 if kwargs.get("normalize", True) else 1e-4)


def test_export_onnx_attaches_the_functions(tmp_path):
    """Through deploykit's own exporter: functions attached, metadata lists the custom ops."""
    from deploykit.export import export_onnx
    from deploykit.models.base import ImagePreprocessor, ModelBundle
    from deploykit.onnx_utils import get_metadata

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 24)

        def forward(self, pixel_values):
            b = pixel_values.shape[0]
            x = self.proj(pixel_values.reshape(b, 1, 16, 4))                 # (B, 1, 16, 24)
            q, k, v = x.reshape(b, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)       # (B, 2, 16, 4) each
            return na_op(q, k, v, 5).mean(dim=(1, 2))

    bundle = ModelBundle(source="test", name="tiny", task="image-classification", module=Tiny().eval(),
                         input_names=["pixel_values"], output_name="logits",
                         dynamic_axes={"pixel_values": {0: "batch"}},
                         preprocessor=ImagePreprocessor(img_size=8, in_chans=1, mean=(0.5,), std=(0.5,)))
    result = export_onnx(bundle, tmp_path / "tiny.onnx")
    model = onnx.load(str(tmp_path / "tiny.onnx"))
    assert get_metadata(model)["custom_ops"] == ["NeighborhoodAttention1D"]
    assert any(f.name == "NeighborhoodAttention1D" for f in model.functions)
    assert result.parity["max_abs_diff"] < 1e-5


class Masked(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v, key_mask):
        return self.fn(q, k, v, key_mask)


def test_key_mask_input_matches_reference():
    import contextlib
    import io
    import warnings

    import onnxruntime as ort

    fns = {
        "na1d": (lambda q, k, v, m: na_op(q, k, v, 3, 1, False, key_mask=m),
                 lambda q, k, v, m: neighborhood_attention(q, k, v, 3, key_mask=m)),
        "na1d-dilated": (lambda q, k, v, m: na_op(q, k, v, 3, 2, False, key_mask=m),
                         lambda q, k, v, m: neighborhood_attention(q, k, v, 3, 2, key_mask=m)),
        "linear": (lambda q, k, v, m: linear_attention_op(q, k, v, causal=True, chunk_size=4, key_mask=m),
                   lambda q, k, v, m: linear_attention(q, k, v, causal=True, chunk_size=4, key_mask=m)),
        "linear-noncausal": (lambda q, k, v, m: linear_attention_op(q, k, v, key_mask=m),
                             lambda q, k, v, m: linear_attention(q, k, v, key_mask=m)),
    }
    for name, (op_fn, ref_fn) in fns.items():
        q, k, v = (torch.randn(2, 2, 12, 4) for _ in range(3))
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[1, 5:] = False          # query 10's whole window [9, 11] is padding: it outputs zeros
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(Masked(op_fn), (q, k, v, mask), dynamo=True,
                                        input_names=["q", "k", "v", "key_mask"], opset_version=18,
                                        dynamic_shapes=({0: "b", 2: "n"},) * 3 + ({0: "b", 1: "n"},))
        model = program.model_proto
        attach_functions(model)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "key_mask": mask.numpy()})[0]
        expected = ref_fn(q, k, v, mask).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        if name == "na1d":
            assert np.all(got[1, :, 10] == 0)
            # A batch shorter than the window (2 < k = 3), rows of 2 and 1 tokens.
            q, k, v = (torch.randn(2, 2, 2, 4) for _ in range(3))
            short = torch.tensor([[True, True], [True, False]])
            got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "key_mask": short.numpy()})[0]
            np.testing.assert_allclose(got, ref_fn(q, k, v, short).numpy(), rtol=1e-5, atol=1e-5)
        if name == "na1d-dilated":
            # Rows of 5 and 2 tokens, shorter than k * d = 6: each sees its whole dilation group.
            q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
            short = torch.arange(5)[None, :] < torch.tensor([[5], [2]])
            got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "key_mask": short.numpy()})[0]
            np.testing.assert_allclose(got, ref_fn(q, k, v, short).numpy(), rtol=1e-5, atol=1e-5)


def test_2d_key_mask_removes_keys_as_the_reference_does():
    import contextlib
    import io
    import warnings

    import onnxruntime as ort

    def op_fn(q, k, v, m):
        return na_op(q, k, v, (3, 3), key_mask=m)

    q, k, v = (torch.randn(2, 2, 6, 7, 4) for _ in range(3))
    mask = torch.ones(2, 6, 7, dtype=torch.bool)
    mask[1, 3:, :] = False
    mask[0, :, 5:] = False
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Masked(op_fn), (q, k, v, mask), dynamo=True,
                                    input_names=["q", "k", "v", "key_mask"], opset_version=18,
                                    dynamic_shapes=({0: "b", 2: "x", 3: "y"},) * 3 + ({0: "b", 1: "x", 2: "y"},))
    model = program.model_proto
    attach_functions(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "key_mask": mask.numpy()})[0]
    expected = neighborhood_attention(q, k, v, (3, 3), key_mask=mask).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
