"""Gradient-norm regularisation by a finite difference (Finlay & Oberman 2019; PAPER.md §6).

With ``d = sign(∇_x ℓ)`` held constant, ``‖∇_x ℓ_i‖₁ ≈ (ℓ_i(x + h·d_i) − ℓ_i(x)) / h``; averaged
over the batch that is ``(mean ℓ(x + h·d) − mean ℓ(x)) / h``. Only first derivatives, so fused
attention kernels and torch.compile work. Same weights and ramp as :mod:`gnr.objectives.gradnorm`.
``x + h·d`` is not clipped to [0, 1]: the model is defined around the box and clipping would bend
the difference direction.
"""

from __future__ import annotations

import torch

from gnr.objectives.base import Objective, input_leaf, soft_ce
from gnr.objectives.gradnorm import penalised


class GradNormFD(Objective):
    passes = 5  # forward, input-only backward for d, forward at x + h·d, backward through both

    def __call__(self, model, x, y_soft, progress):
        x = input_leaf(x)
        # Replay the RNG for the second forward: both points see the same dropout / drop-path masks,
        # otherwise the difference measures the masks, not the gradient.
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            ce = soft_ce(model(x), y_soft)
        (grad,) = torch.autograd.grad(ce, x, retain_graph=True)
        h = self.cfg.fd_step
        ce_h = soft_ce(model(x.detach() + h * grad.sign()), y_soft)
        return penalised(self.cfg, ce, (ce_h - ce) / h, progress)
