"""gnr run from a source checkout on PYTHONPATH, with no installed gnr distribution: the way a GPU
machine without network runs it (`scripts/gpu-cost.sh`, ../shared/gpu/make-kit.sh).

The environment is real: the project venv's packages, minus gnr's own distribution, on a fresh
venv's path; pyautoattack without its metadata too, as the GPU kit copies it in as code. This
checkout's gnr is laid out as the wheel installs it (cli/ as gnr.cli) and run with `python -P`."""

import json
import os
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest
import timm
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def checkout_python(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(python, env) that imports this checkout's gnr and the project's dependencies, with no gnr dist."""
    tmp = tmp_path_factory.mktemp("checkout")
    site = tmp / "site"  # the project venv's site-packages without gnr's (and pyautoattack's) metadata
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        metadata = entry.name.endswith(".dist-info") and entry.name.startswith(("gnr-", "pyautoattack-"))
        if not (metadata or entry.name.startswith("__editable__")):
            (site / entry.name).symlink_to(entry)
    layout = tmp / "layout" / "gnr"  # as scripts/gpu-cost.sh lays it out
    layout.mkdir(parents=True)
    for entry in (ROOT / "gnr").iterdir():
        (layout / entry.name).symlink_to(entry)
    (layout / "cli").symlink_to(ROOT / "cli")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "project-deps.pth").write_text(f"{site}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(PYTHONPATH=str(layout.parent), GNR_HOME=str(tmp / "home"))
    return py, env


def test_the_checkout_has_no_gnr_distribution(checkout_python):
    py, env = checkout_python
    probe = ("import importlib.metadata as m, gnr, gnr.cli.app, pyautoattack\n"
             "for name in ('gnr', 'pyautoattack'):\n"
             "    try: m.distribution(name); print(name, 'installed')\n"
             "    except m.PackageNotFoundError: print(name, 'missing')\n")
    out = subprocess.run([str(py), "-P", "-c", probe], env=env, check=True, capture_output=True, text=True).stdout
    assert out.split("\n")[:2] == ["gnr missing", "pyautoattack missing"], out


def test_training_from_a_checkout_logs_the_model_with_the_installed_versions(checkout_python, demo_shards, tmp_path,
                                                                             monkeypatch):
    """850fea4 exited 2 here: the MLflow Model's requirements were read from gnr's distribution."""
    py, env = checkout_python
    proc = subprocess.run([str(py), "-P", "-m", "gnr.cli.app", "train", "natural", "--max-steps", "2",
                           "--data", str(demo_shards), "--set", "eval.holdout=20", "--set", "tracking.system_metrics=false",
                           "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("gnr is not an installed distribution") == 1, proc.stderr
    summary = json.loads(proc.stdout)

    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env['GNR_HOME']}/mlflow.db")
    local = mlflow.artifacts.download_artifacts(summary["model_uri"], dst_path=str(tmp_path))
    requirements = set(Path(local, "requirements.txt").read_text().split())
    locked = {line.split("==")[0]: line for line in (ROOT / "requirements.lock").read_text().split()}
    assert {f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}",
            locked["pyautoattack"]} <= requirements, requirements  # pyautoattack: no metadata, so the lock's pin
