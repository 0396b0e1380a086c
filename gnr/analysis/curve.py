"""Robust accuracy as a function of ε from per-image minimal adversarial budgets (PAPER.md §4, Fig. 2).

Per image, the smallest L∞ budget that PGD-100 (step ε/4, random start) breaks: an exponential search
from 2/255 (2, 4, 8, ... /255, up to the whole pixel range) brackets it, then 10 bisection steps
narrow the bracket; the minimal ε is the bracket's upper end, the smallest budget seen to break the
image. Misclassified images have minimal ε 0, so accuracy(0) is the clean accuracy, and
accuracy(ε) = share of images whose minimal ε exceeds ε is non-increasing by construction.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from gnr.eval import pgd, predicts, write_rows

START = 2 / 255
BISECTIONS = 10
STEPS = 100
CURVE_EPS_255 = tuple(range(33))  # accuracy(ε) is reported for ε = 0, 1, ..., 32 /255


def breaks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """Per image: does PGD-``steps`` with budget ``eps[i]`` (step ``eps[i]/4``) make it misclassified?"""
    x_adv = pgd(model, x, y, eps=eps, step_size=eps / 4, steps=steps)
    return ~predicts(model, x_adv, y)


def minimal_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = STEPS, start: float = START,
                bisections: int = BISECTIONS) -> torch.Tensor:
    """Per image, the smallest budget (pixels) found to break it: 0 if misclassified, inf if even ε = 1 fails."""
    correct = predicts(model, x, y)
    lo = torch.zeros(len(x), device=x.device)
    hi = torch.full((len(x),), math.inf, device=x.device)
    searching = correct.clone()
    eps = start
    while searching.any():
        idx = searching.nonzero().squeeze(1)
        broken = breaks(model, x[idx], y[idx], torch.full((len(idx),), eps, device=x.device), steps)
        hi[idx[broken]] = eps
        lo[idx[~broken]] = eps
        searching[idx[broken]] = False
        if eps >= 1.0:
            break
        eps = min(2 * eps, 1.0)
    bracketed = (correct & hi.isfinite()).nonzero().squeeze(1)
    for _ in range(bisections):
        if not len(bracketed):
            break
        mid = (lo[bracketed] + hi[bracketed]) / 2
        broken = breaks(model, x[bracketed], y[bracketed], mid, steps)
        hi[bracketed[broken]] = mid[broken]
        lo[bracketed[~broken]] = mid[~broken]
    return torch.where(correct, hi, torch.zeros_like(hi))


def accuracy_curve(min_eps: torch.Tensor, eps_255: Iterable[float] = CURVE_EPS_255) -> list[float]:
    """accuracy(ε): the share of images whose minimal budget is above ε (ε in 1/255)."""
    n = max(len(min_eps), 1)
    return [float((min_eps > e / 255).sum()) / n for e in eps_255]


def curve_figure(curves: dict[str, list[float]], steps: int = STEPS, eps_255=CURVE_EPS_255):
    """One robust-accuracy curve per run (the paper's Fig. 2)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, acc in curves.items():
        ax.plot(list(eps_255), [100 * a for a in acc], marker=".", label=label)
    ax.set(xlabel="ε (×1/255, L∞)", ylabel="robust accuracy (%)", ylim=(0, 100), xlim=(0, max(eps_255)),
           title=f"Robust accuracy vs ε (minimal ε under PGD-{steps})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def analyze_curve(run_ids: list[str], *, n: int = 1000, data: str | None = None, batch_size: int = 100,
                  steps: int = STEPS, weights: str = "ema", uri: str | None = None, device: str = "auto",
                  out: str | None = None) -> dict:
    """Minimal ε per image and accuracy(ε) per run; one PNG and one CSV with every run, logged to each
    run under ``analysis/curve/`` with its own per-image CSV, metric history ``curve/accuracy``
    (step = ε in 1/255) and ``curve/median_min_eps_255``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gnr.analysis.runs import load_runs, log_outputs, output_dir
    from gnr.distributed import pick_device

    dev = pick_device(device, 0)
    folder = output_dir("curve", run_ids, out)
    runs = load_runs(run_ids, weights=weights, uri=uri, device=dev)
    curves, per_run = {}, {}
    for run in runs:
        ids, labels, found = [], [], []
        for x, y, keys in run.images(data=data, n=n, batch_size=batch_size):
            found.append(minimal_eps(run.model, x.to(dev), y.to(dev), steps=steps).cpu())
            ids += keys
            labels += y.tolist()
        min_eps = torch.cat(found)
        curves[run.label] = accuracy_curve(min_eps)
        per_image = folder / f"min_eps-{run.run_id}.csv"
        write_rows([{"id": k, "label": lab, "min_eps_255": float(e) * 255} for k, lab, e in zip(ids, labels, min_eps)],
                   per_image)
        per_run[run.run_id] = {"label": run.label, "n": len(ids), "per_image_csv": per_image,
                               "median_min_eps_255": float(min_eps.median()) * 255, "accuracy": curves[run.label]}
    table = folder / "robust_accuracy.csv"
    write_rows([{"eps_255": e, **{label: acc[i] for label, acc in curves.items()}} for i, e in enumerate(CURVE_EPS_255)],
               table)
    fig = curve_figure(curves, steps)
    png = folder / "robust_accuracy.png"
    fig.savefig(png)
    plt.close(fig)
    for run_id, info in per_run.items():
        log_outputs(run_id, uri, artifact_dir="analysis/curve", files=[png, table, info["per_image_csv"]],
                    metrics={"curve/median_min_eps_255": info["median_min_eps_255"]},
                    series={"curve/accuracy": list(zip(CURVE_EPS_255, info["accuracy"]))})
    return {"png": str(png), "csv": str(table), "eps_255": list(CURVE_EPS_255),
            "runs": {r: {**i, "per_image_csv": str(i["per_image_csv"])} for r, i in per_run.items()}}
