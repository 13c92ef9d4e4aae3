"""report.md: the markdown of a report, and :func:`render_report` / :func:`save_and_render_report`,
which write it with its plots (see :mod:`deploykit.report.rendering` for the file names).

Sections registered by other modules (:mod:`deploykit.report.sections`) render after the
acceptance summary; the report's own sections follow in a fixed order.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from deploykit.io import portable_path, read_json
from deploykit.report.formatting import (
    format_cell,
    format_latency_table,
    format_ms,
    format_number,
    format_per_s,
    group_series,
    parity_rows,
)
from deploykit.report.plots import (
    COSINE_PLOT,
    LATENCY_PLOT,
    PARITY_PLOT,
    TARGETS_PLOT,
    THROUGHPUT_PLOT,
    TUNING_PLOT,
    plot_cosine,
    plot_latency,
    plot_parity,
    plot_targets,
    plot_throughput,
    plot_tuning,
)
from deploykit.report.rendering import Rendering
from deploykit.report.schema import is_number, validate_report
from deploykit.report.sections import render_sections

LOCALIZATION_ROWS = 10


# ----------------------------------------------------------------------------- tables
def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, name + "."))
        elif name.endswith("sha256") and isinstance(value, str) and len(value) > 16:
            rows.append((name, value[:16] + "…"))
        else:
            rows.append((name, value))
    return rows


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(line) + " |" for line in (header, rule, *rows)]


def _kv_table(data: dict) -> list[str]:
    rows = _flatten(data)
    values = dict(rows)
    # a flat alias of a nested entry (parity_max_abs_diff next to parity.max_abs_diff) once
    rows = [(k, v) for k, v in rows if not ("_" in k and values.get(k.replace("_", ".", 1), object()) == v)]
    return _table(["key", "value"], [[f"`{k}`", format_cell(v)] for k, v in rows], ["l", "l"])


def _applied_calibration(cal: dict) -> dict:
    """The calibration settings that took effect: no smoothing settings without smoothing, no
    plugin INT8 without plugin nodes, no percentile unless a percentile method ran."""
    cal = dict(cal)
    if cal.get("smoothquant_alpha") is None and not cal.get("smoothed_groups"):
        for key in [k for k in cal if k.startswith(("smoothquant", "smoothing", "smoothed", "group_alpha"))]:
            cal.pop(key)
    if not cal.get("plugin_int8_nodes"):
        cal.pop("plugin_int8", None)
        cal.pop("plugin_int8_nodes", None)
    if not cal.get("probability_offset_nodes"):
        cal.pop("probability_offset", None)
        cal.pop("probability_offset_nodes", None)
    methods = {cal.get("method"), *((cal.get("tensor_methods") or {}).values()
                                    if isinstance(cal.get("tensor_methods"), dict) else ())}
    if "percentile" not in methods:
        cal.pop("percentile", None)
    return cal


# ----------------------------------------------------------------------------- sections
def _tuning_section(tuning: dict, plot: str = TUNING_PLOT) -> list[str]:
    chosen = tuning.get("chosen") or {}
    criteria = tuning.get("criteria") or {}
    head = (f"Criteria {', '.join(f'`{k} {v}`' for k, v in criteria.items())} on the tuning split "
            f"({(tuning.get('tuning_data') or {}).get('count', '?')} samples, disjoint from calibration and "
            f"evaluation): **{'met' if tuning.get('met') else 'NOT met'}** after {tuning.get('trials_run')} of "
            f"{tuning.get('budget')} trials ({tuning.get('seconds', 0):.0f} s). Chosen: trial {chosen.get('trial')}, "
            f"SmoothQuant alpha {chosen.get('alpha')}, {chosen.get('method')}"
            + (f" {chosen.get('percentile')}" if chosen.get("percentile") is not None else "")
            + f", {chosen.get('float_node_count', 0)} nodes in float.")
    metrics = list(criteria) or sorted({m for t in tuning["trials"] for m in t["metrics"]})
    rows = [[str(t["trial"]), t["phase"], format_cell(t["alpha"]), t["method"] + (f" {t['percentile']}" if t["percentile"]
            is not None else "") + (f", {len(t['tensor_methods'])} tensors own method" if t.get("tensor_methods") else "")
             + (", bias corrected" if t.get("bias_correction") else "")
             + (", P·V offset" if t.get("probability_offset") else "")
             + (", channel shift" if t.get("channel_shift") else "")
             + (", GPTQ weights" if t.get("weight_rounding") == "gptq" else ""), str(t["float_node_count"]), *(format_number(t["metrics"].get(m), m) for m in metrics),
             "✅" if t["passed"] else ""] for t in tuning["trials"]]
    table = _table(["trial", "phase", "alpha", "method", "float nodes", *metrics, "pass"], rows)
    out = ["## Tuning", "", head, "", f"![Tuning trials]({plot})", "", *table]
    ranking = tuning.get("ranking") or []
    if ranking:
        out += ["", "Worst nodes by the error each adds alone (fallback order):", "",
                *_table(["node", "torch module", "added SNR (dB)"],
                        [[f"`{r['node']}`", f"`{r['module']}`", f"{r['added_snr_db']:.1f}"] for r in ranking[:15]])]
    return out


def _float_nodes_section(calibration: dict) -> list[str]:
    """The nodes of the INT8 model that stay in float, with their op types and why."""
    ops = calibration.get("float_node_ops") or {}
    names = calibration.get("float_nodes") or []
    fallback = set(calibration.get("fallback_nodes") or [])
    per_type = calibration.get("float_by_op_type") or {}
    head = (f"**{len(names)} node(s) kept in float** of the {calibration.get('quantized_nodes', 0) + len(names)} "
            "selected for quantization" + (f" ({', '.join(f'{op} {v}' for op, v in per_type.items())})"
                                           if per_type else "") + ".")
    rows = [[f"`{n}`", ops.get(n, "?"), "fallen back by tuning" if n in fallback else "touches a mask"]
            for n in names]
    return ["## Float nodes", "", head, *(["", *_table(["node", "op type", "why"], rows, ["l", "l", "l"])]
                                          if rows else [])]


def _accuracy_section(accuracy: dict) -> list[str]:
    metrics = list(dict.fromkeys(m for values in accuracy.values() for m in values))
    rows = [[f"`{variant}`", *(format_number(values.get(m), m) for m in metrics)]
            for variant, values in accuracy.items()]
    return ["## Accuracy", "", *_table(["variant", *metrics], rows)]


def _checks_table(checks: list[dict]) -> list[str]:
    rows = [[f"`{a['check']}`", format_number(a["value"], a["check"]), format_cell(a["threshold"]),
             "✅ PASS" if a["passed"] else "❌ FAIL"] for a in checks]
    return _table(["check", "value", "threshold", "result"], rows, ["l", "r", "l", "l"])


def _acceptance_section(acceptance: list[dict]) -> list[str]:
    return ["## Acceptance", "", *_checks_table(acceptance)]


def _latency_section(rows: list[dict], latency_plot: str = LATENCY_PLOT,
                     throughput_plot: str = THROUGHPUT_PLOT) -> list[str]:
    batches = sorted({r["batch"] for r in rows})
    header = ["variant@backend"]
    for b in batches:
        header += [f"b{b} p50 / p90 / p99 ms", f"b{b} items/s"]
    table = []
    for series, points in group_series(rows).items():
        by_batch = {p["batch"]: p for p in points}
        line = [f"`{series}`"]
        for b in batches:
            p = by_batch.get(b)
            line += ([f"{format_ms(p['p50_ms'])} / {format_ms(p['p90_ms'])} / {format_ms(p['p99_ms'])}", format_per_s(p["throughput_per_s"])]
                     if p else ["—", "—"])
        table.append(line)
    return ["## Latency", "", "Wall time of one call (host to host); throughput in items per second.", "",
            *_table(header, table), "", f"![Latency by batch size]({latency_plot})", "",
            f"![Throughput by batch size]({throughput_plot})"]


def _ratio_section(latency: dict) -> list[str]:
    """Each variant's batch-N p50 as a ratio to FP32 on the same backend: the median over the
    interleaved rounds and its range, and whether the rounds agree on which is faster."""
    rows, unclear = [], []
    for key, e in latency.items():
        if not isinstance(e, dict) or not is_number(e.get("ratio_to_fp32")):
            continue
        lo, hi = (e.get("ratio_spread") or [None, None])[:2]
        verdict = ("faster" if hi is not None and hi < 1 else "slower" if lo is not None and lo > 1 else "inconclusive") \
            if e.get("conclusive") else "inconclusive"
        if verdict == "inconclusive":
            unclear.append(key)
        rows.append([f"`{key}`", f"{e['ratio_to_fp32']:.2f}×",
                     f"{lo:.2f}–{hi:.2f}" if is_number(lo) and is_number(hi) else "—",
                     format_cell(e.get("rounds")), verdict])
    if not rows:
        return []
    out = ["### Against FP32", "",
           "p50 latency over FP32's on the same backend and batch (below 1: faster), taken per round of the "
           "interleaved measurement; the spread is the range over rounds.", "",
           *_table(["variant@backend/batch", "ratio (median)", "spread", "rounds", "verdict"], rows,
                   ["l", "r", "r", "r", "l"])]
    if unclear:
        out += ["", f"The rounds disagree for {', '.join(f'`{k}`' for k in unclear)}: this run cannot say whether "
                "INT8 is faster or slower there; rerun on a quiet machine or with more rounds (`bench.rounds`)."]
    return out


def _db(value: Any) -> str:
    return f"{value:.1f}" if is_number(value) else "—"


def _size(size: Any) -> str:
    if not is_number(size):
        return "—"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _exclude_command(report: dict, exclude: list[str], base: Path | None = None) -> str:
    """The calibrate command line that keeps ``exclude`` in float, run from the report's folder."""
    model = report["artifacts"].get("fp32") or report["artifacts"].get("fp32.onnx") or "model.onnx"
    words = ["deploykit", "calibrate", _relative(model, base)]
    if report.get("recipe"):
        recipe = report["recipe"]
        words += ["--recipe", portable_path(recipe) if portable_path(recipe) != Path(recipe).name
                  else _relative(recipe, base)]
    for node in exclude:
        words += ["--exclude", node]
    return " ".join(shlex.quote(w) for w in words)


