"""The only module that talks to MLflow.

A training run is identified everywhere by its MLflow run id: `gnr submit` creates the run (state
SCHEDULED) before any pod starts, the trainer attaches to it (RUNNING) and resumes from its
checkpoints after a restart, and `gnr eval --run-id` finds the weights through it.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import tempfile
import time
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gnr
from gnr import __version__, paths
from gnr.config import RunConfig, validate
from gnr.errors import GnrError
from gnr.requirements import model_requirements
from gnr.spool import Spool, compact

log = logging.getLogger(__name__)
# Importing mlflow.pytorch runs logging.basicConfig(level=ERROR), which would silence every warning of
# gnr's (a logger without a level of its own takes the root's): gnr's loggers keep WARNING.
logging.getLogger("gnr").setLevel(logging.WARNING)

CONFIG_ARTIFACT = "config.yaml"
WEIGHTS_DIR = "weights"
MODEL_NAME = "model"  # the run's MLflow Model: runs:/<run id>/model, listed under "Logged models"
# The MLflow 3 UI has GenAI views (traces, evaluations) and model-training views (runs, metrics,
# models). Experiments that gnr creates are tagged as model training, the experiment kind MLflow's
# API and earlier 3.x UIs read. The 3.17 UI picks the views per browser instead (a GenAI / Model
# training switch, GenAI by default) unless the link says which: gnr's links carry UI_VIEW.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
UI_VIEW = "?workflowType=machine_learning"
NOTE_TAG = "mlflow.note.content"  # the run page's "Description"
SOURCE_NAME_TAG, SOURCE_TYPE_TAG, GIT_COMMIT_TAG = "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"
# Download bars from MLflow would interleave with gnr's own rich output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TERMINAL = ("FINISHED", "FAILED", "KILLED")

# MLflow's own defaults (7 retries, exponential backoff, 120 s timeouts) keep a trainer hanging for
# minutes when the server dies. gnr buffers what it cannot send (gnr/spool.py), so it fails fast
# instead: at most ~1 min per call on a hung server, seconds on a refused connection. The user's
# own settings of these variables win.
for _name, _value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                      ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"), ("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")):
    os.environ.setdefault(_name, _value)
PROBE_EVERY_S = 30.0  # while the server is down, how often the trainer checks whether it is back
STALE_AFTER_S = 30 * 60  # a RUNNING run on another host with no heartbeat for this long is stale
# Liveness tags: which process owns a RUNNING run, and when it last reached the server.
HOST_TAG, PID_TAG, HEARTBEAT_TAG, FAILURE_TAG = "gnr.host", "gnr.pid", "gnr.heartbeat", "gnr.failure"


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or paths.local_tracking_uri()


CREDENTIALS = re.compile(r"//[^/@\s]+@")  # the user:password@ of a URL


def redact(uri: str) -> str:
    """Drop credentials from a URI before it is printed or logged."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, before any training, when the tracking server cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:  # /health needs no login; urllib would read user:password@ as part of the host name
            urllib.request.urlopen(redact(uri).rstrip("/") + "/health", timeout=timeout)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise GnrError(f"MLflow tracking server {redact(uri)} is not reachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    # mlflow sets its loggers up on import; a new local store logs its migrations at INFO.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # one line per retry; gnr says once what failed
    resolved = resolve_uri(uri)
    try:
        return MlflowClient(tracking_uri=resolved)  # a SQL store is opened (and migrated) here
    except Exception as e:
        raise GnrError(f"cannot open the MLflow store {redact(resolved)}: {_cause(e)}") from None


def _experiment_id(mlflow_client, name: str, uri: str) -> str:
    try:  # the first call that needs a login: a wrong password (HTTP 401) is one line here
        exp = mlflow_client.get_experiment_by_name(name)
    except Exception as e:
        raise GnrError(f"cannot read MLflow experiment '{name}' at {redact(uri)}: {_cause(e)}") from None
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri == paths.local_tracking_uri():
        location = (paths.local_artifact_root() / name).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=location,
                                               tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    except Exception:  # another process created it first
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _git_commit() -> str | None:
    """The commit of the gnr checkout this code runs from; None for an installed wheel (no checkout)."""
    checkout = Path(gnr.__file__).resolve().parents[1]
    if not (checkout / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=checkout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_params(cfg: RunConfig) -> dict[str, str]:
    import timm
    import torch

    params = {k: ("" if v is None else str(v)) for k, v in cfg.flat().items()}
    if cfg.tracking.uri:
        params["tracking.uri"] = redact(cfg.tracking.uri)
    params.update({"versions.gnr": __version__, "versions.torch": torch.__version__,
                   "versions.timm": timm.__version__})
    return params


def public_config(cfg: RunConfig) -> RunConfig:
    """The config as stored with a run (artifact, checkpoints): the tracking URI without credentials."""
    if not cfg.tracking.uri:
        return cfg
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": redact(cfg.tracking.uri)})})


def run_name(cfg: RunConfig) -> str:
    """``tracking.run_name``, else ``<method>-<model>-<act>`` (e.g. gradnorm-swin_base_patch4_window7_224-gelu)."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    parts = [cfg.objective.method, cfg.model.name] + ([cfg.model.act] if cfg.model.act != "keep" else [])
    return "-".join(parts)


def run_description(cfg: RunConfig) -> str:
    """The run's note (Markdown): what was trained, at which budget, batch and preset."""
    o, m = cfg.objective, cfg.model
    act = "its own activations" if m.act == "keep" else f"{m.act.upper()} activations"
    attack = f", {o.attack.upper()}-{o.attack_steps if o.attack == 'pgd' else 1}" if o.method == "adversarial" else ""
    return (f"**{o.method}**{attack} training of `{m.name}` with {act}, "
            f"ε = {o.eps * 255:.3g}/255, batch {cfg.optim.batch_size} per process"
            f"{f' × {cfg.optim.accum_steps} accumulation steps' if cfg.optim.accum_steps > 1 else ''}, "
            f"{cfg.schedule.epochs} epochs, preset `{cfg.preset}`, data `{cfg.data.source}`.")


def source_tags(entry_point: str, source_type: str) -> dict[str, str]:
    """MLflow's own source tags: the command that runs the job, LOCAL or JOB, and the git commit."""
    tags = {SOURCE_NAME_TAG: entry_point, SOURCE_TYPE_TAG: source_type}
    if commit := _git_commit():
        tags[GIT_COMMIT_TAG] = commit
    return tags


def run_tags(cfg: RunConfig) -> dict[str, str]:
    return {"method": cfg.objective.method, "model": cfg.model.name, "activation": cfg.model.act,
            "dataset": cfg.data.source, "preset": cfg.preset}


def create_run(cfg: RunConfig, tags: dict[str, str] | None = None, status: str = "SCHEDULED", *,
               entry_point: str | None = None, source_type: str = "LOCAL") -> str:
    """Create a run holding the resolved config (params + artifact) and return its id.

    It is named from the config, described in its note, and carries MLflow's source tags:
    ``entry_point`` (default ``gnr train METHOD``) and ``source_type`` (LOCAL, or JOB for a cluster job).
    """
    uri = resolve_uri(cfg.tracking.uri)
    check_reachable(uri)
    c = client(uri)
    exp_id = _experiment_id(c, cfg.tracking.experiment, uri)
    entry_point = entry_point or f"gnr train {cfg.objective.method}"
    run = c.create_run(exp_id, run_name=run_name(cfg), tags={
        **run_tags(cfg), **source_tags(entry_point, source_type), NOTE_TAG: run_description(cfg), **(tags or {})})
    run_id = run.info.run_id
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"run_id": run_id})})
    _log_params(c, run_id, run_params(cfg))
    c.log_text(run_id, public_config(cfg).to_yaml(), CONFIG_ARTIFACT)
    c.update_run(run_id, status=status)
    return run_id


