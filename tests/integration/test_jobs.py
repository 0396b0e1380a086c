"""`gnr jobs list|status|logs|cancel` through the real `kubernetes` client, up to the edge.

No Kubernetes API server can run on these machines, so a loopback fake (tests/fake_kube.py)
answers the REST paths gnr calls; the tests assert the requests (paths, label selectors, delete
bodies) and how the answers are shown."""

import json

import pytest

from gnr.cli import kube
from tests.conftest import assert_one_line_error, run_gnr
from tests.fake_kube import fake_kube, job_object, listing, pod_object  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

RUN = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
API = {
    "PyTorchJob": "/apis/kubeflow.org/v1/namespaces/gnr/pytorchjobs",
    "TrainJob": "/apis/trainer.kubeflow.org/v1alpha1/namespaces/gnr/trainjobs",
    "Job": "/apis/batch/v1/namespaces/gnr/jobs",
}
PODS = "/api/v1/namespaces/gnr/pods"


@pytest.fixture()
def cluster(fake_kube):  # noqa: F811
    """Two runs: RUN training on 2 nodes (plus a finished eval), OTHER failed; no Trainer v2 installed."""
    server, env = fake_kube
    train = job_object("PyTorchJob", f"gnr-train-{RUN}", RUN, conditions=[("Created", ""), ("Running", "")])
    failed = job_object("PyTorchJob", f"gnr-train-{OTHER}", OTHER, created="2026-11-24T10:00:00Z", conditions=[
        ("Created", ""), ("Failed", "PyTorchJob has failed because 1 Master replica(s) failed.")])
    evaluation = job_object("Job", f"gnr-eval-{RUN}", RUN, task="eval", created="2026-11-25T11:00:00Z",
                            conditions=[("SuccessCriteriaMet", ""), ("Complete", "")])
    server.on("GET", API["PyTorchJob"], listing(train, failed))
    server.on("GET", API["Job"], listing(evaluation))
    server.on("GET", PODS, listing(pod_object(f"gnr-train-{RUN}-worker-0", train, restarts=2, node="gpu-2"),
                                   pod_object(f"gnr-train-{RUN}-master-0", train, node="gpu-1"),
                                   pod_object(f"gnr-train-{OTHER}-master-0", failed, phase="Failed")))
    return server, env


