"""One INT8 file scored two ways on this CPU: ONNX Runtime's fused int8 kernels and Q/DQ unfused.

On a run folder (``deploykit run <recipe>``): ``model.int8.onnx`` on the saved evaluation
inputs against the run's torch FP32 outputs (``reference.npz``), once with ORT fusing the Q/DQ
pairs into its u8s8 kernels and once with them left as ops (``session.disable_quant_qdq``, the
graph's exact arithmetic, which deploykit scores ``gpu-trt`` models with), with the seconds
each pass took. On a CPU with VNNI the two should agree; without it the fused kernels' 16-bit
pair sums saturate.

    python bench/qdq_scoring.py runs/mpnet-int8-smoothquant

Writes ``bench/results/qdq_scoring_<run>.json`` (or ``--out``). Not a test: it measures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from deploykit.data import load_split
    from deploykit.io import read_npz, write_json
    from deploykit.metrics import output_reducer, task_metrics
    from deploykit.onnx_utils import get_metadata, load_onnx
    from deploykit.probes import cpu_facts, cpu_text, int8_pairs_saturate
    from deploykit.progress import set_quiet
    from deploykit.runners import OrtRunner
    from deploykit.verify import run_split

    set_quiet(True)
    path = args.run / "model.int8.onnx"
    meta = get_metadata(load_onnx(path, load_weights=False))
    evaluation = load_split(args.run / "data" / "evaluation.npz", list(meta["input_names"]))
    reference = read_npz(args.run / "reference.npz", what="reference outputs")["output"]
    task = meta.get("task", "text-embedding")
    rows = []
    for name, exact in (("fused", False), ("exact", True)):
        runner = OrtRunner(path, exact_qdq=exact)
        t0 = time.perf_counter()
        outputs = run_split(runner, evaluation, reduce=output_reducer(task, evaluation.feeds, reference))
        seconds = time.perf_counter() - t0
        metrics = task_metrics(task, reference, outputs, evaluation.labels)
        rows.append({"scoring": name, "seconds": round(seconds, 1),
                     **{k: round(float(v), 4) for k, v in metrics.items() if isinstance(v, (int, float))}})
        print(f"{name:6s} " + ", ".join(f"{k} {v}" for k, v in rows[-1].items() if k != "scoring"), flush=True)
    facts = cpu_facts()
    out = args.out or Path(__file__).parent / "results" / f"qdq_scoring_{args.run.name}.json"
    write_json(out, {"run": args.run.name, "model": str(meta.get("source")),
                     "preset": (meta.get("calibration") or {}).get("preset"),
                     "evaluation_samples": evaluation.count, "reference": "the run's torch FP32 outputs",
                     "cpu": cpu_text(facts), "pairs_saturate": int8_pairs_saturate(facts), "rows": rows,
                     "exact_over_fused_seconds": round(rows[1]["seconds"] / rows[0]["seconds"], 2)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
