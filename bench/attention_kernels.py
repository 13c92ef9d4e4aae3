"""GPU: deploykit's Triton attention kernels vs reference.py, SDPA, FlexAttention and fla.

Runs wherever torch sees a CUDA device (Triton, torch >= 2.5 for FlexAttention; ``fla-core``
optional for the linear-attention baseline). For each configuration it checks parity with
reference.py (fp16 and bf16, at the smaller lengths), then times with CUDA events (median of
``--iterations`` after warm-up) and reports achieved TFLOP/s and the fraction of the GPU's
dense fp16/bf16 tensor-core peak:

* neighborhood attention (1-D, non-causal window k): FLOPs = 4 B H N k D (QKᵀ and PV over the
  k keys each query sees). Baselines: ``scaled_dot_product_attention`` with a boolean
  window mask (skipped where the N x N mask would not fit), FlexAttention with the same
  window as a block mask (compiled once per shape).
* linear attention (causal, decay): FLOPs = B H N (4 D Dv + 2 C (D + Dv)) for chunk C
  (inter-chunk state products + the intra-chunk masked product). Baseline: fla's
  ``chunk_simple_gla`` (log-decay per head) and ``chunk_linear_attn`` when ``fla`` imports.

Writes JSON and a markdown table::

    python bench/attention_kernels.py --out bench_attention_kernels.json

``--smoke`` runs tiny shapes (for checking the script itself; with TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity), by device-name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0,
               "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.0, "A10": 125.0, "Orin": 42.5}


def peak_for(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def timed(fn, iterations: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events; wall clock on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        times = []
        for _ in range(iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def window_mask(n: int, k: int, device):
    """(N, N) boolean mask of NATTEN's 1-D window (reference.dense_mask's rule, vectorised)."""
    import torch

    i = torch.arange(n, device=device)
    start = (i - k // 2).clamp(0, n - k)
    j = torch.arange(n, device=device)
    return (j[None, :] >= start[:, None]) & (j[None, :] < start[:, None] + k)


def flex_runner(n: int, k: int, device):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def rule(b, h, q_idx, kv_idx):
        start = torch.clamp(q_idx - k // 2, 0, n - k)
        return (kv_idx >= start) & (kv_idx < start + k)

    block_mask = create_block_mask(rule, None, None, n, n, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, kk, v: compiled(q, kk, v, block_mask=block_mask)


def bench_na(args, device, dtype, results):
    import torch

    from deploykit.plugins.neighborhood_attention import neighborhood_attention
    from deploykit.plugins.neighborhood_attention.triton_kernel import neighborhood_attention_triton

    for d in args.head_dims:
        for n in args.lengths:
            for k in args.windows:
                if k > n:
                    continue
                torch.manual_seed(0)
                q, kk, v = (torch.randn(args.batch, args.heads, n, d, device=device, dtype=dtype) for _ in range(3))
                row = {"op": "neighborhood-1d", "dtype": str(dtype).replace("torch.", ""), "N": n, "window": k,
                       "head_dim": d, "batch": args.batch, "heads": args.heads}
                flops = 4 * args.batch * args.heads * n * k * d
                out = neighborhood_attention_triton(q, kk, v, k)
                if n <= args.parity_max_n:
                    ref = neighborhood_attention(q.float(), kk.float(), v.float(), k)
                    row["max_abs_err"] = float((out.float() - ref).abs().max())
                row["deploykit_ms"] = timed(lambda: neighborhood_attention_triton(q, kk, v, k), args.iterations)
                if n * n <= args.max_mask_elems:
                    mask = window_mask(n, k, device)
                    sdpa = torch.nn.functional.scaled_dot_product_attention
                    row["sdpa_mask_ms"] = timed(lambda: sdpa(q, kk, v, attn_mask=mask), args.iterations)
                else:
                    row["sdpa_mask_ms"] = None
                    row["sdpa_note"] = f"N x N mask ({n * n / 1e9:.1f} G entries) over --max-mask-elems"
                try:
                    flex = flex_runner(n, k, device)
                    row["flex_ms"] = timed(lambda: flex(q, kk, v), args.iterations)
                except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is recorded, not fatal
                    row["flex_ms"], row["flex_note"] = None, f"{type(exc).__name__}: {str(exc)[:160]}"
                row["tflops"] = flops / (row["deploykit_ms"] * 1e-3) / 1e12
                if args.peak:
                    row["fraction_of_peak"] = row["tflops"] / args.peak
                if row.get("flex_ms"):
                    row["speedup_vs_flex"] = row["flex_ms"] / row["deploykit_ms"]
                results.append(row)
                print(json.dumps(row), flush=True)


def bench_linear(args, device, dtype, results):
    import torch

    from deploykit.plugins.linear_attention import linear_attention
    from deploykit.plugins.linear_attention.triton_kernel import linear_attention_triton

    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # noqa: BLE001
        chunk_simple_gla, fla_note = None, f"fla not importable: {type(exc).__name__}: {str(exc)[:120]}"
    else:
        fla_note = None
    chunk = 64
    for d in args.head_dims:
        for n in args.lengths:
            torch.manual_seed(0)
            q, kk, v = (torch.randn(args.batch, args.heads, n, d, device=device, dtype=dtype) * 0.5 for _ in range(3))
            decay = [1 - 2.0 ** (-5 - h * 8 / args.heads) for h in range(args.heads)]    # RetNet-style per head
            row = {"op": "linear-causal-decay", "dtype": str(dtype).replace("torch.", ""), "N": n, "head_dim": d,
                   "batch": args.batch, "heads": args.heads}
            flops = args.batch * args.heads * n * (4 * d * d + 2 * chunk * 2 * d)

            def ours():
                return linear_attention_triton(q, kk, v, causal=True, decay=decay, normalize=False, chunk_size=chunk)

            out = ours()
            if n <= args.parity_max_n:
                ref = linear_attention(q.float(), kk.float(), v.float(), causal=True, decay=decay, normalize=False,
                                       chunk_size=chunk)
                row["max_rel_err"] = float((out.float() - ref).abs().max() / ref.abs().max())
            row["deploykit_ms"] = timed(ours, args.iterations)
            row["ms_per_1k_tokens"] = row["deploykit_ms"] / (n / 1024)
            if chunk_simple_gla is not None:
                # fla's layout is (B, T, H, D); g is the per-step log decay. Its feature map is the
                # identity, so the comparison is on the kernel: phi applied to both beforehand.
                fq, fk = (torch.nn.functional.elu(x) + 1 for x in (q, kk))
                g = torch.log(torch.tensor(decay, device=device)).view(1, 1, -1).expand(args.batch, n, -1).float()
                tq, tk, tv = (x.transpose(1, 2).contiguous() for x in (fq, fk, v))
                try:
                    row["fla_ms"] = timed(lambda: chunk_simple_gla(tq, tk, tv, g=g, scale=1.0), args.iterations)
                    row["speedup_vs_fla"] = row["fla_ms"] / row["deploykit_ms"]
                except Exception as exc:  # noqa: BLE001
                    row["fla_ms"], row["fla_note"] = None, f"{type(exc).__name__}: {str(exc)[:160]}"
            else:
                row["fla_ms"], row["fla_note"] = None, fla_note
            row["tflops"] = flops / (row["deploykit_ms"] * 1e-3) / 1e12
            if args.peak:
                row["fraction_of_peak"] = row["tflops"] / args.peak
            results.append(row)
            print(json.dumps(row), flush=True)


def markdown(results: list[dict]) -> str:
    lines = ["| op | dtype | N | window | D | deploykit ms | TFLOP/s | % peak | SDPA+mask ms | Flex ms | fla ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x, digits=3):
        return "—" if x is None else f"{x:.{digits}f}"

    for r in results:
        pct = r.get("fraction_of_peak")
        lines.append(f"| {r['op']} | {r['dtype']} | {r['N']} | {r.get('window', '—')} | {r['head_dim']} | "
                     f"{f(r['deploykit_ms'])} | {f(r['tflops'], 1)} | {'—' if pct is None else f'{100 * pct:.0f}%'} | "
                     f"{f(r.get('sdpa_mask_ms'))} | {f(r.get('flex_ms'))} | {f(r.get('fla_ms'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--windows", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--parity-max-n", type=int, default=4096)
    parser.add_argument("--max-mask-elems", type=float, default=2.0 ** 30)
    parser.add_argument("--ops", nargs="+", default=["neighborhood", "linear"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script")
    parser.add_argument("--out", type=Path, default=Path("bench_attention_kernels.json"))
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.lengths, args.windows, args.head_dims, args.heads, args.iterations = [64], [16], [32], 2, 2
    elif device == "cpu":
        raise SystemExit("no CUDA device: run on a GPU (or --smoke with TRITON_INTERPRET=1)")
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    args.peak = peak_for(name) if device == "cuda" else None
    results: list[dict] = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        if "neighborhood" in args.ops:
            bench_na(args, device, dtype, results)
        if "linear" in args.ops:
            bench_linear(args, device, dtype, results)
    setup = {"device": name, "peak_tflops": args.peak, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
             "cuda": torch.version.cuda, "batch": args.batch, "heads": args.heads}
    try:
        import triton

        setup["triton"] = triton.__version__
    except ImportError:
        pass
    args.out.write_text(json.dumps({"setup": setup, "results": results}, indent=2))
    table = markdown(results)
    args.out.with_suffix(".md").write_text(f"{setup}\n\n{table}\n")
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")



if __name__ == "__main__":
    main()
