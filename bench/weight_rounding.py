"""What GPTQ weight rounding (``quantize.weight_rounding: gptq``) buys over nearest rounding.

On a run's FP32 export and data (``deploykit run <recipe>``: ``model.onnx``, the calibration
and evaluation inputs it saved), ``gpu-trt`` configurations (SmoothQuant on every MatMul with
the channel shift at each ``--alpha``, percentile ``--percentile``, the probabilities offset
before P·V, the preset's int8 embedding rows, no node in float) are built with the int8 weights
rounded to nearest and by GPTQ (:mod:`deploykit.quantize.rounding`), each also with bias
correction where the two are allowed to meet here (the config refuses it; the figures say why).

Each model is scored on the held-out evaluation inputs against the same FP32 graph on ONNX
Runtime: cosine mean, NN agreement, SNR.

    deploykit run minilm-int8-smoothquant
    python bench/weight_rounding.py --run runs/minilm-int8-smoothquant

Writes ``<run>/bench_weight_rounding.json`` (``…_tuning.json`` with ``--split tuning``, or
``--out``). Not a test: it measures.
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str] | None = None) -> int:
    from _run import run_parser

    parser = run_parser(__doc__)
    parser.add_argument("--alpha", type=float, action="append", default=None, help="repeatable (default 0.8, 0.9)")
    args = parser.parse_args(argv)

    from deploykit.metrics import task_metrics
    from deploykit.quantize import QuantConfig, SmoothQuantConfig
    from deploykit.quantize.qdq import build_model, prepare
    from _run import load_run, write_result

    loaded = load_run(args.run, args.split)
    reference = loaded.outputs(loaded.inferred)
    rows = []
    for alpha in args.alpha or [0.8, 0.9]:
        config = QuantConfig(preset="gpu-trt", probability_offset=True,
                             smoothquant=SmoothQuantConfig(targets="all", shift=True)).resolved()
        prepared = prepare(loaded.inferred, loaded.calibration, config, alpha=alpha, threads=loaded.threads)
        ranges = prepared.ranges("percentile", args.percentile)
        for rounding in ("nearest", "gptq"):
            for bias in (False, True):
                t0 = time.perf_counter()
                model = build_model(prepared, ranges, bias_correction=bias, weight_rounding=rounding,
                                    threads=loaded.threads)
                seconds = time.perf_counter() - t0
                metrics = task_metrics("text-embedding", reference, loaded.outputs(model), None)
                rows.append({"alpha": alpha, "weight_rounding": rounding, "bias_correction": bias,
                             "build_seconds": round(seconds, 1),
                             **{k: round(float(metrics[k]), 4) for k in ("cosine_mean", "nn_agreement", "snr_db")}})
                print(f"alpha {alpha} {rounding:7s} bias={bias!s:5s} cosine {metrics['cosine_mean']:.4f} "
                      f"NN {metrics['nn_agreement']:.3f} SNR {metrics['snr_db']:.2f} dB ({seconds:.1f} s)", flush=True)
    suffix = "" if args.split == "evaluation" else f"_{args.split}"
    write_result(loaded, args.out or args.run / f"bench_weight_rounding{suffix}.json",
                 {"percentile": args.percentile, "probability_offset": True, "channel_shift": True,
                  "float_nodes": 0, "calibration_samples": loaded.calibration.count, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