def _parity_section(report: dict, plot: str | None, base: Path | None = None) -> list[str]:
    parity = report.get("parity") or {}
    ver = report.get("verification") or {}
    source = ""
    if ver.get("inputs"):
        digest = f", sha256 `{ver['inputs_sha256'][:16]}…`" if ver.get("inputs_sha256") else ""
        source = f" (`{format_cell(_relative(ver['inputs'], base))}`{digest})"
    intro = (f"Each variant run on each backend on the same saved inputs{source}, compared with "
             f"{format_cell(_relative(ver.get('reference'), base) or 'torch FP32')}"
             f"{' (the ' + format_cell(ver['reference_model']) + ')' if ver.get('reference_model') else ''}.")
    out = ["## Accuracy per backend", "", intro, ""]
    rows = parity_rows(parity)
    if rows:
        metrics = list(dict.fromkeys(m for _, _, values in rows for m in values))
        if "samples" in metrics:
            metrics = [m for m in metrics if m != "samples"] + ["samples"]
        out += [*_table(["variant@backend", *metrics],
                        [[f"`{v}@{b}`", *(format_number(values.get(m), m) for m in metrics)] for v, b, values in rows]),
                ""]
    if ver.get("exact_qdq"):
        out += ["Scored with Q/DQ unfused (the graph's exact integer arithmetic, which TensorRT's int8 GEMMs "
                "reproduce; ONNX Runtime's fused CPU kernels saturate on x86 without VNNI): "
                + ", ".join(f"`{k}`" for k in ver["exact_qdq"]) + ".", ""]
    if ver.get("fused_qdq_saturating"):
        out += ["On ONNX Runtime's fused int8 kernels of a CPU without VNNI, which add products in saturating "
                "16-bit pairs (so these may score lower here than on a CPU with VNNI): "
                + ", ".join(f"`{k}`" for k in ver["fused_qdq_saturating"]) + ".", ""]
    if ver.get("backends_run"):
        out += ["Backends run: " + ", ".join(f"`{b}`" for b in ver["backends_run"]) + ".", ""]
    if "backends_skipped" in ver:
        skipped = ver["backends_skipped"]
        out += ["Backends skipped: " + ("; ".join(f"`{b}` ({format_cell(r)})" for b, r in skipped.items()) if skipped
                                         else "none") + ".", ""]
    if plot:
        out += [f"![Parity by backend]({plot})", ""]
    checks = ver.get("checks") or []
    if checks:
        failed = [c["check"] for c in checks if not c["passed"]]
        out += ["### Parity checks", "",
                f"{len(checks) - len(failed)} of {len(checks)} checks passed"
                + (f"; failed: {', '.join(failed)}." if failed else "."), ""]
    if checks and checks == report.get("acceptance"):  # deploykit verify writes them as the acceptance too
        out += ["They are the checks of the Acceptance table above.", ""]
    elif checks:
        out += [*_checks_table(checks), ""]
    for key, loc in (ver.get("localization") or {}).items():
        nodes = sorted(loc.get("nodes") or [], key=lambda n: (not is_number(n.get("added_snr_db")),
                                                              n.get("added_snr_db") or 0.0))  # worst (lowest) first
        out += [f"### Error localization: `{key}`", ""]
        if nodes:
            shown = nodes[:LOCALIZATION_ROWS]
            on = f" on {loc['samples']} samples" if isinstance(loc.get("samples"), int) else ""
            out += [f"Worst {len(shown)} of {len(nodes)} nodes by the error each adds{on}; accumulated: the error "
                    "of the model up to and including the node.", "",
                    *_table(["node", "op type", "torch module", "added SNR (dB)", "added cosine",
                             "accumulated SNR (dB)", "accumulated cosine"],
                            [[f"`{format_cell(n['node'])}`", format_cell(n.get("op_type")),
                              f"`{format_cell(n['module'])}`" if n.get("module") else "—",
                              _db(n.get("added_snr_db")), format_number(n.get("added_cosine"), "cosine"),
                              _db(n.get("accumulated_snr_db")), format_number(n.get("accumulated_cosine"), "cosine")]
                             for n in shown], ["l", "l", "l", "r", "r", "r", "r"]), ""]
        if isinstance(loc.get("note"), str):
            out += [format_cell(loc["note"]), ""]
        exclude = loc.get("exclude")
        if exclude:
            out += ["Suggested nodes to keep in float:", "", "```sh", _exclude_command(report, exclude, base), "```", ""]
        elif exclude is not None:
            out += ["No nodes suggested to keep in float.", ""]
    return out[:-1] if out[-1] == "" else out


