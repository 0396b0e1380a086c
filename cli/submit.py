"""`gnr submit METHOD --gpus N`: create the MLflow run, then install the chart's training job for it.

The run is created first (state SCHEDULED, resolved config logged) so that its id can go into the
release: pods get it as GNR_RUN_ID and in the ConfigMap's config, and a restarted or preempted pod
resumes the same run from its checkpoints. `submit_eval` does the same for `gnr eval --submit`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import typer

from gnr.cli.common import SET_HELP, console, err_console
from gnr.cli.kube import DEFAULT_NAMESPACE

CHECKPOINT_DIR = "/checkpoints"  # where the chart mounts the checkpoint volume
DRY_RUN_ID = "dry-run"  # the run id the chart receives in --dry-run (no run is created)
_COUNT = re.compile(r"[0-9]+")
_RUN_ID = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")  # also a valid label value

NAMESPACE_HELP = "Kubernetes namespace (default $GNR_NAMESPACE or gnr)."
IMAGE_HELP = "Container image REPOSITORY[:TAG] or REPOSITORY@sha256:DIGEST (default: the chart's)."
VALUES_HELP = "Helm values file with cluster settings: node selectors, tolerations, storage, secrets (repeatable)."


def submit(
    method: str = typer.Argument(..., help="natural | gradnorm | gradnorm-fd | adversarial | edge"),
    gpus: Optional[str] = typer.Option(None, "--gpus", metavar="N", help="GPUs per node (one process each)."),
    nodes: str = typer.Option("1", "--nodes", metavar="M", help="Nodes; global batch = nodes x gpus x optim.batch_size."),
    preset: str = typer.Option("swin-b", "--preset", "-p", help="Shipped preset: swin-b, resnet50, demo."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    namespace: str = typer.Option(DEFAULT_NAMESPACE, "--namespace", "-n", envvar="GNR_NAMESPACE", help=NAMESPACE_HELP),
    image: Optional[str] = typer.Option(None, "--image", help=IMAGE_HELP),
    values: list[Path] = typer.Option([], "--values", "-f", help=VALUES_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the manifests helm renders; create nothing."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the job has finished; exit 1 if it failed."),
    register: Optional[str] = typer.Option(None, "--register", metavar="NAME",
                                           help="Register the job's MLflow model under NAME (a new version)."),
) -> None:
    """Train on Kubernetes: [bold]gnr submit gradnorm --gpus 8[/] runs the paper's Swin-B job on one 8-GPU node."""
    from gnr import tracking
    from gnr.errors import GnrError

    cfg = _train_config(method, preset, overrides, register)
    if gpus is None:
        raise GnrError("--gpus is required: GPUs per node, e.g. --gpus 8")
    sizes = {"nodes": count("--nodes", nodes), "gpusPerNode": count("--gpus", gpus)}
    rendered = _release("train", DRY_RUN_ID, _train_values(cfg, DRY_RUN_ID, sizes, image), namespace, values,
                        dry_run=True)
    if dry_run:
        show(rendered, dry_run=True)
        return
    # The render above caught bad values; only now is anything created.
    api = _preflight()
    run_id = tracking.create_run(cfg, tags={"cluster.namespace": namespace, "cluster.nodes": str(sizes["nodes"]),
                                            "cluster.gpus_per_node": str(sizes["gpusPerNode"])},
                                 source_type="JOB")
    try:
        show(_release("train", run_id, _train_values(cfg, run_id, sizes, image), namespace, values, dry_run=False),
             dry_run=False)
    except GnrError as e:
        raise GnrError(f"{e} ({_abandon(cfg.tracking.uri, run_id)})") from None
    if wait:
        _wait(api, namespace, run_id, "train")


def submit_eval(
    run_id: str,
    *,
    gpus: int,
    namespace: str | None = None,
    image: str | None = None,
    extra_args: Sequence[str] = (),
    values_files: Sequence[Path] = (),
    dry_run: bool = False,
) -> str:
    """Evaluate run ``run_id`` on the cluster (`gnr eval --run-id ID --submit --gpus N`): a Job running
    `gnr eval --run-id RUN_ID EXTRA_ARGS` under torchrun, one process per GPU.

    ``extra_args``: the eval options for the pod (leave out --run-id and the --submit options).
    ``namespace``: default $GNR_NAMESPACE or gnr. Installs the release (``dry_run``: renders it only,
    creating nothing) and returns what to show the user; give it to :func:`show`: in ``dry_run``
    the manifests, exactly as helm renders them, else a summary with the follow-up commands.
    """
    from gnr.errors import GnrError

    if not _RUN_ID.fullmatch(run_id or ""):
        raise GnrError(f"invalid run id '{run_id}'")
    namespace = namespace or os.environ.get("GNR_NAMESPACE") or DEFAULT_NAMESPACE
    chart_values = {"task": "eval", "runId": run_id, **image_values(image),
                    "eval": {"gpus": count("--gpus", gpus), "args": [str(a) for a in extra_args]}}
    if not dry_run:
        _preflight()
    return _release("eval", run_id, chart_values, namespace, values_files, dry_run=dry_run)


