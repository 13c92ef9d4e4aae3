"""Time ONNX models under an edge CPU target's budget (``deploykit bench --target edge-cpu-x86``).

What is emulated: the target's thread count (ONNX Runtime's intra-op threads, and the child
process pinned to that many cores of this machine when it has more), batch 1 (edge serving),
and the target's memory budget: each model runs in a fresh child process holding one ONNX
Runtime session, whose peak resident memory is compared with ``memory_gib``. The children
are loaded together and timed interleaved in ``bench.rounds`` rounds, one round per model in
turn, so a slow spell of this machine slows every variant alike; each variant's ratio to FP32
is taken per round, with its spread, as ``deploykit bench`` does. What is not:
the target's CPU microarchitecture (ISA extensions, caches, clock), memory bandwidth and
thermal limits; latency is this machine's CPU at the target's thread count, a like-for-like
comparison between variants, not the device's figure. ONNX Runtime CPU targets of this
machine's architecture are timed; an aarch64 target on x86_64 is "not measurable here". A
TensorRT target is timed only on its own GPU (its engine, batch 1, no memory figure).

The child runs this file as a script and imports only ONNX Runtime and deploykit's light
modules (io, runners, timing; a test checks that torch stays out): torch alone would add
about 190 MiB (``VmHWM`` of ``import onnxruntime`` 46 MiB, with torch 238 MiB, measured
here) that a deployed ONNX Runtime process does not hold. Peak memory is the process's own
high-water mark (``VmHWM``): on Linux, ``ru_maxrss`` of a child started by ``subprocess``
starts at the parent's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any


from deploykit.errors import UserError

if TYPE_CHECKING:
    from deploykit.bench import BenchConfig
    from deploykit.data import Split
    from deploykit.targets import Target

def _usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def measurability(target: Target) -> tuple[bool, str | None]:
    """Whether this machine can time ``target``: (True, None) or (False, "<why>: not measurable here")."""
    if target.runtime.name == "onnxruntime":
        from deploykit.targets import machine_arch, normalize_arch

        want, have = normalize_arch(target.arch), machine_arch()
        if want != have:
            return False, f"{want} target; this machine is {have}: not measurable here"
        return True, None
    from deploykit.engine import tensorrt_status

    sm = f"sm_{(target.compute_capability or '?').replace('.', '')}"
    env, why = tensorrt_status()                       # never imports TensorRT without a CUDA device
    if env is None:
        return False, f"{sm} TensorRT target; {why}: not measurable here"
    if env.compute_capability != target.compute_capability:
        return False, (f"{sm} TensorRT target; this GPU ({env.gpu}) is sm_{env.compute_capability.replace('.', '')}: "
                       "not measurable here")
    return True, None


def _pick_cpus(cpus: list[int], n: int) -> list[int]:
    """``n`` of ``cpus``, one per physical core first (SMT siblings share a core's units)."""
    first, rest, seen = [], [], set()
    for cpu in cpus:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            siblings = str(cpu)
        (rest if siblings in seen else first).append(cpu)
        seen.add(siblings)
    return (first + rest)[:n]


def _bench_tensorrt(models: dict[str, Path], split: Split, target: Target, config: BenchConfig,
                    entry: dict[str, Any]) -> dict[str, Any]:
    """This machine is the target's GPU: each model's engine (the one next to it when it was
    built here for this target, else built now) timed at batch 1; peak GPU memory is not
    measured (TensorRT's allocations are not torch's)."""
    from deploykit.bench import bench_feeds
    from deploykit.engine import ShapeRanges, build_engine, engine_info, require_tensorrt
    from deploykit.runners.tensorrt import TrtRunner
    from deploykit.progress import track
    from deploykit.targets import check_engine
    from deploykit.timing import time_loop

    env = require_tensorrt(None, plugins=False)        # measurability() found it usable
    entry["threads"] = 1
    entry["notes"].append(f"timed on this machine's {env.gpu} with TensorRT {env.version}; GPU memory not measured")
    feeds = bench_feeds(split, 1, config.seq_len)
    for variant, model in track(list(models.items()), total=len(models), description=f"benchmarking on {target.name}"):
        engine = Path(model).with_suffix(".engine")          # deploykit build's default place
        if engine.is_file():
            try:
                check_engine(engine_info(engine), target, engine)
            except UserError:                                 # built for another GPU or TensorRT
                engine = Path(model).with_name(f"{Path(model).stem}.{target.name}.engine")
        else:
            engine = Path(model).with_name(f"{Path(model).stem}.{target.name}.engine")
        if not engine.is_file():
            build_engine(model, engine, target=target.name,
                         ranges=ShapeRanges(batch=(1, 1, 1), sequence=(1, config.seq_len, config.seq_len)))
        figures = time_loop(TrtRunner(engine), feeds, warmup=config.warmup, iterations=config.iterations,
                            min_seconds=config.min_seconds, max_seconds=config.max_seconds)
        entry["latency"][variant] = {**figures, "engine": str(engine), "peak_rss_mib": None, "model_rss_mib": None,
                                     "within_memory_budget": None}
    return entry


def bench_on_target(models: dict[str, Path], split: Split, target: Target, config: BenchConfig) -> dict[str, Any]:
    """The report entry for ``target``: batch-1 latency and peak memory of each model, each timed
    in a fresh child process at the target's thread count; ``measurable`` False (and no latency)
    where this machine cannot stand in for the target."""
    config.validate()
    cpus = _usable_cpus()
    measurable, reason = measurability(target)
    entry: dict[str, Any] = {"target": target.name, "runtime": target.runtime.describe(), "measurable": measurable,
                             "reason": reason, "threads": None, "machine_cores": len(cpus),
                             "memory_budget_mib": target.memory_gib * 1024, "notes": [], "latency": {}}
    if not measurable:
        return entry
    if target.runtime.name == "tensorrt":
        return _bench_tensorrt(models, split, target, config, entry)

    import onnxruntime as ort

    from deploykit.bench import bench_feeds
    from deploykit.io import write_npz

    wanted = target.threads or 1
    threads = min(wanted, len(cpus))
    pinned: list[int] | None = None
    if len(cpus) < wanted:
        entry["notes"].append(f"this machine has {len(cpus)} cores, target has {wanted}: latency measured with "
                              f"{len(cpus)} threads is a bound, not the target's figure")
    elif len(cpus) > wanted and hasattr(os, "sched_setaffinity"):
        pinned = _pick_cpus(cpus, threads)
        entry["notes"].append(f"pinned to CPUs {','.join(map(str, pinned))} of this machine's {len(cpus)}")
    if not target.runtime.accepts(ort.__version__):
        entry["notes"].append(f"this machine runs onnxruntime {ort.__version__}; target runs "
                              f"{target.runtime.describe()}")
    entry["notes"].append("emulated: threads, batch 1 and the memory budget; not the target's CPU "
                          "microarchitecture, clock or memory bandwidth")
    entry["threads"] = threads

    feeds = bench_feeds(split, 1, config.seq_len)
    with tempfile.TemporaryDirectory(prefix="deploykit-edge-") as tmp:
        feeds_path = write_npz(Path(tmp) / "feeds.npz", feeds)
        entry["latency"] = _time_interleaved(models, feeds_path, threads, pinned, config, Path(tmp), target.name)
    for result in entry["latency"].values():
        result["within_memory_budget"] = bool(result["peak_rss_mib"] <= entry["memory_budget_mib"])
    entry["notes"].append(f"each model in its own process, timed interleaved in {config.rounds} rounds")
    return entry


class _Child:
    """One model's timing process: it loads one ONNX Runtime session, then times a round per
    ``round`` line it reads and reports its peak memory on ``done``."""

    def __init__(self, model: Path, feeds_path: Path, threads: int, cpus: list[int] | None, config: BenchConfig,
                 stderr_path: Path):
        per_round = max(1, -(-config.iterations // config.rounds))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--model", str(model), "--feeds", str(feeds_path),
               "--threads", str(threads), "--warmup", str(config.warmup), "--iterations", str(per_round),
               "--min-seconds", repr(float(config.min_seconds) / config.rounds),
               "--max-seconds", repr(float(config.max_seconds) / config.rounds)]
        if cpus:
            cmd += ["--cpus", ",".join(map(str, cpus))]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])    # deploykit importable however it was found here
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        self.model, self.stderr_path = model, stderr_path
        self._stderr = open(stderr_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, env=env, bufsize=1)

    def ask(self, command: str | None, want: str) -> dict[str, Any]:
        """Send ``command`` (None: only read) and return the child's next JSON line holding ``want``."""
        try:
            if command is not None:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    break
                reply = _json_line(line)
                if isinstance(reply, dict) and want in reply:
                    return reply
                if isinstance(reply, dict) and "error" in reply:      # the child's UserError
                    raise UserError(str(reply["error"]), path=self.model, fix=reply.get("fix"))
        except (BrokenPipeError, OSError):
            pass
        raise self._failure()

    def _failure(self) -> UserError:
        code = self.proc.wait()
        self._stderr.flush()
        errors = [line.strip() for line in self.stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()
                  if line.strip()]
        if errors:
            why = errors[-1]
        elif code < 0:
            why = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
        else:
            why = f"exit code {code}, no result"
        return UserError(f"timing the model in a child process failed ({why})", path=self.model,
                         fix="check that ONNX Runtime runs it: deploykit bench --backend ort-cpu")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()


