"""Real English text for calibration and evaluation: sentences from docstrings.

Docstrings of the Python standard library are prose written by many people over decades,
shipped with every Python installation, so the corpus needs no download. Source files are
parsed with ``ast`` (nothing is imported or executed); modules are visited in a fixed order
and sentences de-duplicated in first-seen order, so the corpus is identical on every
machine with the same Python minor version. The report records the hash of each split,
which pins the exact text used.
"""

from __future__ import annotations

import ast
import functools
import re
import sysconfig
from pathlib import Path

# Well-documented standard-library modules, in a fixed order. Missing ones are skipped.
STDLIB_MODULES: tuple[str, ...] = (
    "argparse", "ast", "asyncio/base_events", "asyncio/events", "asyncio/futures", "asyncio/locks",
    "asyncio/queues", "asyncio/streams", "asyncio/tasks", "base64", "bdb", "bisect", "calendar",
    "cmd", "codecs", "collections/__init__", "concurrent/futures/_base", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest",
    "email/message", "email/utils", "email/feedparser", "enum", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac",
    "http/client", "http/cookiejar", "http/server", "imaplib", "importlib/__init__",
    "importlib/_bootstrap", "importlib/_bootstrap_external", "inspect", "ipaddress",
    "json/__init__", "json/decoder", "json/encoder", "locale", "logging/__init__",
    "logging/handlers", "mailbox", "multiprocessing/connection", "multiprocessing/managers",
    "multiprocessing/pool", "netrc", "numbers", "optparse", "os", "pathlib", "pdb", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue", "random", "re/__init__",
    "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "turtle", "typing", "unittest/case",
    "unittest/mock", "urllib/parse", "urllib/request", "uuid", "warnings", "weakref",
    "xml/dom/minidom", "xml/etree/ElementTree", "zipfile/__init__", "zipfile", "zipimport",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r"(>>>|\.\.\. |::|==|!=|\{|\}|\w\(.*\)\w|^[\-=*~^]{3,}|^\s*[:@]\w+)")
_MARKUP = re.compile(r"``?|\*\*|:[a-z]+:(?=`)")


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def _paragraphs(doc: str) -> list[str]:
    paras, current = [], []
    for line in doc.splitlines():
        if not line.strip():
            if current:
                paras.append(current)
            current = []
            continue
        current.append(line)
    if current:
        paras.append(current)
    keep = []
    for lines in paras:
        # Indented blocks, doctests, option tables and field lists are code, not prose.
        if any(line.startswith((" ", "\t")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        keep.append(_MARKUP.sub("", text))
    return keep


def is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 60:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if _CODE_LIKE.search(sentence):
        return False
    letters = sum(ch.isalpha() for ch in sentence)
    return letters >= 0.75 * len(sentence.replace(" ", ""))


def sentences_from_docstring(doc: str) -> list[str]:
    out = []
    for para in _paragraphs(doc):
        for sentence in _SENTENCE_END.split(para):
            sentence = " ".join(sentence.split())
            if sentence and is_prose(sentence):
                out.append(sentence)
    return out


@functools.lru_cache(maxsize=4)
def docstring_sentences(stdlib_dir: str | None = None) -> tuple[str, ...]:
    """All unique prose sentences from the standard-library docstrings, in a fixed order."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    seen: dict[str, None] = {}
    for module in STDLIB_MODULES:
        path = root / f"{module}.py"
        if not path.is_file():
            continue
        for doc in _docstrings(path):
            for sentence in sentences_from_docstring(doc):
                seen.setdefault(sentence, None)
    return tuple(seen)


def read_text_file(path: str | Path) -> list[str]:
    """A user's own samples: one per line; blank lines and duplicates dropped, order kept."""
    from deploykit.errors import UserError

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the text file ({exc.strerror or exc})", path=path, fix="check the path") from None
    nul = raw.find(b"\0")
    if nul >= 0:
        raise UserError(f"not a text file (a NUL byte at offset {nul})", path=path,
                        fix="give UTF-8 text, one sample per line")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})", path=path,
                        fix="save it as UTF-8 text, one sample per line") from None
    seen: dict[str, None] = {}
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            seen.setdefault(line, None)
    return list(seen)
