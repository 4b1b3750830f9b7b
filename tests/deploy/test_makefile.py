"""The Makefile's bootstrap on a machine whose Python cannot create a venv (Debian without python3-venv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_missing_ensurepip_stops_with_the_package_to_install(tmp_path: Path) -> None:
    # Debian puts ensurepip in pythonX.Y-venv; a module that fails to import stands in for its absence.
    shadow = tmp_path / "shadow" / "ensurepip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n")
    work = tmp_path / "work"
    work.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, work / name)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}
    result = subprocess.run(
        ["make", "install", f"PYTHON={sys.executable}"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    v = sys.version_info
    errors = [line for line in result.stderr.splitlines() if not line.startswith("make")]
    assert errors == [
        f"error: {sys.executable} has no ensurepip, so it cannot create .venv: install it with "
        f"`apt-get install python{v[0]}.{v[1]}-venv` (python3-venv for the default python3)"
    ]
    assert not (work / ".venv").exists()  # stopped before venv left a half-made one
