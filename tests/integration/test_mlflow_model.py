"""The run as MLflow sees it, on a real `mlflow server`: the logged (and registered) MLflow Model, model
URIs in `gnr eval` / `gnr analyze`, system metrics, the run's name, note and source tags, the
experiment's kind."""

import json
import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import DEMO_MODEL, assert_one_line_error, run_gnr

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(demo_run) -> MlflowClient:
    return MlflowClient(tracking_uri=demo_run["uri"])


def test_logged_model_loads_with_mlflow_and_gives_gnr_logits(demo_run, client, tmp_path, monkeypatch):
    """mlflow.pytorch.load_model (pt2: no pickle) equals gnr's own EMA model from the run's safetensors."""
    import mlflow
    import yaml

    from gnr.eval import load_run_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", demo_run["uri"])
    run_id = demo_run["run_id"]
    assert demo_run["summary"]["model_uri"].startswith("models:/m-")
    [logged] = client.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id],
                                           filter_string="name = 'model'")
    assert logged.source_run_id == run_id
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [logged.model_id]

    mlflow_model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    gnr_model = load_run_model(run_id, "ema", demo_run["uri"]).model
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # batch 3: the batch size is free
    with torch.no_grad():
        torch.testing.assert_close(mlflow_model(x), gnr_model(x), rtol=0, atol=1e-5)

    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path))
    mlmodel = yaml.safe_load(open(f"{local}/MLmodel"))
    assert json.loads(mlmodel["signature"]["inputs"]) == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3, 32, 32]}}]
    assert json.loads(mlmodel["signature"]["outputs"])[0]["tensor-spec"]["shape"] == [-1, 10]
    assert mlmodel["flavors"]["pytorch"]["model_data"] == "data"
    assert [p.name for p in (tmp_path / "model" / "data").iterdir()] == ["model.pt2"]  # no pickle
    requirements = open(f"{local}/requirements.txt").read().split()
    import safetensors
    import timm

    # the versions the run used (gnr/requirements.py), whatever the lock says
    assert {f"timm=={timm.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"safetensors=={safetensors.__version__}"} <= set(requirements), requirements
    assert (tmp_path / "model" / "input_example.json").is_file()


def test_register_creates_version_1_of_the_run(demo_run, client):
    version = client.get_model_version(DEMO_MODEL, "1")
    assert version.run_id == demo_run["run_id"]
    assert demo_run["summary"]["registered"] == f"models:/{DEMO_MODEL}/1"


def test_eval_by_model_uri_logs_into_the_source_run(demo_run, client, tmp_path):
    """`gnr eval --model models:/NAME/1` evaluates the run's model into that run, with system metrics."""
    before = len(client.get_metric_history(demo_run["run_id"], "system/cpu_utilization_percentage"))
    proc = run_gnr("eval", "--model", f"models:/{DEMO_MODEL}/1", "--tracking-uri", demo_run["uri"], "--attacks", "clean",
                   "--n", 5, "--json", env={"GNR_HOME": str(tmp_path)}, check=True)
    summary = json.loads(proc.stdout)
    assert summary["run_id"] == demo_run["run_id"] and summary["weights"] == "ema"
    metrics = client.get_run(demo_run["run_id"]).data.metrics
    assert summary["n"] == 5 and metrics["eval/n"] == summary["logged"]["n"] >= 5  # with other tests' images
    assert metrics["eval/clean"] == pytest.approx(summary["logged"]["accuracy"]["clean"])
    after = client.get_metric_history(demo_run["run_id"], "system/cpu_utilization_percentage")
    assert len(after) > before  # at least the evaluation's last sample
    assert sorted(m.step for m in after) == list(range(len(after)))  # evaluation continues training's steps
    assert all(m.value > 0 for m in after)  # a job is running: no sample reads an idle 0% CPU


def test_every_model_uri_form_resolves_to_the_source_run(demo_run, client):
    from gnr.analysis.runs import source_runs

    client.set_registered_model_alias(DEMO_MODEL, "champion", "1")
    uris = [f"runs:/{demo_run['run_id']}/model", f"models:/{DEMO_MODEL}/1", f"models:/{DEMO_MODEL}/latest",
            f"models:/{DEMO_MODEL}@champion", demo_run["summary"]["model_uri"]]
    assert source_runs(uris, demo_run["uri"]) == [demo_run["run_id"]] * len(uris)


@pytest.mark.parametrize("uri, needle", [
    ("models:/no-such-model/1", "no mlflow model 'models:/no-such-model/1'"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "no mlflow run"),
    ("s3://bucket/model", "not an mlflow model uri"),
])
def test_bad_model_uris_are_clear_errors(demo_run, uri, needle):
    from gnr.errors import GnrError
    from gnr.tracking import model_source_run

    with pytest.raises(GnrError, match="(?i)" + re.escape(needle)):
        model_source_run(uri, demo_run["uri"])


def test_cli_model_uri_errors_are_one_line(demo_run, tmp_path):
    proc = run_gnr("eval", "--model", "models:/no-such-model/1", "--tracking-uri", demo_run["uri"],
                   env={"GNR_HOME": str(tmp_path)})
    assert_one_line_error(proc, "no mlflow model")


def test_run_is_named_described_and_sourced(demo_run, client):
    run = client.get_run(demo_run["run_id"])
    tags = run.data.tags
    assert run.info.run_name == "gradnorm-test_convnext-gelu"
    note = tags["mlflow.note.content"]
    for part in ("gradnorm", "test_convnext", "GELU", "ε = 8/255", "batch 64", "preset `demo`"):
        assert part in note, (part, note)
    assert tags["mlflow.source.name"] == "gnr train gradnorm" and tags["mlflow.source.type"] == "LOCAL"
    assert len(tags["mlflow.source.git.commit"]) == 40  # the tests run from a git checkout
    assert not any("git" in k for k in run.data.params)
    system = {k for k in run.data.metrics if k.startswith("system/")}
    for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_percentage",
                "network_receive_megabytes"):
        assert f"system/{key}" in system, system


def test_experiments_gnr_creates_open_on_model_training(demo_run, client):
    """The experiment kind tag, and the link gnr prints selects the UI's model-training views (MLflow 3.17
    chooses them per browser; scripts/screenshot-run.sh shows both in a real browser)."""
    experiment = client.get_experiment_by_name("tests")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run_page = f"{demo_run['uri']}/#/experiments/{experiment.experiment_id}/runs/{demo_run['run_id']}"
    assert demo_run["summary"]["ui_command"] == f"open {run_page}?workflowType=machine_learning"
