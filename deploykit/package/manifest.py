"""The bundle format: its constants, the manifest's schema and the path rule every name in it obeys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import deploykit.package.limits as limits
from deploykit.errors import UserError

FORMAT = "deploykit-bundle/1"
VARIANTS = {"int8": "model.int8.onnx", "fp32": "model.onnx"}
PRIMARY = "int8"
VERIFY_BATCH = 32                   # device-verify's inference batch
_HEX = frozenset("0123456789abcdef")
_REQUIRED = ("verify/inputs.npz", "verify/expected.npz", "verify/thresholds.json")
FIX_BAD = "do not use this bundle; re-package the run with deploykit package"


def unsafe_rel(rel: Any) -> str | None:
    """Why ``rel`` is not a plain relative path inside a bundle (None when it is)."""
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    if len(rel) > 4096 or any(ord(c) < 32 for c in rel):
        return "is too long or holds control characters"
    if rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        return "is an absolute path"
    if "\\" in rel:
        return "holds a backslash"
    parts = rel.split("/")
    if ".." in parts:
        return "climbs out of the bundle ('..')"
    if any(p in ("", ".") or len(p) > 255 for p in parts):
        return "is not a plain relative path"
    return None


def bad_bundle(message: str, where: Path | str) -> UserError:
    return UserError(message, path=where, fix=FIX_BAD)


def json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def check_manifest(manifest: Any, where: Path | str) -> dict[str, Any]:
    """The manifest's structure, every path it names and every size it declares; the manifest.

    Every path (``files``' keys, ``variants``' values) must be a plain relative path inside the
    bundle, and every model a variant names must be one of ``files`` (so it is hash-checked)."""
    if not isinstance(manifest, dict):
        raise bad_bundle(f"manifest.json is {json_kind(manifest)}, not a JSON object", where)
    if manifest.get("format") != FORMAT:
        raise bad_bundle(f"manifest.json is not a {FORMAT} manifest (format {manifest.get('format')!r})", where)
    for key, kind in (("name", str), ("files", dict), ("variants", dict), ("target", dict), ("inputs", dict)):
        if key not in manifest:
            raise bad_bundle(f"manifest.json lacks '{key}'", where)
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise bad_bundle(f"manifest.json '{key}' is {json_kind(manifest[key])}, not {json_kind(kind())}", where)
    files = manifest["files"]
    total = 0
    for rel, entry in files.items():
        why = unsafe_rel(rel)
        if why or rel == "manifest.json":
            raise bad_bundle(f"the manifest lists an unsafe path '{rel}' ({why or 'the manifest itself'})", where)
        if not isinstance(entry, dict):
            raise bad_bundle(f"manifest.json files['{rel}'] is {json_kind(entry)}, not an object with sha256 and bytes",
                             where)
        digest, size = entry.get("sha256"), entry.get("bytes")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            raise bad_bundle(f"manifest.json files['{rel}'] has no SHA-256 (64 lowercase hex digits)", where)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad_bundle(f"manifest.json files['{rel}'] has no size in bytes", where)
        if size > limits.MAX_MEMBER_BYTES:
            raise bad_bundle(f"bundle file {rel} declares {size} bytes, over the {limits.MAX_MEMBER_BYTES} a bundle "
                             "file may hold", where)
        total += size
    if total > limits.MAX_TOTAL_BYTES:
        raise bad_bundle(f"the bundle declares {total} bytes, over the {limits.MAX_TOTAL_BYTES} a bundle may hold",
                         where)
    for rel in _REQUIRED:
        if rel not in files:
            raise bad_bundle(f"manifest.json does not list {rel}", where)
    variants = manifest["variants"]
    if not variants:
        raise bad_bundle("manifest.json names no variants", where)
    for variant, rel in variants.items():
        if not isinstance(rel, str):
            raise bad_bundle(f"manifest.json variants['{variant}'] is {json_kind(rel)}, not a path in the bundle",
                             where)
        why = unsafe_rel(rel)
        if why:
            raise bad_bundle(f"manifest.json variants['{variant}'] names an unsafe path '{rel}' ({why})", where)
        if rel not in files or not rel.endswith(".onnx"):
            raise bad_bundle(f"manifest.json variants['{variant}'] names '{rel}', which is not an ONNX file the "
                             "manifest lists (and hashes)", where)
    if manifest.get("primary") is not None and manifest["primary"] not in variants:
        raise bad_bundle(f"manifest.json primary '{manifest['primary']}' is not one of its variants", where)
    name = manifest["target"].get("name")
    if not isinstance(name, str) or not name:
        raise bad_bundle("manifest.json target has no name", where)
    names = manifest["inputs"].get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise bad_bundle("manifest.json inputs.names is not a list of input names", where)
    profile = manifest.get("profile")
    if profile is not None:
        if not isinstance(profile, dict):
            raise bad_bundle(f"manifest.json profile is {json_kind(profile)}, not an object", where)
        for key, value in profile.items():
            if not (isinstance(value, list) and len(value) == 3
                    and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
                raise bad_bundle(f"manifest.json profile['{key}'] is not [min, opt, max] positive integers", where)
    return manifest


def parse_manifest(data: bytes, where: Path | str) -> dict[str, Any]:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = " ".join(str(getattr(exc, "msg", exc)).split())[:120] or type(exc).__name__
        raise bad_bundle(f"manifest.json is not valid JSON ({reason})", where) from None
    return check_manifest(manifest, where)
