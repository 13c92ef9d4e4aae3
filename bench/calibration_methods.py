"""Which calibration method each preset should default to: every method x preset on real models.

For each model and preset, the naive (untuned) path: no SmoothQuant, no fallback, the
preset's Q/DQ placement, calibrated on the same seeded calibration split; only the range
estimator changes. All histogram methods come from one set of collected statistics, so the
methods differ in nothing but the ranges. Each Q/DQ model is scored on the held-out
evaluation split against the same FP32 ONNX on ONNX Runtime (cosine mean / min, nearest-
neighbour agreement).

    python bench/calibration_methods.py --out bench_calibration_methods.json
    python bench/calibration_methods.py --model embedded:minilm \\
        --onnx-model paraphrase-l3=/path/to/paraphrase-MiniLM-L3-v2.onnx:461

``--onnx-model name=path[:output]`` adds an ONNX file deploykit did not export (fed the
first ``--model``'s tokenised text, restricted to the inputs the file declares; ``output``
picks the sentence-embedding output when the file has several). Not a test: it measures.
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from deploykit.data import DataSpec, Split, iterate_batches, make_splits, map_batches
from deploykit.io import write_json
from deploykit.metrics import embedding_metrics
from deploykit.presets import EXACT_QDQ_PRESETS, PRESETS
from deploykit.progress import set_quiet
from deploykit.quantize import QuantConfig, build_qdq, load_for_quantization, prepare
from deploykit.quantize.graph import cpu_session

# (method, percentile) pairs measured; percentile only for the percentile method.
METHODS = [("minmax", None), ("running-minmax", None), ("percentile", 99.99), ("percentile", 99.999),
           ("mse", None), ("entropy", None)]


def run_model(model: onnx.ModelProto, split: Split, output: str | None, threads: int,
              exact_qdq: bool = False) -> np.ndarray:
    session = cpu_session(model, threads, exact_qdq=exact_qdq)
    names = [i.name for i in session.get_inputs()]
    outputs = [output] if output else None
    return map_batches(lambda f: session.run(outputs, {n: f[n] for n in names})[0],
                       iterate_batches(split.feeds, 32), 32)


def restrict(split: Split, model: onnx.ModelProto) -> Split:
    names = {i.name for i in model.graph.input}
    return Split(split.name, {k: v for k, v in split.feeds.items() if k in names}, split.sha256, split.samples)


def measure(name: str, path: Path, splits, presets: list[str], output: str | None, threads: int) -> list[dict]:
    model, inferred = load_for_quantization(path)
    calibration, evaluation = restrict(splits.calibration, model), restrict(splits.evaluation, model)
    reference = run_model(model, evaluation, output, threads)
    rows = []
    for preset in presets:
        # percentile as the collecting method: histograms too, so every method below is available
        config = QuantConfig(preset=preset, method="percentile").resolved()
        t0 = time.perf_counter()
        try:
            prepared = prepare(inferred, calibration, config, threads=threads, where=path)
        except Exception as exc:          # recorded, not fatal: the other presets still run
            rows.append({"model": name, "preset": preset, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{name:16s} {preset:10s} failed: {rows[-1]['error']}", flush=True)
            continue
        collect_s = time.perf_counter() - t0
        for method, pct in METHODS:
            t0 = time.perf_counter()
            ranges = prepared.ranges(method, pct)
            try:
                qdq = build_qdq(prepared, ranges)
            except Exception as exc:
                rows.append({"model": name, "preset": preset, "method": method, "percentile": pct,
                             "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"{name:16s} {preset:10s} {method} failed: {rows[-1]['error']}", flush=True)
                continue
            metrics = embedding_metrics(reference, run_model(qdq, evaluation, output, threads,
                                                                   preset in EXACT_QDQ_PRESETS))[0]
            clipped = {k: round(r.max / r.hi, 3) for k, r in ranges.items() if not r.masked and r.hi > 0}
            worst = max(clipped.items(), key=lambda kv: kv[1]) if clipped else (None, None)
            rows.append({"model": name, "preset": preset, "method": method, "percentile": pct,
                         "cosine_mean": round(metrics["cosine_mean"], 6), "cosine_min": round(metrics["cosine_min"], 6),
                         "nn_agreement": round(metrics["nn_agreement"], 4), "snr_db": round(metrics["snr_db"], 2),
                         "float_nodes": len(prepared.mask_float_nodes),
                         "worst_clip": {"tensor": worst[0], "max_over_range": worst[1]},
                         "seconds": round(time.perf_counter() - t0, 1), "collect_seconds": round(collect_s, 1)})
            r = rows[-1]
            print(f"{name:16s} {preset:10s} {method}{'' if pct is None else f' {pct}':10s} cosine "
                  f"{r['cosine_mean']:.4f} / min {r['cosine_min']:.4f}  NN {r['nn_agreement']:.3f}", flush=True)
    return rows


def winners(rows: list[dict]) -> dict[str, dict]:
    """Per preset: the method with the best mean rank (NN agreement, then cosine mean) over the models."""
    out = {}
    for preset in sorted({r["preset"] for r in rows if "error" not in r}):
        ranks: dict[str, list[float]] = {}
        for model in sorted({r["model"] for r in rows}):
            sub = [r for r in rows if r["preset"] == preset and r["model"] == model and "error" not in r]
            order = sorted(sub, key=lambda r: (-r["nn_agreement"], -r["cosine_mean"]))
            for k, r in enumerate(order):
                ranks.setdefault(_label(r), []).append(k + 1)
        best = min(ranks, key=lambda m: (float(np.mean(ranks[m])), m))
        out[preset] = {"method": best, "mean_rank": float(np.mean(ranks[best])),
                       "ranks": {m: float(np.mean(v)) for m, v in sorted(ranks.items())}}
    return out


def _label(row: dict) -> str:
    return row["method"] if row["percentile"] is None else f"percentile {row['percentile']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="deploykit model source (repeatable)")
    parser.add_argument("--onnx-model", action="append", default=[], help="name=path[:output] (repeatable)")
    parser.add_argument("--presets", nargs="+", default=["gpu-trt", "cpu-ort"], choices=sorted(PRESETS))
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--evaluation", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_calibration_methods.json"))
    args = parser.parse_args()
    set_quiet(True)
    logging.disable(logging.WARNING)
    from deploykit.export import export_onnx
    from deploykit.models import load_model

    sources = args.model or ["embedded:minilm"]
    rows, splits = [], None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deploykit-bench-") as tmp:
        for source in sources:
            bundle = load_model(source, {"max_length": 128, "attn_implementation": "eager"}
                                if source == "embedded:minilm" else {})
            model_splits = make_splits(bundle, DataSpec(source="docstrings", calibration=args.calibration,
                                                        evaluation=args.evaluation, seed=0))
            splits = splits or model_splits
            path = Path(tmp) / f"{len(rows)}.onnx"
            export_onnx(bundle, path, opset=18)
            rows += measure(source, path, model_splits, args.presets, None, args.threads)
        for spec in args.onnx_model:
            name, _, rest = spec.partition("=")
            path, _, output = rest.partition(":")
            rows += measure(name, Path(path), splits, args.presets, output or None, args.threads)
    write_json(args.out, {"rows": rows, "winners": winners(rows),
                          "setup": {"calibration": args.calibration, "evaluation": args.evaluation, "seed": 0,
                                    "data": "docstrings", "threads": args.threads, "smoothquant": None,
                                    "fallback": None, "reference": "FP32 ONNX on ONNX Runtime CPU",
                                    "machine": platform.processor() or platform.machine(),
                                    "seconds": round(time.perf_counter() - start, 1)}})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
