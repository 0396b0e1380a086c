"""Minimal adversarial ε by exponential search + bisection, on a linear model where it is known exactly."""

import math

import pytest
import torch
from torch import nn

from gnr.analysis.curve import BISECTIONS, START, accuracy_curve, minimal_eps


def _linear_two_class(w: torch.Tensor) -> nn.Module:
    """logit_0 = w·x - w·0.5, logit_1 = 0: class 0 iff w·(x - 0.5) > 0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(w.numel(), 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0] = w.flatten()
        model[1].bias.copy_(torch.tensor([-0.5 * w.sum(), 0.0]))
    return model.eval().requires_grad_(False)


def test_minimal_eps_matches_the_linear_margin():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4)
    model = _linear_two_class(w)
    # images near the centre of the pixel box, so the L∞ ball never hits 0 or 1 before the margin
    x = 0.5 + 0.02 * torch.randn(8, 3, 4, 4)
    y = torch.zeros(8, dtype=torch.long)
    margin = ((x - 0.5) * w).flatten(1).sum(1)
    true_eps = margin / w.abs().sum()  # L∞ distance to the decision boundary
    found = minimal_eps(model, x, y, steps=20)
    for m, t, f in zip(margin, true_eps, found):
        if m <= 0:
            assert f == 0  # misclassified
        else:
            bracket = START * 2 ** max(0, math.ceil(math.log2(t / START)))
            assert t - 1e-6 <= f <= t + bracket / 2**BISECTIONS + 1e-6


def test_accuracy_curve_is_monotone_from_clean_accuracy_to_zero():
    min_eps = torch.tensor([0.0, 0.0, 1.5, 3.0, 10.0, math.inf]) / 255
    curve = accuracy_curve(min_eps, eps_255=range(12))
    assert curve[0] == pytest.approx(4 / 6)
    assert all(a >= b for a, b in zip(curve, curve[1:]))
    assert curve[-1] == pytest.approx(1 / 6)  # the unbreakable image
    assert accuracy_curve(min_eps[:5], eps_255=[32])[0] == 0
