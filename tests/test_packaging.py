"""The install layout: top-level folders map under deploykit., nothing generic is claimed."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_cli_module_is_the_top_level_cli_file():
    link = ROOT / "deploykit" / "cli.py"
    assert link.is_symlink() and link.resolve() == (ROOT / "cli.py").resolve()


def test_package_names_resolve_under_deploykit():
    import deploykit.calib
    import deploykit.cli
    import deploykit.recipes

    assert Path(deploykit.calib.__file__).parent.name == "calib"
    assert callable(deploykit.cli.main)
    assert "calib" not in sys.modules and "recipes" not in sys.modules
