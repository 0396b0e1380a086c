"""Helm as `gnr submit` and `gnr eval --submit` use it: find the binary and the chart, then render
(`helm template`) or install (`helm upgrade --install`) one release of `charts/gnr`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from gnr.errors import GnrError

# A wheel ships the chart as package data beside this module; a checkout (editable install) has it at
# charts/gnr beside `cli/`.
CHART_CANDIDATES = (Path(__file__).resolve().parent / "chart", Path(__file__).resolve().parents[1] / "charts" / "gnr")
RELEASE_NAME_MAX = 53  # helm's limit


def binary() -> str:
    """`$GNR_HELM`, else the helm `make install` puts beside gnr's Python (the venv's bin/), else PATH's."""
    configured = os.environ.get("GNR_HELM")
    beside = Path(sys.executable).parent / "helm"  # not resolved: a venv's python is a symlink
    path = configured or (str(beside) if _executable(beside) else shutil.which("helm"))
    if not path or not _executable(path):
        where = f"GNR_HELM={configured} is not an executable" if configured else "helm not found in the venv or on PATH"
        raise GnrError(f"{where}: run `make install` (it puts helm into .venv/bin), install Helm 3 "
                       "(https://helm.sh/docs/intro/install/), or set GNR_HELM to its path")
    return path


def _executable(path: str | Path) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def chart() -> Path:
    """`$GNR_CHART`, else the chart installed with gnr (a wheel's package data, or a checkout's charts/gnr)."""
    configured = os.environ.get("GNR_CHART")
    candidates = [Path(configured)] if configured else CHART_CANDIDATES
    for path in candidates:
        if (path / "Chart.yaml").is_file():
            return path
    raise GnrError(f"no Helm chart at {candidates[0]}: set GNR_CHART to the charts/gnr directory of a gnr checkout")


def release_name(task: str, run_id: str) -> str:
    return f"gnr-{task}-{run_id}"[:RELEASE_NAME_MAX].rstrip("-")


def apply(release: str, namespace: str, values: dict, values_files: Sequence[Path] = (), dry_run: bool = False) -> str:
    """Render (dry_run) or install the release and return helm's stdout: the manifests, or its report.

    ``values_files`` (cluster settings) come first; ``values`` (run id, config, sizes) win over them.
    """
    import yaml

    helm, chart_dir = binary(), chart()
    for f in values_files:
        if not Path(f).is_file():
            raise GnrError(f"values file not found: {f}")
    verb = ["template"] if dry_run else ["upgrade", "--install"]
    with tempfile.TemporaryDirectory(prefix="gnr-helm-") as tmp:
        generated = Path(tmp) / "values.yaml"
        generated.write_text(yaml.safe_dump(values, sort_keys=False))
        files = [arg for f in [*values_files, generated] for arg in ("--values", str(f))]
        proc = subprocess.run([helm, *verb, release, str(chart_dir), "--namespace", namespace, *files],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise GnrError(f"helm {verb[0]} failed: {_one_line(proc.stderr) or f'exit status {proc.returncode}'}")
    return proc.stdout


def _one_line(stderr: str) -> str:
    """Helm's error (it may span lines, e.g. schema violations) as one line, without its hints."""
    lines = [ln.strip() for ln in stderr.splitlines()
             if ln.strip() and not ln.startswith(("WARNING:", "Use --debug"))]
    return " ".join(lines).removeprefix("Error: ")
