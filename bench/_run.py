"""What the bench scripts that re-measure a run share: its FP32 export, its saved calibration
and evaluation inputs, and a scorer of a model's outputs on the evaluation inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class Run:
    folder: Path
    inferred: Any                     # the FP32 export, shape-inferred (deploykit's quantization input)
    calibration: Any                  # deploykit.data.Split
    evaluation: Any                   # the split scored on (held out by default)
    threads: int
    outputs: Callable[[Any], Any]     # model -> its outputs on the evaluation inputs (ORT CPU)


def load_run(folder: Path, split: str = "evaluation") -> Run:
    """``deploykit run <recipe>``'s folder: ``model.onnx``, ``data/calibration.npz`` and the
    split models are scored on (``evaluation``, the held-out one, or ``tuning``, what the
    tuner scored)."""
    from deploykit.data import iterate_batches, load_split, map_batches
    from deploykit.quantize.graph import cpu_session
    from deploykit.quantize.qdq import load_for_quantization
    from deploykit.runners import default_threads

    _, inferred = load_for_quantization(folder / "model.onnx")
    names = [i.name for i in inferred.graph.input]
    calibration = load_split(folder / "data" / "calibration.npz", names)
    evaluation = load_split(folder / "data" / f"{split}.npz", names)
    threads = default_threads()

    def outputs(model):   # the benches build gpu-trt forms: scored as deploykit's tuner scores them
        session = cpu_session(model, threads, exact_qdq=True)
        return map_batches(lambda f: session.run(None, f)[0], iterate_batches(evaluation.feeds, 32), 32)

    return Run(folder, inferred, calibration, evaluation, threads, outputs)


def run_parser(doc: str, default_run: str = "runs/minilm-int8-smoothquant"):
    """An argument parser with what every re-measuring script takes: ``--run``, ``--percentile``
    (of the configuration it builds) and ``--out``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path(default_run))
    parser.add_argument("--percentile", type=float, default=99.999)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--split", choices=["evaluation", "tuning"], default="evaluation",
                        help="score on the held-out inputs, or on the tuner's")
    return parser


def write_result(run: Run, out: Path, record: dict) -> None:
    """``record`` with where it was measured (the run, its evaluation size, the reference, the
    threads and machine) written to ``out`` as JSON."""
    import platform

    from deploykit.io import write_json

    write_json(out, {"run": str(run.folder), **record, "split": run.evaluation.name,
                     "evaluation_samples": run.evaluation.count,
                     "reference": "the FP32 export on ONNX Runtime", "threads": run.threads,
                     "machine": platform.processor() or platform.machine()})
    print(f"wrote {out}")