def _log_params(c, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def load_run_config(run_id: str, uri: str | None = None) -> RunConfig:
    """The resolved config a run was trained with."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = download(run_id, CONFIG_ARTIFACT, tmp, uri)
        return validate(yaml.safe_load(Path(path).read_text()))


def download(run_id: str, artifact_path: str, dst: str | Path, uri: str | None = None) -> Path:
    """Download one artifact of a run; a clear error when the run or the artifact does not exist."""
    c = client(uri)
    get_run(run_id, uri)
    try:
        return Path(c.download_artifacts(run_id, artifact_path, str(dst)))
    except Exception as e:
        raise _error(e, f"run {run_id} has no artifact '{artifact_path}'",
                     f"cannot download '{artifact_path}' of run {run_id}") from None


def download_if_logged(run_id: str, artifact_path: str, dst: str | Path, uri: str | None = None) -> Path | None:
    """One artifact of a run, or None when the run has none by that name (any other failure is an error)."""
    folder = artifact_path.rpartition("/")[0] or None
    try:
        listed = {f.path for f in client(uri).list_artifacts(run_id, folder)}
    except Exception as e:
        raise _error(e, f"no MLflow run '{run_id}'", f"cannot list the artifacts of run {run_id}") from None
    return download(run_id, artifact_path, dst, uri) if artifact_path in listed else None


def get_run(run_id: str, uri: str | None = None):
    resolved = resolve_uri(uri)
    check_reachable(resolved)
    try:
        return client(resolved).get_run(run_id)
    except Exception as e:
        raise _error(e, f"no MLflow run '{run_id}' at {redact(resolved)}",
                     f"cannot read MLflow run '{run_id}' at {redact(resolved)}") from None


def _error(e: Exception, missing: str, failed: str) -> GnrError:
    """``missing`` when MLflow says the thing does not exist; otherwise ``failed`` with the cause
    (permissions, storage, network), so that no other failure reads as "not found"."""
    if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
        return GnrError(missing)
    return GnrError(f"{failed}: {_cause(e)}")


def _cause(e: Exception) -> str:
    """The first line of an error, without any user:password a URL in it may carry."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {CREDENTIALS.sub('//', first)}"


class Tracker:
    """Logs one training run. Only rank 0 builds one; other ranks log nothing.

    When the server stops answering, training goes on: one warning, then every call is appended to
    a durable spool beside the checkpoints (:meth:`attach_spool`) and sent, in order, once the
    server answers again (checked every ``PROBE_EVERY_S``) or by the next process that resumes the
    run. The run carries its owner's host, pid and a heartbeat, so a run whose process is gone is
    recognised as stale (:func:`stale_reason`) instead of being left RUNNING.
    """

    spool: Spool | None = None
    offline_since: float | None = None  # monotonic time of the first failed call, while the server is down
    _last_probe = 0.0

    def __init__(self, cfg: RunConfig):
        self.uri = resolve_uri(cfg.tracking.uri)
        check_reachable(self.uri)
        self.client = client(self.uri)
        if cfg.tracking.run_id:
            run = get_run(cfg.tracking.run_id, self.uri)
            self.run_id = run.info.run_id
            stale = stale_reason(run)
            if stale:
                log.warning("run %s was left RUNNING but %s; resuming it", self.run_id, stale)
            if not run.data.params:
                _log_params(self.client, self.run_id, run_params(cfg))
                self.client.log_text(self.run_id, public_config(cfg).to_yaml(), CONFIG_ARTIFACT)
            if FAILURE_TAG in run.data.tags:  # an earlier attempt's failure; this one starts clean
                self.client.delete_tag(self.run_id, FAILURE_TAG)
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = create_run(cfg, status="RUNNING")
        self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
        self.client.log_batch(self.run_id, tags=_tag_list({HOST_TAG: socket.gethostname(), PID_TAG: os.getpid(),
                                                           HEARTBEAT_TAG: int(time.time())}))

    def attach_spool(self, directory: Path) -> None:
        """Buffer into ``directory`` from now on, and first send what an earlier process buffered there."""
        self.spool = Spool(directory / "mlflow-spool.jsonl")
        pending = len(self.spool)
        if not pending:
            return
        try:
            self._send_spool()
        except Exception as e:
            if not is_outage(e):
                raise
            self._go_offline(e)
            return
        log.warning("sent %d MLflow calls buffered while the server was down", pending)

    # -- what the trainer logs -------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self._call({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": step,
                        "timestamp": int(time.time() * 1000)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call({"op": "text", "text": text, "artifact_file": artifact_file})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def finish(self, status: str) -> None:
        """End the run. With the server still down, raise a one-line error that says how to finish it."""
        assert status in TERMINAL
        if self.offline_since is None or self._back_online(force=True):
            try:
                self.client.set_terminated(self.run_id, status=status)
                return
            except Exception as e:
                if self.spool is None or not is_outage(e):
                    raise
        pending = len(self.spool) if self.spool else 0
        raise GnrError(f"MLflow server {redact(self.uri)} is unreachable, so run {self.run_id} ({status}) stays "
                       f"open with {pending} buffered calls; it is resumable: when the server is back, run "
                       f"gnr train --resume {self.run_id}")

    def log_model(self, model, example, register_as: str | None = None):
        """Log ``model`` (a pixels-in-[0, 1] classifier: gnr's ``Normalized`` wrapper) as the run's MLflow
        Model ``model``, registered as ``register_as`` when given; returns MLflow's ``ModelInfo``.

        MLflow's ``pt2`` format (``torch.export``) stores a graph and tensors, not a pickle: it loads
        with ``mlflow.pytorch.load_model`` without gnr and without running untrusted code. The
        signature is float32 ``[-1, 3, H, W]`` in, logits ``[-1, classes]`` out; ``example`` (two or
        more images: a batch of one would fix the batch size) is the input example.
        """
        import copy

        import mlflow
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        model = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
        x = example.detach().cpu().float().contiguous()
        with torch.no_grad():
            logits = model(x)
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *x.shape[1:]))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *logits.shape[1:]))]))
        # mlflow.pytorch.log_model is a fluent API: it takes the store and the experiment from globals.
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(experiment_id=self.experiment_id)
        try:
            return mlflow.pytorch.log_model(
                model, name=MODEL_NAME, run_id=self.run_id, signature=signature, input_example=x.numpy(),
                pip_requirements=model_requirements(), registered_model_name=register_as,
                serialization_format="pt2")
        except Exception as e:
            raise GnrError(f"could not log the MLflow model of run {self.run_id} (its weights are logged "
                           f"under {WEIGHTS_DIR}/): {_cause(e)}") from None

    def ui_command(self) -> str:
        if self.uri == paths.local_tracking_uri():
            return "gnr ui"
        return f"open {redact(self.uri)}/#/experiments/{self.experiment_id}/runs/{self.run_id}{UI_VIEW}"

    # -- sending, or buffering while the server is down ------------------------------------------
    def _call(self, op: dict) -> None:
        if self.spool is not None and self.offline_since is not None and not self._back_online():
            self.spool.append(op)
            return
        try:
            self._send(op)
        except Exception as e:
            if self.spool is None or not is_outage(e):
                raise
            self._go_offline(e)
            self.spool.append(op)

    def _go_offline(self, e: Exception) -> None:
        self.offline_since = self._last_probe = time.monotonic()
        log.warning("MLflow server %s is unreachable (%s); training goes on, buffering metrics and "
                    "artifacts in %s", redact(self.uri), _cause(e), self.spool.path)

    def _back_online(self, force: bool = False) -> bool:
        if not force and time.monotonic() - self._last_probe < PROBE_EVERY_S:
            return False
        self._last_probe = time.monotonic()
        try:
            check_reachable(self.uri, timeout=5)
            self._send_spool()
        except Exception as e:
            if not is_outage(e):
                raise
            return False
        log.warning("MLflow server %s is back; sent what was buffered", redact(self.uri))
        self.offline_since = None
        return True

    def _send_spool(self) -> None:
        """Send the buffered calls in order; those not sent stay buffered."""
        ops = compact(self.spool.read())
        for i, op in enumerate(ops):
            try:
                self._send(op)
            except Exception:
                self.spool.replace(ops[i:])
                raise
        self.spool.replace([])

    def _send(self, op: dict) -> None:
        from mlflow.entities import Metric

        kind, heartbeat = op["op"], {HEARTBEAT_TAG: int(time.time())}
        if kind == "metrics":
            batch = [Metric(k, v, op["timestamp"], op["step"]) for k, v in op["metrics"].items()]
            self.client.log_batch(self.run_id, metrics=batch, tags=_tag_list(heartbeat))
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=_tag_list({**op["tags"], **heartbeat}))
        elif kind == "artifact":
            if Path(op["path"]).exists():  # a buffered file removed since is not there to send
                self.client.log_artifact(self.run_id, op["path"], op["artifact_path"])
        elif kind == "text":
            self.client.log_text(self.run_id, op["text"], op["artifact_file"])


