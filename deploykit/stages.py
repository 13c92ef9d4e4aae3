"""The stages of a run, as functions over a :class:`deploykit.context.RunContext`.

``deploykit run`` (``deploykit.pipeline``) is one sequence of them: load -> data -> train ->
export -> calibrate -> baselines -> reference -> verify -> bench -> package; a study
(``deploykit.study``) runs each of its variants through load, export, calibrate, reference and
verify, then adds its tables. The machinery the stages share with the standalone commands
(``deploykit verify``, ``deploykit bench``) lives here too: backend runners, verification
against torch FP32 with localization, benchmarking, target checks.

This module is below both ``deploykit.pipeline`` and ``deploykit.study``: it imports neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deploykit.bench import BenchConfig, bench as bench_runners
from deploykit.context import RunContext, RunResult, parity_feeds, reference_outputs
from deploykit.data import DataSpec, Split, make_splits, save_split
from deploykit.io import read_json, write_json, write_npz
from deploykit.onnx_utils import get_metadata, load_onnx
from deploykit.progress import say, stage
from deploykit.quantize import QuantConfig
from deploykit.quantize import calibrate as calibrate_onnx
from deploykit.runners import TorchRunner, default_threads, make_runner
from deploykit.verify import VerifyResult
from deploykit.verify import verify as verify_runners


# ----------------------------------------------------------------------------- load, data, train
def load(ctx: RunContext, *, untransformed: bool = False) -> None:
    """The recipe's model, or (``untransformed``) the model without its transforms or checkpoint, frozen."""
    from deploykit.models import load_model
    from deploykit.train import distillation_teacher

    rec = ctx.rec
    with stage(f"load model {rec.model.source}"):
        if untransformed:
            ctx.bundle = distillation_teacher(rec.model.source, rec.model.options)
        else:
            ctx.bundle = load_model(rec.model.source, rec.model.options)


def data(ctx: RunContext, spec: DataSpec) -> None:
    """The seeded splits of ``spec``, each but the training split saved to ``<run>/data``."""
    rec = ctx.rec
    with stage(f"data: {rec.data.source} (seed {rec.data.seed})"):
        ctx.splits = make_splits(ctx.bundle, spec)
        ctx.data_paths = {name: save_split(split, ctx.run_dir / "data") for name, split in ctx.splits.parts()
                          if name != "training"}


def train(ctx: RunContext) -> None:
    """Train the model per the recipe's ``train`` section, when enabled."""
    from deploykit.train import train_variant

    if ctx.rec.train.enabled:
        ctx.training = train_variant(ctx.bundle, ctx.rec, ctx.splits, ctx.run_dir)
        ctx.lap("train")


# ----------------------------------------------------------------------------- export, calibrate
def export(ctx: RunContext, title: str = "export", *, record: bool = True):
    """``<run>/model.onnx`` with its parity against torch on two real batches (an ONNX model
    source: the prepared graph, against the user's file on ONNX Runtime); ``record``: its
    summary in ``model.export.json`` and the parity said."""
    from deploykit.export import export_onnx

    path = ctx.run_dir / "model.onnx"
    onnx_in = has_onnx_reference(ctx.bundle)
    with stage(f"prepare {ctx.bundle.info['onnx_file']}" if onnx_in else title):
        if onnx_in:
            from deploykit.export.onnx_in import prepare_onnx

            ctx.exported = prepare_onnx(ctx.bundle, path, parity_feeds=parity_feeds(ctx.splits.evaluation))
        else:
            ctx.exported = export_onnx(ctx.bundle, path, opset=ctx.rec.export.opset,
                                       parity_feeds=parity_feeds(ctx.splits.evaluation))
        if record:
            write_json(path.with_suffix(".export.json"), {"model": ctx.bundle.source, **ctx.exported.summary()})
    ctx.models["fp32"] = path
    if record:
        say(f"  parity vs {reference_name(ctx.bundle)}: max |diff| {ctx.exported.parity['max_abs_diff']:.3g}")
    return ctx.exported


def has_onnx_reference(bundle) -> bool:
    """The model source is an ONNX file (no torch model): its reference is that file on ORT."""
    return bundle is not None and getattr(bundle, "module", None) is None and "onnx_file" in bundle.info


def reference_name(bundle) -> str:
    """What the FP32 reference is, as reports and bundles name it."""
    return getattr(bundle, "reference_name", None) or "torch"


