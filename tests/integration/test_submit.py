"""`gnr submit` and `submit_eval` (behind `gnr eval --submit`): what helm renders, what it would
install, the MLflow run created first, and one-line errors.

No Kubernetes API server can run here, so installing stops at the edge: a recording stand-in for
`helm upgrade --install` keeps its arguments and values files (which the real helm then renders and
the schemas validate), and `--wait` polls a loopback fake of the API (tests/fake_kube.py)."""

import json
import os
import sys

import pytest
import yaml

from gnr.cli.submit import submit_eval
from gnr.config import build_config
from tests.conftest import assert_one_line_error, run_gnr
from tests.fake_kube import fake_kube, job_object, listing  # noqa: F401  (fixture)
from tests.helm import helm, helm_path_env  # noqa: F401  (fixtures)
from tests.manifests import CHART, helm_template, objects, validate, write_values

pytestmark = pytest.mark.integration

RECORDING_HELM = f"""#!{sys.executable}
# Stands in for `helm upgrade --install` against a cluster: records its arguments and values files.
# Anything else (helm template) goes to the real helm.
import json, os, shutil, sys
record, args = os.environ["HELM_RECORD"], sys.argv[1:]
if args[0] != "upgrade":
    os.execv(os.environ["REAL_HELM"], ["helm", *args])
files = [args[i + 1] for i, a in enumerate(args) if a == "--values"]
for n, f in enumerate(files):
    shutil.copy(f, os.path.join(record, f"values-{{n}}.yaml"))
json.dump(args, open(os.path.join(record, "argv.json"), "w"))
if os.environ.get("HELM_FAIL"):
    sys.exit('Error: INSTALLATION FAILED: namespaces "gnr" not found')
print("Release has been upgraded. Happy Helming!")
"""


@pytest.fixture()
def recording_helm(helm, tmp_path):  # noqa: F811
    """(record dir, env) for a `gnr` that installs through the recording helm."""
    script = tmp_path / "helm"
    script.write_text(RECORDING_HELM)
    script.chmod(0o755)
    record = tmp_path / "helm-record"
    record.mkdir()
    return record, {"GNR_HELM": str(script), "HELM_RECORD": str(record), "REAL_HELM": str(helm)}


def test_dry_run_prints_exactly_what_helm_renders(helm, helm_path_env, tmp_path):  # noqa: F811
    proc = run_gnr("submit", "gradnorm", "--gpus", "8", "--dry-run", env=helm_path_env, check=True)
    cfg = build_config(preset="swin-b", fields={"objective.method": "gradnorm", "tracking.run_id": "dry-run"})
    values = write_values(tmp_path / "values.yaml", {
        "task": "train", "runId": "dry-run", "train": {"nodes": 1, "gpusPerNode": 8, "config": cfg.to_yaml()}})
    assert proc.stdout == helm_template(helm, [values], release="gnr-train-dry-run").stdout


