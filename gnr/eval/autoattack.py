"""Standard L∞ AutoAttack, one attack at a time, with per-attack cost, progress and optional bf16.

pyautoattack's ``run_standard_evaluation`` runs APGD-CE, APGD-T, FAB-T and Square in turn, each on
the images that every earlier attack failed to break. :func:`run_autoattack` makes the same calls
one attack at a time (``attacks_to_run = [attack]`` on the still-robust images): every attack
re-seeds itself in ``perturb`` and sees the same images in the same order, so the per-image flags
are those of a single ``run_standard_evaluation`` call, while each attack's seconds and passes can
be reported as it finishes. A pass is one image through the model (forward) or back through it
(backward), counted by :class:`PassCounter`.

Precision ``bf16`` runs the attack iterations under bf16 autocast, then re-checks every image's
final adversarial example in fp32; an image whose fp32 verdict differs is attacked again in fp32.
The re-check can only correct verdicts bf16 reached; an image that bf16's attack failed to break
is not attacked again, so the default stays fp32.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
PRECISIONS = ("fp32", "bf16")


class PassCounter(nn.Module):
    """The wrapped model, counting images through its forward and back through its backward.

    A backward is counted by a hook on the logits, which fires once per backward pass that reaches
    them (``torch.autograd.grad`` or ``.backward``), with the number of images in the batch.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.forward_images = 0
        self.backward_images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.forward_images += x.shape[0]
        if out.requires_grad:
            out.register_hook(self._on_backward)
        return out

    def _on_backward(self, grad: torch.Tensor) -> None:
        self.backward_images += grad.shape[0]

    def counts(self) -> tuple[int, int]:
        return self.forward_images, self.backward_images


class Autocast(nn.Module):
    """``model`` under autocast to ``dtype``, returning fp32 logits (what pyautoattack's losses expect)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


@dataclass
class AttackStats:
    """One attack of the suite on one batch: ``images`` attacked, of which ``robust`` survived."""

    attack: str
    eps: float  # in 1/255
    images: int
    robust: int
    seconds: float
    forward: int  # image-passes, pyautoattack's per-call checks included
    backward: int
    precision: str = "fp32"


@dataclass
class Recheck:
    """The fp32 re-check of a bf16 run: ``agreed + disagreed == checked``; every disagreement is re-attacked
    in fp32, after which ``flipped`` verdicts differ from bf16's."""

    checked: int = 0
    agreed: int = 0
    disagreed: int = 0
    flipped: int = 0


