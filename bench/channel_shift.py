"""What SmoothQuant's channel shift buys, and what its two safeguards are for.

On a run's FP32 export and data (``deploykit run <recipe>``: ``model.onnx``, the calibration
and evaluation inputs it saved), ``gpu-trt`` configurations (SmoothQuant on every MatMul at each
``--alpha``, percentile ``--percentile``, the probabilities offset before P·V, the preset's int8
embedding rows, no node in float) are built three ways:

* ``plain``: SmoothQuant as before (``smoothquant.shift: false``);
* ``shift, unguarded``: each channel centred, but the offsets left off the int8 grid and the
  biases compensating with the float weights;
* ``shift``: what ``smoothquant.shift: true`` writes (offsets on the grid, biases compensating
  with the stored int8 weights; :mod:`deploykit.quantize.shift`).

Each model is scored on the held-out evaluation inputs against the same FP32 graph on ONNX
Runtime: cosine mean, NN agreement, SNR.

    deploykit run minilm-int8-smoothquant
    python bench/channel_shift.py --run runs/minilm-int8-smoothquant

Writes ``<run>/bench_channel_shift.json``
(``…_tuning.json`` with ``--split tuning``, or ``--out``). Not a test: it measures.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from _run import run_parser

    parser = run_parser(__doc__)
    parser.add_argument("--alpha", type=float, action="append", default=None, help="repeatable (default 0.8, 0.9)")
    args = parser.parse_args(argv)

    from deploykit.metrics import task_metrics
    from deploykit.quantize import QuantConfig, SmoothQuantConfig
    from deploykit.quantize.qdq import build_model, build_qdq, prepare
    from _run import load_run, write_result

    loaded = load_run(args.run, args.split)
    run, inferred, calibration = loaded.folder, loaded.inferred, loaded.calibration
    threads, outputs = loaded.threads, loaded.outputs
    reference = outputs(inferred)
    rows = []
    for alpha in args.alpha or [0.8, 0.9]:
        for shift in (False, True):
            config = QuantConfig(preset="gpu-trt", probability_offset=True,
                                 smoothquant=SmoothQuantConfig(targets="all", shift=shift)).resolved()
            prepared = prepare(inferred, calibration, config, alpha=alpha, threads=threads)
            ranges = prepared.ranges("percentile", args.percentile)
            builds = [("shift" if shift else "plain", build_model(prepared, ranges))]
            if shift:
                builds.insert(0, ("shift, unguarded", build_qdq(prepared, ranges,
                                                                reference=(prepared.model, prepared.smoothing),
                                                                exact_shift_bias=False)))
            for label, model in builds:
                metrics = task_metrics("text-embedding", reference, outputs(model), None)
                rows.append({"alpha": alpha, "form": label,
                             **{k: round(float(metrics[k]), 4) for k in ("cosine_mean", "nn_agreement", "snr_db")}})
                print(f"alpha {alpha} {label:17s} cosine {metrics['cosine_mean']:.4f} "
                      f"NN {metrics['nn_agreement']:.3f} SNR {metrics['snr_db']:.2f} dB", flush=True)
    suffix = "" if args.split == "evaluation" else f"_{args.split}"
    write_result(loaded, args.out or run / f"bench_channel_shift{suffix}.json",
                 {"percentile": args.percentile, "probability_offset": True, "float_nodes": 0, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