def _tag_list(tags: dict[str, Any]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)[:5000]) for k, v in tags.items()]


def is_outage(e: Exception) -> bool:
    """The server is down, hung or overloaded (worth buffering and retrying), as opposed to a call
    that it answered and refused (a bad value, a missing run), which retrying would not fix."""
    import requests

    if isinstance(e, (requests.exceptions.RequestException, OSError, GnrError)):
        return True
    code = getattr(e, "error_code", None)
    return code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED")


def stale_reason(run) -> str | None:
    """Why a RUNNING run has no live process behind it, or None when it may still be alive."""
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    host, pid, beat = tags.get(HOST_TAG), tags.get(PID_TAG, ""), tags.get(HEARTBEAT_TAG, "")
    if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
        return f"its process {pid} on {host} is gone"
    if beat.isdigit() and time.time() - int(beat) > STALE_AFTER_S:
        return f"its process ({pid or '?'} on {host or '?'}) has not reported for {(time.time() - int(beat)) / 60:.0f} min"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child nobody has waited for yet is a zombie: gone all the same
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def fix_stale_run(run_id: str, uri: str | None = None) -> str | None:
    """Mark a run FAILED when it is RUNNING with no live process behind it; returns what was done."""
    run = get_run(run_id, uri)
    reason = stale_reason(run)
    if reason is None:
        return None
    c = client(uri)
    c.set_tag(run_id, FAILURE_TAG, f"stale: {reason}")
    c.set_terminated(run_id, status="FAILED")
    return f"run {run_id} was left RUNNING but {reason}: marked FAILED (resume it with gnr train --resume {run_id})"


