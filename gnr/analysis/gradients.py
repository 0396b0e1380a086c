"""Input-gradient statistics of a trained model (PAPER.md §4 and Table 1).

Per sample, in pixel space: the L1 norm of ``∇ₓℓ`` (sum over C, H, W), split by colour channel;
whether the clean prediction is correct and whether PGD-10 fails (✓, robust) or succeeds (✗); and
how strongly the gradient follows the image's edges (Section 5 of the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from gnr.eval import pgd, pgd_step, predicts, write_rows
from gnr.objectives.edge import edge_map

CHANNELS = ("R", "G", "B")
LOG_FLOOR = 1e-12  # keeps log() finite on flat image regions and exactly-zero gradients
PGD_STEPS = 10  # Table 1 conditions on PGD-10


def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``∇ₓ CE(model(x)_i, y_i)``: the gradient of the summed loss, since in eval mode no
    sample's loss depends on another's input."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad


def pixel_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between ``a[i]`` and ``b[i]`` over their pixels, one value per image."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(LOG_FLOOR)).float()


def edge_correlation(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per image: correlation over pixels of log edge energy (the edge objective's teacher map) and
    log gradient magnitude (|g| summed over channels). Near 1: the gradient sits on the edges."""
    edges = edge_map(x)[:, 0]
    magnitude = grad.abs().sum(1)
    return pixel_correlation(edges.clamp_min(LOG_FLOOR).log(), magnitude.clamp_min(LOG_FLOOR).log())


@dataclass
class SampleStats:
    """Per-sample columns, concatenated over batches."""

    ids: list[str]
    labels: torch.Tensor
    correct: torch.Tensor
    robust: torch.Tensor
    l1: torch.Tensor
    l1_channels: torch.Tensor  # [N, 3]
    edge_corr: torch.Tensor

    def rows(self) -> list[dict]:
        return [{"id": k, "label": int(self.labels[i]), "correct": int(self.correct[i]),
                 "robust": int(self.robust[i]), "l1": float(self.l1[i]),
                 **{f"l1_{c}": float(self.l1_channels[i, j]) for j, c in enumerate(CHANNELS)},
                 "edge_corr": float(self.edge_corr[i])} for i, k in enumerate(self.ids)]


def sample_stats(model: nn.Module, batches: Iterable, *, eps: float, device: torch.device | str = "cpu") -> SampleStats:
    """Gradient statistics and PGD outcome for every image of ``batches`` ((x, y, keys) triples)."""
    cols: dict[str, list] = {k: [] for k in ("ids", "labels", "correct", "robust", "l1", "l1_channels", "edge_corr")}
    for x, y, keys in batches:
        x, y = x.to(device), y.to(device)
        grad = input_gradients(model, x, y)
        x_adv = pgd(model, x, y, eps=eps, step_size=pgd_step(eps), steps=PGD_STEPS)
        correct = predicts(model, x, y)
        per_channel = grad.abs().sum((2, 3))
        cols["ids"] += list(keys)
        cols["labels"].append(y.cpu())
        cols["correct"].append(correct.cpu())
        cols["robust"].append((correct & predicts(model, x_adv, y)).cpu())
        cols["l1"].append(per_channel.sum(1).cpu())
        cols["l1_channels"].append(per_channel.cpu())
        cols["edge_corr"].append(edge_correlation(x, grad).cpu())
    return SampleStats(ids=cols.pop("ids"), **{k: torch.cat(v) for k, v in cols.items()})


def _mean(t: torch.Tensor) -> float:
    return float(t.double().mean()) if len(t) else math.nan


