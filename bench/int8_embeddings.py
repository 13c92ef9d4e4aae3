"""INT8 embedding tables: file size and accuracy with and without them, and each graph form's speed.

On the artifacts of a run (its FP32 export, INT8 model, torch FP32 reference and evaluation
set), this measures:

- the FP32 file, the run's INT8 file as written (``quantize.embeddings`` on), and the same
  INT8 model with its embedding tables put back in FP32 (the file deploykit wrote before
  INT8 embeddings): size, INT8 / FP32, cosine mean / min and nearest-neighbour agreement
  against the torch FP32 reference on the held-out evaluation set;
- the FP32 export with only its embedding tables int8 (the error the tables alone add);
- each embedding form (``dq-gather``, ``gather-mul``, ``gather-block``) on the same INT8
  model: file size, accuracy, and ONNX Runtime CPU latency (median of ``--iterations`` runs at
  batch 1 and 8, fixed sequence length), the forms interleaved so machine load hits all alike.

    deploykit run recipes/minilm-int8-smoothquant.yaml
    python bench/int8_embeddings.py --run runs/minilm-int8-smoothquant

Writes ``<run>/bench_int8_embeddings.json`` (or ``--out``). Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
from pathlib import Path

import onnx

from deploykit.data import load_split
from deploykit.io import read_npz, write_json
from deploykit.onnx_utils import model_bytes
from deploykit.progress import set_quiet
from deploykit.quantize.embeddings import FORMS, embedding_tables, quantize_embeddings
from deploykit.runners import OrtRunner
from deploykit.verify import embedding_metrics, run_split

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def float_tables(int8: onnx.ModelProto, fp32: onnx.ModelProto) -> onnx.ModelProto:
    """``int8`` with each ``DequantizeLinear(int8 table) -> Gather`` put back as the FP32 table."""
    originals = {i.name: i for i in fp32.graph.initializer}
    inits = {i.name: i for i in int8.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(int8)
    drop_nodes, drop_inits, add = [], set(), []
    for node in out.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith("_int8"):
            continue
        name = node.input[0][: -len("_int8")]
        if name not in originals or inits[node.input[0]].data_type != onnx.TensorProto.INT8:
            continue
        for reader in out.graph.node:
            if reader.op_type == "Gather" and reader.input[0] == node.output[0]:
                reader.input[0] = name
        drop_nodes.append(node)
        drop_inits.update(node.input[:2])
        add.append(originals[name])
    for node in drop_nodes:
        out.graph.node.remove(node)
    kept = [i for i in out.graph.initializer if i.name not in drop_inits]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + add)
    return out


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def _latency(paths: dict[str, Path], split, batches: list[int], seq: int,
             iterations: int, threads: int) -> dict[str, dict[str, float]]:
    """Median ms per form and batch, the forms timed interleaved call by call (deploykit's bench
    with one call per round: load drifts hit every form alike)."""
    from deploykit.bench import BenchConfig, bench

    runners = [(name, OrtRunner(path, threads=threads, exact_qdq=False)) for name, path in paths.items()]
    config = BenchConfig(batches=list(batches), seq_len=seq, warmup=1, iterations=iterations, min_seconds=0.0,
                         rounds=iterations)
    latency = bench(runners, split, config)
    return {name: {f"batch{b}_ms_median": round(latency[f"{name}@ort-cpu/b{b}"]["p50_ms"], 3) for b in batches}
            for name in paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/minilm-int8-smoothquant"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_quiet(True)
    logging.disable(logging.WARNING)
    run = args.run
    evaluation = load_split(run / "data" / "evaluation.npz", NAMES)
    reference = read_npz(run / "reference.npz")["output"]
    fp32_path, int8_path = run / "model.onnx", run / "model.int8.onnx"
    fp32, int8 = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    fp32_bytes = model_bytes(fp32_path)

    def measure(path: Path) -> dict:
        metrics, _ = embedding_metrics(reference, run_split(OrtRunner(path), evaluation))
        size = model_bytes(path)
        return {"mb": round(size / 1e6, 2), "of_fp32": round(size / fp32_bytes, 4),
                **{k: round(metrics[k], 5) for k in ("cosine_mean", "cosine_min", "nn_agreement")}}

    rows = {}
    with tempfile.TemporaryDirectory(prefix="int8emb-") as tmp:
        tmp = Path(tmp)
        plain = float_tables(int8, fp32)
        if not embedding_tables(plain):
            raise SystemExit(f"{int8_path} has no int8 embedding tables to compare (quantize.embeddings off?)")
        paths = {"fp32": fp32_path, "int8 as written": int8_path,
                 "int8, fp32 embeddings": _save(plain, tmp / "plain.onnx")}
        emb_only = onnx.load(str(fp32_path))
        quantize_embeddings(emb_only, "dq-gather")
        paths["fp32, int8 embeddings only"] = _save(emb_only, tmp / "emb_only.onnx")
        forms = {}
        for form in FORMS:
            model = onnx.ModelProto()
            model.CopyFrom(plain)
            records = quantize_embeddings(model, form)
            forms[form] = _save(model, tmp / f"{form}.onnx")
            paths[f"int8, {form}"] = forms[form]
        tables = [{k: r[k] for k in ("name", "shape", "bytes_fp32", "bytes_int8")} for r in records]
        for name, path in paths.items():
            rows[name] = measure(path)
            print(json.dumps({name: rows[name]}), flush=True)
        latency = _latency({"int8, fp32 embeddings": paths["int8, fp32 embeddings"], **forms},
                           evaluation, args.batches, args.seq, args.iterations, args.threads)
        print(json.dumps(latency), flush=True)
    import onnxruntime

    result = {"run": str(run), "evaluation_samples": evaluation.count, "tables": tables, "rows": rows,
              "ort_cpu_latency": {"threads": args.threads, "seq_len": args.seq, "iterations": args.iterations,
                                  "ms": latency},
              "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
              "machine": platform.machine()}
    out_path = args.out or run / "bench_int8_embeddings.json"
    write_json(out_path, result)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
