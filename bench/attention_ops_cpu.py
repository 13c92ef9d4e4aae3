"""ORT CPU: one attention layer, dense softmax vs deploykit's ops (ONNX local functions).

For each op the layer takes q, k, v (1, H, N, D) as inputs (no projections) and is exported
once with a dynamic N. Latency: median of timed runs after warm-up at N in --lengths.
Memory: each (op, N) runs in a fresh subprocess that builds the session, runs once and
reports its peak RSS (Linux VmHWM); the peak of the same process at N = --base-length is subtracted, so
the figure is what the N-sized run added. Writes JSON (and prints a markdown table).

    python bench/attention_ops_cpu.py --out bench_attention_ops_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

OPS = {
    "dense": {},
    "neighborhood-1d-k64": {"kernel_size": 64},
    "linear": {"causal": False},
    "linear-causal": {"causal": True},
}


def build(op: str, path: Path, heads: int, dim: int) -> None:
    import torch

    from deploykit.plugins import attach_functions
    from deploykit.plugins.linear_attention.onnx_function import linear_attention_op
    from deploykit.plugins.neighborhood_attention.onnx_function import na_op

    settings = OPS[op]

    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            if op == "dense":
                return torch.softmax(q @ k.transpose(-1, -2) * dim ** -0.5, dim=-1) @ v
            if op.startswith("neighborhood"):
                return na_op(q, k, v, settings["kernel_size"])
            return linear_attention_op(q, k, v, causal=settings["causal"])

    # Three distinct tensors: passing one tensor three times lets the exporter alias the inputs.
    example = tuple(torch.randn(1, heads, 256, dim) for _ in range(3))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Layer(), example, dynamo=True, input_names=["q", "k", "v"],
                                    dynamic_shapes=({2: "n"},) * 3, opset_version=18)
    model = program.model_proto
    attach_functions(model)
    import onnx

    onnx.save(model, str(path))


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feeds(n: int, heads: int, dim: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((1, heads, n, dim), dtype=np.float32) for name in ("q", "k", "v")}


def peak_child(path: Path, n: int, heads: int, dim: int, threads: int) -> int:
    """Peak RSS (bytes) of a fresh process that builds the session and runs it once at N = n."""
    # VmHWM (Linux): the high-water mark of this process image. Not ru_maxrss, which Linux
    # carries across exec from the (large) parent and would hide the child's own peak.
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import attention_ops_cpu as b; s = b.session(__import__('pathlib').Path({str(path)!r}), {threads}); "
            f"s.run(None, b.feeds({n}, {heads}, {dim})); "
            f"print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024        # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--base-length", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench_attention_ops_cpu.json"))
    args = parser.parse_args()
    import numpy as np
    import onnxruntime as ort

    from deploykit.io import write_json
    from deploykit.plugins.linear_attention import linear_attention
    from deploykit.plugins.neighborhood_attention import neighborhood_attention

    results = {"setup": {"batch": 1, "heads": args.heads, "head_dim": args.dim, "threads": args.threads,
                         "iterations": args.iterations, "onnxruntime": ort.__version__,
                         "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")},
               "latency_ms": {}, "parity_max_abs": {}, "peak_extra_mib": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for op in OPS:
            paths[op] = Path(tmp) / f"{op}.onnx"
            build(op, paths[op], args.heads, args.dim)
        import torch

        for op, path in paths.items():
            sess = session(path, args.threads)
            results["latency_ms"][op] = {}
            for n in args.lengths:
                f = feeds(n, args.heads, args.dim)
                out = sess.run(None, f)[0]
                if n <= 2048:   # parity with reference.py (torch), float32
                    q, k, v = (torch.from_numpy(f[x]) for x in ("q", "k", "v"))
                    if op == "dense":
                        ref = torch.softmax(q @ k.transpose(-1, -2) * args.dim ** -0.5, -1) @ v
                    elif op.startswith("neighborhood"):
                        ref = neighborhood_attention(q, k, v, OPS[op]["kernel_size"])
                    else:
                        ref = linear_attention(q, k, v, causal=OPS[op]["causal"])
                    results["parity_max_abs"].setdefault(op, {})[str(n)] = float(np.abs(out - ref.numpy()).max())
                for _ in range(2):
                    sess.run(None, f)
                times = []
                for _ in range(args.iterations):
                    t = time.perf_counter()
                    sess.run(None, f)
                    times.append((time.perf_counter() - t) * 1000)
                results["latency_ms"][op][str(n)] = round(statistics.median(times), 3)
                print(f"{op:22s} N={n:5d}  {statistics.median(times):9.2f} ms", flush=True)
        for op, path in paths.items():
            base = peak_child(path, args.base_length, args.heads, args.dim, args.threads)
            results["peak_extra_mib"][op] = {}
            for n in args.memory_lengths:
                extra = (peak_child(path, n, args.heads, args.dim, args.threads) - base) / 2 ** 20
                results["peak_extra_mib"][op][str(n)] = round(extra, 1)
                print(f"{op:22s} N={n:5d}  +{extra:8.1f} MiB peak", flush=True)
    write_json(args.out, results)
    lines = ["| op | " + " | ".join(f"N={n}" for n in args.lengths) + " |",
             "|---|" + "---:|" * len(args.lengths)]
    for op, row in results["latency_ms"].items():
        lines.append(f"| {op} | " + " | ".join(f"{row[str(n)]:.2f} ms" for n in args.lengths) + " |")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
