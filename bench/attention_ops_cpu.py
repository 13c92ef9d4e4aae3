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
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPS = {
    "dense": {"kind": "dense"},
    "neighborhood-1d-k64": {"kind": "neighborhood", "kernel_size": 64},
    "linear": {"kind": "linear", "causal": False},
    "linear-causal": {"kind": "linear", "causal": True},
}


def peak_child(path: Path, op: str, n: int, heads: int, dim: int, threads: int) -> int:
    """Peak RSS (bytes) of a fresh process that builds the session and runs it once at N = n."""
    # VmHWM (Linux): the high-water mark of this process image. Not ru_maxrss, which Linux
    # carries across exec from the (large) parent and would hide the child's own peak.
    code = ("import onnx; from deploykit.bench.attention_layer import layer_feeds; "
            "from deploykit.quantize.graph import cpu_session; "
            f"s = cpu_session(onnx.load({str(path)!r}), {threads}); "
            f"s.run(None, layer_feeds({OPS[op]!r}, {n}, {heads}, {dim})); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
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

    from deploykit.bench.attention_layer import build_layer, layer_feeds, time_layer
    from deploykit.io import write_json
    from deploykit.quantize.graph import cpu_session
    from deploykit.plugins.linear_attention import linear_attention
    from deploykit.plugins.neighborhood_attention import neighborhood_attention

    results = {"setup": {"batch": 1, "heads": args.heads, "head_dim": args.dim, "threads": args.threads,
                         "iterations": args.iterations, "onnxruntime": ort.__version__,
                         "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")},
               "latency_ms": {}, "parity_max_abs": {}, "peak_extra_mib": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        import onnx
        import torch

        for op, spec in OPS.items():
            paths[op] = Path(tmp) / f"{op}.onnx"
            model = build_layer(spec, args.heads, args.dim)
            onnx.save(model, str(paths[op]))
            session = cpu_session(model, args.threads)
            for n in [n for n in args.lengths if n <= 2048]:     # parity with reference.py (torch), float32
                f = layer_feeds(spec, n, args.heads, args.dim)
                out = session.run(None, f)[0]
                q, k, v = (torch.from_numpy(f[x]) for x in ("q", "k", "v"))
                if op == "dense":
                    ref = torch.softmax(q @ k.transpose(-1, -2) * args.dim ** -0.5, -1) @ v
                elif op.startswith("neighborhood"):
                    ref = neighborhood_attention(q, k, v, spec["kernel_size"])
                else:
                    ref = linear_attention(q, k, v, causal=spec["causal"])
                results["parity_max_abs"].setdefault(op, {})[str(n)] = float(np.abs(out - ref.numpy()).max())
            rows = time_layer(model, spec, args.lengths, args.heads, args.dim, threads=args.threads,
                              iterations=args.iterations)
            results["latency_ms"][op] = {str(n): row["p50_ms"] for n, row in rows.items()}
            for n, row in rows.items():
                print(f"{op:22s} N={n:5d}  {row['p50_ms']:9.2f} ms", flush=True)
        for op, path in paths.items():
            base = peak_child(path, op, args.base_length, args.heads, args.dim, args.threads)
            results["peak_extra_mib"][op] = {}
            for n in args.memory_lengths:
                extra = (peak_child(path, op, n, args.heads, args.dim, args.threads) - base) / 2 ** 20
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
