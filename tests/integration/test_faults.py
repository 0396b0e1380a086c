"""Faults end cleanly and lose nothing (issue 10): each test drives the real component into the fault.

A real `mlflow server` (behind basic auth) killed mid-run and restarted on the same port and store;
a real tmpfs that fills up; real shards with one removed; a real text file posing as a JPEG.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import BIN, _free_port, assert_one_line_error, run_gnr, wait_for_http

pytestmark = pytest.mark.integration

PASSWORD = "gnr-test-Pw-4f9c1e"  # the auth server's admin password; it must never be printed


class AuthServer:
    """`mlflow server --app-name basic-auth` on loopback that a test can kill and start again on the
    same port and store."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, _free_port(), None
        self.uri = f"http://admin:{PASSWORD}@127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_FLASK_SERVER_SECRET_KEY": "gnr-tests", "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
               "MLFLOW_AUTH_CONFIG_PATH": str(self._auth_config())}
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root, env=env)
        if not wait_for_http(f"http://127.0.0.1:{self.port}/health", self.proc, timeout=180):
            self.kill()
            raise RuntimeError(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")

    def _auth_config(self) -> Path:
        path = self.root / "basic_auth.ini"
        path.write_text("[mlflow]\ndefault_permission = READ\n"
                        f"database_uri = sqlite:///{self.root / 'basic_auth.db'}\nadmin_username = admin\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        return path

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture()
def auth_server(tmp_path):
    server = AuthServer(tmp_path / "auth-server")
    server.root.mkdir()
    server.start()
    yield server
    server.kill()


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text


def _checkpoints(home: Path, run_id: str) -> list[Path]:
    return sorted((home / "checkpoints" / run_id).glob("step-*.pt"))


def test_mlflow_outage_buffers_and_resume_finishes_the_run(auth_server, demo_shards, tmp_path):
    """Items 1 and 8: a credentialed URI works; the server dies after the first checkpoint; training
    goes on, buffers, and exits with one line saying how to resume; `gnr eval` fixes the stale RUNNING
    run; `gnr train --resume` sends the buffer and ends the run FINISHED."""
    home = tmp_path / "home"
    wrong = auth_server.uri.replace(PASSWORD, "Wrong-password-123")
    proc = run_gnr("train", "natural", "--tracking-uri", wrong, "--data", demo_shards, env={"GNR_HOME": str(home)})
    assert_one_line_error(proc, "401")
    assert "Wrong-password" not in proc.stderr + proc.stdout
    args = ["train", "gradnorm", "--max-steps", "30", "--data", demo_shards, "--set", "eval.holdout=40",
            "--set", "checkpoint.every_minutes=100", "--tracking-uri", auth_server.uri, "--experiment", "outage", "--json"]
    env = {**os.environ, "GNR_HOME": str(home)}
    trainer = subprocess.Popen([str(BIN / "gnr"), *map(str, args)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((home / "checkpoints").glob("*/step-000000022.pt")) and time.time() < deadline:
        assert trainer.poll() is None, trainer.communicate()
        time.sleep(0.05)
    os.kill(trainer.pid, signal.SIGSTOP)  # the first checkpoint is there: the server dies now
    auth_server.kill()
    killed_at = time.time()
    os.kill(trainer.pid, signal.SIGCONT)
    out, err = trainer.communicate(timeout=300)
    took = time.time() - killed_at
    _no_secret(out, err)
    assert trainer.returncode != 0 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err  # one warning when the server went away, one error at the end
    assert "unreachable" in lines[0] and "training goes on" in lines[0]
    run_id = next(home.joinpath("checkpoints").iterdir()).name
    assert f"gnr train --resume {run_id}" in lines[1] and "resumable" in lines[1]
    print(f"server killed -> trainer exited in {took:.1f} s")
    assert took < 120, took
    ckpts = _checkpoints(home, run_id)
    assert ckpts[-1].name == "step-000000030.pt"
    assert torch.load(ckpts[-1], weights_only=True)["update"] == 30
    spool = home / "checkpoints" / run_id / "mlflow-spool.jsonl"
    buffered = [json.loads(line) for line in spool.read_text().splitlines()]
    assert any(op["op"] == "metrics" and op["step"] == 30 and "holdout/pgd10_acc" in op["metrics"] for op in buffered)

    auth_server.start()  # same port, same store
    c = auth_server.client()
    assert c.get_run(run_id).info.status == "RUNNING"  # the trainer could not say otherwise
    proc = run_gnr("eval", "--run-id", run_id, "--tracking-uri", auth_server.uri, "--attacks", "clean", "--n", "8",
                   env={"GNR_HOME": str(home)})
    _no_secret(proc.stdout, proc.stderr)
    assert f"run {run_id} was left RUNNING" in proc.stderr and "is gone" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    run = c.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["gnr.failure"].startswith("stale")

    proc = run_gnr(*args[:-1], "--resume", run_id, "--json", env={"GNR_HOME": str(home)})
    _no_secret(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stderr
    assert "sent" in proc.stderr and "buffered" in proc.stderr
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and "gnr.failure" not in run.data.tags
    history = c.get_metric_history(run_id, "holdout/pgd10_acc")
    assert sorted(m.step for m in history) == [22, 30]  # step 30 was logged while the server was down
    logged = {a.path for a in c.list_artifacts(run_id, "checkpoints")} | {a.path for a in c.list_artifacts(run_id, "weights")}
    assert {"checkpoints/last.pt", "checkpoints/best.pt", "weights/ema.safetensors", "weights/raw.safetensors"} <= logged
    assert not spool.exists()
    params = c.get_run(run_id).data.params
    _no_secret(json.dumps(params), (Path(c.download_artifacts(run_id, "config.yaml", str(tmp_path)))).read_text())


@pytest.fixture()
def tmpfs(tmp_path):
    """A real tmpfs of 5 MiB: room for one demo checkpoint (3.5 MB), not for the next one's temp file."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_the_run_with_one_line_and_resume_cleans_stale_temp_files(tmpfs, mlflow_server, demo_shards):
    """Items 2 and 9: the second checkpoint does not fit. One line, no temp file, the run FAILED with
    the reason as a tag, the first checkpoint intact; after a killed write's temp files are left
    behind and space is freed, --resume removes them and finishes from the last good checkpoint."""
    args = ["train", "natural", "--max-steps", "30", "--data", demo_shards, "--set", "eval.holdout=40",
            "--set", "checkpoint.every_minutes=100", "--tracking-uri", mlflow_server, "--experiment", "disk-full", "--json"]
    proc = run_gnr(*args, env={"GNR_HOME": str(tmpfs)})
    assert_one_line_error(proc, "No space left on device")
    (run_dir,) = (tmpfs / "checkpoints").iterdir()
    assert str(run_dir / "step-000000030.pt") in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["logged", "step-000000022.pt"]  # no temp file left
    assert torch.load(run_dir / "step-000000022.pt", weights_only=True)["update"] == 22
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=mlflow_server).get_run(run_dir.name)
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["gnr.failure"]

    subprocess.run(["mount", "-o", "remount,size=20m", str(tmpfs)], check=True)
    stale = [run_dir / "step-000000025.pt.tmp", run_dir / f".step-000000026.pt.{2**22 + 7}.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)  # what a write killed mid-way leaves
    proc = run_gnr(*args[:-1], "--resume", run_dir.name, "--json", env={"GNR_HOME": str(tmpfs)}, check=True)
    assert not any(p.exists() for p in stale)
    assert torch.load(run_dir / "step-000000030.pt", weights_only=True)["update"] == 30
    assert MlflowClient(tracking_uri=mlflow_server).get_run(run_dir.name).info.status == "FINISHED"


def test_bad_gnr_home_is_one_line(tmp_path, mlflow_server, demo_shards):
    """Items 2 and 3: GNR_HOME a file fails before any work; an unwritable checkpoint dir fails the run
    with one line naming the path, and the run is FAILED with the reason as a tag."""
    home = tmp_path / "home-file"
    home.write_text("not a directory")
    proc = run_gnr("train", "gradnorm", env={"GNR_HOME": str(home)}, timeout=120)
    assert_one_line_error(proc, f"GNR_HOME {home} is not a directory")

    proc = run_gnr("train", "natural", "--max-steps", "2", "--data", demo_shards, "--tracking-uri", mlflow_server,
                   "--experiment", "bad-home", env={"GNR_HOME": "/proc/self"}, timeout=300)
    assert_one_line_error(proc, "cannot write checkpoints to /proc/self/checkpoints/")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=mlflow_server)
    (run,) = c.search_runs([c.get_experiment_by_name("bad-home").experiment_id])
    assert run.info.status == "FAILED" and "/proc/self/checkpoints" in run.data.tags["gnr.failure"]


def test_no_holdout_and_a_missing_shard(tmp_path, mlflow_server, demo_shards):
    """Items 4 and 5: eval.holdout=0 trains (best = last), and a removed 256-sample shard is counted
    256 per epoch (not once per pass over it) and 256 x epochs in total."""
    import shutil

    data = tmp_path / "shards"
    shutil.copytree(demo_shards, data)
    manifest = json.loads((data / "train.json").read_text())
    lost = next(s["count"] for s in manifest["shards"] if s["name"] == "train-000002.tar")
    (data / "train-000002.tar").unlink()
    home = tmp_path / "home"
    proc = run_gnr("train", "natural", "--max-steps", "44", "--data", data, "--set", "eval.holdout=0",
                   "--set", "checkpoint.every_minutes=100", "--tracking-uri", mlflow_server, "--experiment", "faults",
                   "--json", env={"GNR_HOME": str(home)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("train-000002.tar") == 1  # warned once
    run_id = json.loads(proc.stdout)["run_id"]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=mlflow_server)
    assert c.get_run(run_id).info.status == "FINISHED"
    per_epoch = {m.step: m.value for m in c.get_metric_history(run_id, "data/skipped_samples")}
    total = {m.step: m.value for m in c.get_metric_history(run_id, "data/skipped_samples_total")}
    assert lost == 256 and per_epoch == {22: lost, 44: lost} and total == {22: lost, 44: 2 * lost}
    assert "holdout/pgd10_acc" not in c.get_run(run_id).data.metrics
    best = torch.load(c.download_artifacts(run_id, "checkpoints/best.pt", str(tmp_path)), weights_only=True)
    assert best["update"] == 44  # no held-out score: the best checkpoint is the last


def test_imagefolder_skips_a_file_that_is_not_an_image(tmp_path, imagenet_sample):
    """Item 6: a text file named x.JPEG is skipped with a warning naming it and listed in the manifest;
    --strict stops with one line."""
    root = tmp_path / "root" / "n01440764"
    root.mkdir(parents=True)
    for src in sorted(imagenet_sample.glob("n01440764_*.JPEG"))[:1] + sorted(imagenet_sample.glob("*.JPEG"))[1:3]:
        (root / src.name).write_bytes(src.read_bytes())
    (root / "x.JPEG").write_text("this is not a JPEG\n")
    proc = run_gnr("data", "imagefolder", root.parent, "--out", tmp_path / "out", "--split", "val", check=True)
    assert "x.JPEG" in proc.stderr and "not a decodable image" in proc.stderr
    manifest = json.loads((tmp_path / "out" / "val.json").read_text())
    assert manifest["total"] == 3 and manifest["skipped"] == ["n01440764/x.JPEG"]
    from gnr.data.loader import eval_loader
    from gnr.config import build_config

    cfg = build_config("demo", overrides=[f"data.source={tmp_path / 'out'}", "data.num_classes=1000",
                                          "data.img_size=64", "data.eval_resize=64", "data.workers=0"])
    (x, y, keys), = list(eval_loader(cfg, split="val", batch_size=8))
    assert x.shape[0] == 3 and "n01440764/x" not in keys

    proc = run_gnr("data", "imagefolder", root.parent, "--out", tmp_path / "strict", "--split", "val", "--strict")
    assert_one_line_error(proc, f"{root / 'x.JPEG'} is not a decodable image")
    assert not (tmp_path / "strict" / "val.json").exists()


def test_figures_label_imagenet_file_names(imagenet_sample, tmp_path):
    """Item 7: `--images` with ImageNet-style names (n01440764_tench.JPEG) reads the class map, and the
    labels are the class-map indices of the real sample files."""
    from torch import nn

    from gnr.analysis.figures import folder_images, run_inputs
    from gnr.analysis.runs import AnalysedRun
    from gnr.config import build_config

    chosen = sorted(imagenet_sample.glob("*.JPEG"))[::250]
    folder = tmp_path / "images"
    folder.mkdir()
    for src in chosen:
        (folder / src.name).write_bytes(src.read_bytes())
    class_map = json.loads((Path(__file__).resolve().parents[2] / "gnr/assets/imagenet_class_to_id_map.json").read_text())
    cfg = build_config("demo", overrides=["data.num_classes=1000", "data.img_size=32", "data.eval_resize=32"])
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1000)).eval()
    run = AnalysedRun(run_id="0" * 32, label="tiny", cfg=cfg, model=model)
    x, y, names = run_inputs(run, folder_images(folder, k=len(chosen)), len(chosen), torch.device("cpu"))
    assert names == [p.name for p in chosen] and x.shape == (len(chosen), 3, 32, 32)
    assert y.tolist() == [class_map[p.name.split("_")[0]] for p in chosen]


def test_stale_running_runs_are_recognised(mlflow_server, caplog):
    """Item 1: a RUNNING run whose process is gone (same host, dead pid) or silent for too long is stale;
    resuming it says so, and a live one is not stale."""
    import socket

    from gnr import tracking
    from gnr.config import build_config

    cfg = build_config("demo", overrides=[f"tracking.uri={mlflow_server}", "tracking.experiment=stale"])
    c = tracking.client(mlflow_server)
    dead = subprocess.Popen(["true"])
    dead.wait()
    cases = {"gone": {tracking.PID_TAG: dead.pid, tracking.HOST_TAG: socket.gethostname()},
             "silent": {tracking.PID_TAG: 1, tracking.HOST_TAG: "elsewhere", tracking.HEARTBEAT_TAG: int(time.time()) - 3600},
             "alive": {tracking.PID_TAG: os.getppid(), tracking.HOST_TAG: socket.gethostname(),
                       tracking.HEARTBEAT_TAG: int(time.time())}}
    runs = {name: tracking.create_run(cfg, tags={k: str(v) for k, v in tags.items()}, status="RUNNING")
            for name, tags in cases.items()}
    reasons = {name: tracking.stale_reason(c.get_run(run_id)) for name, run_id in runs.items()}
    assert reasons["gone"] == f"its process {dead.pid} on {socket.gethostname()} is gone"
    assert reasons["silent"].startswith("its process (1 on elsewhere) has not reported for 60 min")
    assert reasons["alive"] is None

    resumed = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_id": runs["gone"]})})
    with caplog.at_level("WARNING", logger="gnr.tracking"):
        tracker = tracking.Tracker(resumed)
    assert f"run {runs['gone']} was left RUNNING but its process {dead.pid}" in caplog.text
    assert c.get_run(runs["gone"]).data.tags[tracking.PID_TAG] == str(os.getpid())  # this process owns it now
    tracker.finish("KILLED")
    assert c.get_run(runs["gone"]).info.status == "KILLED"
