"""The wheel as a user installs it: `cli/` is `gnr.cli` (no top-level `cli`), the chart ships inside,
and `gnr submit --dry-run` renders from a fresh venv without a checkout, `GNR_CHART` or helm on
PATH: the helm is the one `make install` puts into the venv's bin/.

The fresh venv gets only the gnr wheel; its dependencies (torch, mlflow, ...) come from the project
venv through a `.pth` line, so nothing is downloaded and nothing is installed twice."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from gnr.cli import helm as gnr_helm
from tests.conftest import ROOT, assert_one_line_error, copy_sources
from tests.helm import helm  # noqa: F401  (fixture)
from tests.manifests import objects

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The gnr wheel, built offline from a copy of the sources (the checkout stays clean)."""
    src, out = copy_sources(tmp_path_factory.mktemp("src")), tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("gnr-*.whl")
    return whl


def test_wheel_holds_every_package_and_the_chart_and_no_top_level_cli(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not any(n.startswith("cli/") for n in names), "a top-level `cli` package collides with other distributions"
    packages = {p.parent for p in [*ROOT.glob("gnr/**/__init__.py"), *ROOT.glob("cli/**/__init__.py")]}
    for pkg in packages:
        installed = Path("gnr") / pkg.relative_to(ROOT / "gnr") if pkg.is_relative_to(ROOT / "gnr") \
            else Path("gnr/cli") / pkg.relative_to(ROOT / "cli")
        assert f"{installed.as_posix()}/__init__.py" in names, f"{pkg} is not in the wheel: list it in pyproject.toml"
    chart = ROOT / "charts" / "gnr"
    for f in chart.rglob("*"):
        if f.is_file():
            assert f"gnr/cli/chart/{f.relative_to(chart).as_posix()}" in names, f"{f} is not in the wheel"
    assert "gnr/presets/demo.yaml" in names and "gnr/assets/imagenet_class_to_id_map.json" in names


def test_wheel_install_finds_its_chart_and_the_helm_in_its_venv(wheel, helm, tmp_path):  # noqa: F811
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py, gnr = env_dir / "bin" / "python", env_dir / "bin" / "gnr"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # No helm on PATH and no GNR_CHART / GNR_HELM: only what the install itself provides.
    env = {k: v for k, v in os.environ.items() if k not in ("GNR_CHART", "GNR_HELM", "PYTHONPATH")}
    env.update(PATH=str(tmp_path / "empty"), GNR_HOME=str(tmp_path / "home"))
    submit = [str(gnr), "submit", "gradnorm", "--gpus", "8", "--dry-run"]

    where = subprocess.run([str(py), "-c", "import gnr, gnr.cli.helm as h; print(gnr.__file__); print(h.chart())"],
                           cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(purelib) for p in where), (where, purelib)

    assert_one_line_error(subprocess.run(submit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300),
                          "helm not found in the venv or on PATH")

    shutil.copy(helm, env_dir / "bin" / "helm")  # where `make install` puts it
    proc = subprocess.run(submit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    kinds = {o["kind"]: o for o in objects(proc.stdout)}
    assert "ConfigMap" in kinds and kinds.keys() & {"PyTorchJob", "TrainJob"}, set(kinds)
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["config.yaml"])
    assert config["objective"]["method"] == "gradnorm"
    assert "gnr.cli.app" in proc.stdout


def test_editable_install_maps_gnr_cli_and_its_chart_to_the_checkout(monkeypatch):
    """`make install` (pip install -e): `gnr.cli` is this checkout's cli/, and the chart its charts/gnr."""
    monkeypatch.delenv("GNR_CHART", raising=False)
    assert Path(gnr_helm.__file__).resolve() == ROOT / "cli" / "helm.py"
    assert gnr_helm.chart() == ROOT / "charts" / "gnr"
