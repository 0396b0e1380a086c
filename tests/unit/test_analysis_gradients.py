"""Input-gradient statistics against direct per-image computations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gnr.analysis.gradients import SampleStats, edge_correlation, input_gradients, pixel_correlation, sample_stats, summarize


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()


def test_batched_input_gradients_equal_one_image_at_a_time():
    model = _model()
    x, y = torch.rand(5, 3, 8, 8), torch.randint(0, 10, (5,))
    batched = input_gradients(model, x, y)
    for i in range(5):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)
        torch.testing.assert_close(batched[i], gi[0])


def test_sample_stats_and_summary_match_direct_computation():
    model = _model()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    stats = sample_stats(model, [(x[:4], y[:4], list("abcd")), (x[4:], y[4:], list("ef"))], eps=4 / 255)
    grad = input_gradients(model, x, y)
    torch.testing.assert_close(stats.l1, grad.abs().sum((1, 2, 3)))
    torch.testing.assert_close(stats.l1_channels.sum(1), stats.l1)
    assert torch.equal(stats.correct, model(x).argmax(1) == y)
    assert not (stats.robust & ~stats.correct).any()
    summary = summarize(stats)
    assert summary["l1_mean"] == pytest.approx(float(stats.l1.mean()))
    assert sum(summary[f"l1_share_{c}"] for c in "RGB") == pytest.approx(1.0)
    assert [r["id"] for r in stats.rows()] == list("abcdef")


def test_conditional_means_split_by_pgd_outcome():
    stats = SampleStats(ids=list("abcd"), labels=torch.zeros(4, dtype=torch.long),
                        correct=torch.tensor([True, True, True, False]), robust=torch.tensor([True, False, True, False]),
                        l1=torch.tensor([1.0, 10.0, 3.0, 20.0]), l1_channels=torch.ones(4, 3),
                        edge_corr=torch.zeros(4))
    s = summarize(stats)
    assert (s["l1_mean_robust"], s["l1_mean_broken"], s["l1_mean_incorrect"]) == (2.0, 15.0, 20.0)
    assert s["clean_acc"] == 0.75 and s["pgd10_acc"] == 0.5


def test_correlations():
    a = torch.rand(3, 5, 5)
    torch.testing.assert_close(pixel_correlation(a, 2 * a + 1), torch.ones(3))
    torch.testing.assert_close(pixel_correlation(a, -a), -torch.ones(3))
    x = torch.zeros(1, 3, 16, 16)
    x[..., 8:] = 1.0  # one vertical edge
    on_edge, off_edge = torch.full_like(x, 1e-6), torch.full_like(x, 1e-6)
    on_edge[..., 6:10] = 1.0
    off_edge[..., 0:4] = 1.0
    assert edge_correlation(x, on_edge)[0] > 0.3 > edge_correlation(x, off_edge)[0]