def reference_label(bundle) -> str:
    """The reference as progress lines say it: ``torch fp32``, or ``fp32 onnx on ort-cpu``."""
    return reference_name(bundle) if has_onnx_reference(bundle) else f"{reference_name(bundle)} fp32"


def calibrate(ctx: RunContext, key: str, config: QuantConfig, preset: str, title: str, *,
              tuning_split: Split | None = None):
    """``<run>/model.<key>.onnx``: the FP32 export calibrated on the calibration split."""
    path = ctx.run_dir / f"model.{key}.onnx"
    with stage(title):
        result = calibrate_onnx(ctx.models["fp32"], ctx.splits.calibration, path, config,
                                tuning_split=tuning_split, default_preset=preset)
    ctx.models[key] = path
    return result


def calibrate_int8(ctx: RunContext) -> None:
    """The run's INT8 model (the recipe's preset, tuned when asked), then its fit to the targets."""
    rec = ctx.rec
    preset = rec.preset()
    method = "tuning" if rec.quantize.tune.enabled else rec.quantize.resolved(preset).method
    cal = ctx.calibration = calibrate(ctx, "int8", rec.quantize, preset, f"calibrate ({preset}, {method})",
                                      tuning_split=ctx.splits.tuning)
    say(f"  {cal.qdq_counts['QuantizeLinear']} QuantizeLinear, {len(cal.quantized_nodes)} nodes quantized, "
        f"{cal.float_line()}")
    say(f"  {size_line(cal.file_sizes, cal.embeddings)}")
    ctx.lap("calibrate")
    ctx.target_notes = check_targets([ctx.models["fp32"], ctx.models["int8"]], rec.targets)


def size_line(sizes: dict[str, Any], embeddings: list[dict[str, Any]]) -> str:
    """``file size: FP32 90.8 MB, INT8 23.5 MB (25.9 % of FP32)`` and the int8 embedding tables."""
    line = (f"file size: FP32 {sizes['fp32_bytes'] / 1e6:.1f} MB, INT8 {sizes['int8_bytes'] / 1e6:.1f} MB "
            f"({100 * sizes['int8_over_fp32']:.1f} % of FP32)")
    if embeddings:
        line += (f"; {len(embeddings)} embedding table(s) int8 ({embeddings[0]['form']}): "
                 f"{sum(e['bytes_fp32'] for e in embeddings) / 1e6:.1f} -> "
                 f"{sum(e['bytes_int8'] for e in embeddings) / 1e6:.1f} MB")
    return line


def baselines(ctx: RunContext) -> None:
    """The recipe's comparison models (``baselines``), next to the INT8 one."""
    from deploykit.quantize.baselines import VARIANT, make_baseline

    for kind in ctx.rec.baselines:
        with stage(f"baseline {kind}"):
            path = make_baseline(kind, ctx.models["fp32"], ctx.run_dir / f"model.{VARIANT[kind]}.onnx")
            ctx.models[VARIANT[kind]] = path
    if ctx.rec.baselines:
        ctx.lap("baselines")


# ----------------------------------------------------------------------------- verify
def reference(ctx: RunContext, title: str | None = None, name: str = "reference.npz"):
    """Torch FP32 outputs of the model (an ONNX model source: the user's FP32 graph on ONNX
    Runtime) on the evaluation split, saved as ``<run>/<name>``."""
    with stage(title or f"reference outputs ({reference_label(ctx.bundle)})"):
        ctx.reference = reference_outputs(ctx.bundle, ctx.splits.evaluation, ctx.rec.verify.batch_size)
        write_npz(ctx.run_dir / name, {"output": ctx.reference})
    return ctx.reference


def verify(ctx: RunContext) -> None:
    """Every model on every usable backend of the recipe vs the reference, its thresholds, and
    per-node localization of a failing Q/DQ model."""
    from deploykit.engine import ShapeRanges

    rec = ctx.rec
    ctx.verified = verify_backends(ctx.bundle, ctx.models, ctx.reference, ctx.splits.evaluation,
                                   backends=rec.verify.backends, rules=rec.acceptance,
                                   batch_size=rec.verify.batch_size, localize_failures=rec.verify.localize,
                                   localize_samples=rec.verify.localize_samples, ranges=ShapeRanges.from_recipe(rec))
    print_parity(ctx.verified["parity"], ctx.verified["verification"])
    ctx.lap("verify")


