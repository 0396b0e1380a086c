"""Input gradients that concentrate on edges (PAPER.md §1, "edge"; paper Section 5).

Teacher: an edge map of the input (blur, Sobel-like derivatives, channel-pooled magnitude, blur,
broadcast to 3 channels). Student: the input gradient of one logit per image, its class sampled from
``softmax(logits / T)``, by double backprop. Both are divided by their RMS over the batch and compared
by MSE; ``L = CE + α·MSE`` with ``α = min(start + slope·epoch, max)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gnr.doublegrad import differentiated_twice
from gnr.objectives.base import Objective, detached_parts, input_leaf, soft_ce

GAUSS_SIGMA, GAUSS_TAPS = 1.0, 7
DERIVATIVE = torch.tensor([[-0.5, 0.0, 0.5], [-1.0, 0.0, 1.0], [-0.5, 0.0, 0.5]])


def _depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Same-size per-channel 2-D filtering with reflect padding."""
    c = x.shape[1]
    kh, kw = kernel.shape
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    return F.conv2d(x, kernel.to(x).expand(c, 1, kh, kw), groups=c)


def _gaussian(sigma: float = GAUSS_SIGMA, taps: int = GAUSS_TAPS) -> torch.Tensor:
    t = torch.arange(taps, dtype=torch.float32) - taps // 2
    g = torch.exp(-t**2 / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


@torch.no_grad()
def edge_map(x: torch.Tensor) -> torch.Tensor:
    """The teacher ``E`` for pixels ``x`` [B, C, H, W], same shape (edge magnitude on every channel)."""
    blurred = _depthwise(x.float(), _gaussian())
    dx, dy = _depthwise(blurred, DERIVATIVE), _depthwise(blurred, DERIVATIVE.T)
    magnitude = (dx**2 + dy**2).sum(1, keepdim=True).sqrt()
    return _depthwise(magnitude, _gaussian()).expand_as(x)


def rms_normalised(t: torch.Tensor) -> torch.Tensor:
    """``t / rms(t)`` over the whole batch (a flat image has zero edges: keep it finite)."""
    return t / t.float().pow(2).mean().sqrt().clamp_min(1e-12)


class Edge(Objective):
    passes = 5
    double_backward = True

    def __call__(self, model, x, y_soft, progress):
        cfg = self.cfg
        x = input_leaf(x)
        with differentiated_twice():
            logits = model(x)
            ce = soft_ce(logits, y_soft)
            probs = torch.softmax(logits.detach().float() / cfg.edge_temperature, dim=1)
            picked = logits.gather(1, torch.multinomial(probs, 1)).sum()
            (student,) = torch.autograd.grad(picked, x, create_graph=True)
        penalty = F.mse_loss(rms_normalised(student), rms_normalised(edge_map(x.detach())))
        alpha = min(cfg.edge_alpha_start + cfg.edge_alpha_slope * math.floor(progress), cfg.edge_alpha_max)
        loss = ce + alpha * penalty
        return loss, detached_parts(x.device, ce=ce, penalty=penalty, alpha=alpha)