def _time_interleaved(models: dict[str, Path], feeds_path: Path, threads: int, cpus: list[int] | None,
                      config: BenchConfig, tmp: Path, target_name: str) -> dict[str, Any]:
    """Every model in its own child process, all loaded at once and warmed up, then timed in
    ``config.rounds`` rounds, one round per model in turn (the order rotating each round): a
    slow spell of this machine slows every variant alike. Each variant's figures pool its
    rounds; its ratio to FP32 is taken per round (as in ``deploykit bench``)."""
    from deploykit.bench import compare_rounds
    from deploykit.progress import track
    from deploykit.timing import summarize

    names = list(models)
    children: dict[str, _Child] = {}
    try:
        for k, name in enumerate(names):
            children[name] = _Child(Path(models[name]), feeds_path, threads, cpus, config, tmp / f"child{k}.err")
        for name in names:
            children[name].ask(None, "ready")
            children[name].ask("warmup", "warm")
        times: dict[str, list[list[float]]] = {name: [] for name in names}
        for r in track(range(config.rounds), total=config.rounds,
                       description=f"benchmarking on {target_name} ({config.rounds} rounds)"):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times[name].append(children[name].ask("round", "times")["times"])
        out: dict[str, Any] = {}
        for name in names:
            memory = children[name].ask("done", "peak_rss_mib")
            out[name] = {**summarize(times[name], 1, threads), **memory}
    finally:
        for child in children.values():
            child.close()
    base = out.get("fp32")
    for name, entry in out.items():
        if base is not None and name != "fp32":
            compare_rounds(entry, base)
    return out