def _ratio_cell(e: dict) -> str:
    """``0.62× (0.58–0.66)``, marked inconclusive when the rounds disagree; "—" without a ratio."""
    if not is_number(e.get("ratio_to_fp32")):
        return "—"
    lo, hi = (e.get("ratio_spread") or [None, None])[:2]
    spread = f" ({lo:.2f}–{hi:.2f})" if is_number(lo) and is_number(hi) else ""
    return f"{e['ratio_to_fp32']:.2f}×{spread}" + ("" if e.get("conclusive") else ", inconclusive")


def _targets_section(targets: dict, plot: str | None) -> list[str]:
    rows = []
    for name, target in targets.items():
        runtime = f"`{format_cell(target.get('runtime'))}`"
        if not target.get("measurable"):
            rows.append([f"`{name}`", runtime, "—", "—", "—", "—", "—", "—", "not measurable here"])
            continue
        latency = target.get("latency") or {}
        if not latency:
            rows.append([f"`{name}`", runtime, "no latency measured", format_cell(target.get("threads")),
                         "—", "—", "—", "—", "—"])
        budget = target.get("memory_budget_mib")
        for variant, e in latency.items():
            threads = e.get("threads") if e.get("threads") is not None else target.get("threads")
            peak = e.get("peak_rss_mib")
            memory = (f"{peak:.1f}" if is_number(peak) else "—") + " / " + (f"{budget:.0f}" if is_number(budget)
                                                                              else "—")
            within = e.get("within_memory_budget")
            rows.append([f"`{name}`", runtime, f"`{variant}`", format_cell(threads),
                         format_ms(e["p50_ms"]) if is_number(e.get("p50_ms")) else "—",
                         format_ms(e["p99_ms"]) if is_number(e.get("p99_ms")) else "—", _ratio_cell(e), memory,
                         "—" if within is None else "✅" if within else "❌"])
    out = ["## Targets", "", "Batch-1 latency per deployment target, with the runtime and threads it would use; "
           "the ratio to FP32 is the median over rounds timed interleaved, with its range; "
           "peak RSS of the whole process against the target's memory budget.", "",
           *_table(["target", "runtime", "variant", "threads", "p50 ms", "p99 ms", "vs FP32 (spread)",
                    "peak RSS / budget MiB", "within budget"], rows, ["l", "l", "l", "r", "r", "r", "r", "r", "l"])]
    bullets = [f"- `{name}`: {format_cell(note)}" for name, target in targets.items() for note in target.get("notes") or []]
    for name, target in targets.items():
        if not target.get("measurable"):
            reason = format_cell(target.get("reason") or "no reason given")
            bullets.append(f"- `{name}`: " + (reason if "not measurable here" in str(reason)
                                              else f"not measurable here: {reason}"))
    cores = {name: target["machine_cores"] for name, target in targets.items() if target.get("machine_cores")}
    if len(set(cores.values())) == 1:
        bullets.insert(0, f"- measured on a machine with {next(iter(cores.values()))} cores")
    elif cores:
        bullets.insert(0, "- cores of the machine measured on: " + ", ".join(f"`{n}` {c}" for n, c in cores.items()))
    if bullets:
        out += ["", *bullets]
    if plot:
        out += ["", f"![Latency by target]({plot})"]
    return out


