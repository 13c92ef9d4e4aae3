"""SmoothQuant strength for one group kind, the others fixed: held-out error of that group alone
in int8, and of the whole model, per strength.

On a run's FP32 export and data (``deploykit run <recipe>``), the ``gpu-trt`` form of the MPNet
recipe (the channel shift, the probabilities offset, percentile ``--percentile``, embeddings
float) is built with every kind at ``--alpha`` except ``--kind``, which takes each of
``--alphas`` (``none``: not smoothed). Per strength: only that kind's MatMuls in int8 (nearest
rounding), and the whole model in int8 with GPTQ weights. Scored with Q/DQ unfused (the exact
arithmetic deploykit scores ``gpu-trt`` with) against the FP32 graph.

    deploykit run mpnet-int8-smoothquant
    python bench/group_alpha.py --run runs/mpnet-int8-smoothquant --kind mlp-out --alphas none 0.5 0.8

Writes ``<run>/bench_group_alpha_<kind>.json`` (or ``--out``). Not a test: it measures.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from _run import run_parser

    parser = run_parser(__doc__)
    parser.add_argument("--alpha", type=float, default=0.8, help="the strength of every other kind")
    parser.add_argument("--kind", default="mlp-out", help="attention-in | attention-out | mlp-in | mlp-out")
    parser.add_argument("--alphas", nargs="+", default=["none", "0.5", "0.65", "0.8", "0.9"])
    args = parser.parse_args(argv)

    from deploykit.metrics import task_metrics
    from deploykit.quantize import QuantConfig, SmoothQuantConfig
    from deploykit.quantize.qdq import build_qdq, float_reference, prepare
    from deploykit.quantize.smoothquant import KINDS
    from deploykit.quantize.tune import node_kinds
    from _run import load_run, write_result

    if args.kind not in KINDS:
        parser.error(f"--kind: use one of {', '.join(KINDS)}")
    loaded = load_run(args.run, args.split)
    reference = loaded.outputs(loaded.inferred)
    config = QuantConfig(preset="gpu-trt", probability_offset=True, embeddings=False,
                         smoothquant=SmoothQuantConfig(targets="all", shift=True)).resolved()
    stats = None
    rows = []
    for text in args.alphas:
        strength = None if text == "none" else float(text)
        alpha = {kind: (strength if kind == args.kind else args.alpha) for kind in KINDS}
        prepared = prepare(loaded.inferred, loaded.calibration, config, alpha=alpha, smooth_stats=stats,
                           threads=loaded.threads)
        stats = prepared.smooth_stats
        ranges = prepared.ranges("percentile", args.percentile)
        base = float_reference(prepared, ranges)
        everything = [n.name for n in prepared.nodes]
        members = [n for n, k in node_kinds(loaded.inferred, everything).items() if k == args.kind]
        row = {"alpha": strength}
        for label, model in (
                ("group_only", lambda: build_qdq(prepared, ranges, [n for n in everything if n not in members],
                                                 reference=base)),
                ("whole_gptq", lambda: build_qdq(prepared, ranges, [], reference=base, weight_rounding="gptq"))):
            built = model()
            m = task_metrics("text-embedding", reference, loaded.outputs(built), None)
            row[label] = {k: round(float(m[k]), 4) for k in ("cosine_mean", "nn_agreement", "snr_db")}
            print(f"{args.kind} alpha {text:5s} {label:11s} cosine {m['cosine_mean']:.5f} "
                  f"NN {m['nn_agreement']:.3f} SNR {m['snr_db']:.2f} dB", flush=True)
        rows.append(row)
    suffix = "" if args.split == "evaluation" else f"_{args.split}"
    write_result(loaded, args.out or args.run / f"bench_group_alpha_{args.kind}{suffix}.json",
                 {"kind": args.kind, "other_alpha": args.alpha, "percentile": args.percentile,
                  "probability_offset": True, "channel_shift": True, "embeddings": "float",
                  "scoring": "exact Q/DQ", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
