"""The README's headline table, read from the runs that produced it.

Each row comes from one run's ``report.json`` (``deploykit run <recipe>``): the held-out task
metric of FP32 and INT8 against torch FP32, the float MatMuls the INT8 model keeps, the file
sizes, the tuning time, and INT8's batch-1 latency as a ratio to FP32 on ONNX Runtime CPU,
timed interleaved in the same run (median over rounds, with its range), labelled with the CPU
and thread count of that run. Nothing is measured here: every figure is the run's own.

    python bench/headline.py runs/minilm-int8-smoothquant runs/mpnet-int8-smoothquant ...

Writes ``bench/results/headline.json`` (or ``--out``) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

METRICS = {"text-embedding": ("cosine_mean", "nn_agreement"), "causal-lm": ("perplexity", "top1_agreement")}


def _task(report: dict[str, Any]) -> str:
    accuracy = report.get("accuracy") or {}
    names = {m for values in accuracy.values() for m in values}
    return "causal-lm" if "perplexity" in names else "text-embedding"


def _variant(accuracy: dict[str, Any], variant: str) -> dict[str, Any]:
    """The variant's metrics on ONNX Runtime CPU (``int8@ort-cpu``), else its plain entry."""
    return accuracy.get(f"{variant}@ort-cpu") or accuracy.get(variant) or {}


def row(run: Path) -> dict[str, Any]:
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    task = _task(report)
    a, b = METRICS[task]
    accuracy = report.get("accuracy") or {}
    fp32, int8 = _variant(accuracy, "fp32"), _variant(accuracy, "int8")
    cal = report.get("calibration") or {}
    tuning = report.get("tuning") or {}
    latency = report.get("latency") or {}
    ratio = latency.get("int8@ort-cpu/b1") or {}
    env = report.get("environment") or {}
    data = report.get("data") or {}
    return {
        "run": report.get("run") or run.name, "model": report.get("model"), "task": task, "metrics": [a, b],
        "evaluation_samples": (data.get("evaluation") or {}).get("count"),
        "fp32": {a: fp32.get(a), b: fp32.get(b)}, "int8": {a: int8.get(a), b: int8.get(b)},
        "float_matmuls": (cal.get("float_by_op_type") or {}).get("MatMul"),
        "file_mb": report.get("file_sizes"),
        "tune_s": tuning.get("seconds"), "tuning_met": tuning.get("met"),
        "latency_b1_int8_over_fp32": ratio.get("ratio_to_fp32"), "latency_spread": ratio.get("ratio_spread"),
        "latency_conclusive": ratio.get("conclusive"), "latency_rounds": ratio.get("rounds"),
        "threads": (report.get("bench") or {}).get("threads"),
        "cpu": env.get("cpu"), "onnxruntime": env.get("onnxruntime"), "torch": env.get("torch"),
        "created": report.get("created"),
        "acceptance": {c["check"]: c["passed"] for c in report.get("acceptance") or []},
    }


def _num(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model (run) | held-out metric | FP32 | INT8 | float MatMuls | file FP32 → INT8 | tune | "
             "INT8 / FP32 latency, b1 ORT CPU | CPU, threads |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        a, b = r["metrics"]
        digits = 2 if r["task"] == "causal-lm" else 4
        size = r["file_mb"] or {}
        lat = r["latency_b1_int8_over_fp32"]
        spread = r["latency_spread"] or [None, None]
        tune = "—" if r["tune_s"] is None else f"{r['tune_s']:.0f} s"
        latency = ("—" if lat is None else f"{lat:.2f}× ({spread[0]:.2f}–{spread[1]:.2f}"
                   + ("" if r["latency_conclusive"] else ", inconclusive") + ")")
        lines.append(
            f"| {r['model']} (`{r['run']}`) | {a} / {b}, {r['evaluation_samples']} | "
            f"{_num(r['fp32'][a], digits)} / {_num(r['fp32'][b], 3)} | {_num(r['int8'][a], digits)} / "
            f"{_num(r['int8'][b], 3)} | {r['float_matmuls'] or '—'} | "
            f"{size.get('fp32_mb', 0):.1f} → {size.get('int8_mb', 0):.1f} MB "
            f"({100 * (size.get('int8_over_fp32') or 0):.0f} %) | "
            f"{tune} | "
            f"{latency} | {r['cpu']}, {r['threads']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with report.json)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "headline.json")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "report.json").is_file()]
    if missing:
        print(f"headline: no report.json in {', '.join(missing)}; run deploykit run <recipe> first", file=sys.stderr)
        return 2
    rows = [row(r) for r in args.runs]
    from deploykit.io import write_json

    write_json(args.out, {"rows": rows})
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
