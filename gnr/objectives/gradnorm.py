"""Gradient-norm regularisation by exact double backprop (PAPER.md §1, Eq. 2).

``L = λ_CE·mean_i ℓ_i + λ_GN·α(t)·ε·mean_i ‖∇_x ℓ_i‖₁``. ``ε·‖∇_x ℓ_i‖₁`` is the first-order
worst-case loss increase in the L∞ ball of radius ε (pixel space, so no 1/σ), and ``α`` ramps
linearly from 0 to 1 over ``ramp_epochs``, per step.
"""

from __future__ import annotations

import torch

from gnr.config import ObjectiveConfig
from gnr.doublegrad import differentiated_twice
from gnr.objectives.base import Objective, detached_parts, input_leaf, linear_ramp, soft_ce


def penalised(cfg: ObjectiveConfig, ce: torch.Tensor, grad_l1: torch.Tensor,
              progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 2 from the mean CE and the mean per-sample ‖∇_x ℓ_i‖₁ (exact or estimated)."""
    alpha = linear_ramp(progress, cfg.ramp_epochs)
    penalty = cfg.eps * grad_l1
    loss = cfg.lambda_ce * ce + cfg.lambda_gn * alpha * penalty
    return loss, detached_parts(ce.device, ce=ce, penalty=penalty, grad_l1=grad_l1, alpha=alpha)


class GradNorm(Objective):
    passes = 5
    double_backward = True

    def __call__(self, model, x, y_soft, progress):
        x = input_leaf(x)
        with differentiated_twice():
            ce = soft_ce(model(x), y_soft)
            (grad,) = torch.autograd.grad(ce, x, create_graph=True)
        # The gradient of the batch-mean CE is ∇_x ℓ_i / B per sample, so the mean over the batch of
        # ‖B·grad_i‖₁ is the L1 norm of the whole tensor.
        grad_l1 = grad.abs().sum()
        return penalised(self.cfg, ce, grad_l1, progress)