def test_dry_run_carries_every_option(helm_path_env, tmp_path):  # noqa: F811
    cluster = write_values(tmp_path / "cluster.yaml", {"nodeSelector": {"pool": "h100"}, "operator": "trainer"})
    proc = run_gnr("submit", "adversarial", "--gpus", "4", "--nodes", "2", "--preset", "resnet50",
                   "--set", "optim.batch_size=32", "--set", "model.act=silu", "--namespace", "research",
                   "--image", "registry.example.com:5000/ml/gnr:1.2", "--values", cluster, "--dry-run",
                   env=helm_path_env, check=True)
    objs = objects(proc.stdout)
    for obj in objs:
        validate(obj)
        assert obj["metadata"]["namespace"] == "research"
    (job,) = [o for o in objs if o["kind"] == "TrainJob"]
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["image"] == "registry.example.com:5000/ml/gnr:1.2"
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert patch["template"]["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "h100"}
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["preset"] == "resnet50" and config["objective"]["method"] == "adversarial"
    assert (config["optim"]["batch_size"], config["model"]["act"]) == (32, "silu")  # per process, untouched by --gpus
    assert config["tracking"]["run_id"] == "dry-run" and config["checkpoint"]["dir"] == "/checkpoints"


@pytest.mark.parametrize("args,needle", [
    (["bogus", "--gpus", "8"], "unknown method 'bogus'"),
    (["gradnorm"], "--gpus is required"),
    (["gradnorm", "--gpus", "0"], "--gpus must be a positive integer"),
    (["gradnorm", "--gpus", "-2"], "--gpus must be a positive integer"),
    (["gradnorm", "--gpus", "eight"], "--gpus must be a positive integer"),
    (["gradnorm", "--gpus", "1.5"], "--gpus must be a positive integer"),
    (["gradnorm", "--gpus", "8", "--nodes", "0"], "--nodes must be a positive integer"),
    (["gradnorm", "--gpus", "8", "--set", "optim.batch_size"], "invalid override"),
    (["gradnorm", "--gpus", "8", "--set", "optim.nope=1"], "optim.nope"),
    (["gradnorm", "--gpus", "8", "--set", "optim.batch_size=-4"], "optim.batch_size"),
    (["gradnorm", "--gpus", "8", "--preset", "nope"], "unknown preset 'nope'"),
    (["gradnorm", "--gpus", "8", "--set", "tracking.uri=http://me:pw@mlflow:5000"], "must not carry credentials"),
    (["gradnorm", "--gpus", "8", "--values", "no-such.yaml", "--dry-run"], "values file not found"),
    (["gradnorm", "--gpus", "8", "--image", "Not An Image", "--dry-run"], "image.repository"),
])
def test_bad_input_is_a_one_line_error(helm_path_env, args, needle):  # noqa: F811
    assert_one_line_error(run_gnr("submit", *args, env=helm_path_env), needle)


def test_no_kubeconfig_is_a_one_line_error(monkeypatch, helm_path_env, tmp_path):  # noqa: F811
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    env = {**helm_path_env, "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "missing")}
    assert_one_line_error(run_gnr("submit", "gradnorm", "--gpus", "8", env=env), "no kubeconfig")


def _fake_operator(server, state: str) -> None:
    """The PyTorchJob of whichever run is asked about reports ``state``; no TrainJob CRD; no batch Jobs."""
    def pytorchjobs(req):
        selector = dict(s.split("=") for s in req.query["labelSelector"].split(","))
        run_id = selector["gnr/run-id"]
        return listing(job_object("PyTorchJob", f"gnr-train-{run_id}", run_id, conditions=[("Created", ""), (state, "")]))

    server.on("GET", "/apis/kubeflow.org/v1/namespaces/gnr/pytorchjobs", pytorchjobs)
    server.on("GET", "/apis/batch/v1/namespaces/gnr/jobs", listing())


def test_submit_creates_the_run_then_installs_and_waits(helm, recording_helm, fake_kube, mlflow_server, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    record, helm_env = recording_helm
    server, kube_env = fake_kube
    _fake_operator(server, "Succeeded")
    proc = run_gnr("submit", "gradnorm", "--gpus", "8", "--nodes", "2", "--preset", "demo", "--wait",
                   env={**helm_env, **kube_env, "MLFLOW_TRACKING_URI": mlflow_server, "GNR_HOME": str(tmp_path)},
                   check=True)
    values = yaml.safe_load((record / "values-0.yaml").read_text())
    run_id = values["runId"]
    release = f"gnr-train-{run_id}"
    assert f"submitted train job for MLflow run {run_id}" in proc.stdout
    assert f"PyTorchJob {release}: Succeeded" in proc.stderr

    # helm: upgrade --install of this run's release, with the run's resolved config
    argv = json.loads((record / "argv.json").read_text())
    assert argv[:6] == ["upgrade", "--install", release, str(CHART), "--namespace", "gnr"]
    assert argv[6] == "--values" and len(argv) == 8
    config = yaml.safe_load(values["train"]["config"])
    assert (values["train"]["nodes"], values["train"]["gpusPerNode"]) == (2, 8)
    assert config["tracking"]["run_id"] == run_id and config["checkpoint"]["dir"] == "/checkpoints"
    for obj in objects(helm_template(helm, [record / "values-0.yaml"], release=release).stdout):
        validate(obj)

    # MLflow: the run exists before any pod, waiting, with the same config
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "SCHEDULED"
    assert run.data.tags["cluster.nodes"] == "2" and run.data.tags["cluster.gpus_per_node"] == "8"
    assert run.info.run_name == "gradnorm-test_convnext-gelu" and run.data.tags["mlflow.source.type"] == "JOB"
    logged = MlflowClient(mlflow_server).download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(open(logged))["tracking"]["run_id"] == run_id

    # --wait: asked the API for this run's training job by label
    polls = [r for r in server.calls("GET") if r.path.endswith("/pytorchjobs")]
    assert polls and polls[0].query["labelSelector"] == (
        f"app.kubernetes.io/name=gnr,gnr/run-id={run_id},app.kubernetes.io/component=train")


def test_failed_install_marks_the_run_failed(recording_helm, fake_kube, mlflow_server, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    record, helm_env = recording_helm
    _, kube_env = fake_kube
    proc = run_gnr("submit", "natural", "--gpus", "1", "--preset", "demo", "--set", "tracking.experiment=submit-fails",
                   env={**helm_env, **kube_env, "HELM_FAIL": "1", "MLFLOW_TRACKING_URI": mlflow_server,
                        "GNR_HOME": str(tmp_path)})
    assert_one_line_error(proc, "helm upgrade failed: INSTALLATION FAILED")
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("submit-fails").experiment_id])
    assert run.info.status == "FAILED" and f"MLflow run {run.info.run_id} marked FAILED" in proc.stderr


def test_bad_values_fail_before_any_run_exists(recording_helm, fake_kube, tmp_path):  # noqa: F811
    record, helm_env = recording_helm
    _, kube_env = fake_kube
    bad = write_values(tmp_path / "cluster.yaml", {"tolerations": "all"})
    proc = run_gnr("submit", "gradnorm", "--gpus", "8", "--values", bad,
                   env={**helm_env, **kube_env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})  # never asked
    assert_one_line_error(proc, "helm template failed: values don't meet the specifications")
    assert "tolerations" in proc.stderr and not (record / "argv.json").exists()


def test_submit_eval_dry_run_renders_the_eval_job(helm, monkeypatch):  # noqa: F811
    monkeypatch.setenv("GNR_HELM", str(helm))
    monkeypatch.delenv("GNR_NAMESPACE", raising=False)
    text = submit_eval("abc123", gpus=4, image="gnr:dev", extra_args=["--attacks", "autoattack", "--n", "5000"],
                       dry_run=True)
    (job,) = objects(text)
    validate(job)
    assert job["kind"] == "Job" and job["metadata"]["name"] == "gnr-eval-abc123"
    assert job["metadata"]["namespace"] == "gnr"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "gnr:dev"
    assert container["command"] == ["torchrun", "--standalone", "--nproc-per-node=4", "-m", "gnr.cli.app", "eval",
                                    "--run-id", "abc123", "--attacks", "autoattack", "--n", "5000"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_submit_eval_installs_the_release(recording_helm, fake_kube, monkeypatch):  # noqa: F811
    record, helm_env = recording_helm
    _, kube_env = fake_kube
    for key, value in {**helm_env, **kube_env}.items():
        monkeypatch.setenv(key, value)
    text = submit_eval("abc123", gpus=1, namespace="research")
    assert "submitted eval job for MLflow run abc123: release gnr-eval-abc123 in namespace research" in text
    argv = json.loads((record / "argv.json").read_text())
    assert argv[:6] == ["upgrade", "--install", "gnr-eval-abc123", str(CHART), "--namespace", "research"]
    assert yaml.safe_load((record / "values-0.yaml").read_text()) == {
        "task": "eval", "runId": "abc123", "eval": {"gpus": 1, "args": []}}


@pytest.mark.parametrize("run_id,gpus,needle", [("", 1, "invalid run id"), ("has space", 1, "invalid run id"),
                                                ("abc", 0, "--gpus must be a positive integer")])
def test_submit_eval_rejects_bad_input(run_id, gpus, needle):
    from gnr.errors import GnrError

    with pytest.raises(GnrError, match=needle):
        submit_eval(run_id, gpus=gpus, dry_run=True)


def test_chart_location_can_be_overridden(helm_path_env, tmp_path):  # noqa: F811
    proc = run_gnr("submit", "gradnorm", "--gpus", "8", "--dry-run", env={**helm_path_env, "GNR_CHART": str(tmp_path)})
    assert_one_line_error(proc, f"no Helm chart at {tmp_path}")
    assert os.path.isfile(CHART / "Chart.yaml")
