"""deploykit's INT8 against the INT8 tools installable here, on one FP32 export and one calibration set.

On the artifacts of a run (``deploykit run``: its FP32 export ``model.onnx``, its INT8 model,
the calibration inputs it used, the held-out evaluation set and the torch FP32 reference):

- ``deploykit``: the run's INT8 model as written (and, when it stores int8 embeddings, the same
  model with its embedding tables in FP32, the file deploykit wrote before them);
- ``ort-static-<method>``: ONNX Runtime's ``quantize_static`` in TensorRT's form (QDQ,
  symmetric int8 activations, per-channel symmetric int8 weights, MatMul/Gemm, ORT's own
  Q/DQ placement) with its MinMax, Entropy and Percentile calibrators
  (``bench/ort_calibrators.py``'s call), fed the same calibration inputs;
- ``ort-dynamic``: ONNX Runtime's ``quantize_dynamic`` (``deploykit.quantize.baselines``);
- ``modelopt-<method>``: NVIDIA ModelOpt's ONNX INT8 (``modelopt.onnx.quantization.quantize``,
  max / entropy calibration on the CPU execution provider, float parts kept FP32), where it
  imports; otherwise the row records why not.

Each row: file size (MB, share of FP32), cosine mean / min and nearest-neighbour agreement
against the torch FP32 reference on the evaluation set, seconds to quantize.

    python bench/peers.py --run runs/minilm-int8-smoothquant

Writes ``<run>/bench_peers.json`` (or ``--out``). Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from deploykit.data import Split, load_split
from deploykit.io import read_npz, write_json
from deploykit.onnx_utils import model_bytes
from deploykit.progress import set_quiet
from deploykit.quantize.baselines import make_baseline
from deploykit.runners import OrtRunner
from deploykit.verify import embedding_metrics, run_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_embeddings import NAMES, float_tables  # noqa: E402
from ort_calibrators import ort_quantize  # noqa: E402

ORT_METHODS = ("minmax", "entropy", "percentile")
MODELOPT_METHODS = ("max", "entropy")


def ort_dynamic_default(fp32: Path, out: Path) -> Path:
    """``quantize_dynamic`` with its default op types: the MatMuls and the embedding Gathers
    (per-tensor uint8 tables), the smallest file ONNX Runtime's dynamic path writes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(onnx.load(str(fp32)), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def modelopt_quantize(fp32: Path, out: Path, feeds: dict[str, np.ndarray], method: str) -> None:
    from modelopt.onnx.quantization import quantize

    quantize(str(fp32), quantize_mode="int8", calibration_data=dict(feeds), calibration_method=method,
             calibration_eps=["cpu"], output_path=str(out), high_precision_dtype="fp32", log_level="ERROR")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/minilm-int8-smoothquant"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--evaluation", type=int, default=None, help="use the first N evaluation samples")
    parser.add_argument("--calibration", type=int, default=None,
                        help="use the first N calibration samples (a quick check; the comparison uses all)")
    parser.add_argument("--skip", nargs="*", default=[], help="tools to leave out: ort-static ort-dynamic modelopt")
    args = parser.parse_args()
    set_quiet(True)
    logging.disable(logging.WARNING)
    run = args.run
    calib = load_split(run / "data" / "calibration.npz", NAMES)
    evaluation = load_split(run / "data" / "evaluation.npz", NAMES)
    reference = read_npz(run / "reference.npz")["output"]
    if args.calibration:
        calib = Split(calib.name, {k: v[:args.calibration] for k, v in calib.feeds.items()},
                      f"{calib.sha256}[:{args.calibration}]")
    if args.evaluation:
        evaluation = Split(evaluation.name, {k: v[:args.evaluation] for k, v in evaluation.feeds.items()},
                           f"{evaluation.sha256}[:{args.evaluation}]")
        reference = reference[:args.evaluation]
    fp32, int8 = run / "model.onnx", run / "model.int8.onnx"
    fp32_bytes = model_bytes(fp32)

    def measure(path: Path) -> dict:   # exact Q/DQ: TensorRT's arithmetic, as deploykit scores gpu-trt
        metrics, _ = embedding_metrics(reference, run_split(OrtRunner(path, exact_qdq=True), evaluation))
        size = model_bytes(path)
        return {"mb": round(size / 1e6, 2), "of_fp32": round(size / fp32_bytes, 4),
                **{k: round(metrics[k], 4) for k in ("cosine_mean", "cosine_min", "nn_agreement")}}

    rows = []

    def record(tool: str, method: str | None, make) -> None:
        row = {"tool": tool, "method": method}
        start = time.perf_counter()
        try:
            path = make()
            row["seconds"] = round(time.perf_counter() - start, 1)
            row.update(status="ok", **measure(path))
        except Exception as exc:  # noqa: BLE001 - recording the failure is the point
            row.update(status="failed", error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                       if str(exc).strip() else type(exc).__name__)
        print(json.dumps(row), flush=True)
        rows.append(row)

    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        tmp = Path(tmp)
        record("fp32 (onnx)", None, lambda: fp32)
        record("deploykit", "as run", lambda: int8)
        int8_model = onnx.load(str(int8))
        plain = float_tables(int8_model, onnx.load(str(fp32)))
        if len(plain.graph.initializer) != len(int8_model.graph.initializer) or \
                {n.op_type for n in plain.graph.node} != {n.op_type for n in int8_model.graph.node}:
            def _plain() -> Path:
                onnx.save_model(plain, str(tmp / "deploykit-fp32-emb.onnx"))
                return tmp / "deploykit-fp32-emb.onnx"
            record("deploykit", "as run, fp32 embeddings", _plain)
        if "ort-static" not in args.skip:
            for method in ORT_METHODS:
                out = tmp / f"ort-{method}.onnx"
                record("ort-static", method, lambda m=method, o=out: (
                    ort_quantize(fp32, o, calib.feeds, m, ["MatMul", "Gemm"], False), o)[1])
        if "ort-dynamic" not in args.skip:
            record("ort-dynamic", "MatMul", lambda: make_baseline("ort-dynamic", fp32, tmp / "dynamic.onnx"))
            record("ort-dynamic", "default ops (Gather too)", lambda: ort_dynamic_default(fp32, tmp / "dyn-all.onnx"))
        modelopt = {"status": "skipped"}
        if "modelopt" not in args.skip:
            try:
                import modelopt as mo
                import modelopt.onnx.quantization  # noqa: F401
                modelopt = {"status": "ok", "version": mo.__version__}
            except Exception as exc:  # noqa: BLE001
                modelopt = {"status": "not importable", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            if modelopt["status"] == "ok":
                for method in MODELOPT_METHODS:
                    out = tmp / f"modelopt-{method}.onnx"
                    record("modelopt", method, lambda m=method, o=out: (
                        modelopt_quantize(fp32, o, calib.feeds, m), o)[1])
    import onnxruntime

    result = {"run": str(run), "calibration_samples": calib.count, "evaluation_samples": evaluation.count,
              "onnxruntime": onnxruntime.__version__, "modelopt": modelopt, "python": platform.python_version(),
              "rows": rows}
    out_path = args.out or run / "bench_peers.json"
    write_json(out_path, result)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
