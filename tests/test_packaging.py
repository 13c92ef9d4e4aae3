"""The install layout: top-level folders map under deploykit., nothing generic is claimed."""

from __future__ import annotations

import subprocess
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


def test_the_top_level_cli_file_runs_the_package_cli():
    # One CLI: deploykit/cli.py is a real module (no symlink), and cli.py at the top hands over
    # to it, so `python cli.py` and the installed `deploykit` command are the same app.
    module = ROOT / "deploykit" / "cli.py"
    assert module.is_file() and not module.is_symlink()
    import deploykit.cli

    shim = {}
    exec(compile((ROOT / "cli.py").read_text(), "cli.py", "exec"), shim)
    assert shim["app"] is deploykit.cli.app and shim["main"] is deploykit.cli.main
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT.parent)
    assert proc.returncode == 0 and "calibrate" in proc.stdout and "device-verify" in proc.stdout, proc.stderr


def test_package_names_resolve_under_deploykit():
    import deploykit.calib
    import deploykit.cli
    import deploykit.recipes

    assert Path(deploykit.calib.__file__).parent.name == "calib"
    assert callable(deploykit.cli.main)
    assert "calib" not in sys.modules and "recipes" not in sys.modules
