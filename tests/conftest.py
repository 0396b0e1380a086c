"""Fixtures shared by the suite: real servers and real data, cleaned up after themselves."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GNR_SHARED", ROOT.parent / "shared"))
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"
ROBUSTBENCH = SHARED / "data" / "robustbench"
BIN = Path(sys.executable).parent
DEMO_MODEL = "tests-demo"  # the registered model of the demo_run fixture

SOURCES = ("pyproject.toml", "README.md", "gnr", "cli", "charts")  # what a wheel of gnr is built from

# Two cores: keep every torch process to one intra-op thread unless a test says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def copy_sources(dest: Path) -> Path:
    """A copy of what gnr's wheel is built from, so that pip builds it without touching the checkout."""
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    assert IMAGENET_SAMPLE.is_dir(), f"real JPEGs expected at {IMAGENET_SAMPLE}"
    return IMAGENET_SAMPLE


@pytest.fixture(scope="session")
def class_map() -> Path:
    return ROBUSTBENCH / "imagenet_class_to_id_map.json"


@pytest.fixture()
def gnr_home(tmp_path, monkeypatch) -> Path:
    """An isolated $GNR_HOME (local MLflow store, demo shards, checkpoints) for one test."""
    home = tmp_path / "gnr-home"
    monkeypatch.setenv("GNR_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """The bundled demo dataset written once per session (read-only for tests)."""
    from gnr.data.shards import write_demo

    out = tmp_path_factory.mktemp("demo-shards")
    write_demo(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll a loopback server started by a test until `url` answers (False: it died or timed out)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with a SQLite backend and a proxied artifact store."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    if not wait_for_http(f"{uri}/health", proc, timeout=120):
        proc.kill()
        raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def run_gnr(*args, env=None, timeout=600, check=False, cwd=None) -> subprocess.CompletedProcess:
    """Run the installed `gnr` console script as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(BIN / "gnr"), *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"gnr {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str = "") -> None:
    """Bad input: non-zero exit, a short message, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    msg = proc.stderr.strip()
    assert msg and len(msg.splitlines()) <= 2, msg
    assert needle.lower() in msg.lower(), msg


@pytest.fixture(scope="session")
def demo_run(mlflow_server, tmp_path_factory) -> dict:
    """A short gradnorm run of the demo preset, logged to the real MLflow server (shared, read-only);
    its MLflow model is registered as ``DEMO_MODEL`` version 1."""
    import json

    home = tmp_path_factory.mktemp("demo-run-home")
    proc = run_gnr("train", "gradnorm", "--max-steps", "12", "--tracking-uri", mlflow_server,
                   "--experiment", "tests", "--register", DEMO_MODEL, "--json", env={"GNR_HOME": str(home)}, check=True)
    summary = json.loads(proc.stdout)
    return {"run_id": summary["run_id"], "uri": mlflow_server, "home": home, "summary": summary}
