"""What the probabilities offset before P·V buys, against keeping P·V in float.

On a run's FP32 export and data (``deploykit run <recipe>``: ``model.onnx``, the calibration
and evaluation inputs it saved), one ``gpu-trt`` configuration (SmoothQuant on every MatMul,
``--alpha``, percentile ``--percentile``, the preset's int8 embedding rows) is built with and
without ``quantize.probability_offset``, and each with no node in float, with every softmax · V
MatMul in float, and with the run's own fallen-back nodes in float. Each model is scored on the
held-out evaluation inputs against the same FP32 graph on ONNX Runtime: cosine mean, NN
agreement, SNR.

    deploykit run minilm-int8-smoothquant
    python bench/probability_offset.py --run runs/minilm-int8-smoothquant

Writes ``<run>/bench_probability_offset.json`` (or ``--out``). Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/minilm-int8-smoothquant"))
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--percentile", type=float, default=99.999)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from deploykit.io import write_json
    from deploykit.metrics import task_metrics
    from deploykit.quantize import QuantConfig, SmoothQuantConfig
    from deploykit.quantize.probabilities import probability_matmuls
    from deploykit.quantize.qdq import build_model, prepare
    from _run import load_run

    loaded = load_run(args.run)
    run, inferred, calibration, evaluation = loaded.folder, loaded.inferred, loaded.calibration, loaded.evaluation
    threads, outputs = loaded.threads, loaded.outputs
    reference = outputs(inferred)
    ranges_file = run / "model.int8.ranges.json"
    fallen = json.loads(ranges_file.read_text(encoding="utf-8")).get("float_nodes", []) if ranges_file.is_file() else []
    pv = [n.name for n in probability_matmuls(inferred)]
    config = QuantConfig(preset="gpu-trt", smoothquant=SmoothQuantConfig(targets="all")).resolved()
    rows = []
    for offset in (False, True):
        prepared = prepare(inferred, calibration, config, alpha=args.alpha, offset=offset, threads=threads)
        ranges = prepared.ranges("percentile", args.percentile)
        for label, float_nodes in (("no node in float", []), ("every P·V in float", pv),
                                   ("the run's fallen-back nodes in float", fallen)):
            metrics = task_metrics("text-embedding", reference, outputs(build_model(prepared, ranges, float_nodes)), None)
            rows.append({"offset": offset, "float": label, "float_nodes": len(float_nodes),
                         **{k: round(float(metrics[k]), 4) for k in ("cosine_mean", "nn_agreement", "snr_db")}})
            print(f"offset={offset!s:5} {label:38s} cosine {metrics['cosine_mean']:.4f} "
                  f"NN {metrics['nn_agreement']:.3f} SNR {metrics['snr_db']:.2f} dB", flush=True)
    out = args.out or run / "bench_probability_offset.json"
    write_json(out, {"run": str(run), "alpha": args.alpha, "percentile": args.percentile,
                     "evaluation_samples": evaluation.count, "pv_matmuls": pv, "fallen_back": fallen, "rows": rows,
                     "reference": "the FP32 export on ONNX Runtime", "threads": threads,
                     "machine": platform.processor() or platform.machine()})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