def verify_on_ort(ctx: RunContext, reference: np.ndarray, title: str) -> VerifyResult:
    """Every model on ONNX Runtime CPU vs ``reference``, without thresholds (a study's variant)."""
    from deploykit.runners import OrtRunner

    with stage(title):
        return verify_runners({k: OrtRunner(p) for k, p in ctx.models.items()}, reference, ctx.splits.evaluation,
                              ctx.bundle.task, batch_size=ctx.rec.verify.batch_size)


def is_qdq(path: Path) -> bool:
    model = load_onnx(Path(path), load_weights=False)
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def check_targets(models: list[Path], targets: list[str], where: str | None = None) -> dict[str, list[str]]:
    """Check each model against each target (refuses what a target cannot run); the notes."""
    from deploykit.targets import check_model, get_target

    notes: dict[str, list[str]] = {}
    for name in targets:
        target = get_target(name)
        for model in models:
            for note in check_model(model, target):
                notes.setdefault(name, []).append(f"{Path(model).name}: {note}")
    return notes


def backend_runners(variants: dict[str, Path], backends: list[str], *, threads: int | None = None,
                    ranges=None) -> dict[str, Any]:
    """``{"<variant>@<backend>": runner}`` for every ONNX variant on every non-torch backend.
    TensorRT uses the engine next to the model, built here first when there is none."""
    runners: dict[str, Any] = {}
    for backend in backends:
        for name, path in variants.items():
            if backend == "torch":
                continue
            if backend == "tensorrt" and not Path(path).with_suffix(".engine").is_file():
                from deploykit.engine import ShapeRanges, build_engine

                with stage(f"build TensorRT engine for {path}"):
                    build_engine(path, Path(path).with_suffix(".engine"), ranges=ranges or ShapeRanges())
            runners[f"{name}@{backend}"] = make_runner(backend, model_path=path, threads=threads)
    return runners


def verify_backends(bundle, variants: dict[str, Path], reference: np.ndarray, split: Split, *, backends: list[str],
                    rules: dict[str, str], batch_size: int = 32, localize_failures: bool = True,
                    localize_samples: int = 64, ranges=None) -> dict[str, Any]:
    """Every variant on every usable backend vs torch FP32, thresholds, and per-node localization
    of a failing Q/DQ variant. Returns the report update (``parity``, ``verification``,
    ``accuracy`` and ``distributions`` of the first ONNX backend, ``passed``)."""
    from deploykit.verify import choose_backends, cross_verify, evaluate_checks, localize, parity_entry

    run, skipped = choose_backends(backends)
    if "torch" in run and has_onnx_reference(bundle):
        run = [b for b in run if b != "torch"]
        skipped = {**skipped, "torch": f"no torch model: the reference is the {reference_name(bundle)}"}
    for backend, reason in skipped.items():
        say(f"  {backend}: skipped ({reason})")
    parity: dict[str, Any] = {}
    if "torch" in run:
        parity["fp32@torch"] = parity_entry(bundle.task, reference, reference, split.labels)
    onnx_backends = [b for b in run if b != "torch"]
    result = VerifyResult()
    exact: list[str] = []              # runs scored with Q/DQ unfused (OrtRunner.exact_qdq)
    if onnx_backends:
        first = onnx_backends[0]
        runners = backend_runners(variants, [first])
        exact += [k for k, r in runners.items() if getattr(r, "exact_qdq", False)]
        with stage(f"verify on {first}"):
            result = verify_runners({k.split("@")[0]: r for k, r in runners.items()}, reference, split, bundle.task,
                                    batch_size=batch_size)
        for name in variants:
            parity[f"{name}@{first}"] = {**result.accuracy[name], "samples": split.count}
        others = backend_runners(variants, onnx_backends[1:], ranges=ranges)
        exact += [k for k, r in others.items() if getattr(r, "exact_qdq", False)]
        if others:
            with stage(f"verify on {', '.join(onnx_backends[1:])}"):
                more, _ = cross_verify(others, reference, split, bundle.task, batch_size=batch_size)
            parity.update(more)
    checks = evaluate_checks(rules, parity)
    localization: dict[str, Any] = {}
    fp32 = next((p for n, p in variants.items() if not is_qdq(p)), None)
    if localize_failures and fp32 is not None:
        failed = dict.fromkeys(c["check"].rsplit(".", 1)[0] for c in checks if not c["passed"] and "@" in c["check"])
        for key in failed:
            name, backend = key.split("@", 1)
            if name not in variants or not is_qdq(variants[name]):
                continue
            with stage(f"localize {key}: per-node error against {fp32.name}"):
                found = localize(fp32, variants[name], split, samples=localize_samples)
            if backend != "ort-cpu" and parity.get(f"{name}@ort-cpu") is not None:
                found["note"] = (f"compare with {name}@ort-cpu: if ONNX Runtime passes, the difference is "
                                 f"{backend}'s kernels or fusions; `polygraphy run {variants[name]} --trt --onnxrt "
                                 "--trt-outputs mark all --onnx-outputs mark all` compares layer by layer")
            localization[key] = found
    verification = {"backends_run": run, "backends_skipped": skipped, "checks": checks,
                    "localization": localization, **({"exact_qdq": exact} if exact else {}),
                    **_saturating_runs(variants, run, exact),
                    "inputs_sha256": split.sha256, "samples": split.count}
    return {"parity": parity, "verification": verification, "accuracy": result.accuracy,
            "distributions": result.distributions, "passed": all(c["passed"] for c in checks),
            "outputs": {f"{k}@{onnx_backends[0]}": v for k, v in result.outputs.items()} if onnx_backends else {}}


