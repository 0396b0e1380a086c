"""Per image, one measure's verdict: classified correctly, and still so under the measure's attack."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from gnr.eval.attacks import pgd
from gnr.eval.autoattack import Recheck, run_autoattack
from gnr.eval.phases import Phases
from gnr.eval.spec import Measure, pgd_step


def predicts(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def robust_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, measure: Measure, seed: int,
                   aa_log: list[str], *, precision: str = "fp32", on_attack=None,
                   rechecks: list[Recheck] | None = None, phases: Phases | None = None) -> torch.Tensor:
    """Per image: is it classified correctly and does it survive ``measure``'s attack?

    AutoAttack runs each attack of its suite as a phase of ``phases``, reports its stats to ``on_attack``
    and, in bf16, its fp32 re-check to ``rechecks``.
    """
    if measure.attack == "clean":
        return predicts(model, x, y)
    eps = measure.eps / 255
    if measure.attack == "autoattack":
        result = run_autoattack(model, x, y, eps=eps, seed=seed, log=aa_log, precision=precision, on_attack=on_attack,
                                phases=phases)
        if result.recheck is not None and rechecks is not None:
            rechecks.append(result.recheck)
        return result.flags
    steps = int(measure.attack.removeprefix("pgd"))
    x_adv = pgd(model, x, y, eps=eps, step_size=pgd_step(eps), steps=steps, random_start=True)
    return predicts(model, x, y) & predicts(model, x_adv, y)


@contextmanager
def seeded(seed: int, device: torch.device):
    """A fixed RNG stream for one batch (PGD random starts), leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