# -- after training: evaluation and analysis log into a run, the report reads runs back -------------

class RunWriter(Tracker):
    """Logs into an existing run (evaluation, analysis) without touching its status, params or config."""

    def __init__(self, run_id: str, uri: str | None = None):
        self.uri = resolve_uri(uri)
        run = get_run(run_id, self.uri)
        self.client = client(self.uri)
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id


_MODEL_URI = re.compile(r"runs:/(?P<run>[^/]+)/.+|models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))?")


def model_source_run(model_uri: str, uri: str | None = None) -> str:
    """The id of the run an MLflow model came from, for ``runs:/ID/model``, ``models:/NAME/VERSION``,
    ``models:/NAME/latest``, ``models:/NAME@ALIAS`` and ``models:/m-<logged model id>``."""
    match = _MODEL_URI.fullmatch(model_uri.strip())
    if not match:
        raise GnrError(f"'{model_uri}' is not an MLflow model URI (runs:/RUN_ID/model, models:/NAME/VERSION "
                       "or models:/NAME@ALIAS)")
    resolved = resolve_uri(uri)
    if match["run"]:
        return get_run(match["run"], resolved).info.run_id
    check_reachable(resolved)
    c = client(resolved)
    name = match["name"]
    try:
        if match["alias"]:
            run_id = c.get_model_version_by_alias(name, match["alias"]).run_id
        elif match["version"] == "latest":
            versions = c.search_model_versions(f"name = '{name}'")
            if not versions:
                raise GnrError(f"registered model '{name}' has no versions")
            run_id = max(versions, key=lambda v: int(v.version)).run_id
        elif match["version"]:
            run_id = c.get_model_version(name, match["version"]).run_id
        else:  # an MLflow 3 logged model id
            run_id = c.get_logged_model(name).source_run_id
    except GnrError:
        raise
    except Exception as e:
        raise _error(e, f"no MLflow model '{model_uri}' at {redact(resolved)}",
                     f"cannot read MLflow model '{model_uri}' at {redact(resolved)}") from None
    if not run_id:
        raise GnrError(f"MLflow model '{model_uri}' was not logged by a run")
    return run_id


