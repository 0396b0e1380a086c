"""The runs an analysis compares: each one's model, config, images and label, and logging back into it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from gnr import paths
from gnr.config import RunConfig
from gnr.data.loader import with_resolved_source
from gnr.errors import GnrError
from gnr.eval import Batch, image_batches, load_run_model


@dataclass
class AnalysedRun:
    run_id: str
    label: str
    cfg: RunConfig
    model: nn.Module

    def images(self, *, data: str | None = None, n: int | None = None, batch_size: int = 100) -> Iterator[Batch]:
        """The first ``n`` images of the run's validation split (or of ``data``), preprocessed as for evaluation."""
        cfg = with_resolved_source(self.cfg, data)
        return image_batches(cfg, split=cfg.data.val_split, n=n, batch_size=batch_size)


def source_runs(models: list[str], uri: str | None = None) -> list[str]:
    """The run each MLflow model URI came from; the model holds that run's EMA (else raw) weights,
    which the analysis loads from the run (see :func:`gnr.eval.model_source`)."""
    from gnr.tracking import model_source_run

    return [model_source_run(m, uri) for m in models]


def load_runs(run_ids: list[str], *, weights: str = "ema", uri: str | None = None,
              device: torch.device | str = "cpu") -> list[AnalysedRun]:
    from gnr.tracking import find_runs

    if not run_ids:
        raise GnrError("name the runs to analyse with --run-id ID ... or --model URI ...")
    records = find_runs(run_ids=run_ids, uri=uri)
    labels = [f"{r.tags.get('method', '?')} ({r.tags.get('activation', '?')})" for r in records]
    labels = [f"{lab} {r.run_id[:6]}" if labels.count(lab) > 1 else lab for lab, r in zip(labels, records)]
    out = []
    for record, label in zip(records, labels):
        loaded = load_run_model(record.run_id, weights, uri, device)
        out.append(AnalysedRun(record.run_id, label, loaded.cfg, loaded.model))
    return out


def output_dir(kind: str, run_ids: list[str], out: str | Path | None = None) -> Path:
    """Local copy of an analysis' files: ``out`` or ``$GNR_HOME/analysis/<kind>/<run ids>``."""
    path = Path(out) if out else paths.home() / "analysis" / kind / "-".join(r[:8] for r in run_ids)
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_outputs(run_id: str, uri: str | None, *, artifact_dir: str, files: list[Path],
                metrics: dict[str, float] | None = None, series: dict[str, list[tuple[int, float]]] | None = None) -> None:
    """Files under ``artifact_dir``, metrics at step 0, and ``series`` as metric histories (step, value)."""
    from gnr.tracking import RunWriter

    writer = RunWriter(run_id, uri)
    if metrics:
        writer.log_metrics(metrics, step=0)
    for name, points in (series or {}).items():
        for step, value in points:
            writer.log_metrics({name: value}, step=step)
    for f in files:
        writer.log_artifact(f, artifact_dir)
