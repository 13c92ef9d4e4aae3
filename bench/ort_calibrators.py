"""ONNX Runtime's own static calibrators vs deploykit's, on the artifacts of a run.

For each calibration method and op set, quantize the run's FP32 ONNX with
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, symmetric int8
activations: the TensorRT-legal form) and with ``deploykit.quantize.calibrate``, record
whether it completed and the error if not, and measure cosine / NN agreement against the
run's torch FP32 reference on the evaluation set. ORT is fed fixed-length (padded) batches,
its best case; one extra probe feeds it deploykit's padding-trimmed batches.

    python bench/ort_calibrators.py --run runs/minilm-int8      # after `deploykit run`

Writes ``<run>/bench_ort_calibrators.json``. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path


from deploykit.data import iterate_batches, load_split
from deploykit.io import read_npz, write_json
from deploykit.progress import set_quiet
from deploykit.quantize import QuantConfig, calibrate
from deploykit.runners import OrtRunner
from deploykit.verify import embedding_metrics, run_split

PERCENTILE = 99.999   # ORT's default CalibPercentile; deploykit uses the same here
ALL_OPS = ["MatMul", "Gemm", "Add", "Mul", "Softmax", "Where", "LayerNormalization", "Div", "Sub"]
OP_SETS = {"matmul": ["MatMul", "Gemm"], "all": ALL_OPS}
METHODS = ("minmax", "percentile", "entropy")


def ort_quantize(model: Path, out: Path, feeds: dict, method: str, ops: list[str], trimmed: bool,
                 inputs_only: bool = False) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            size = 16
            if trimmed:
                self.batches = iterate_batches(feeds, size)
            else:
                n = next(iter(feeds.values())).shape[0]
                self.batches = iter([{k: v[i:i + size] for k, v in feeds.items()} for i in range(0, n, size)])

        def get_next(self):
            return next(self.batches, None)

    import onnx

    # A ModelProto: given a path, ORT writes "<model>-inferred.onnx" beside the input.
    quantize_static(onnx.load(str(model)), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=ops, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                      "entropy": CalibrationMethod.Entropy}[method],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "CalibPercentile": PERCENTILE,
                                   **({"OpTypesToExcludeOutputQuantization": ops} if inputs_only else {})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/minilm-int8"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    set_quiet(True)
    logging.disable(logging.WARNING)
    run = args.run
    names = ["input_ids", "attention_mask", "token_type_ids"]
    calib = load_split(run / "data" / "calibration.npz", names)
    evaluation = load_split(run / "data" / "evaluation.npz", names)
    reference = read_npz(run / "reference.npz")["output"]
    fp32 = run / "model.onnx"
    rows = []

    def measure(path: Path) -> dict:   # exact Q/DQ: TensorRT's arithmetic, as deploykit scores gpu-trt
        metrics, _ = embedding_metrics(reference, run_split(OrtRunner(path, exact_qdq=True), evaluation))
        return {k: round(metrics[k], 4) for k in ("cosine_mean", "cosine_min", "nn_agreement")}

    with tempfile.TemporaryDirectory() as tmp:
        # (tool, method, ops, trimmed batches, Q/DQ on op inputs only). ORT's default placement
        # also quantizes every quantized op's output; "inputs only" is deploykit's placement,
        # so those rows isolate the calibrators.
        jobs = [("onnxruntime", m, o, False, False) for o in OP_SETS for m in METHODS]
        jobs += [("onnxruntime", m, "matmul", False, True) for m in METHODS]
        jobs += [("onnxruntime", "percentile", "matmul", True, False)]
        jobs += [("deploykit", m, o, True, True) for o in OP_SETS for m in (*METHODS, "mse")]
        for tool, method, opset, trimmed, inputs_only in jobs:
            out = Path(tmp) / f"{tool}-{method}-{opset}-{trimmed}-{inputs_only}.onnx"
            row = {"tool": tool, "method": method, "ops": opset, "trimmed_batches": trimmed,
                   "inputs_only": inputs_only}
            start = time.perf_counter()
            try:
                if tool == "onnxruntime":
                    ort_quantize(fp32, out, calib.feeds, method, OP_SETS[opset], trimmed, inputs_only)
                else:
                    result = calibrate(fp32, calib, out, QuantConfig(method=method, percentile=PERCENTILE,
                                                                     op_types=OP_SETS[opset]))
                    row["float_nodes"] = len(result.float_nodes)
                row["seconds"] = round(time.perf_counter() - start, 1)
                row.update(status="ok", **measure(out))
            except Exception as exc:  # noqa: BLE001 - recording the failure is the point
                row.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    import onnxruntime

    result = {"run": str(run), "calibration_samples": calib.count, "percentile": PERCENTILE, "evaluation_samples": evaluation.count,
              "onnxruntime": onnxruntime.__version__, "python": platform.python_version(), "rows": rows}
    out_path = args.out or run / "bench_ort_calibrators.json"
    write_json(out_path, result)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
