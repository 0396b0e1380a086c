"""The evaluated model: a run's exported weights (or a file) in the run's architecture, frozen."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gnr.config import RunConfig
from gnr.data.shards import file_sha256
from gnr.errors import GnrError


def build_evaluated_model(cfg: RunConfig, weights_file: str | Path, device: torch.device) -> nn.Module:
    """The run's architecture with ``weights_file`` loaded, in eval mode, parameters frozen."""
    from gnr.models import build_model

    model_cfg = cfg.model.model_copy(update={"pretrained": False, "weights": str(weights_file)})
    model, _ = build_model(model_cfg, cfg.data.num_classes, cfg.data.img_size)
    return model.to(device).eval().requires_grad_(False)


@dataclass
class RunModel:
    model: nn.Module
    cfg: RunConfig
    digest: str  # sha1 of the weights file: a retrained run invalidates cached results


def load_run_model(run_id: str, weights: str = "ema", uri: str | None = None,
                   device: torch.device | str = "cpu") -> RunModel:
    """A run's trained model (``ema`` or ``raw`` weights from MLflow) and the config it was trained with."""
    from gnr.tracking import download_weights, load_run_config

    if weights not in ("ema", "raw"):
        raise GnrError(f"--weights is ema, raw or a local file (got '{weights}')")
    cfg = load_run_config(run_id, uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = download_weights(run_id, weights, tmp, uri)
        return RunModel(build_evaluated_model(cfg, path, torch.device(device)), cfg, file_sha256(path))


def model_source(model_uri: str, uri: str | None = None) -> tuple[str, str]:
    """The run an MLflow model URI came from and the weights (``ema`` or ``raw``) it holds.

    gnr loads those weights (safetensors) from that run rather than the logged model itself: they
    are the same tensors (the tests compare the logits), the run's config rebuilds the eager timm model
    that attacks and gradient statistics differentiate through (the logged model is an exported graph),
    loading runs no code from the store, and results land in, and are cached for, that run.
    """
    from gnr.tracking import load_run_config, model_source_run

    run_id = model_source_run(model_uri, uri)
    return run_id, "ema" if load_run_config(run_id, uri).ema.enabled else "raw"
