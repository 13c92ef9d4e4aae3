"""How much int8 attention probabilities cost a model, and what other forms of them would buy.

On the torch model (no ONNX, no Q/DQ graph: a fake-quantized softmax and P·V product), every
attention's softmax output P is rounded to symmetric int8 in one of four forms, everything
else float, and the sentence embeddings are scored against the float model's on held-out text:

* ``plain``: P on the fixed scale 1/127 (what the ``gpu-trt`` graph does without the offset);
* ``offset``: ``2P − 1`` on 1/127, so P gets 255 levels (``quantize.probability_offset``);
* ``deferred``: the unnormalised ``E = exp(s − max s)`` on 1/127, divided by the sum of the
  rounded ``E`` after the product (every row's largest weight is then exactly 1);
* ``deferred-offset``: ``2E − 1`` on 1/127, then the same division.

Then again with V in int8 too (per-tensor per layer, percentile ``--percentile`` of |V| on the
calibration inputs), to see whether P is what limits P·V.

    python bench/probability_forms.py --model embedded:mpnet

Writes ``bench/results/probability_forms_<model>.json`` (or ``--out``). Not a test: it measures.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

FORMS = ("plain", "offset", "deferred", "deferred-offset")


def _round(x, step):
    import torch

    return torch.clamp(torch.round(x / step), -127, 127) * step


def fake_probabilities(scores, form: str):
    """The softmax of ``scores`` over the last axis, its int8 rounding in ``form`` applied."""
    import torch

    if form == "float":
        return torch.softmax(scores, dim=-1)
    if form in ("plain", "offset"):
        p = torch.softmax(scores, dim=-1)
        return _round(p, 1 / 127) if form == "plain" else (_round(2 * p - 1, 1 / 127) + 1) / 2
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    e = _round(e, 1 / 127) if form == "deferred" else (_round(2 * e - 1, 1 / 127) + 1) / 2
    return e / e.sum(dim=-1, keepdim=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:mpnet")
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--evaluation", type=int, default=300)
    parser.add_argument("--percentile", type=float, default=99.999)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from deploykit.data import DataSpec, make_splits
    from deploykit.io import write_json
    from deploykit.metrics import embedding_metrics
    from deploykit.models import load_model

    bundle = load_model(args.model, {"max_length": 128, "attn_implementation": "eager"})
    splits = make_splits(bundle, DataSpec(calibration=args.calibration, evaluation=args.evaluation, seed=0))
    state = {"form": "float", "pv": False, "layer": 0, "v_ranges": None, "v_scale": None}
    softmax, matmul = torch.nn.functional.softmax, torch.matmul

    def patched_softmax(x, dim=-1, **kw):          # only attention calls it in these models
        state["pv"] = True
        return fake_probabilities(x, state["form"]) if dim in (-1, x.dim() - 1) else softmax(x, dim=dim, **kw)

    def patched_matmul(a, b):                      # the product right after a softmax is P·V
        if state["pv"]:
            state["pv"] = False
            layer, state["layer"] = state["layer"], state["layer"] + 1
            if state["v_ranges"] is not None:
                state["v_ranges"].setdefault(layer, []).append(b.abs().flatten().numpy())
            elif state["v_scale"] is not None:
                b = _round(b, state["v_scale"][layer])
        return matmul(a, b)

    def embed(feeds):
        out = []
        with torch.no_grad():
            for i in range(0, len(next(iter(feeds.values()))), 32):
                state["layer"] = 0
                out.append(bundle.module(*[torch.from_numpy(feeds[k][i:i + 32]) for k in bundle.input_names]).numpy())
        return np.concatenate(out)

    rows = []
    torch.nn.functional.softmax, torch.matmul = patched_softmax, patched_matmul
    try:
        state["v_ranges"] = {}
        embed(splits.calibration.feeds)            # V's range per layer, from the calibration inputs
        ranges, state["v_ranges"] = state["v_ranges"], None
        v_scale = {k: float(np.percentile(np.concatenate(v), args.percentile)) / 127 for k, v in ranges.items()}
        reference = embed(splits.evaluation.feeds)
        for v_int8 in (False, True):
            state["v_scale"] = v_scale if v_int8 else None
            for form in (("float",) if v_int8 else ()) + FORMS:
                state["form"] = form
                t0 = time.perf_counter()
                m, _ = embedding_metrics(reference, embed(splits.evaluation.feeds))
                rows.append({"probabilities": form, "v": "int8" if v_int8 else "float",
                             **{k: round(float(m[k]), 4) for k in ("cosine_mean", "nn_agreement", "snr_db")}})
                print(f"P {form:16s} V {rows[-1]['v']:5s} cosine {m['cosine_mean']:.5f} NN {m['nn_agreement']:.3f} "
                      f"SNR {m['snr_db']:.2f} dB ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        torch.nn.functional.softmax, torch.matmul = softmax, matmul
    name = args.model.split(":")[-1]
    out = args.out or Path(__file__).parent / "results" / f"probability_forms_{name}.json"
    write_json(out, {"model": args.model, "calibration_samples": args.calibration,
                     "evaluation_samples": args.evaluation, "v_percentile": args.percentile,
                     "reference": "the float torch model", "threads": torch.get_num_threads(),
                     "machine": platform.processor() or platform.machine(), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
