"""Figures are real PNGs of the size the layout promises."""

import torch
from PIL import Image
from torch import nn

from gnr.analysis.figures import DPI, display, figure_pixels, gradient_figure, perturbation_figure, q99
from gnr.analysis.runs import AnalysedRun
from gnr.config import build_config


def _run(label: str, seed: int) -> AnalysedRun:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    return AnalysedRun(run_id=str(seed) * 32, label=label, cfg=build_config("demo"), model=model)


def test_display_maps_zero_to_grey_and_q99_to_the_ends():
    g = torch.tensor([-2.0, 0.0, 1.0, 4.0]).view(1, 1, 4).expand(3, 1, 4)
    shown = display(g, 2.0)
    assert shown.shape == (1, 4, 3)
    assert shown[0, :, 0].tolist() == [0.0, 0.5, 0.75, 1.0]
    assert q99(torch.ones(10)) == 1.0


def test_figures_are_pngs_of_the_expected_size(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    runs = [_run("natural", 0), _run("gradnorm", 1)]
    x, y = torch.rand(3, 3, 8, 8), torch.randint(0, 10, (3,))
    inputs = [(x, y, ["a.png", "b.png", "c.png"])] * 2
    for name, fig in (("g.png", gradient_figure(runs, inputs, "gradients")),
                      ("p.png", perturbation_figure(runs, inputs, eps=4 / 255, title="perturbations"))):
        fig.savefig(tmp_path / name, dpi=DPI)
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.size == figure_pixels(3, 3)