def target_backend(target: dict) -> str:
    """The verify backend a target's runtime corresponds to (ORT targets here are CPUs)."""
    return "tensorrt" if str(target.get("runtime", "")).startswith("tensorrt") else "ort-cpu"


def _target_accuracy_section(targets: dict, parity: dict, checks: list[dict]) -> list[str]:
    """Each target's accuracy: its runtime's parity entries, or why there are none."""
    rows = []
    for name, target in targets.items():
        backend = target_backend(target)
        found = {k: v for k, v in parity.items() if k.endswith(f"@{backend}") and isinstance(v, dict)}
        if not found:
            rows.append([f"`{name}`", f"`{backend}`", f"not verified here ({backend} did not run)", "—", "—", "—"])
            continue
        label = f"`{backend}`" + (" (this machine's CPU, not the target's)"
                                  if backend == "ort-cpu" and not target.get("measurable") else "")
        for key, metrics in found.items():
            task = "nn_agreement" if "nn_agreement" in metrics else "top1" if "top1" in metrics else \
                "perplexity_ratio" if "perplexity_ratio" in metrics else "top1_agreement"
            own = [c for c in checks if c.get("check", "").startswith(f"{key}.")]
            verdict = "—" if not own else ("✅ " if all(c["passed"] for c in own) else "❌ ") + \
                f"{sum(c['passed'] for c in own)}/{len(own)}"
            rows.append([f"`{name}`", label, f"`{key.split('@')[0]}`",
                         format_number(metrics.get("cosine_mean"), "cosine_mean"),
                         f"{task} {format_number(metrics.get(task), task)}", verdict])
    return ["### Accuracy on each target's runtime", "",
            "The target's runtime as verified on this machine (same model file, same saved inputs); a "
            "TensorRT target's figures need TensorRT, so they come from `device-verify` on the device.", "",
            *_table(["target", "backend", "variant", "cosine mean", "task metric", "checks"], rows,
                    ["l", "l", "l", "r", "l", "l"])]


