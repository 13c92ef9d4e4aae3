"""``deploykit device-verify``: on the device, check a bundle, run it, compare with the expected outputs, time it."""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np

import deploykit.package.limits as limits
from deploykit.errors import UserError
from deploykit.io import read_json, write_json
from deploykit.package.manifest import FIX_BAD, VERIFY_BATCH, bad_bundle, json_kind, unsafe_rel
from deploykit.package.unpack import check_target, unpack_bundle, verify_tree
from deploykit.progress import say, stage


def device_verify(bundle: str | Path, *, target: str | None = None, out: str | Path | None = None,
                  variants: list[str] | None = None, threads: int | None = None, iterations: int = 20,
                  allow_other_arch: bool = False) -> dict[str, Any]:
    """On the device: check the bundle, run it, compare with the expected outputs, time it."""
    bundle = Path(bundle)
    if bundle.is_file():
        with tempfile.TemporaryDirectory(prefix="deploykit-bundle-") as tmp:
            with _shown_as(Path(tmp) / "bundle", bundle):
                folder = unpack_bundle(bundle, Path(tmp) / "bundle", target=target, announce=False)
                return _device_verify(folder, bundle, target, out, variants, threads, iterations, allow_other_arch)
    if not bundle.is_dir():
        raise UserError("bundle not found", path=bundle, fix="give the .tar.gz or the folder deploykit unpack wrote")
    with _shown_as(bundle, bundle):
        return _device_verify(bundle, bundle, target, out, variants, threads, iterations, allow_other_arch)


@contextlib.contextmanager
def _shown_as(folder: Path, shown: Path):
    """Errors about files below ``folder`` (the bundle's folder, or the private folder an archive
    was unpacked into) name ``shown`` (what the user gave) and the file's path inside the bundle;
    their fix is the bundle's (the file was hash-checked: only a new bundle mends it)."""
    try:
        yield
    except UserError as exc:
        root = str(folder)
        path = exc.path or ""
        inside = path.startswith(root + os.sep)
        if not (inside or path == root or root in exc.message or root in (exc.fix or "")):
            raise
        rel = Path(path).relative_to(folder).as_posix() if inside else ""
        message = exc.message.replace(root + os.sep, "").replace(root, str(shown))
        if rel and not message.startswith(rel):
            message = f"{rel}: {message}"
        fix = FIX_BAD if rel else (exc.fix or "").replace(root + os.sep, "").replace(root, str(shown)) or None
        raise UserError(message, path=shown, fix=fix) from None


