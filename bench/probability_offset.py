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

Writes ``<run>/bench_probability_offset.json``
(``…_tuning.json`` with ``--split tuning``, or ``--out``). Not a test: it measures.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from _run import run_parser

    parser = run_parser(__doc__)
    parser.add_argument("--alpha", type=float, default=0.9)
    args = parser.parse_args(argv)

    from deploykit.metrics import task_metrics
    from deploykit.quantize import QuantConfig, SmoothQuantConfig
    from deploykit.quantize.probabilities import probability_matmuls
    from deploykit.quantize.qdq import build_model, prepare
    from _run import load_run, write_result

    loaded = load_run(args.run, args.split)
    run, inferred, calibration = loaded.folder, loaded.inferred, loaded.calibration
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
    suffix = "" if args.split == "evaluation" else f"_{args.split}"
    write_result(loaded, args.out or run / f"bench_probability_offset{suffix}.json",
                 {"alpha": args.alpha, "percentile": args.percentile, "pv_matmuls": pv, "fallen_back": fallen,
                  "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
