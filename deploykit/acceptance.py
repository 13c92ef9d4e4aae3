"""Acceptance rules: thresholds written as ``'>= 0.995'``, and their checks against the
parity figures keyed ``<variant>@<backend>`` (a leaf: nothing of deploykit is imported)."""

from __future__ import annotations

import re
from typing import Any

_RULE = re.compile(r"^\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


def parse_rule(rule: str) -> tuple[str, float] | None:
    """``'>= 0.995'`` -> (">=", 0.995); None if malformed."""
    match = _RULE.match(str(rule))
    if not match:
        return None
    try:
        return match.group(1), float(match.group(2))
    except ValueError:
        return None


def passes(value: float | None, rule: str) -> bool:
    op, number = parse_rule(rule)
    if value is None:
        return False
    return {">=": value >= number, "<=": value <= number, ">": value > number, "<": value < number}[op]


def evaluate_checks(rules: dict[str, str], parity: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Thresholds on the parity entries: ``int8.cosine_mean`` applies to int8 on every backend
    it ran on, ``int8@tensorrt.cosine_mean`` to one. A rule that matches nothing fails (a gate
    must not pass because its variant did not run)."""
    results = []
    for key, rule in rules.items():
        variant, metric = key.rsplit(".", 1)
        keys = [k for k in parity if (k == variant if "@" in variant else k.split("@", 1)[0] == variant)]
        keys = [k for k in keys if not k.endswith("@torch") or variant.endswith("@torch")] or keys
        threshold = " ".join(str(rule).split())
        if not keys:
            results.append({"check": key, "value": None, "threshold": threshold, "passed": False,
                            "note": f"no '{variant}' result to check"})
        for k in keys:
            value = parity[k].get(metric)
            if metric == "snr_db" and value is None and parity[k].get("max_abs_diff") == 0:
                ok = parse_rule(rule)[0] in (">=", ">")      # identical outputs: infinite SNR
            else:
                ok = passes(value, rule)
            results.append({"check": f"{k}.{metric}", "value": value, "threshold": threshold, "passed": ok})
    return results