def test_list_shows_every_gnr_job(cluster):
    server, env = cluster
    proc = run_gnr("jobs", "list", env=env, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["RUN", "ID", "TASK", "KIND", "STATE", "AGE"]
    rows = [ln.split()[:4] for ln in lines[1:]]
    assert rows == [[OTHER, "train", "PyTorchJob", "Failed"], [RUN, "train", "PyTorchJob", "Running"],
                    [RUN, "eval", "Job", "Succeeded"]]
    asked = {r.path: r.query["labelSelector"] for r in server.calls("GET")}
    assert asked == {path: "app.kubernetes.io/name=gnr" for path in API.values()}  # TrainJob: 404, skipped


def test_list_json(cluster):
    _, env = cluster
    jobs = json.loads(run_gnr("jobs", "list", "--json", env=env, check=True).stdout)
    assert [(j["run_id"], j["kind"], j["state"]) for j in jobs] == [
        (OTHER, "PyTorchJob", "Failed"), (RUN, "PyTorchJob", "Running"), (RUN, "Job", "Succeeded")]
    assert jobs[0]["message"].startswith("PyTorchJob has failed")


def test_status_shows_the_run_and_its_pods(cluster):
    server, env = cluster
    proc = run_gnr("jobs", "status", RUN, env=env, check=True)
    assert f"PyTorchJob gnr-train-{RUN} (train): Running" in proc.stdout
    assert f"Job gnr-eval-{RUN} (eval): Succeeded" in proc.stdout and "no pods" in proc.stdout
    pods = [ln.split() for ln in proc.stdout.splitlines() if "-0 " in ln]
    assert pods == [[f"gnr-train-{RUN}-master-0", "Running", "0", "gpu-1"],
                    [f"gnr-train-{RUN}-worker-0", "Running", "2", "gpu-2"]]
    pod_queries = [r.query["labelSelector"] for r in server.calls("GET") if r.path == PODS]
    assert pod_queries == [f"app.kubernetes.io/name=gnr,gnr/run-id={RUN},app.kubernetes.io/component={task},"
                           f"app.kubernetes.io/instance=gnr-{task}-{RUN}" for task in ("train", "eval")]
    job_queries = {r.query["labelSelector"] for r in server.calls("GET") if r.path in API.values()}
    assert job_queries == {f"app.kubernetes.io/name=gnr,gnr/run-id={RUN}"}


def test_logs_read_the_master_pod(cluster):
    server, env = cluster
    log = f"{PODS}/gnr-train-{RUN}-master-0/log"
    server.on("GET", log, (200, b"step 20 loss 2.31\nstep 40 loss 2.05\n"))
    proc = run_gnr("jobs", "logs", RUN, "--task", "train", "--follow", "--tail", "100", env=env, check=True)
    assert proc.stdout == "step 20 loss 2.31\nstep 40 loss 2.05\n"
    (req,) = [r for r in server.calls("GET") if r.path == log]
    assert req.query == {"container": "pytorch", "follow": "true", "tailLines": "100"}


def test_logs_default_to_the_latest_job(cluster):
    server, env = cluster
    log = f"{PODS}/gnr-eval-{RUN}-x7k2p/log"
    server.on("GET", log, (200, b"clean acc 0.81\n"))
    assert_one_line_error(run_gnr("jobs", "logs", RUN, env=env), f"Job gnr-eval-{RUN} has no pods yet (Succeeded)")
    proc = run_gnr("jobs", "logs", RUN, "--pod", f"gnr-eval-{RUN}-x7k2p", env=env, check=True)
    assert proc.stdout == "clean acc 0.81\n"
    assert [r.query["container"] for r in server.calls("GET") if r.path == log] == ["gnr"]


def test_cancel_deletes_the_unfinished_jobs(cluster):
    server, env = cluster
    path = f"{API['PyTorchJob']}/gnr-train-{RUN}"
    server.on("DELETE", path, (200, {"kind": "Status", "status": "Success"}))
    proc = run_gnr("jobs", "cancel", RUN, env=env, check=True)
    assert f"cancelled PyTorchJob gnr-train-{RUN} (train)" in proc.stdout
    (delete,) = server.calls("DELETE")  # the finished eval Job is left alone
    assert delete.path == path and delete.body["propagationPolicy"] == "Foreground"


def test_cancel_with_nothing_running_is_a_one_line_error(cluster):
    server, env = cluster
    assert_one_line_error(run_gnr("jobs", "cancel", OTHER, env=env), f"no unfinished gnr job for run {OTHER}")
    assert not server.calls("DELETE")


@pytest.mark.parametrize("args,needle", [
    (["status", "nosuchrun"], "no gnr job for run nosuchrun in namespace gnr"),
    (["logs", RUN, "--task", "bench"], "unknown task 'bench'"),
    (["logs", OTHER, "--namespace", "elsewhere"], f"no gnr job for run {OTHER} in namespace elsewhere"),
])
def test_bad_input_is_a_one_line_error(cluster, args, needle):
    _, env = cluster
    assert_one_line_error(run_gnr("jobs", *args, env=env), needle)


def test_api_refusal_is_a_one_line_error(fake_kube):  # noqa: F811
    server, env = fake_kube
    server.on("GET", API["PyTorchJob"], (403, {"kind": "Status", "code": 403, "reason": "Forbidden"}))
    assert_one_line_error(run_gnr("jobs", "list", env=env), "Kubernetes API: list pytorchjobs in namespace gnr: 403")


def test_unreachable_api_is_a_one_line_error(fake_kube):  # noqa: F811
    server, env = fake_kube
    server.close()
    assert_one_line_error(run_gnr("jobs", "list", env=env), "cannot reach the Kubernetes API")


def test_no_kubeconfig_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    proc = run_gnr("jobs", "list", env={"HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "missing")})
    assert_one_line_error(proc, "no kubeconfig")


def test_wait_follows_the_job_until_it_finishes(fake_kube, monkeypatch):  # noqa: F811
    server, env = fake_kube
    states = iter(["Created", "Running", "Running", "Failed"])

    def answer(req):
        return listing(job_object("PyTorchJob", f"gnr-train-{RUN}", RUN, conditions=[(next(states), "")]))

    server.on("GET", API["PyTorchJob"], answer)
    monkeypatch.setenv("KUBECONFIG", env["KUBECONFIG"])
    seen = []
    job = kube.wait(kube.connect(), "gnr", RUN, "train", lambda j: seen.append(j.state), poll_seconds=0.01)
    assert job.state == "Failed" and seen == ["Created", "Running", "Failed"]


def test_age():
    from datetime import datetime, timezone

    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)
    assert [kube.age(t, now) for t in ("2026-11-25T11:59:30Z", "2026-11-25T11:15:00Z", "2026-11-25T09:00:00Z",
                                       "2026-11-20T12:00:00Z", "")] == ["30s", "45m", "3h", "5d", "?"]
