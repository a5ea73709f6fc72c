"""Every module imports; ``pipelines`` and ``rewards`` never import ``vialign``."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

PACKAGES = ("vialign", "pipelines", "rewards")


def all_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        names.append(package)
        names += [info.name for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}.")]
    return [name for name in names if not name.endswith(".__main__")]  # running it is test_cli's job


@pytest.mark.parametrize("name", all_modules())
def test_module_imports(name):
    importlib.import_module(name)


def test_pipelines_and_rewards_do_not_import_vialign():
    code = (
        "import sys, pkgutil, importlib, pipelines, rewards\n"
        "for p in (pipelines, rewards):\n"
        "    for m in pkgutil.walk_packages(p.__path__, prefix=p.__name__ + '.'): importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m == 'vialign' or m.startswith('vialign.'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_every_package_is_listed_for_the_wheel():
    """pyproject lists packages explicitly: a new sub-package missing there imports from a checkout or an
    editable install but is absent from the wheel users install."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for top in ("vialign", "rewards", "pipelines")
        for init in (root / top).rglob("__init__.py")
    }
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
