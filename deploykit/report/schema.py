"""The report.json contract: :func:`validate_report` raises a :class:`UserError` naming the first
field that breaks it.

Contract (see DESIGN.md)::

    {"model": str, "recipe": str|null, "target": str,
     "artifacts":   {name: path},
     "accuracy":    {variant: {metric: float|null}},
     "latency":     {"<variant>@<backend>/b<batch>": {"batch", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s"}},
     "environment": {"python": str, "torch", "onnxruntime", "cpu", "gpu": str|null, ...}}

plus optional ``created``, ``deploykit_version``, ``data``, ``export``, ``calibration``,
``distributions`` ({variant: {"cosine": [...]}}), ``acceptance``, ``timings_s``, ``bench``,
``notes``, and the deployment sections::

    "parity":       {"<variant>@<backend>": {metric: float|null, "samples": int|null}},
    "verification": {"inputs", "inputs_sha256", "reference": str, "backends_run": [str],
                     "backends_skipped": {backend: reason}, "checks": [acceptance-like rows],
                     "exact_qdq": ["<variant>@<backend>" scored with Q/DQ unfused],
                     "fused_qdq_saturating": ["<variant>@ort-cpu" on saturating int8 kernels],
                     "localization": {"<variant>@<backend>": {"nodes": [{"node", "op_type", "module",
                                      "added_snr_db", "added_cosine", "accumulated_snr_db",
                                      "accumulated_cosine"}], "exclude": [str]}}},
    "targets":      {target: {"runtime": str, "measurable": bool, "reason": str|null, "threads",
                              "machine_cores", "memory_budget_mib", "notes": [str],
                              "latency": {variant: {"p50_ms", "p99_ms", "peak_rss_mib",
                                                    "within_memory_budget": bool|null, ...}}}},
    "bundles":      {target: {"path": str, "sha256": str, "size_bytes": int, "files": int}}

Unknown extra fields are allowed and kept.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, NoReturn

from deploykit.errors import UserError

LATENCY_KEY = re.compile(r"^(?P<variant>[^@/]+)@(?P<backend>[^@/]+)/b(?P<batch>[1-9][0-9]*)$")
LATENCY_FIELDS = ("batch", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s")
PARITY_KEY = re.compile(r"^(?P<variant>[^@/]+)@(?P<backend>[^@/]+)$")
ENVIRONMENT_KEYS = ("python", "torch", "onnxruntime", "cpu", "gpu")
_FIX = "regenerate the report with deploykit or correct the field in report.json"

Check = Callable[[Any], bool]


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- value checks
def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _str_or_null(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _count_or_null(v: Any) -> bool:
    return v is None or _count(v)


def _positive_or_null(v: Any) -> bool:
    return v is None or (_count(v) and v > 0)


def _amount_or_null(v: Any) -> bool:
    return v is None or (is_number(v) and v >= 0)


def _number_or_null(v: Any) -> bool:
    return v is None or is_number(v)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _bool_or_null(v: Any) -> bool:
    return v is None or isinstance(v, bool)


class _Checks:
    """The checks of one report: each failure raises a :class:`UserError` naming ``path``."""

    def __init__(self, path: str | Path | None):
        self.path = path

    def fail(self, where: str, problem: str) -> NoReturn:
        raise UserError(f"report field {where} {problem}", path=self.path, fix=_FIX)

    def need_dict(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"must be an object, got {type(value).__name__}")
        return value

    def optional(self, entry: dict, key: str, where: str, ok: Check, expected: str) -> None:
        if key in entry and not ok(entry[key]):
            self.fail(f"{where}['{key}']", f"must be {expected}, got {entry[key]!r}")

    def pair_key(self, key: str, where: str) -> None:
        if not PARITY_KEY.match(key):
            self.fail(where, "has a bad key: use '<variant>@<backend>', e.g. 'int8@ort-cpu'")

    def rows(self, rows: Any, where: str, prefix: str) -> None:
        """Acceptance-like rows ``{"check", "value", "threshold", "passed"}``."""
        if not isinstance(rows, list):
            self.fail(where, f"must be a list, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            at = f"{prefix}[{i}]"
            self.need_dict(row, at)
            for key, ok in (("check", lambda v: isinstance(v, str)), ("threshold", lambda v: isinstance(v, str)),
                            ("passed", lambda v: isinstance(v, bool)),
                            ("value", lambda v: v is None or is_number(v))):
                if key not in row:
                    self.fail(at, f"is missing '{key}'")
                if not ok(row[key]):
                    self.fail(f"{at}['{key}']", f"has the wrong type or value: {row[key]!r}")


# ----------------------------------------------------------------------------- the report
def validate_report(data: dict, *, path: str | Path | None = None) -> None:
    """Check ``data`` against the report contract; raise :class:`UserError` naming the first problem."""
    if not isinstance(data, dict):
        raise UserError(f"a report must be a JSON object, got {type(data).__name__}", path=path, fix=_FIX)
    checks = _Checks(path)
    _validate_header(data, checks)
    _validate_artifacts_and_accuracy(data, checks)
    _validate_latency(data["latency"], checks)
    _validate_environment(data["environment"], checks)
    _validate_optional_sections(data, checks)
    _validate_deployment(data, checks)


def _validate_header(data: dict, checks: _Checks) -> None:
    """The required keys, and the model, recipe, target, created and version strings."""
    for key in ("model", "recipe", "target", "artifacts", "accuracy", "latency", "environment"):
        if key not in data:
            checks.fail(f"'{key}'", "is missing")
    for key in ("model", "target"):
        if not isinstance(data[key], str):
            checks.fail(f"'{key}'", f"must be a string, got {type(data[key]).__name__}")
    if data["recipe"] is not None and not isinstance(data["recipe"], str):
        checks.fail("'recipe'", f"must be a string or null, got {type(data['recipe']).__name__}")
    for key in ("created", "deploykit_version"):
        if key in data and data[key] is not None and not isinstance(data[key], str):
            checks.fail(f"'{key}'", f"must be a string, got {type(data[key]).__name__}")


def _validate_artifacts_and_accuracy(data: dict, checks: _Checks) -> None:
    for name, value in checks.need_dict(data["artifacts"], "'artifacts'").items():
        if not isinstance(value, str):
            checks.fail(f"artifacts['{name}']", f"must be a path string, got {type(value).__name__}")

    for variant, metrics in checks.need_dict(data["accuracy"], "'accuracy'").items():
        for metric, value in checks.need_dict(metrics, f"accuracy['{variant}']").items():
            if value is not None and not is_number(value):
                checks.fail(f"accuracy['{variant}']['{metric}']", f"must be a finite number or null, got {value!r}")


def _validate_latency(latency: Any, checks: _Checks) -> None:
    for key, entry in checks.need_dict(latency, "'latency'").items():
        where = f"latency['{key}']"
        match = LATENCY_KEY.match(key)
        if not match:
            checks.fail(where, "has a bad key: use '<variant>@<backend>/b<batch>', e.g. 'int8@ort-cpu/b8'")
        checks.need_dict(entry, where)
        for name in LATENCY_FIELDS:
            if name not in entry:
                checks.fail(where, f"is missing '{name}'")
        batch = entry["batch"]
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            checks.fail(f"{where}['batch']", f"must be a positive integer, got {batch!r}")
        if batch != int(match["batch"]):
            checks.fail(where, f"has batch {batch} but its key says b{match['batch']}")
        for name in LATENCY_FIELDS[1:]:
            if not is_number(entry[name]) or entry[name] < 0:
                checks.fail(f"{where}['{name}']", f"must be a non-negative finite number, got {entry[name]!r}")


def _validate_environment(environment: Any, checks: _Checks) -> None:
    env = checks.need_dict(environment, "'environment'")
    for key in ENVIRONMENT_KEYS:
        if key not in env:
            checks.fail(f"environment['{key}']", "is missing")
        if not (isinstance(env[key], str) or (env[key] is None and key != "python")):
            checks.fail(f"environment['{key}']", f"must be a string{'' if key == 'python' else ' or null'}, "
                                                 f"got {type(env[key]).__name__}")


def _validate_optional_sections(data: dict, checks: _Checks) -> None:
    """The optional object sections, timings, distributions, acceptance and notes."""
    for key in ("data", "export", "calibration", "bench", "timings_s", "distributions", "study", "training",
                "file_sizes"):
        if key in data:
            checks.need_dict(data[key], f"'{key}'")
    for key, value in data.get("file_sizes", {}).items():
        if not _number_or_null(value):
            checks.fail(f"file_sizes['{key}']", f"must be a finite number or null, got {value!r}")
    for stage, seconds in data.get("timings_s", {}).items():
        if not is_number(seconds):
            checks.fail(f"timings_s['{stage}']", f"must be a finite number, got {seconds!r}")
    for variant, dist in data.get("distributions", {}).items():
        for name, values in checks.need_dict(dist, f"distributions['{variant}']").items():
            if not isinstance(values, list) or not all(is_number(v) for v in values):
                checks.fail(f"distributions['{variant}']['{name}']", "must be a list of finite numbers")

    if "acceptance" in data:
        checks.rows(data["acceptance"], "'acceptance'", "acceptance")
    if "notes" in data and not (isinstance(data["notes"], list) and all(isinstance(n, str) for n in data["notes"])):
        checks.fail("'notes'", "must be a list of strings")


# ----------------------------------------------------------------------------- deployment sections
def _validate_deployment(data: dict, checks: _Checks) -> None:
    """The optional ``parity``, ``verification``, ``targets`` and ``bundles`` sections."""
    if "parity" in data:
        _validate_parity(data["parity"], checks)
    if "verification" in data:
        _validate_verification(data["verification"], checks)
    if "targets" in data:
        _validate_targets(data["targets"], checks)
    if "bundles" in data:
        _validate_bundles(data["bundles"], checks)


def _validate_parity(parity: Any, checks: _Checks) -> None:
    for key, metrics in checks.need_dict(parity, "'parity'").items():
        where = f"parity['{key}']"
        checks.pair_key(key, where)
        for metric, value in checks.need_dict(metrics, where).items():
            if metric == "samples":
                checks.optional(metrics, metric, where, _count_or_null, "a non-negative integer or null")
            elif not _number_or_null(value):
                checks.fail(f"{where}['{metric}']", f"must be a finite number or null, got {value!r}")


def _validate_verification(verification: Any, checks: _Checks) -> None:
    ver = checks.need_dict(verification, "'verification'")
    for key in ("inputs", "inputs_sha256", "reference"):
        checks.optional(ver, key, "verification", _str_or_null, "a string or null")
    checks.optional(ver, "backends_run", "verification", _str_list, "a list of strings")
    checks.optional(ver, "exact_qdq", "verification", _str_list, "a list of strings")
    checks.optional(ver, "fused_qdq_saturating", "verification", _str_list, "a list of strings")
    if "backends_skipped" in ver:
        for backend, reason in checks.need_dict(ver["backends_skipped"], "verification['backends_skipped']").items():
            if not isinstance(reason, str):
                checks.fail(f"verification['backends_skipped']['{backend}']",
                            f"must be a reason string, got {reason!r}")
    if "checks" in ver:
        checks.rows(ver["checks"], "verification['checks']", "verification['checks']")
    if "localization" in ver:
        for key, loc in checks.need_dict(ver["localization"], "verification['localization']").items():
            _validate_localization(key, loc, checks)


def _validate_localization(key: str, loc: Any, checks: _Checks) -> None:
    where = f"verification['localization']['{key}']"
    checks.pair_key(key, where)
    checks.need_dict(loc, where)
    checks.optional(loc, "exclude", where, _str_list, "a list of node names")
    if "nodes" not in loc:
        return
    if not isinstance(loc["nodes"], list):
        checks.fail(f"{where}['nodes']", f"must be a list, got {type(loc['nodes']).__name__}")
    for i, node in enumerate(loc["nodes"]):
        at = f"{where}['nodes'][{i}]"
        checks.need_dict(node, at)
        if not isinstance(node.get("node"), str):
            checks.fail(f"{at}['node']", f"must be a node name string, got {node.get('node')!r}")
        for name in ("op_type", "module"):
            checks.optional(node, name, at, _str_or_null, "a string or null")
        for name in ("added_snr_db", "added_cosine", "accumulated_snr_db", "accumulated_cosine"):
            checks.optional(node, name, at, _number_or_null, "a finite number or null")


def _validate_targets(targets: Any, checks: _Checks) -> None:
    for name, target in checks.need_dict(targets, "'targets'").items():
        where = f"targets['{name}']"
        checks.need_dict(target, where)
        for key in ("runtime", "measurable"):
            if key not in target:
                checks.fail(where, f"is missing '{key}'")
        checks.optional(target, "measurable", where, lambda v: isinstance(v, bool), "true or false")
        checks.optional(target, "target", where, _is_str, "a string")
        checks.optional(target, "runtime", where, _is_str, "a string")
        checks.optional(target, "reason", where, _str_or_null, "a string or null")
        checks.optional(target, "threads", where, _positive_or_null, "a positive integer or null")
        checks.optional(target, "machine_cores", where, _positive_or_null, "a positive integer or null")
        checks.optional(target, "memory_budget_mib", where, _amount_or_null, "a non-negative finite number or null")
        checks.optional(target, "notes", where, _str_list, "a list of strings")
        latency = target.get("latency")
        for variant, entry in ({} if latency is None else checks.need_dict(latency, f"{where}['latency']")).items():
            _validate_target_latency(f"{where}['latency']['{variant}']", entry, checks)


def _validate_target_latency(at: str, entry: Any, checks: _Checks) -> None:
    checks.need_dict(entry, at)
    if "p50_ms" not in entry:
        checks.fail(at, "is missing 'p50_ms'")
    for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_per_s", "peak_rss_mib", "model_rss_mib"):
        checks.optional(entry, key, at, _amount_or_null, "a non-negative finite number or null")
    for key in ("batch", "threads"):
        checks.optional(entry, key, at, _positive_or_null, "a positive integer or null")
    checks.optional(entry, "iterations", at, _count_or_null, "a non-negative integer or null")
    checks.optional(entry, "within_memory_budget", at, _bool_or_null, "true, false or null")


def _validate_bundles(bundles: Any, checks: _Checks) -> None:
    for name, bundle in checks.need_dict(bundles, "'bundles'").items():
        where = f"bundles['{name}']"
        checks.need_dict(bundle, where)
        if "path" not in bundle:
            checks.fail(where, "is missing 'path'")
        checks.optional(bundle, "path", where, _is_str, "a path string")
        checks.optional(bundle, "sha256", where, _str_or_null, "a string or null")
        for key in ("size_bytes", "files"):
            checks.optional(bundle, key, where, _count_or_null, "a non-negative integer or null")


__all__ = ["validate_report", "is_number", "LATENCY_KEY", "LATENCY_FIELDS", "PARITY_KEY", "ENVIRONMENT_KEYS"]
