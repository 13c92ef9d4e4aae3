"""A causal LM's KV-cache decode step, FP32 and static W8A8, on real caches.

Exports the decode step (``deploykit.export.decode``), builds its feeds from docstring
sentences (each sentence's second-to-last token after its prefix, the prefix's KV cache from a
torch prefill; the true next token is the sentence's last), calibrates it with deploykit's
``calibrate`` on the calibration sentences (gpu-trt by default, SmoothQuant on every MatMul),
and compares INT8 with FP32 on held-out sentences: perplexity of the true next tokens, top-1
agreement, cosine of the logits at FP32's top-32 tokens. Also ORT FP32 against the torch step
and against the prefill at the same position.

    python bench/decode_step.py --source embedded:smollm2 --out bench/results/decode_step.json

Not a test: it measures.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="embedded:smollm2")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--evaluation", type=int, default=64)
    parser.add_argument("--preset", default="gpu-trt")
    parser.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant strength (every MatMul)")
    parser.add_argument("--method", default=None, help="calibration method (default: the preset's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_step.json")
    args = parser.parse_args(argv)

    from deploykit.data import DataSpec, iterate_batches, make_splits, map_batches
    from deploykit.export.decode import decode_feeds, export_decode_step, step_metrics
    from deploykit.io import write_json
    from deploykit.models import load_model
    from deploykit.onnx_utils import model_bytes
    from deploykit.quantize import QuantConfig, SmoothQuantConfig, calibrate
    from deploykit.runners import OrtRunner, default_threads

    t0 = time.perf_counter()
    bundle = load_model(args.source, {"max_length": args.max_length, "attn_implementation": "eager"})
    splits = make_splits(bundle, DataSpec(calibration=args.calibration, evaluation=args.evaluation, seed=0))
    with tempfile.TemporaryDirectory(prefix="deploykit-decode-") as tmp:
        step = Path(tmp) / "step.onnx"
        record = export_decode_step(bundle, step, splits.calibration)
        cal, _, _ = decode_feeds(bundle, splits.calibration)
        ev, _, targets = decode_feeds(bundle, splits.evaluation)
        config = QuantConfig(preset=args.preset, method=args.method,
                             smoothquant=SmoothQuantConfig(alpha=args.alpha, targets="all"))
        t1 = time.perf_counter()
        result = calibrate(step, cal, Path(tmp) / "step.int8.onnx", config)
        seconds = time.perf_counter() - t1
        threads = default_threads()

        def run(path: Path) -> np.ndarray:
            return map_batches(OrtRunner(path, threads=threads).infer, iterate_batches(ev.feeds, 8), 8)

        fp32, int8 = run(step), run(Path(tmp) / "step.int8.onnx")
        sizes = {"fp32_mb": round(model_bytes(step) / 1e6, 1),
                 "int8_mb": round(model_bytes(Path(tmp) / "step.int8.onnx") / 1e6, 1)}
    out = {
        "source": args.source, "max_length": args.max_length, "preset": args.preset, "alpha": args.alpha,
        "method": result.config.method, "export": {k: v for k, v in record.items() if k != "path"},
        "calibration_steps": cal.count, "evaluation_steps": ev.count,
        "fp32": step_metrics(fp32, fp32, targets), "int8": step_metrics(fp32, int8, targets),
        "float_by_op_type": result.summary()["float_by_op_type"], "quantized_nodes": len(result.quantized_nodes),
        "file_sizes": sizes, "calibrate_seconds": round(seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "threads": threads},
    }
    write_json(args.out, out)
    f, i = out["fp32"], out["int8"]
    print(f"decode step of {args.source}: {record['layers']} layers, parity vs torch {record['parity']['max_abs_diff']:.2e}, "
          f"vs prefill {record['parity']['vs_prefill_max_abs_diff']:.2e}")
    print(f"FP32 perplexity {f['perplexity']:.2f}; INT8 {i['perplexity']:.2f} ({100 * (i['perplexity_ratio'] - 1):+.1f} %), "
          f"top-1 agreement {i['top1_agreement']:.3f}, cosine {i['cosine_mean']:.4f} over {ev.count} held-out steps")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