class SystemMetrics:
    """MLflow's system metrics of this node (CPU, memory, disk, network; GPU when pynvml imports) as
    ``system/...`` (``system/node<k>/...`` on several nodes) of one run, sampled every
    ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (default 10).

    MLflow's own monitor thread stops as soon as its run is not RUNNING, but evaluation logs into
    FINISHED runs; so gnr drives MLflow's monitor from a thread of its own, and takes one last sample
    when it stops, so that a short job has at least one.
    """

    def __init__(self, run_id: str, uri: str | None = None, node_id: str | None = None, interval: float = 10.0):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # INFO on start and stop
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, node_id=node_id,
                                            tracking_uri=resolve_uri(uri), resume_logging=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gnr-system-metrics", daemon=True)
        self._failed = False

    def __enter__(self) -> "SystemMetrics":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.monitor.mlflow_logger.flush()
        except Exception as e:
            self._warn(e)

    def _loop(self) -> None:
        import psutil

        psutil.cpu_percent()  # psutil measures CPU per calling thread: open this thread's first window
        while not self._stop.wait(self.monitor.sampling_interval):
            self._sample()
        self._sample()  # the last one: a job shorter than the interval still has one

    def _sample(self) -> None:
        try:
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
        except Exception as e:  # system metrics must never stop a job
            self._warn(e)

    def _warn(self, e: Exception) -> None:
        if is_outage(e):  # samples are dropped while the server is down; the trainer says so once
            return
        if not self._failed:
            self._failed = True
            logging.getLogger(__name__).warning("system metrics not logged: %s", _cause(e))


