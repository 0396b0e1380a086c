"""The paper's qualitative figures for any set of runs (PAPER.md §4).

- Fig. 1: images beside their loss-input gradients, one column per run, each gradient shown as
  ``0.5 + 0.5·g / q99(|g|)`` (grey = 0) with its L1 norm.
- Fig. 3: PGD-10 perturbations ``x_adv − x`` shown as ``0.5 + 0.5·δ/ε``, framed green where the model
  kept its answer and red where the attack flipped it.

Images come from the run's validation split or from any folder. A folder image's label is its
ImageNet class when the file name starts with a wnid and the model has 1000 classes; otherwise the
model's own clean prediction stands in for it (the gradient then explains that prediction).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from PIL import Image

from gnr.analysis.gradients import input_gradients
from gnr.analysis.runs import AnalysedRun
from gnr.data.shards import asset
from gnr.errors import GnrError
from gnr.eval import pgd, pgd_step, predicts, seeded

CELL_IN = 1.6  # inches per image cell
HEADER_IN = 0.8  # suptitle and column headers
DPI = 100
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
WNID = re.compile(r"^(n\d{8})")


def figure_pixels(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure with ``rows`` images and ``cols`` columns."""
    return round(cols * CELL_IN * DPI), round((rows * CELL_IN + HEADER_IN) * DPI)


def display(t: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """[3, H, W] signed map -> HWC image in [0, 1], grey at 0: ``0.5 + 0.5·t/scale``."""
    return (0.5 + 0.5 * t / scale).clamp(0, 1).permute(1, 2, 0)


def q99(t: torch.Tensor) -> torch.Tensor:
    return torch.quantile(t.abs().flatten().float(), 0.99).clamp_min(1e-12)


def folder_images(folder: str | Path, k: int) -> list[tuple[str, Image.Image]]:
    """The first ``k`` images (sorted by path) anywhere under ``folder``, as RGB."""
    root = Path(folder)
    if not root.is_dir():
        raise GnrError(f"--images: no such folder {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:k]
    if not files:
        raise GnrError(f"--images: no image files under {root}")
    return [(p.name, Image.open(p).convert("RGB")) for p in files]


def folder_label(name: str, num_classes: int) -> int | None:
    match = WNID.match(name)
    if not match or num_classes != 1000:
        return None
    return json.loads(asset("imagenet_class_to_id_map.json").read_text()).get(match.group(1))


def run_inputs(run: AnalysedRun, images: list | None, k: int, device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Pixels, labels and names of the figure's images, preprocessed as ``run`` evaluates."""
    from gnr.data.transforms import eval_transform

    if images is None:
        x, y, names = next(iter(run.images(n=k, batch_size=k)))
        return x.to(device), y.to(device), list(names)
    transform = eval_transform(run.cfg)
    x = torch.stack([transform(img) for _, img in images]).to(device)
    with torch.no_grad():
        predicted = run.model(x).argmax(1)
    known = [folder_label(name, run.cfg.data.num_classes) for name, _ in images]
    y = torch.tensor([p if lab is None else lab for lab, p in zip(known, predicted.tolist())], device=device)
    return x, y, [name for name, _ in images]


def _grid(rows: int, cols: int, title: str):
    import matplotlib.pyplot as plt

    height = rows * CELL_IN + HEADER_IN
    fig, axes = plt.subplots(rows, cols, figsize=(cols * CELL_IN, height), dpi=DPI, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - HEADER_IN / height, wspace=0.05, hspace=0.35)
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / height, va="top")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _show(ax, image: torch.Tensor, title: str, frame: str | None = None) -> None:
    ax.imshow(image.cpu().numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=7)
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame:
            spine.set_color(frame)
            spine.set_linewidth(4)


def _image_grid(runs: list[AnalysedRun], inputs: list[tuple], title: str):
    """A grid with the input images in column 0 and one empty column per run; returns (fig, axes, rows)."""
    rows = len(inputs[0][2])
    fig, axes = _grid(rows, 1 + len(runs), title)
    x0, _, names = inputs[0]
    for i in range(rows):
        _show(axes[i, 0], x0[i].permute(1, 2, 0), names[i][:24])
    return fig, axes, rows


def gradient_figure(runs: list[AnalysedRun], inputs: list[tuple], title: str):
    """Fig. 1: column 0 the images, then one column of loss-input gradients per run."""
    fig, axes, rows = _image_grid(runs, inputs, title)
    for j, (run, (x, y, _)) in enumerate(zip(runs, inputs), start=1):
        grad = input_gradients(run.model, x, y)
        for i in range(rows):
            head = f"{run.label}\n" if i == 0 else ""
            _show(axes[i, j], display(grad[i], q99(grad[i])), f"{head}‖g‖₁ = {grad[i].abs().sum():.3g}")
    return fig


def perturbation_figure(runs: list[AnalysedRun], inputs: list[tuple], *, eps: float, title: str):
    """Fig. 3: column 0 the images, then one column of PGD-10 perturbations per run (green: resisted)."""
    fig, axes, rows = _image_grid(runs, inputs, title)
    for j, (run, (x, y, _)) in enumerate(zip(runs, inputs), start=1):
        x_adv = pgd(run.model, x, y, eps=eps, step_size=pgd_step(eps), steps=10)
        resisted = predicts(run.model, x_adv, y)
        for i in range(rows):
            head = f"{run.label}\n" if i == 0 else ""
            verdict = "resisted" if resisted[i] else "fooled"
            _show(axes[i, j], display(x_adv[i] - x[i], eps), f"{head}{verdict}",
                  frame="tab:green" if resisted[i] else "tab:red")
    return fig


def analyze_figures(run_ids: list[str], *, images: str | None = None, k: int = 6, eps: float = 4.0,
                    weights: str = "ema", uri: str | None = None, device: str = "auto", seed: int = 0,
                    out: str | None = None) -> dict:
    """Fig. 1 and Fig. 3 for ``k`` images (``eps`` in 1/255), saved locally and logged to every run
    under ``analysis/figures/``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gnr.analysis.runs import load_runs, log_outputs, output_dir
    from gnr.distributed import pick_device

    dev = pick_device(device, 0)
    runs = load_runs(run_ids, weights=weights, uri=uri, device=dev)
    folder_imgs = folder_images(images, k) if images else None
    inputs = [run_inputs(run, folder_imgs, k, dev) for run in runs]
    folder = output_dir("figures", run_ids, out)
    source = Path(images).name if images else "validation split"
    figures = {
        "fig1_gradients.png": lambda: gradient_figure(runs, inputs, f"Loss-input gradients\n{source}"),
        "fig3_perturbations.png": lambda: perturbation_figure(
            runs, inputs, eps=eps / 255, title=f"PGD-10 perturbations, ε = {eps:g}/255\n{source}"),
    }
    paths = []
    for name, draw in figures.items():
        with seeded(seed, dev):
            fig = draw()
        fig.savefig(folder / name, dpi=DPI)
        plt.close(fig)
        paths.append(folder / name)
    for run in runs:
        log_outputs(run.run_id, uri, artifact_dir="analysis/figures", files=paths)
    rows = len(inputs[0][2])
    return {"files": [str(p) for p in paths], "size": figure_pixels(rows, 1 + len(runs)), "images": inputs[0][2]}
