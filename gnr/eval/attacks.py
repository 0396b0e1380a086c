"""L∞ attacks in pixel space, shared by adversarial training and evaluation.

Both leave the model alone: its train/eval mode is the caller's choice, and gradients are taken with
``torch.autograd.grad`` w.r.t. the input only, so nothing accumulates in parameter ``.grad``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FGSM_STEP = 1.25  # FGSM with random start (Wong et al. 2020) steps 1.25·eps


def summed_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy against int labels or soft targets, summed: the step uses only the gradient's
    sign, and a sum keeps per-sample gradients from shrinking by 1/B (fp16 underflow)."""
    return F.cross_entropy(logits, y, reduction="sum")


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | torch.Tensor,
        step_size: float | torch.Tensor, steps: int, random_start: bool = True,
        loss_fn: LossFn | None = None) -> torch.Tensor:
    """Projected gradient ascent on ``loss_fn(model(x_adv), y)`` inside the L∞ ``eps``-ball of ``x``
    and the [0, 1] pixel box. ``eps`` and ``step_size`` are floats or one value per image (a search
    for each image's minimal ε attacks a whole batch at once). ``steps=0`` returns the (random)
    start. The result is detached."""
    loss_fn = loss_fn or summed_ce
    x = x.detach()
    eps, step_size = _per_image(eps, x), _per_image(step_size, x)
    x_adv = x + (torch.rand_like(x) * 2 - 1) * eps if random_start else x
    x_adv = x_adv.clamp(0, 1)
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(model(x_adv), y), x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def _per_image(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``value`` as a tensor that broadcasts against ``x`` image by image: shape [B, 1, 1, 1] or []."""
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return value.reshape(-1, *[1] * (x.dim() - 1)) if value.dim() else value


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float | None = None,
         random_start: bool = True) -> torch.Tensor:
    """FGSM with random start (Wong et al. 2020): one signed-gradient step of ``1.25·eps`` by default."""
    step_size = FGSM_STEP * eps if step_size is None else step_size
    return pgd(model, x, y, eps=eps, step_size=step_size, steps=1, random_start=random_start)
