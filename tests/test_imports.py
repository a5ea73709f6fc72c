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
