"""The documentation: a short README that keeps CI's two commands, links that resolve, the
design doc's layer diagram, and a command table that matches the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250

# The floors of the picture, top to bottom (the leaf modules come below them); each is checked
# against test_structure.FLOORS, the list the code is held to.
LAYERS = ["cli", "pipeline", "study", "stages", "context / package", "recipe", "study_report", "outliers",
          "report", "verify / bench / doctor", "quantize / train / compression", "export", "runners", "engine",
          "targets", "sparsity", "data", "models", "recipes / feeds", "plugins / calib / small helpers"]
LEAF_MODULES = ["io", "errors", "acceptance", "metrics", "presets", "probes", "threads"]


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# ---------------------------------------------------------------- markdown helpers

FENCE = re.compile(r"^(```|~~~)")


def split_fences(text: str) -> tuple[list[str], list[list[str]]]:
    """The lines outside fenced code blocks (blocks blanked out), and each block's lines."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
            prose.append("")
            continue
        if block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    prose, _ = split_fences(text)
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")


def links(text: str) -> list[str]:
    """Every link target outside code: inline links, images and reference definitions."""
    prose, _ = split_fences(text)
    out = []
    for line in prose:
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        out += INLINE_LINK.findall(line)
        ref = REFERENCE_DEF.match(line)
        if ref:
            out.append(ref.group(1))
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in links(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.name}: {target}: no file {dest}")
            continue
        if anchor:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append(f"{path.name}: {target}: an anchor into a file that is not markdown")
            elif anchor not in anchors(dest.read_text()):
                problems.append(f"{path.name}: {target}: no heading #{anchor} in {dest.name}")
    return problems


def section(text: str, heading: str) -> str:
    """The text under a '## heading' up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(#{1,6})\s+(.*)$", line)
        if match and match.group(2).strip() == heading:
            level = len(match.group(1))
            body = []
            for rest in lines[i + 1:]:
                head = re.match(r"^(#{1,6})\s", rest)
                if head and len(head.group(1)) <= level:
                    break
                body.append(rest)
            return "\n".join(body)
    raise AssertionError(f"no heading '{heading}'")


# ---------------------------------------------------------------- the helpers can fail

def test_link_parser_finds_links_and_skips_code():
    text = ("See [a](a.md), ![img](pics/x.png) and [b](b.md#part \"title\").\n"
            "`[not](code.md)` and [web](https://example.org).\n"
            "[ref]: ref.md\n"
            "```\n[in a block](block.md)\n```\n")
    assert links(text) == ["a.md", "pics/x.png", "b.md#part", "https://example.org", "ref.md"]


def test_slug_follows_github():
    assert slug("`gpu-trt`, tuned (`minilm-int8-smoothquant`): 5 min 17 s") == \
        "gpu-trt-tuned-minilm-int8-smoothquant-5-min-17-s"
    assert slug("The paper's W8A8 setting") == "the-papers-w8a8-setting"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_link_checker_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Real part\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#real-part) [self](#top) [gone](missing.md) [bad](other.md#nope)\n\n# Top\n")
    problems = broken_links(page)
    assert len(problems) == 2
    assert "missing.md" in problems[0] and "#nope" in problems[1]


# ---------------------------------------------------------------- the documents

def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/"


def ci_commands() -> list[str]:
    """The commands .ci/run runs from the README: its install and its test line."""
    out = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        line = line.strip()
        if line.startswith(("pip install", "pytest")):
            out.append(" ".join(shlex.split(line, posix=False)))
    return out


def readme_commands() -> list[str]:
    """Every shell command in the README's 'Two commands' code block (split at && and #)."""
    _, blocks = split_fences(section(README.read_text(), "Two commands"))
    out = []
    for block in blocks:
        for line in block:
            line = re.sub(r"\s+#.*$", "", line)  # a trailing comment
            for part in line.split("&&"):
                if part.strip():
                    out.append(" ".join(shlex.split(part.strip(), posix=False)))
    return out


def test_readme_keeps_the_commands_ci_runs():
    ci = ci_commands()
    assert ci == ['pip install -e ".[test,models]"', "pytest"], f".ci/run changed: {ci}"
    readme = readme_commands()
    for command in ci:
        assert command in readme, f"README's 'Two commands' block must contain `{command}` (.ci/run runs it)"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_docs_are_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README.read_text())}
    unlinked = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"link these from README.md: {unlinked}"


def test_design_doc_has_the_layer_diagram():
    _, blocks = split_fences(section((DOCS / "design.md").read_text(), "Layers"))
    names = list(LAYERS)

    def layer_order(block):
        found, at = [], 0
        for line in block:
            if at < len(names) and re.match(rf"^{re.escape(names[at])}(\s|$)", line):
                found.append(names[at])
                at += 1
        return found, block

    diagrams = [layer_order(b) for b in blocks]
    full = [block for found, block in diagrams if found == names]
    assert full, f"docs/design.md 'Layers' needs a diagram with, top to bottom: {names}"
    last_layer = max(i for i, line in enumerate(full[0]) if line.startswith(names[-1]))
    leaf = [line for line in full[0][last_layer + 1:] if all(re.search(rf"\b{m}\b", line) for m in LEAF_MODULES)]
    assert leaf, f"the leaf modules {LEAF_MODULES} belong at the bottom of the diagram"


def test_design_doc_says_where_new_code_goes():
    text = section((DOCS / "design.md").read_text(), "Where new code goes")
    for place in ["deploykit/runners", "recipes/", "register_section", "deploykit/report/sections.py",
                  "deploykit/stages.py", "deploykit/cli.py"]:
        assert place in text, f"'Where new code goes' does not mention {place}"


def readme_table_commands() -> list[str]:
    text = section(README.read_text(), "Commands")
    rows = [line for line in text.splitlines() if line.startswith("|")]
    out = []
    for row in rows:
        first = row.split("|")[1]
        out += re.findall(r"`deploykit ([a-z][a-z0-9-]*)", first)
    return out


def cli_commands() -> set[str]:
    import typer.main

    from deploykit.cli import app

    return set(typer.main.get_command(app).commands)


def test_readme_command_table_matches_the_cli():
    table = readme_table_commands()
    assert len(table) >= 10, f"the README's command table lists too few commands: {table}"
    cli = cli_commands()
    assert "no-such-command" not in cli and "run" in cli
    unknown = sorted(set(table) - cli)
    assert not unknown, f"README lists commands the CLI does not have: {unknown}"
    missing = sorted(cli - set(table))
    assert not missing, f"README's command table misses: {missing}"


def test_the_layer_picture_is_the_floors_the_code_is_held_to():
    from test_structure import FLOORS

    assert len(FLOORS) == len(LAYERS) + 1                       # + the leaf modules
    for label, floor in zip(LAYERS, FLOORS):
        # the floor's first module, by its last name, heads the picture's line
        assert floor[0].rpartition(".")[2] == label.split(" / ")[0], (label, floor)
    assert {m.rpartition(".")[2] for m in FLOORS[-1]} == set(LEAF_MODULES)