def _saturating_runs(variants: dict[str, Path], backends: list[str], exact: list[str]) -> dict[str, list[str]]:
    """``{"fused_qdq_saturating": [...]}``: the Q/DQ runs on ORT's fused CPU kernels, on a CPU
    where those add in saturating 16-bit pairs (no VNNI), so they may score lower than elsewhere."""
    from deploykit.probes import int8_pairs_saturate

    if "ort-cpu" not in backends or not int8_pairs_saturate():
        return {}
    keys = [f"{n}@ort-cpu" for n, p in variants.items() if f"{n}@ort-cpu" not in exact and is_qdq(p)]
    return {"fused_qdq_saturating": keys} if keys else {}


def print_parity(parity: dict[str, Any], verification: dict[str, Any]) -> None:
    for key, metrics in parity.items():
        shown = {k: v for k, v in metrics.items() if k != "samples" and v is not None}
        say(f"  {key}: " + ", ".join(f"{k} {v:.5g}" for k, v in shown.items()))
    for check in verification["checks"]:
        say(f"  check {check['check']} {check['threshold']}: {check['value']} -> "
            f"{'pass' if check['passed'] else 'FAIL'}")
    for key, found in verification["localization"].items():
        # the torch module a node came from, where the export recorded it, before the ONNX name
        worst = ", ".join((f"{n['module']} [{n['node']}]" if n.get("module") else n["node"])
                          + (f" ({n['added_snr_db']:.1f} dB)" if isinstance(n.get("added_snr_db"), (int, float)) else "")
                          for n in found["nodes"][:5])
        say(f"  {key} worst nodes: {worst}; try: " + " ".join(f"--exclude {n}" for n in found["exclude"]))


# ----------------------------------------------------------------------------- bench
def bench(ctx: RunContext) -> None:
    """Latency of every model on the recipe's backends (and torch), then each target's budget."""
    rec = ctx.rec
    ctx.threads = rec.bench.threads or default_threads()
    ctx.latency = bench_all(ctx.bundle, ctx.splits.evaluation, list(ctx.models.values()), rec.bench.backends,
                            rec.bench, ctx.threads, rec.bench.torch_baseline)
    print_latency(ctx.latency)
    ctx.lap("bench")
    ctx.targets = bench_targets({k: v for k, v in ctx.models.items() if k in ("fp32", "int8")},
                                ctx.splits.evaluation, rec.targets, rec.bench)
    ctx.lap("targets")


def variant_names(onnx_paths: list[Path]) -> list[str]:
    """Report names for models: the variant recorded at export/calibration (fp32, int8, ...),
    or the file stem where several models in one call share that variant."""
    recorded = [str(get_metadata(load_onnx(p, load_weights=False)).get("variant") or p.stem) for p in onnx_paths]
    names = [r if recorded.count(r) == 1 else p.stem for r, p in zip(recorded, onnx_paths)]
    out: list[str] = []
    for name in names:
        unique, k = name, 2
        while unique in out:
            unique, k = f"{name}-{k}", k + 1
        out.append(unique)
    return out