def _bundles_section(bundles: dict, base: Path | None = None) -> list[str]:
    rows = [[f"`{name}`", f"`{format_cell(_relative(b['path'], base))}`", f"`{b['sha256']}`" if b.get("sha256") else "—",
             _size(b.get("size_bytes")), format_cell(b.get("files"))] for name, b in bundles.items()]
    return ["## Edge bundles", "", *_table(["target", "path", "sha256", "size", "files"], rows,
                                           ["l", "l", "l", "r", "r"])]

# ----------------------------------------------------------------------------- the whole report
def _relative(value: Any, base: Path | None) -> Any:
    """An artifact path relative to the report's folder (``../x`` when beside it)."""
    if not isinstance(value, str) or base is None or not Path(value).is_absolute():
        return value
    return Path(os.path.relpath(Path(value).resolve(), Path(base).resolve())).as_posix()


def _settings_and_environment(report: dict, base: Path | None = None) -> list[str]:
    """Data, export, calibration and bench settings, timings, environment, artifacts and notes."""
    md: list[str] = []
    for key, heading in (("file_sizes", "File sizes"), ("data", "Data"), ("export", "Export"),
                         ("calibration", "Calibration"), ("bench", "Bench settings")):
        if report.get(key):
            data = _applied_calibration(report[key]) if key == "calibration" else report[key]
            md += [f"## {heading}", "", *_kv_table(data), ""]
    if report.get("timings_s"):
        timings = dict(report["timings_s"])
        timings["total"] = round(sum(timings.values()), 2)
        md += ["## Timings (s)", "", *_table(["stage", "seconds"],
                                             [[f"`{k}`", f"{v:.2f}"] for k, v in timings.items()]), ""]
    if report["environment"]:
        md += ["## Environment", "", *_kv_table(report["environment"]), ""]
    if report["artifacts"]:
        md += ["## Artifacts", "", "Paths relative to this report's folder.", "",
               *_table(["name", "path"], [[f"`{k}`", f"`{_relative(v, base)}`"]
                                          for k, v in report["artifacts"].items()], ["l", "l"]), ""]
    if report.get("notes"):
        md += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    return md


