"""`gnr jobs list|status|logs|cancel`: gnr's jobs on Kubernetes, named by their MLflow run id."""

import sys
from typing import Optional

import typer

from gnr.cli.common import console, print_json
from gnr.cli.kube import DEFAULT_NAMESPACE

app = typer.Typer(no_args_is_help=True, help="Follow and control gnr jobs on Kubernetes, by MLflow run id.")

NAMESPACE = typer.Option(DEFAULT_NAMESPACE, "--namespace", "-n", envvar="GNR_NAMESPACE",
                         help="Kubernetes namespace (default $GNR_NAMESPACE or gnr).")
TASK = typer.Option(None, "--task", help="train | eval (default: the run's latest job).")
JSON = typer.Option(False, "--json", help="Print JSON on stdout.")


@app.command("list")
def list_jobs(namespace: str = NAMESPACE, as_json: bool = JSON) -> None:
    """gnr's training and evaluation jobs in a namespace."""
    from rich.table import Table

    from gnr.cli import kube

    jobs = kube.find_jobs(kube.connect(), namespace)
    if as_json:
        print_json([j.summary() for j in jobs])
        return
    if not jobs:
        console.print(f"no gnr jobs in namespace {namespace}", highlight=False)
        return
    table = Table("RUN ID", "TASK", "KIND", "STATE", "AGE", box=None, header_style="bold")  # --json has names
    for j in jobs:
        table.add_row(j.run_id, j.task, j.kind.kind, _styled(j.state), kube.age(j.created))
    console.print(table)


@app.command("status")
def status(run_id: str = typer.Argument(..., help="MLflow run id."), namespace: str = NAMESPACE,
           as_json: bool = JSON) -> None:
    """The jobs of one run and their pods."""
    from rich.table import Table

    from gnr.cli import kube

    api = kube.connect()
    jobs = _jobs_of(api, namespace, run_id)
    report = [(job, kube.pods(api, job)) for job in jobs]
    if as_json:
        print_json([{**job.summary(), "pods": [_pod_summary(p) for p in pods]} for job, pods in report])
        return
    for job, pods in report:
        console.print(f"[bold]{job.kind.kind} {job.name}[/] ({job.task}): {_styled(job.state)}"
                      + (f" - {job.message}" if job.message else "") + f", age {kube.age(job.created)}",
                      highlight=False)
        table = Table("POD", "PHASE", "RESTARTS", "NODE", box=None, header_style="bold")
        for p in map(_pod_summary, pods):
            table.add_row(p["name"], p["phase"], str(p["restarts"]), p["node"])
        console.print(table if pods else "  no pods")


@app.command("logs")
def logs(run_id: str = typer.Argument(..., help="MLflow run id."), namespace: str = NAMESPACE,
         task: Optional[str] = TASK,
         pod: Optional[str] = typer.Option(None, "--pod", help="Pod name (default: the master / first node)."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Stream new lines until the pod stops."),
         tail: Optional[int] = typer.Option(None, "--tail", help="Only the last N lines.")) -> None:
    """The log of a run's job (rank 0 of the master pod unless --pod)."""
    from gnr.cli import kube
    from gnr.errors import GnrError

    api = kube.connect()
    job = _jobs_of(api, namespace, run_id, task)[-1]
    if pod is None:
        pods = kube.pods(api, job)
        if not pods:
            raise GnrError(f"{job.kind.kind} {job.name} has no pods yet ({job.state})")
        pod = pods[0].metadata.name
    for chunk in kube.log_stream(api, job, pod, follow=follow, tail=tail):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()


@app.command("cancel")
def cancel(run_id: str = typer.Argument(..., help="MLflow run id."), namespace: str = NAMESPACE,
           task: Optional[str] = TASK) -> None:
    """Stop a run's unfinished jobs: delete them and their pods (checkpoints stay)."""
    from gnr.cli import kube
    from gnr.errors import GnrError

    api = kube.connect()
    active = [j for j in _jobs_of(api, namespace, run_id, task) if not j.done]
    if not active:
        raise GnrError(f"no unfinished gnr job for run {run_id} in namespace {namespace}")
    for job in active:
        kube.delete(api, job)
        console.print(f"cancelled {job.kind.kind} {job.name} ({job.task}); `helm uninstall {job.release} "
                      f"-n {namespace}` removes the rest of the release", highlight=False, markup=False)


def _jobs_of(api, namespace: str, run_id: str, task: Optional[str] = None) -> list:
    from gnr.cli import kube
    from gnr.errors import GnrError

    if task not in (None, "train", "eval"):
        raise GnrError(f"unknown task '{task}' (choose train or eval)")
    jobs = kube.find_jobs(api, namespace, run_id, task)
    if not jobs:
        raise GnrError(f"no gnr job for run {run_id} in namespace {namespace}")
    return jobs


def _pod_summary(pod) -> dict:
    statuses = pod.status.container_statuses or []
    return {"name": pod.metadata.name, "phase": pod.status.phase or "Unknown",
            "restarts": sum(s.restart_count or 0 for s in statuses), "node": pod.spec.node_name or "-"}


def _styled(state: str) -> str:
    color = {"Succeeded": "green", "Failed": "red", "Running": "cyan", "Restarting": "yellow"}.get(state)
    return f"[{color}]{state}[/]" if color else state
