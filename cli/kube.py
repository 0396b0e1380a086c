"""The Kubernetes side of `gnr jobs` and `gnr submit --wait`, through the `kubernetes` client.

Only `cli/` talks to Kubernetes. gnr's jobs are found by the labels the chart puts on every job and
pod (`app.kubernetes.io/name=gnr`, `gnr/run-id=<MLflow run id>`, `app.kubernetes.io/component=
train|eval`), whichever kind runs them: a PyTorchJob, a TrainJob or (evaluation) a batch Job.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

from gnr.errors import GnrError

DEFAULT_NAMESPACE = "gnr"
NAME_LABEL = "app.kubernetes.io/name=gnr"
RUN_LABEL = "gnr/run-id"
TASK_LABEL = "app.kubernetes.io/component"
RELEASE_LABEL = "app.kubernetes.io/instance"
SUCCEEDED, FAILED = "Succeeded", "Failed"
TIMEOUT = (10, 60)  # seconds to connect, to read an answer
FOLLOW_READ_TIMEOUT = 24 * 3600  # a followed log may stay quiet for long (evaluation, a slow epoch)
# Condition types of the three kinds, in gnr's words (the others keep their own: Running, Created...).
_STATES = {"Complete": SUCCEEDED, "SuccessCriteriaMet": SUCCEEDED, "FailureTarget": FAILED}


@dataclass(frozen=True)
class Kind:
    kind: str
    group: str
    version: str
    plural: str
    container: str  # the gnr container in this kind's pods


KINDS = (
    Kind("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", "pytorch"),
    Kind("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "node"),
    Kind("Job", "batch", "v1", "jobs", "gnr"),
)


@dataclass(frozen=True)
class Job:
    kind: Kind
    name: str
    namespace: str
    run_id: str
    task: str
    release: str
    state: str
    message: str
    created: str

    @property
    def done(self) -> bool:
        return self.state in (SUCCEEDED, FAILED)

    def summary(self) -> dict[str, str]:
        return {"run_id": self.run_id, "task": self.task, "kind": self.kind.kind, "name": self.name,
                "namespace": self.namespace, "state": self.state, "message": self.message,
                "created": self.created, "release": self.release}


def connect():
    """An API client from the kubeconfig ($KUBECONFIG or ~/.kube/config), or in-cluster credentials."""
    import yaml
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # as set now, not at import
    except (ConfigException, yaml.YAMLError, OSError) as e:
        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            reason = str(e).splitlines()[0].rstrip(".")
            raise GnrError(f"no kubeconfig ({reason}): set KUBECONFIG or run `kubectl config view` to check") from None
        config.load_incluster_config()
    return client.ApiClient()


@contextlib.contextmanager
def _api_errors(what: str):
    """API and connection errors as one line."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as e:
        raise GnrError(f"Kubernetes API: {what}: {e.status} {e.reason}") from None
    except HTTPError as e:
        reason = getattr(e, "reason", None) or e
        raise GnrError(f"cannot reach the Kubernetes API ({what}): {reason}") from None


def _selector(run_id: str | None = None, task: str | None = None) -> str:
    parts = [NAME_LABEL]
    if run_id:
        parts.append(f"{RUN_LABEL}={run_id}")
    if task:
        parts.append(f"{TASK_LABEL}={task}")
    return ",".join(parts)


def find_jobs(api, namespace: str, run_id: str | None = None, task: str | None = None) -> list[Job]:
    """gnr's jobs in a namespace, oldest first; kinds whose CRD is not installed are skipped."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    objects = client.CustomObjectsApi(api)
    jobs = []
    for kind in KINDS:
        with _api_errors(f"list {kind.plural} in namespace {namespace}"):
            try:
                listed = objects.list_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural,
                                                               label_selector=_selector(run_id, task),
                                                               _request_timeout=TIMEOUT)
            except ApiException as e:
                if e.status == 404:  # this operator is not installed
                    continue
                raise
        jobs += [_job(kind, item) for item in listed.get("items", [])]
    return sorted(jobs, key=lambda j: j.created)


def _job(kind: Kind, obj: dict) -> Job:
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    labels = meta.get("labels") or {}
    state, message = _state(status)
    return Job(kind, meta.get("name", ""), meta.get("namespace", ""), labels.get(RUN_LABEL, ""),
               labels.get(TASK_LABEL, ""), labels.get(RELEASE_LABEL, ""), state, message,
               meta.get("creationTimestamp", ""))


def _state(status: dict) -> tuple[str, str]:
    """The job's state: its latest true condition, else Running while pods are active, else Pending."""
    true = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    if true:
        last = true[-1]
        return _STATES.get(last["type"], last["type"]), last.get("message", "")
    if status.get("active"):
        return "Running", ""
    return "Pending", ""


def pods(api, job: Job) -> list:
    """The job's pods, the one to read first at the head: running before finished, then by name
    (a PyTorchJob's master-0 before its workers, a TrainJob's node-0 before the others)."""
    from kubernetes import client

    with _api_errors(f"list pods of {job.name}"):
        listed = client.CoreV1Api(api).list_namespaced_pod(
            job.namespace, label_selector=f"{_selector(job.run_id, job.task)},{RELEASE_LABEL}={job.release}",
            _request_timeout=TIMEOUT)
    return sorted(listed.items, key=lambda p: (p.status.phase != "Running", p.metadata.name))


def log_stream(api, job: Job, pod: str, follow: bool = False, tail: int | None = None) -> Iterator[bytes]:
    """The log of the gnr container of one pod, as it arrives."""
    from kubernetes import client

    with _api_errors(f"read the log of pod {pod}"):
        resp = client.CoreV1Api(api).read_namespaced_pod_log(
            pod, job.namespace, container=job.kind.container, follow=follow, tail_lines=tail,
            _preload_content=False, _request_timeout=(TIMEOUT[0], FOLLOW_READ_TIMEOUT if follow else TIMEOUT[1]))
        try:
            yield from resp.stream(4096)
        finally:
            resp.release_conn()


def delete(api, job: Job) -> None:
    """Delete the job object; its pods go with it (foreground propagation)."""
    from kubernetes import client

    with _api_errors(f"delete {job.kind.kind} {job.name}"):
        client.CustomObjectsApi(api).delete_namespaced_custom_object(
            job.kind.group, job.kind.version, job.namespace, job.kind.plural, job.name,
            body=client.V1DeleteOptions(propagation_policy="Foreground"), _request_timeout=TIMEOUT)


def wait(api, namespace: str, run_id: str, task: str, on_change: Callable[[Job], None],
         poll_seconds: float = 10.0) -> Job:
    """Poll until the run's job of this task has finished; call ``on_change`` whenever its state moves."""
    last = None
    while True:
        jobs = find_jobs(api, namespace, run_id, task)
        if jobs:
            job = jobs[-1]
            if job.state != last:
                on_change(job)
                last = job.state
            if job.done:
                return job
        time.sleep(poll_seconds)


def age(created: str, now: datetime | None = None) -> str:
    """'2024-05-01T10:00:00Z' -> '3h' (the largest whole unit)."""
    if not created:
        return "?"
    then = datetime.fromisoformat(created.replace("Z", "+00:00"))
    seconds = int(((now or datetime.now(timezone.utc)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"