def _header(report: dict, base: Path | None = None) -> list[str]:
    """The title, the recipe / target / run line and the acceptance summary. Paths are named
    as :func:`portable_path` does (a report travels: no paths of the machine that wrote it)."""
    title = f"# deploykit report: {portable_path(report['model'], base)}"
    meta = [f"**recipe** `{portable_path(report['recipe'], base)}`" if report["recipe"] else "**recipe** —",
            f"**target** `{report['target']}`"]
    if report.get("run"):
        meta.append(f"**run** `{report['run']}`")
    if report.get("created"):
        meta.append(f"**created** {report['created']}")
    if report.get("deploykit_version"):
        meta.append(f"**deploykit** {report['deploykit_version']}")
    md = [title, "", " · ".join(meta), ""]

    acceptance = report.get("acceptance") or []
    if acceptance:
        failed = [a["check"] for a in acceptance if not a["passed"]]
        md += [f"**Acceptance: {'❌ FAILED' if failed else '✅ passed'}** "
               f"({len(acceptance) - len(failed)} of {len(acceptance)} checks passed"
               + (f"; failed: {', '.join(failed)})" if failed else ")"), ""]
    return md


def render_markdown(report: dict, rendering: Rendering) -> str:
    """The markdown of ``report``; the plots it links are registered on ``rendering``."""
    md = _header(report, rendering.out)
    md += render_sections(report, rendering)
    acceptance = report.get("acceptance") or []
    parity_variants = {k.split("@", 1)[0] for k in (report.get("parity") or {})}
    if report["accuracy"] and not set(report["accuracy"]) <= parity_variants:
        md += [*_accuracy_section(report["accuracy"]), ""]
    elif report["accuracy"]:       # the same figures are rows of "Accuracy per backend": one table
        md += ["## Accuracy", "", "Every variant on every backend: **Accuracy per backend** below (the run's own "
               "figures are its `@ort-cpu` rows).", ""]
    cosines = {v: d["cosine"] for v, d in (report.get("distributions") or {}).items() if d.get("cosine")}
    if cosines:
        cosine_plot = rendering.add(COSINE_PLOT, lambda dest: plot_cosine(cosines, dest))
        md += ["### Cosine distribution", "",
               "Per-sample `1 − cosine` against the reference, log scale (cosines near 1 are unreadable "
               "on a linear axis).", "", f"![Cosine distribution]({cosine_plot})", ""]
    if acceptance:
        md += [*_acceptance_section(acceptance), ""]
    if isinstance(report.get("calibration"), dict) and "float_nodes" in report["calibration"]:
        md += [*_float_nodes_section(report["calibration"]), ""]

    rows = format_latency_table(report)
    if rows:
        md += [*_latency_section(rows, rendering.add(LATENCY_PLOT, lambda dest: plot_latency(rows, dest)),
                                 rendering.add(THROUGHPUT_PLOT, lambda dest: plot_throughput(rows, dest))), ""]
        ratios = _ratio_section(report.get("latency") or {})
        if ratios:
            md += [*ratios, ""]

    parity = report.get("parity") or {}
    if parity or report.get("verification"):
        plotted = any(is_number(m.get("cosine_mean")) or is_number(m.get("snr_db")) for m in parity.values())
        plot = rendering.add(PARITY_PLOT, lambda dest: plot_parity(parity, dest)) if plotted else None
        md += [*_parity_section(report, plot, rendering.out), ""]
    targets = report.get("targets") or {}
    if targets:
        md += [*_targets_section(targets, rendering.add(TARGETS_PLOT, lambda dest: plot_targets(targets, dest))), ""]
        md += [*_target_accuracy_section(targets, parity, (report.get("verification") or {}).get("checks") or []), ""]
    if report.get("bundles"):
        md += [*_bundles_section(report["bundles"], rendering.out), ""]

    tuning = report.get("tuning")
    if isinstance(tuning, dict) and tuning.get("trials"):
        md += [*_tuning_section(tuning, rendering.add(TUNING_PLOT, lambda dest: plot_tuning(tuning, dest))), ""]

    md += _settings_and_environment(report, rendering.out)
    return "\n".join(md).rstrip() + "\n"


def render_report(report_json: str | Path, out_dir: str | Path | None = None) -> Path:
    """Render the markdown and PNG plots of ``report_json`` (``report.json`` -> ``report.md``,
    ``X.json`` -> ``X.md`` and ``X-*.png``), all written together; return the markdown path."""
    report_json = Path(report_json)
    report = read_json(report_json, what="report")
    validate_report(report, path=report_json)
    rendering = Rendering(report_json, out_dir)
    return rendering.write(render_markdown(report, rendering), inputs=(report_json,))


def save_and_render_report(report_json: str | Path, report: dict) -> Path:
    """Write ``report`` to ``report_json`` together with its markdown and plots next to it,
    in one group of atomic renames; return the report path."""
    report_json = Path(report_json)
    validate_report(report, path=report_json)
    rendering = Rendering(report_json)
    rendering.write(render_markdown(report, rendering), report=report)
    return report_json


__all__ = ["render_markdown", "render_report", "save_and_render_report", "target_backend", "LOCALIZATION_ROWS"]
