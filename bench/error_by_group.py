"""Where a BERT-family INT8 model's output error comes from, group by group.

On a run's FP32 export and data (``deploykit run <recipe>``), one ``gpu-trt`` configuration
(SmoothQuant on every MatMul with the channel shift at ``--alpha``, percentile ``--percentile``,
the probabilities offset, embeddings float) is built with only one group of MatMuls in int8
and every other node float, and scored on the held-out inputs against the FP32 graph on ONNX
Runtime. Groups, by where each MatMul sits in the graph (not by module names, which differ
between families): Q/K/V, attention-out, FFN-in, FFN-out, and the two activation products
(Q·Kᵀ, P·V). Noise powers of the groups add up to about the whole model's.

For FFN-out it also splits the error into its weights' part and its inputs' part (only the
weights int8, only the inputs int8), and builds it with GPTQ weights fitted to the centred input
(what the weights do *not* meet with the shift) and to the uncentred one (what they meet).

    deploykit run minilm-int8-smoothquant
    python bench/error_by_group.py --run runs/minilm-int8-smoothquant

Writes ``<run>/bench_error_by_group.json`` (or ``--out``). Not a test: it measures.
"""

from __future__ import annotations

import sys


# the graph's kinds (deploykit.quantize.tune.node_kinds), named as the docs name the groups
GROUP_NAMES = {"attention-in": "qkv", "attention-out": "attention-out", "mlp-in": "ffn-in", "mlp-out": "ffn-out",
               "attention-values": "p·v", "activation-product": "q·kᵀ"}


def main(argv: list[str] | None = None) -> int:
    from _run import run_parser

    parser = run_parser(__doc__)
    parser.add_argument("--alpha", type=float, default=0.9)
    args = parser.parse_args(argv)

    from deploykit.metrics import task_metrics
    from deploykit.quantize import QuantConfig, SmoothQuantConfig
    from deploykit.quantize.graph import initializers, producers
    from deploykit.quantize.qdq import build_qdq, float_reference, prepare
    from deploykit.quantize.shift import compensate_weights
    from deploykit.quantize.tune import node_kinds
    from _run import load_run, write_result

    loaded = load_run(args.run, args.split)
    reference = loaded.outputs(loaded.inferred)
    config = QuantConfig(preset="gpu-trt", probability_offset=True, embeddings=False,
                         smoothquant=SmoothQuantConfig(targets="all", shift=True)).resolved()
    prepared = prepare(loaded.inferred, loaded.calibration, config, alpha=args.alpha, threads=loaded.threads)
    ranges = prepared.ranges("percentile", args.percentile)
    base = float_reference(prepared, ranges)
    groups: dict[str, list[str]] = {}
    for name, kind in node_kinds(loaded.inferred, [n.name for n in prepared.nodes]).items():
        groups.setdefault(GROUP_NAMES.get(kind, kind), []).append(name)
    everything = [n.name for n in prepared.nodes]
    rows = []

    def score(label: str, model) -> None:
        m = task_metrics("text-embedding", reference, loaded.outputs(model), None)
        rows.append({"int8": label, **{k: round(float(m[k]), 4) for k in ("cosine_mean", "nn_agreement", "snr_db")}})
        print(f"{label:38s} cosine {m['cosine_mean']:.5f} NN {m['nn_agreement']:.3f} SNR {m['snr_db']:.2f} dB",
              flush=True)

    def only(members: list[str], part: str = "both", rounding: str = "nearest", records=None):
        """Only ``members`` in int8; ``part`` weights | inputs | both; GPTQ fitted with ``records``."""
        model = build_qdq(prepared, ranges, [n for n in everything if n not in members], reference=base,
                          exact_shift_bias=False)
        if rounding == "gptq":
            from deploykit.quantize.rounding import round_weights

            round_weights(model, base[0], loaded.calibration, records=records)
        prod, float_inits = producers(model), initializers(base[0])
        float_nodes = {n.name: n for n in base[0].graph.node}
        for node in model.graph.node:
            if node.name not in members:
                continue
            if part == "weights":                 # the input read as float: skip its Q/DQ pair
                node.input[0] = prod[prod[node.input[0]].input[0]].input[0]
            elif part == "inputs":                # the float weight back
                w = float_nodes[node.name].input[1]
                model.graph.initializer.append(float_inits[w])
                node.input[1] = w
        if part != "inputs":
            compensate_weights(model, base[0], base[1])
        return model

    for name, members in groups.items():
        score(f"only {name} ({len(members)})", only(members))
    ffn_out = groups.get("ffn-out", [])
    if ffn_out:
        score("only ffn-out, weights", only(ffn_out, "weights"))
        score("only ffn-out, inputs", only(ffn_out, "inputs"))
        score("only ffn-out, GPTQ on the centred input", only(ffn_out, rounding="gptq", records=None))
        score("only ffn-out, GPTQ on the uncentred input", only(ffn_out, rounding="gptq", records=base[1]))
    suffix = "" if args.split == "evaluation" else f"_{args.split}"
    write_result(loaded, args.out or args.run / f"bench_error_by_group{suffix}.json",
                 {"alpha": args.alpha, "percentile": args.percentile, "probability_offset": True,
                  "channel_shift": True, "embeddings": "float", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
