"""Adversarial training (Liu et al. 2023 recipe; PAPER.md §1): PGD-k or FGSM, then train on x_adv.

The attack runs on the unwrapped model (not through DDP, whose reducer expects every forward to be
followed by a parameter backward) in eval mode, against the same soft targets. Its step is scaled by
``min(floor(progress), ramp_epochs) / ramp_epochs``: epoch 0 trains on random noise in the ball only.
"""

from __future__ import annotations

import math

from gnr.eval.attacks import FGSM_STEP, pgd
from gnr.models import unwrap
from gnr.objectives.base import Objective, detached_parts, linear_ramp, soft_ce


class Adversarial(Objective):
    @property
    def passes(self) -> int:
        return 2 + 2 * self.attack_steps

    @property
    def attack_steps(self) -> int:
        return 1 if self.cfg.attack == "fgsm" else self.cfg.attack_steps

    def __call__(self, model, x, y_soft, progress):
        cfg = self.cfg
        scale = linear_ramp(math.floor(progress), cfg.ramp_epochs)
        step_size = scale * (FGSM_STEP * cfg.eps if cfg.attack == "fgsm" else cfg.attack_step_size)
        net = unwrap(model)
        was_training = net.training
        net.eval()
        try:
            x_adv = pgd(net, x, y_soft, eps=cfg.eps, step_size=step_size,
                        steps=self.attack_steps if scale > 0 else 0)
        finally:
            net.train(was_training)
        logits = model(x_adv)
        ce = soft_ce(logits, y_soft)
        # Training-batch error on x_adv (w.r.t. the dominant target class), from the training forward.
        success = (logits.argmax(1) != y_soft.argmax(1)).float().mean()
        return ce, detached_parts(x.device, ce=ce, alpha=scale, attack_success=success)
