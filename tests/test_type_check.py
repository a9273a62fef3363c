"""The type check in `make lint` catches mistakes in proxy/ and local_backend/.

mypy runs with the project's own pyproject.toml on a copy of a few small modules (standard library
imports only, so a cold cache costs seconds, not the minute the whole tree takes): the copy passes as
it is, and fails once a type error or an unannotated function is put into it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Standard-library-only modules, one per package the check covers.
MODULES = ["proxy/http/cpu.py", "local_backend/errors.py", "netguard/addresses.py"]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")


def _tree(tmp_path: Path) -> Path:
    """The project's config and MODULES, each package's other modules left out (empty __init__.py)."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for module in MODULES:
        target = tmp_path / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / module, target)
        for folder in target.relative_to(tmp_path).parents:
            if folder != Path("."):
                (tmp_path / folder / "__init__.py").touch()
    return tmp_path


def _mypy(tree: Path) -> subprocess.CompletedProcess[str]:
    # The config's own `files` (proxy, local_backend, netguard) and its settings; the cache in the copy.
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tree / ".mypy_cache")],
                          cwd=tree, capture_output=True, text=True, timeout=600)


def _append(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code)


def test_the_config_covers_every_package() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert set(config["files"]) == {"proxy", "local_backend", "netguard"}
    assert config["disallow_untyped_defs"] and config["check_untyped_defs"] and config["strict_optional"]
    assert not config.get("ignore_missing_imports") and not config.get("ignore_errors")
    lint = (ROOT / "Makefile").read_text().split("\nlint:")[1].split("\n\n")[0]
    assert "ruff check" in lint and "mypy" in lint


def test_mypy_fails_on_type_errors_in_proxy_and_local_backend(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    clean = _mypy(tree)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    # A wrong return type in proxy/, an Optional used as a value and an unannotated function in
    # local_backend/.
    _append(tree / "proxy/http/cpu.py", "def injected_wrong_return(size: int) -> str:\n    return size\n")
    _append(tree / "local_backend/errors.py",
            "def injected_optional(text: str | None) -> int:\n    return len(text)\n\n\n"
            "def injected_untyped(value):\n    return value\n")
    broken = _mypy(tree)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    out = broken.stdout
    assert "proxy/http/cpu.py" in out and "[return-value]" in out
    assert "local_backend/errors.py" in out and "[arg-type]" in out and "[no-untyped-def]" in out