@dataclass
class AutoAttackResult:
    flags: torch.Tensor  # per image: correct and not broken by any attack
    stats: list[AttackStats] = field(default_factory=list)
    recheck: Recheck | None = None


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seed: int,
                   log: list[str] | None = None, precision: str = "fp32",
                   on_attack: Callable[[AttackStats], None] | None = None) -> AutoAttackResult:
    """Standard L∞ AutoAttack of one batch at ``eps`` (pixels); ``precision`` fp32 (exact) or bf16 (re-checked)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    log = log if log is not None else []
    if precision == "fp32":
        flags, _, stats = _attack_in_turn(model, x, y, eps=eps, seed=seed, log=log, on_attack=on_attack)
        return AutoAttackResult(flags, stats)
    flags, x_adv, stats = _attack_in_turn(Autocast(model), x, y, eps=eps, seed=seed, log=log, on_attack=on_attack,
                                          label="bf16")
    with torch.no_grad():
        fp32 = model(x_adv).argmax(1) == y
    disagree = fp32 != flags
    recheck = Recheck(checked=len(y), agreed=int((~disagree).sum()), disagreed=int(disagree.sum()))
    final = fp32.clone()
    if disagree.any():
        idx = disagree.nonzero().flatten()
        again, _, more = _attack_in_turn(model, x[idx], y[idx], eps=eps, seed=seed, log=log, on_attack=on_attack)
        final[idx] = again
        stats += more
    recheck.flipped = int((final != flags).sum())
    return AutoAttackResult(final, stats, recheck)


def _attack_in_turn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seed: int, log: list[str],
                    on_attack, label: str = "fp32") -> tuple[torch.Tensor, torch.Tensor, list[AttackStats]]:
    """pyautoattack's standard suite, one ``run_standard_evaluation`` call per attack on the images still robust.

    Returns the robust flags, the final adversarial examples (the clean image where no attack
    succeeded) and each attack's stats.
    """
    from pyautoattack import AutoAttack, checks

    counter = PassCounter(model)
    aa = AutoAttack(counter, norm="Linf", eps=eps, version="standard", seed=seed, device=x.device)
    x_adv, flags = x.clone(), None
    with torch.no_grad():  # for pyautoattack's Square check; not counted against an attack
        accuracy = {"clean": (model(x).argmax(1) == y).float().mean().item()}
    stats = []
    with _collect_warnings(aa.logger, log):
        for attack in list(aa.attacks_to_run):
            idx = torch.arange(len(y), device=y.device) if flags is None else flags.nonzero().flatten()
            if len(idx) == 0:
                break
            aa.attacks_to_run = [attack]
            before, t0 = counter.counts(), time.perf_counter()
            x_sub, y_sub = aa.run_standard_evaluation(x[idx], y[idx], batch_size=len(idx))
            flags = torch.zeros_like(y, dtype=torch.bool) if flags is None else flags
            x_adv[idx], flags[idx] = x_sub, y_sub == y[idx]
            accuracy[attack] = flags.float().mean().item()
            after = counter.counts()
            event = AttackStats(attack, round(eps * 255, 6), images=len(idx), robust=int(flags.sum()),
                                seconds=time.perf_counter() - t0, forward=after[0] - before[0],
                                backward=after[1] - before[1], precision=label)
            stats.append(event)
            if on_attack:
                on_attack(event)
        checks.check_square_sr(accuracy, logger=aa.logger)
    return flags, x_adv, stats


@contextmanager
def _collect_warnings(logger: logging.Logger, into: list[str]):
    """pyautoattack's warnings (randomised / dynamic model, zero gradients, Square beating the white-box
    attacks) collected into ``into`` instead of printed mid-progress-bar."""

    class Collect(logging.Handler):
        def emit(self, record):
            into.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


# Forwards an attack makes besides its iterations, per image and call: pyautoattack's checks and clean
# pass (9), start and final predictions; measured with PassCounter on a model that no attack breaks.
CALL_FORWARDS = {"apgd-ce": 10, "apgd-t": 10, "fab-t": 10, "square": 12}


def upper_bound_passes(num_classes: int = 1000) -> dict[str, tuple[int, int]]:
    """(forward, backward) image-passes per image for each attack of the standard suite when it fails on
    that image, from the suite's settings: what an image that stays robust throughout costs."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(nn.Identity(), norm="Linf", eps=0.0, version="standard", seed=0)
    apgd_targets = min(aa.apgd_targeted.n_target_classes, num_classes - 1)
    fab_targets = min(aa.fab.n_target_classes, num_classes - 1)
    apgd = aa.apgd.n_restarts * (aa.apgd.n_iter + 1)
    apgd_t = apgd_targets * aa.apgd_targeted.n_restarts * (aa.apgd_targeted.n_iter + 1)
    fab_t = fab_targets * aa.fab.n_restarts * aa.fab.n_iter
    return {"apgd-ce": (apgd + CALL_FORWARDS["apgd-ce"], apgd),
            "apgd-t": (apgd_t + apgd_targets + CALL_FORWARDS["apgd-t"], apgd_t),
            "fab-t": (2 * fab_t + 3 * fab_targets + CALL_FORWARDS["fab-t"], fab_t),
            "square": (aa.square.n_queries + CALL_FORWARDS["square"], 0)}