def bench_all(bundle, split, models, backends, config, threads, torch_baseline) -> dict[str, Any]:
    names = variant_names(models)
    runners = [(name, make_runner(backend, model_path=m, threads=threads, for_latency=True))
               for backend in backends if backend != "torch" for name, m in zip(names, models)]
    if (torch_baseline or "torch" in backends) and not has_onnx_reference(bundle):
        runners.append(("fp32", TorchRunner(bundle, threads=threads)))
    with stage(f"bench ({threads} threads, batches {config.batches})"):
        return bench_runners(runners, split, config)


def bench_targets(models: dict[str, Path], split: Split, targets: list[str], config: BenchConfig) -> dict[str, Any]:
    """Each target's budget emulated here where this machine can run it (batch 1, its threads,
    peak memory); a reason for the rest ("not measurable here")."""
    from deploykit.bench.edge import bench_on_target
    from deploykit.targets import get_target

    out = {}
    with stage(f"targets: {', '.join(targets)}"):
        for name in targets:
            entry = bench_on_target(models, split, get_target(name), config)
            out[name] = entry
            if not entry["measurable"]:
                say(f"  {name}: {entry['reason']}")
            for variant, fig in entry["latency"].items():
                ratio = (f" ({fig['ratio_to_fp32']:.2f}× FP32, rounds {fig['ratio_spread'][0]:.2f}–"
                         f"{fig['ratio_spread'][1]:.2f}{'' if fig['conclusive'] else ', inconclusive'})"
                         if "ratio_to_fp32" in fig else "")
                memory = (f", peak RSS {fig['peak_rss_mib']:.0f} MiB of {entry['memory_budget_mib']:.0f}"
                          if fig.get("peak_rss_mib") is not None else "")
                say(f"  {name} {variant}: p50 {fig['p50_ms']:.2f} ms{ratio} at batch 1 on {fig['threads']} threads"
                    + memory)
    return out


def print_latency(latency: dict[str, Any]) -> None:
    for key, entry in latency.items():
        say(f"  {key}: p50 {entry['p50_ms']:.2f} ms, p99 {entry['p99_ms']:.2f} ms, "
            f"{entry['throughput_per_s']:.1f}/s")


# ----------------------------------------------------------------------------- package, finish
def package(ctx: RunContext) -> None:
    """A bundle per ``package.targets`` when every acceptance check passed (recorded in the report)."""
    rec, report = ctx.rec, ctx.report
    acceptance = report["acceptance"]
    if rec.package.targets and not all(a["passed"] for a in acceptance):
        say("  no bundle written: an acceptance check failed (a bundle ships only what passed)")
    elif rec.package.targets:
        from deploykit.package import VERIFY_BATCH, GateFailed, package_run

        # verify's ORT CPU outputs are the bundle's expected outputs when they were computed in
        # the batches the bundle uses (trimmed padding makes other batchings differ by rounding)
        reusable = {k.split("@")[0]: v for k, v in ctx.verified["outputs"].items() if k.endswith("@ort-cpu")
                    and k.split("@")[0] in ("fp32", "int8")} if rec.verify.batch_size == VERIFY_BATCH else None
        bundles = {}
        for name_ in rec.package.targets:
            try:
                bundles[name_] = package_run(ctx.run_dir, name_, samples=rec.package.samples,
                                             outputs=reusable).summary()
            except GateFailed as exc:        # e.g. package.samples: a subset that misses a threshold
                say(f"  {name_}: {exc}")
                acceptance.append({"check": f"package:{name_}", "value": None, "threshold": "thresholds met on "
                                   "the bundle's inputs", "passed": False})
        ctx.lap("package")
        report["bundles"] = bundles
        report["artifacts"].update({f"bundle_{k}": v["path"] for k, v in bundles.items()})
        report["timings_s"] = ctx.timings


def finish(ctx: RunContext, report_path: Path, acceptance: list[dict[str, Any]]) -> RunResult:
    """Say each acceptance check and where the report is; the run's result."""
    accepted = all(a["passed"] for a in acceptance)
    for a in acceptance:
        say(f"  acceptance {a['check']} {a['threshold']}: {a['value']} -> {'pass' if a['passed'] else 'FAIL'}")
    if ctx.calibration is not None:
        say(f"  int8 float nodes: {ctx.calibration.float_line()}")
    say(f"[bold]report:[/] {report_path} and {ctx.run_dir / 'report.md'}")
    return RunResult(ctx.run_dir, report_path, read_json(report_path), accepted)