def _json_line(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# ----------------------------------------------------------------------------- the child process
def _child(argv: list[str] | None = None) -> int:
    """Load the model, then serve the parent's lines: ``warmup``, ``round`` (time one round and
    print its call times), ``done`` (print peak memory and exit). One JSON line per reply."""
    parser = argparse.ArgumentParser(description="time one ONNX model for deploykit bench --target (internal)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--feeds", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--cpus", default="")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=4)        # per round
    parser.add_argument("--min-seconds", type=float, default=0.2)   # per round
    parser.add_argument("--max-seconds", type=float, default=4.0)   # per round
    args = parser.parse_args(argv)
    if args.cpus:                                          # before ONNX Runtime starts its threads
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})

    import onnxruntime  # noqa: F401 - part of the baseline, not of the model

    from deploykit.io import read_npz
    from deploykit.runners import OrtRunner
    from deploykit.timing import peak_rss_mib, time_calls

    def reply(obj: dict[str, Any]) -> None:
        print(json.dumps(obj), flush=True)

    try:
        feeds = read_npz(args.feeds, what="feeds file")
        baseline = peak_rss_mib()
        runner = OrtRunner(args.model, provider="cpu", threads=args.threads, exact_qdq=False)   # its speed
        reply({"ready": True})
        for line in sys.stdin:
            command = line.strip()
            if command == "warmup":
                for _ in range(args.warmup):
                    runner.infer(feeds)
                reply({"warm": True})
            elif command == "round":
                reply({"times": time_calls(runner, feeds, args.iterations, args.min_seconds, args.max_seconds)})
            elif command == "done":
                break
    except UserError as exc:
        print(exc.one_line(), file=sys.stderr)
        reply({"error": exc.message, "fix": exc.fix})
        return 2
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types; the parent reports the last line
        traceback.print_exc()
        text = " ".join(str(exc).split())
        print(f"{type(exc).__name__}: {text[:400]}", file=sys.stderr)   # one line: multi-line ORT messages
        return 1
    peak = peak_rss_mib()
    reply({"peak_rss_mib": peak, "model_rss_mib": max(peak - baseline, 0.0)})
    return 0


if __name__ == "__main__":
    sys.exit(_child())
