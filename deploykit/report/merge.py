"""Merging a stage's partial report into the report it updates."""

from __future__ import annotations

import copy

DICT_SECTIONS = ("artifacts", "accuracy", "latency", "environment", "distributions", "timings_s", "data",
                 "export", "calibration", "bench", "parity", "verification", "targets", "bundles")
LIST_SECTIONS = ("acceptance", "notes")


def merge_report(existing: dict | None, update: dict) -> dict:
    """Return ``existing`` updated by a stage's partial report ``update``; neither input is changed.

    Dict sections merge key by key (update wins; ``accuracy`` merges each variant's metrics; a
    ``parity`` / ``targets`` / ``bundles`` entry of the update replaces the same-named one whole),
    lists (``acceptance``, ``notes``) and scalars are replaced.
    """
    merged = copy.deepcopy(existing) if existing else {}
    for key, value in copy.deepcopy(update).items():
        old = merged.get(key)
        if key in DICT_SECTIONS and isinstance(old, dict) and isinstance(value, dict):
            if key == "accuracy":
                for variant, metrics in value.items():
                    if isinstance(old.get(variant), dict) and isinstance(metrics, dict):
                        old[variant].update(metrics)
                    else:
                        old[variant] = metrics
            else:
                old.update(value)
        else:
            merged[key] = value
    return merged


__all__ = ["merge_report", "DICT_SECTIONS", "LIST_SECTIONS"]