def summarize(s: SampleStats) -> dict[str, float]:
    """Table 1 columns (accuracies as fractions) plus the per-channel and edge statistics."""
    total_channels = s.l1_channels.double().sum(0)
    out = {
        "n": float(len(s.ids)),
        "clean_acc": _mean(s.correct.float()),
        "pgd10_acc": _mean(s.robust.float()),
        "l1_mean": _mean(s.l1),
        "l1_mean_robust": _mean(s.l1[s.robust]),
        "l1_mean_broken": _mean(s.l1[~s.robust]),
        "l1_mean_correct": _mean(s.l1[s.correct]),
        "l1_mean_incorrect": _mean(s.l1[~s.correct]),
        "l1_median": float(s.l1.median()) if len(s.l1) else math.nan,
        "edge_corr_mean": _mean(s.edge_corr),
        "edge_corr_median": float(s.edge_corr.median()) if len(s.edge_corr) else math.nan,
    }
    for j, c in enumerate(CHANNELS):
        out[f"l1_mean_{c}"] = _mean(s.l1_channels[:, j])
        out[f"l1_share_{c}"] = float(total_channels[j] / total_channels.sum().clamp_min(LOG_FLOOR))
    return out


def histogram_figure(s: SampleStats, title: str):
    """Per-sample log10 ‖∇ₓℓ‖₁ split by correct / incorrect, and per colour channel."""
    import matplotlib.pyplot as plt
    import numpy as np

    log_l1 = s.l1.clamp_min(LOG_FLOOR).log10().numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    bins = np.histogram_bin_edges(log_l1, bins=30)
    for mask, label, colour in ((s.correct, "correct", "tab:green"), (~s.correct, "incorrect", "tab:red")):
        if mask.any():
            left.hist(log_l1[mask.numpy()], bins=bins, alpha=0.6, label=f"{label} ({int(mask.sum())})", color=colour)
    left.set(xlabel="log10 ‖∇ₓℓ‖₁ per sample", ylabel="images", title="by clean prediction")
    left.legend()
    log_ch = s.l1_channels.clamp_min(LOG_FLOOR).log10().numpy()
    bins = np.histogram_bin_edges(log_ch, bins=30)
    for j, (c, colour) in enumerate(zip(CHANNELS, ("tab:red", "tab:green", "tab:blue"))):
        right.hist(log_ch[:, j], bins=bins, alpha=0.5, label=c, color=colour)
    right.set(xlabel="log10 ‖∇ₓℓ‖₁ of one channel", title="by colour channel")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def analyze_gradients(run_ids: list[str], *, n: int = 10000, eps: float = 4.0, data: str | None = None,
                      batch_size: int = 100, weights: str = "ema", uri: str | None = None, device: str = "auto",
                      out: str | None = None) -> dict[str, dict]:
    """Table 1 statistics of each run on its first ``n`` validation images (``eps`` in 1/255), written
    locally and logged into the run: metrics ``grad/*``, ``analysis/gradients/{stats.json,
    per_sample.csv,histograms.png}``."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gnr.analysis.runs import load_runs, log_outputs, output_dir
    from gnr.distributed import pick_device

    dev = pick_device(device, 0)
    folder = output_dir("gradients", run_ids, out)
    results = {}
    for run in load_runs(run_ids, weights=weights, uri=uri, device=dev):
        stats = sample_stats(run.model, run.images(data=data, n=n, batch_size=batch_size), eps=eps / 255, device=dev)
        summary = summarize(stats)
        here = folder / run.run_id[:8]
        here.mkdir(exist_ok=True)
        (here / "stats.json").write_text(json.dumps(
            {"run_id": run.run_id, "label": run.label, "weights": weights, "eps_255": eps, **summary}, indent=2))
        write_rows(stats.rows(), here / "per_sample.csv")
        fig = histogram_figure(stats, f"{run.label}: per-sample input-gradient L1 (n={len(stats.ids)})")
        fig.savefig(here / "histograms.png")
        plt.close(fig)
        files = [here / "stats.json", here / "per_sample.csv", here / "histograms.png"]
        log_outputs(run.run_id, uri, artifact_dir="analysis/gradients", files=files,
                    metrics={f"grad/{k}": v for k, v in summary.items()})
        results[run.run_id] = {"label": run.label, **summary, "files": [str(f) for f in files]}
    return results
