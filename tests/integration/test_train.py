"""The trainer end to end: real demo shards, real MLflow (local store and a loopback server),
real torchrun with 2 CPU processes, real signals."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import BIN, assert_one_line_error, run_gnr

pytestmark = pytest.mark.integration


def _client(home: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def test_main_job_runs_with_no_arguments(gnr_home):
    """`gnr train gradnorm` alone: builds the demo shards, trains, evaluates, logs, prints the summary."""
    proc = run_gnr("train", "gradnorm", check=True)
    assert "gnr ui" in proc.stdout and "FINISHED" in proc.stdout
    assert (gnr_home / "data" / "demo" / "train.json").is_file()
    client = _client(gnr_home)
    (run,) = client.search_runs([client.get_experiment_by_name("gnr-demo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id in proc.stdout
    assert run.data.tags["method"] == "gradnorm" and run.data.tags["activation"] == "gelu"
    # test_convnext's layers, replaced by the explicit double-backward versions
    assert {k: v for k, v in run.data.tags.items() if k.startswith("fast_layers.")} == \
        {"fast_layers.Conv2d": "13", "fast_layers.GELU": "9", "fast_layers.LayerNorm": "9",
         "fast_layers.LayerNorm2d": "5"}
    assert run.data.params["objective.lambda_gn"] == "1.2"
    metrics = run.data.metrics
    assert metrics["holdout/clean_acc"] > 0.5, metrics  # 10 digit classes: chance is 0.1
    assert 0.0 <= metrics["holdout/pgd10_acc"] <= metrics["holdout/clean_acc"]
    assert metrics["train/alpha"] == pytest.approx(1.0)  # ramp finished (2 of 8 epochs)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "weights")}
    assert artifacts == {"weights/ema.safetensors", "weights/raw.safetensors"}


def test_run_reaches_real_mlflow_server(demo_run):
    client = MlflowClient(tracking_uri=demo_run["uri"])
    run = client.get_run(demo_run["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["objective.method"] == "gradnorm"
    assert run.data.params["versions.torch"] == torch.__version__
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [5, 10]  # log_every = 5 in the demo preset, 12 steps
    for name in ("train/ce", "train/penalty", "train/grad_l1", "train/lr", "train/images_per_s", "perf/sec_per_step"):
        assert name in run.data.metrics, name
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "weights"} <= listed
    local = client.download_artifacts(run.info.run_id, "weights/ema.safetensors")
    assert any(k.endswith("weight") for k in load_file(local))


def test_unreachable_tracking_server_fails_before_training(gnr_home):
    proc = run_gnr("train", "gradnorm", "--tracking-uri", "http://127.0.0.1:9", timeout=60)
    assert_one_line_error(proc, "not reachable")
    assert not (gnr_home / "checkpoints").exists()


def test_unknown_model_is_one_line_and_creates_no_run(gnr_home):
    proc = run_gnr("train", "gradnorm", "--model", "resnet_does_not_exist")
    assert_one_line_error(proc, "resnet_does_not_exist")
    if (gnr_home / "mlflow.db").exists():
        client = _client(gnr_home)
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_non_finite_loss_fails_the_run_and_keeps_the_last_good_checkpoint(gnr_home):
    proc = run_gnr("train", "natural", "--set", "optim.base_lr=1e30", "--set", "checkpoint.every_minutes=0.00001",
                   "--set", "optim.clip_grad=null", "--max-steps", "50")
    assert_one_line_error(proc, "non-finite loss")
    client = _client(gnr_home)
    (run,) = client.search_runs([client.get_experiment_by_name("gnr-demo").experiment_id])
    assert run.info.status == "FAILED"
    ckpts = sorted((gnr_home / "checkpoints" / run.info.run_id).glob("step-*.pt"))
    assert ckpts, "the last good checkpoint must be kept"
    state = torch.load(ckpts[-1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _train_cmd(*extra):
    return [str(BIN / "gnr"), "train", "gradnorm", "--json", "--set", "schedule.epochs=2",
            "--set", "checkpoint.every_minutes=0.001", "--set", "checkpoint.keep_last=50", *extra]


def _final_state(home: Path, run_id: str) -> tuple[dict, dict]:
    run = _client(home).get_run(run_id)
    weights = load_file(str(home / "checkpoints" / run_id / "weights" / "ema.safetensors"))
    return run.data.metrics, weights


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    """Resume restores model, EMA, optimizer, schedule, RNG and data position, so the resumed run
    replays the same batches, augmentations and PGD starts: on one CPU thread the results must be
    identical up to float round-off (we allow 1e-5, far below any real divergence)."""
    ref_home, kill_home = tmp_path / "ref", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_train_cmd(), env={**env, "GNR_HOME": str(ref_home)}, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    ref_id = json.loads(ref.stdout)["run_id"]

    proc = subprocess.Popen(_train_cmd(), env={**env, "GNR_HOME": str(kill_home)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    spe = 1437 // 64  # train samples // batch: steps per epoch of the demo set
    deadline, killed_run = time.time() + 300, None
    while time.time() < deadline and killed_run is None:
        for ck in (kill_home / "checkpoints").glob("*/step-*.pt"):
            if int(ck.stem.split("-")[1]) >= spe + 3:  # mid way through the second epoch
                killed_run = ck.parent.name
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_run, "no mid-epoch checkpoint appeared"
    assert _client(kill_home).get_run(killed_run).info.status == "RUNNING"  # SIGKILL: no chance to close

    resumed = subprocess.run(_train_cmd("--resume", killed_run), env={**env, "GNR_HOME": str(kill_home)},
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["run_id"] == killed_run

    ref_metrics, ref_w = _final_state(ref_home, ref_id)
    res_metrics, res_w = _final_state(kill_home, killed_run)
    assert _client(kill_home).get_run(killed_run).info.status == "FINISHED"
    for key in ("holdout/clean_acc", "holdout/pgd10_acc", "train/loss", "train/grad_l1"):
        assert res_metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-6), key
    for name, tensor in ref_w.items():
        torch.testing.assert_close(res_w[name], tensor, rtol=1e-5, atol=1e-6)


def test_sigint_checkpoints_and_marks_run_killed(gnr_home):
    proc = subprocess.Popen([str(BIN / "gnr"), "train", "adversarial", "--json"], env={**os.environ},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((gnr_home / "checkpoints").glob("*")):
        time.sleep(0.1)
    time.sleep(2)  # a few training steps in
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (run_dir,) = list((gnr_home / "checkpoints").glob("*"))
    assert list(run_dir.glob("step-*.pt"))
    assert _client(gnr_home).get_run(run_dir.name).info.status == "KILLED"


def test_torchrun_two_cpu_processes(mlflow_server, gnr_home):
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "gnr.cli.app", "train", "gradnorm",
         "--max-steps", "6", "--tracking-uri", mlflow_server, "--experiment", "torchrun", "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # only rank 0 prints
    run = MlflowClient(tracking_uri=mlflow_server).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    # system metrics from one process per node: one series, each step once (two ranks would repeat steps)
    steps = [m.step for m in MlflowClient(tracking_uri=mlflow_server).get_metric_history(
        run.info.run_id, "system/cpu_utilization_percentage")]
    assert steps and sorted(steps) == list(range(len(steps)))
    assert not any(k.startswith("system/node") for k in run.data.metrics)
    assert summary["steps"] == 6
    assert run.data.metrics["holdout/clean_acc"] >= 0
    # the checkpoint holds each rank's own RNG streams, so every rank resumes exactly where it was
    from gnr.checkpoint import latest, load

    rng = load(latest(gnr_home / "checkpoints" / summary["run_id"]))["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