def system_metrics(run_id: str, uri: str | None, cfg: RunConfig, dist):
    """A context that logs :class:`SystemMetrics` into ``run_id`` while it is open, from one process per
    node (``dist``: a :class:`gnr.distributed.Dist`); nothing when ``tracking.system_metrics`` is off."""
    from contextlib import nullcontext

    if not (cfg.tracking.system_metrics and dist.is_node_main):
        return nullcontext()
    try:
        return SystemMetrics(run_id, uri, dist.node_id)
    except Exception as e:  # psutil missing, store unreadable: system metrics never stop a job
        logging.getLogger(__name__).warning("system metrics not logged: %s", _cause(e))
        return nullcontext()


def download_weights(run_id: str, which: str, dst: str | Path, uri: str | None = None) -> Path:
    """A run's exported weights (``ema`` or ``raw``): the state dict of the ``Normalized`` model."""
    return download(run_id, f"{WEIGHTS_DIR}/{which}.safetensors", dst, uri)


@dataclass(frozen=True)
class RunRecord:
    """What the report needs from one run, as plain values."""

    run_id: str
    name: str
    status: str
    start_time: int
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


def find_runs(experiment: str | None = None, run_ids: list[str] | tuple[str, ...] = (),
              uri: str | None = None) -> list[RunRecord]:
    """The named runs, or every run of an experiment (oldest first)."""
    resolved = resolve_uri(uri)
    if run_ids:
        runs = [get_run(r, resolved) for r in run_ids]
    elif not experiment:
        raise GnrError("choose runs with --experiment NAME or --run-id ID ...")
    else:
        check_reachable(resolved)
        c = client(resolved)
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            raise GnrError(f"no MLflow experiment '{experiment}' at {redact(resolved)}")
        runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=10000)
    return [RunRecord(r.info.run_id, r.info.run_name or "", r.info.status, r.info.start_time or 0,
                      dict(r.data.tags), dict(r.data.params), dict(r.data.metrics)) for r in runs]


# MLflow prints "View run ... at: URL" on stdout when a run on a tracking server ends; stdout belongs
# to `--json` output (`gnr ... --json | jq`), and `ui_command` already says where the run is. Its
# per-download tqdm bars would interleave with gnr's own rich progress on stderr.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