def show(text: str, dry_run: bool) -> None:
    """Manifests verbatim on stdout (no wrapping or markup: they must stay valid YAML), or a summary."""
    if dry_run:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        console.print(text, highlight=False, markup=False, soft_wrap=True)


def count(option: str, value: str | int) -> int:
    """A positive integer from a CLI option, or a one-line error."""
    from gnr.errors import GnrError

    text = str(value).strip()
    if not _COUNT.fullmatch(text) or int(text) < 1:
        raise GnrError(f"{option} must be a positive integer, got '{value}'")
    return int(text)


def image_values(image: str | None) -> dict:
    """`--image` as chart values: REPOSITORY[:TAG] or REPOSITORY@DIGEST (the chart's schema checks them)."""
    if not image:
        return {}
    name, _, digest = image.partition("@")
    repository, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:  # no tag; a colon before the last '/' is a registry port
        repository, tag = name, ""
    return {"image": {"repository": repository, "tag": tag, "digest": digest}}


def _train_config(method: str, preset: str, overrides: list[str], register: str | None = None):
    """The resolved RunConfig of the job: checkpoints on the chart's volume, no credentials inside."""
    from gnr import tracking
    from gnr.config import METHODS, build_config
    from gnr.errors import GnrError

    if method not in METHODS:
        raise GnrError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    cfg = build_config(preset=preset, overrides=overrides,
                       fields={"objective.method": method, "checkpoint.dir": CHECKPOINT_DIR,
                               "tracking.register_as": register})
    if cfg.tracking.uri and tracking.redact(cfg.tracking.uri) != cfg.tracking.uri:
        raise GnrError("tracking.uri must not carry credentials: they would land in the ConfigMap "
                       "(use MLFLOW_TRACKING_USERNAME/PASSWORD here and mlflow.auth.secretName in the chart)")
    return cfg


def _train_values(cfg, run_id: str, sizes: dict, image: str | None) -> dict:
    """Chart values of a training release: the config with its run id, nodes and GPUs per node."""
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_id": run_id})})
    return {"task": "train", "runId": run_id, **image_values(image), "train": {**sizes, "config": cfg.to_yaml()}}


def _preflight():
    """Before anything is created: helm and the chart are there, and the cluster is configured."""
    from gnr.cli import helm, kube

    helm.binary()
    helm.chart()
    return kube.connect()


def _release(task: str, run_id: str, chart_values: dict, namespace: str, values_files: Sequence[Path], *,
             dry_run: bool) -> str:
    from gnr.cli import helm

    release = helm.release_name(task, run_id)
    out = helm.apply(release, namespace, chart_values, values_files, dry_run)
    if dry_run:
        return out
    return (f"submitted {task} job for MLflow run {run_id}: release {release} in namespace {namespace}\n"
            f"  gnr jobs status {run_id} -n {namespace}\n"
            f"  gnr jobs logs {run_id} -n {namespace} --follow")


def _abandon(uri: str | None, run_id: str) -> str:
    """Mark the run of a job that could not be installed FAILED, so that no run waits forever."""
    from gnr import tracking

    try:
        tracking.client(uri).set_terminated(run_id, status="FAILED")
    except Exception as e:  # the install error matters more than this one
        return f"MLflow run {run_id} is left SCHEDULED: {type(e).__name__}"
    return f"MLflow run {run_id} marked FAILED"


def _wait(api, namespace: str, run_id: str, task: str) -> None:
    from gnr.cli import kube

    def on_change(job: kube.Job) -> None:
        err_console.print(f"{job.kind.kind} {job.name}: {job.state}" + (f" ({job.message})" if job.message else ""),
                          highlight=False, markup=False)

    if kube.wait(api, namespace, run_id, task, on_change).state == kube.FAILED:
        raise typer.Exit(1)