def _all_tensors(graph) -> Iterator[Any]:
    """Every tensor a graph (or a function) holds: initializers, sparse ones, and node
    attributes, subgraphs included."""
    yield from getattr(graph, "initializer", ())
    for sparse in getattr(graph, "sparse_initializer", ()):
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _check_model_data(folder: Path, rel: str, listed: dict[str, Any], where: Path) -> None:
    """A bundled ONNX model whose weights live in external files may name only files of the
    bundle that the manifest lists (and that were hash-checked): never a path outside it."""
    import onnx

    try:
        model = onnx.load(str(folder / rel), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own types for bad files
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise bad_bundle(f"bundle model {rel} is not a readable ONNX file ({first})", where) from None
    base = PurePosixPath(rel).parent
    for tensor in (t for g in [model.graph, *model.functions] for t in _all_tensors(g)):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        why = unsafe_rel(location)
        inside = (base / location).as_posix() if not why else None
        if why or inside not in listed:
            raise bad_bundle(f"bundle model {rel} reads its weights from '{location}', "
                             f"{'which ' + why if why else 'a file the manifest does not list'}", where)


def _check_npz(folder: Path, rel: str, where: Path) -> None:
    """A bundled .npz (a zip of .npy arrays), before numpy loads it: plain .npy members, no
    duplicates, each within the ceilings, each array's header no larger than its member."""
    import zipfile

    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(folder / rel) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise bad_bundle(f"bundle file {rel} holds an array name twice", where)
            if sum(i.file_size for i in infos) > limits.MAX_TOTAL_BYTES or len(infos) > limits.MAX_MEMBERS:
                raise bad_bundle(f"bundle file {rel} unpacks to more than {limits.MAX_TOTAL_BYTES} bytes", where)
            for info in infos:
                if info.is_dir() or not info.filename.endswith(".npy") or unsafe_rel(info.filename) \
                        or "/" in info.filename:
                    raise bad_bundle(f"bundle file {rel} holds '{info.filename}', not an array", where)
                if info.file_size > limits.MAX_MEMBER_BYTES:
                    raise bad_bundle(f"bundle file {rel}: array {info.filename} unpacks to {info.file_size} bytes, "
                                     f"over the {limits.MAX_MEMBER_BYTES} allowed", where)
                with zf.open(info) as fh:
                    version = npy.read_magic(fh)
                    reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, _, dtype = reader(fh)
                if dtype.hasobject or int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > info.file_size:
                    raise bad_bundle(f"bundle file {rel}: array {info.filename} declares more data than it holds "
                                     f"(shape {list(shape)}, {dtype})", where)
    except UserError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile,
            NotImplementedError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise bad_bundle(f"bundle file {rel} is not a readable .npz ({reason})", where) from None


def _device_verify(folder: Path, shown: Path, target_name: str | None, out, variants, threads, iterations,
                   allow_other_arch: bool) -> dict[str, Any]:
    from deploykit.runners import default_threads
    from deploykit.verify import evaluate_checks

    manifest = verify_tree(folder, shown)
    target = check_target(manifest, target_name, shown)
    arch = _check_device(folder, target, shown, allow_other_arch)
    thresholds, task = _read_thresholds(folder, manifest, shown)
    expected, split, reference = _read_arrays(folder, manifest, shown)
    chosen = variants or list(manifest["variants"])
    unknown = [v for v in chosen if v not in manifest["variants"]]
    if unknown:
        raise UserError(f"the bundle has no variant(s) {unknown}", path=shown,
                        fix=f"choose from {', '.join(manifest['variants'])}")
    backend, runners = _device_runners(folder, manifest, target, chosen, threads, shown)
    with stage(f"device-verify {manifest['name']} on {backend} ({split.count} inputs)"):
        parity, vs_here, latency = _run_variants(runners, backend, split, expected, reference, task, iterations,
                                                 shown)
    checks = evaluate_checks(thresholds.get("rules") or {}, parity)
    passed = all(c["passed"] for c in checks)
    memory = _memory(target)
    result = {"bundle": str(shown), "name": manifest["name"], "target": target.name, "backend": backend,
              "machine": {"arch": arch, "platform": platform.platform(),
                          "threads": threads or min(target.threads or default_threads(), default_threads())},
              "samples": split.count, "parity": parity, "vs_packaging_machine": vs_here, "latency_b1": latency,
              "memory": memory,
              "checks": checks, "passed": passed}
    _print_device(result)
    if out is not None:
        write_json(Path(out), result)
        say(f"wrote {out}")
    return result


def _check_device(folder: Path, target, shown: Path, allow_other_arch: bool) -> str:
    """This machine's architecture, once it is the target's (or ``allow_other_arch``) and every
    bundled engine's metadata names this target's GPU and TensorRT."""
    from deploykit.targets import check_engine, machine_arch

    arch = machine_arch()
    if arch != target.arch and not allow_other_arch:
        raise UserError(f"the bundle is for {target.arch} (target '{target.name}'); this machine is {arch}",
                        path=shown, fix=f"run device-verify on the {target.name} device (or --allow-other-arch to "
                                        "check the numerics here anyway)")
    for meta in sorted((folder / "engines").glob("*.json")) if (folder / "engines").is_dir() else []:
        info = read_json(meta, what="engine metadata")
        if not isinstance(info, dict):
            raise bad_bundle(f"bundle file engines/{meta.name} is {json_kind(info)}, not an object", shown)
        try:
            check_engine(info, target, shown / "engines" / meta.name)
        except UserError as exc:        # its own fix (build on the target), not a broken bundle's
            raise UserError(f"engines/{meta.name}: {exc.message}", path=shown, fix=exc.fix) from None
    return arch


def _read_thresholds(folder: Path, manifest: dict[str, Any], shown: Path) -> tuple[dict[str, Any], str]:
    """(verify/thresholds.json, the task it names), its rules each a ``'<variant>.<metric>'`` rule."""
    from deploykit.verify import parse_rule

    thresholds = read_json(folder / "verify/thresholds.json", what="thresholds")
    rules = thresholds.get("rules") or {} if isinstance(thresholds, dict) else None
    if not isinstance(rules, dict) or not all(isinstance(k, str) and "." in k and parse_rule(v) is not None
                                              for k, v in rules.items()):
        raise bad_bundle("bundle file verify/thresholds.json is not {task, rules: {'<variant>.<metric>': '>= x'}}",
                         shown)
    task = thresholds.get("task", manifest.get("task"))
    if not isinstance(task, str):
        raise bad_bundle("bundle file verify/thresholds.json names no task", shown)
    return thresholds, task


def _read_arrays(folder: Path, manifest: dict[str, Any], shown: Path):
    """(the expected outputs, the saved inputs, the reference outputs among the expected ones),
    each .npz checked before numpy loads it."""
    from deploykit.data import load_split
    from deploykit.io import read_npz

    for rel in ("verify/expected.npz", "verify/inputs.npz"):
        _check_npz(folder, rel, shown)
    expected = read_npz(folder / "verify/expected.npz", what="expected outputs")
    split = load_split(folder / "verify/inputs.npz", list(manifest["inputs"]["names"]))
    reference = expected.get("reference")
    if reference is None or reference.ndim < 1 or reference.shape[0] != split.count:
        raise bad_bundle(f"bundle file verify/expected.npz holds no 'reference' outputs for the {split.count} inputs",
                         shown)
    return expected, split, reference


def _run_variants(runners: dict[str, Any], backend: str, split, expected: dict[str, np.ndarray],
                  reference: np.ndarray, task: str, iterations: int, shown: Path):
    """(parity against the reference, against the packaging machine's outputs, batch-1 latency)
    of each variant, keyed ``<variant>@<backend>``."""
    from deploykit.bench import BenchConfig, time_runner
    from deploykit.verify import parity_entry

    parity: dict[str, Any] = {}
    vs_here: dict[str, Any] = {}
    latency: dict[str, Any] = {}
    for variant, runner in runners.items():
        from deploykit.metrics import output_reducer

        output = _variant_outputs(variant, runner, split, shown, output_reducer(task, split.feeds, reference))
        if output.shape != reference.shape:
            raise bad_bundle(f"variant {variant} gives outputs of shape {list(output.shape)}, the expected outputs "
                             f"are {list(reference.shape)}", shown)
        key = f"{variant}@{backend}"
        parity[key] = parity_entry(task, reference, output, split.labels)
        here = expected.get(variant)
        if here is not None and here.shape != output.shape:
            raise bad_bundle(f"bundle file verify/expected.npz: '{variant}' has shape {list(here.shape)}, the "
                             f"variant gives {list(output.shape)}", shown)
        if here is not None:
            entry = parity_entry(task, here, output, None)
            vs_here[key] = {k: entry[k] for k in ("cosine_mean", "cosine_min", "max_abs_diff", "snr_db")}
        # One saved input at its full saved shape (text: padded to max_length, as deploykit bench
        # times it), not trimmed to its own length: the figure is comparable across machines.
        feeds = {k: np.ascontiguousarray(v[:1]) for k, v in split.feeds.items()}
        latency[key] = {**time_runner(runner, feeds, BenchConfig(batches=[1], warmup=3, iterations=iterations,
                                                                 min_seconds=0.5, max_seconds=20.0)),
                        "shapes": {k: list(v.shape) for k, v in feeds.items()}}
    return parity, vs_here, latency


def _variant_outputs(variant: str, runner, split, shown: Path, reduce=None) -> np.ndarray:
    """The variant's outputs on all saved inputs, in device-verify's batches; ``reduce`` (a causal
    LM's per-position record against the expected reference) shrinks each batch's output."""
    from deploykit.data import iterate_batches, map_batches

    try:
        return map_batches(runner.infer, iterate_batches(split.feeds, VERIFY_BATCH), VERIFY_BATCH, reduce)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the runtimes raise their own types for bad graphs or feeds
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise bad_bundle(f"variant {variant} cannot run on the bundle's inputs ({first})", shown) from None


def _memory(target) -> dict[str, Any]:
    """The whole check's peak (every model's session, 1,000 inputs and outputs): an upper bound
    of what serving one model takes, against the target's memory."""
    from deploykit.timing import peak_rss_mib

    memory = {"peak_rss_mib": round(peak_rss_mib(), 1), "budget_mib": target.memory_gib * 1024}
    memory["within_budget"] = memory["peak_rss_mib"] <= memory["budget_mib"]
    return memory


def _device_runners(folder: Path, manifest: dict[str, Any], target, chosen: list[str], threads: int | None,
                    shown: Path) -> tuple[str, dict[str, Any]]:
    from deploykit.runners import OrtRunner, default_threads

    if target.runtime.name == "onnxruntime":
        import onnxruntime as ort

        if not target.runtime.accepts(ort.__version__):
            raise UserError(f"the bundle's target '{target.name}' runs {target.runtime.describe()}; this machine has "
                            f"onnxruntime {ort.__version__}", path=shown, fix="install an onnxruntime in that range")
        n = threads or min(target.threads or default_threads(), default_threads())
        for v in chosen:
            _check_model_data(folder, manifest["variants"][v], manifest["files"], shown)
        # what this device's ONNX Runtime runs: its own fused integer kernels
        return "ort-cpu", {v: OrtRunner(folder / manifest["variants"][v], threads=n, exact_qdq=False)
                           for v in chosen}
    from deploykit.engine import ShapeRanges, build_engine, engine_info, require_tensorrt
    from deploykit.runners.tensorrt import TrtRunner

    env = require_tensorrt(shown, plugins=False)   # deploykit ops: plugins from 10.15, else their decomposition
    runners = {}
    for variant in chosen:
        _check_model_data(folder, manifest["variants"][variant], manifest["files"], shown)
        onnx_path = folder / manifest["variants"][variant]
        bundled = folder / "engines" / (Path(manifest["variants"][variant]).stem + ".engine")
        engine = None
        if bundled.is_file():
            info = engine_info(bundled)
            if str(info.get("compute_capability")) == str(env.compute_capability) and \
                    str(info.get("tensorrt")) == str(env.version):
                engine = bundled
        if engine is None:
            engine = folder.parent / f"{folder.name}.engines" / f"{variant}.engine"
            profile = manifest.get("profile") or {}
            ranges = ShapeRanges(**{k: tuple(v) for k, v in profile.items() if k in ("batch", "sequence")})
            with stage(f"build the {variant} engine on this device ({env.gpu})"):
                build_engine(onnx_path, engine, target=target.name, ranges=ranges)
        runners[variant] = TrtRunner(engine)
    return "tensorrt", runners


def _print_device(result: dict[str, Any]) -> None:
    from deploykit.progress import is_quiet

    if is_quiet():
        return
    from rich.table import Table

    from deploykit.progress import console

    table = Table(title=f"device-verify {result['name']} ({result['backend']}, target {result['target']})")
    for col, justify in (("variant@backend", "left"), ("cosine mean", "right"), ("SNR dB", "right"),
                         ("vs packaging machine (cos)", "right"), ("b1 p50 ms", "right")):
        table.add_column(col, justify=justify)
    for key, metrics in result["parity"].items():
        snr = metrics.get("snr_db")
        here = result["vs_packaging_machine"].get(key, {}).get("cosine_mean")
        table.add_row(key, f"{metrics['cosine_mean']:.5f}", "exact" if snr is None else f"{snr:.1f}",
                      "—" if here is None else f"{here:.6f}", f"{result['latency_b1'][key]['p50_ms']:.2f}")
    console.print(table)
    for c in result["checks"]:
        say(f"  {c['check']} {c['threshold']}: {c['value']} -> {'pass' if c['passed'] else 'FAIL'}")
    mem = result["memory"]
    say(f"  peak RSS of the whole check {mem['peak_rss_mib']:.0f} MiB of the target's {mem['budget_mib']:.0f} "
        f"({'within' if mem['within_budget'] else 'OVER'} budget; one model alone takes less)")
    say(f"[bold]{'PASS' if result['passed'] else 'FAIL'}[/]")
