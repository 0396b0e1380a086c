"""Standard L∞ AutoAttack, one attack at a time, with per-attack cost, progress and optional bf16.

pyautoattack's ``run_standard_evaluation`` checks the model (randomised? probabilities? dynamic?),
then runs APGD-CE, APGD-T, FAB-T and Square in turn, each on the images that every earlier attack
failed to break. :func:`run_autoattack` runs the checks once and then each attack's ``perturb`` on
the still-robust images, as that loop does for a batch of the same size (pyautoattack 0.2.0): every
attack re-seeds itself in ``perturb`` and sees the same images in the same order, so the per-image
flags are those of a single ``run_standard_evaluation`` call (a test compares them), while each
attack is a phase of its own whose seconds and passes are reported as it finishes. Calling
``run_standard_evaluation`` once per attack would give the same flags but repeat its checks and
clean pass for every attack (8 forwards per image each time).

A pass is one image through the model (forward) or back through it (backward), counted by
:class:`PassCounter` per call and batch size, so that what the passes alone cost can be measured
(:func:`gnr.eval.speed.model_seconds`) and set against each attack's wall time.

Precision ``bf16`` runs the attack iterations under bf16 autocast, then re-checks every image's
final adversarial example in fp32; an image whose fp32 verdict differs is attacked again in fp32.
The re-check can only correct verdicts bf16 reached; an image that bf16's attack failed to break
is not attacked again, so the default stays fp32.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from gnr.eval.phases import Phases

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
PRECISIONS = ("fp32", "bf16")


class PassCounter(nn.Module):
    """The wrapped model, counting images through its forward and back through its backward, and the
    calls of each at each batch size.

    A backward is counted by a hook on the logits, which fires once per backward pass that reaches
    them (``torch.autograd.grad`` or ``.backward``), with the number of images in the batch.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.forward_images = 0
        self.backward_images = 0
        self.forward_calls: Counter[int] = Counter()  # batch size -> calls
        self.backward_calls: Counter[int] = Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.forward_images += x.shape[0]
        self.forward_calls[x.shape[0]] += 1
        if out.requires_grad:
            out.register_hook(self._on_backward)
        return out

    def _on_backward(self, grad: torch.Tensor) -> None:
        self.backward_images += grad.shape[0]
        self.backward_calls[grad.shape[0]] += 1

    def counts(self) -> tuple[int, int]:
        return self.forward_images, self.backward_images

    def snapshot(self) -> tuple[Counter, Counter]:
        return Counter(self.forward_calls), Counter(self.backward_calls)

    def progress(self) -> str:
        return f"{self.forward_images} forward and {self.backward_images} backward image-passes so far"


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
    forward: int  # image-passes; the first attack's include pyautoattack's checks of the model
    backward: int
    precision: str = "fp32"
    forward_calls: dict[int, int] = field(default_factory=dict)  # batch size -> calls
    backward_calls: dict[int, int] = field(default_factory=dict)


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
    outcome: list[str] = field(default_factory=list)  # per image: misclassified, the attack that broke it, or
    # robust, in the precision asked for (before bf16's re-check)


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seed: int,
                   log: list[str] | None = None, precision: str = "fp32",
                   on_attack: Callable[[AttackStats], None] | None = None,
                   phases: Phases | None = None) -> AutoAttackResult:
    """Standard L∞ AutoAttack of one batch at ``eps`` (pixels); ``precision`` fp32 (exact) or bf16 (re-checked).
    Each attack is a phase of ``phases``; its stats go to ``on_attack`` as it ends."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    log = log if log is not None else []
    phases = phases or Phases()
    run = dict(eps=eps, seed=seed, log=log, on_attack=on_attack, phases=phases)
    if precision == "fp32":
        flags, _, stats, outcome = _attack_in_turn(model, x, y, **run)
        return AutoAttackResult(flags, stats, outcome=outcome)
    flags, x_adv, stats, outcome = _attack_in_turn(Autocast(model), x, y, **run, label="bf16")
    with phases.phase(f"fp32 re-check of {len(y)} bf16 verdicts"), torch.no_grad():
        fp32 = model(x_adv).argmax(1) == y
    disagree = fp32 != flags
    recheck = Recheck(checked=len(y), agreed=int((~disagree).sum()), disagreed=int(disagree.sum()))
    final = fp32.clone()
    if disagree.any():
        idx = disagree.nonzero().flatten()
        again, _, more, _ = _attack_in_turn(model, x[idx], y[idx], **run)
        final[idx] = again
        stats += more
    recheck.flipped = int((final != flags).sum())
    return AutoAttackResult(final, stats, recheck, outcome)


def _attack_in_turn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seed: int, log: list[str],
                    on_attack, phases: Phases, label: str = "fp32"
                    ) -> tuple[torch.Tensor, torch.Tensor, list[AttackStats], list[str]]:
    """pyautoattack's standard suite on one batch: its checks, then each attack on the images still robust.

    Returns the robust flags, the final adversarial examples (the clean image where no attack
    succeeded), each attack's stats and each image's outcome.
    """
    from pyautoattack import AutoAttack, checks

    counter = PassCounter(model)
    aa = AutoAttack(counter, norm="Linf", eps=eps, version="standard", seed=seed, device=x.device)
    x_adv = x.clone()
    with torch.no_grad():  # not counted: the clean pass that run_standard_evaluation makes besides its checks
        flags = model(x).argmax(1) == y
    outcome = ["robust" if f else "misclassified" for f in flags.tolist()]
    accuracy = {"clean": flags.float().mean().item()}
    stats = []
    eps_255 = round(eps * 255, 6)
    with _collect_warnings(aa.logger, log):
        before = counter.counts(), counter.snapshot(), time.perf_counter()
        checks.check_randomized(aa.get_logits, x, y, bs=len(y), logger=aa.logger)  # counted with the first attack
        n_classes = checks.check_range_output(aa.get_logits, x, logger=aa.logger)
        checks.check_dynamic(aa.model, x, False, logger=aa.logger)
        checks.check_n_classes(n_classes, aa.attacks_to_run, aa.apgd_targeted.n_target_classes,
                               aa.fab.n_target_classes, logger=aa.logger)
        for attack in aa.attacks_to_run:
            idx = flags.nonzero().flatten()
            if len(idx) == 0:
                break
            name = f"{attack} at {eps_255:g}/255" + ("" if label == "fp32" else f" ({label})")
            with phases.phase(f"{name} on {len(idx)} images", counter.progress), torch.no_grad():
                x_attack = _perturb(aa, attack, x[idx], y[idx])
                broken = counter(x_attack).argmax(1) != y[idx]
            x_adv[idx[broken]] = x_attack[broken]
            flags[idx[broken]] = False
            for i in idx[broken].tolist():
                outcome[i] = attack
            accuracy[attack] = flags.float().mean().item()
            (f0, b0), (fc0, bc0), t0 = before
            (f1, b1), (fc1, bc1) = counter.counts(), counter.snapshot()
            event = AttackStats(attack, eps_255, images=len(idx), robust=int(flags.sum()),
                                seconds=time.perf_counter() - t0, forward=f1 - f0, backward=b1 - b0, precision=label,
                                forward_calls=dict(fc1 - fc0), backward_calls=dict(bc1 - bc0))
            stats.append(event)
            if on_attack:
                on_attack(event)
            before = (f1, b1), (fc1, bc1), time.perf_counter()
        checks.check_square_sr(accuracy, logger=aa.logger)
    return flags, x_adv, stats, outcome


def _perturb(aa, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One attack of the suite on ``x``, set up as ``run_standard_evaluation`` sets it up."""
    if attack == "apgd-ce":
        aa.apgd.loss, aa.apgd.seed = "ce", aa.get_seed()
        return aa.apgd.perturb(x, y)
    if attack == "apgd-t":
        aa.apgd_targeted.seed = aa.get_seed()
        return aa.apgd_targeted.perturb(x, y)
    if attack == "fab-t":
        aa.fab.targeted, aa.fab.n_restarts, aa.fab.seed = True, 1, aa.get_seed()
        return aa.fab.perturb(x, y)
    if attack == "square":
        aa.square.seed = aa.get_seed()
        return aa.square.perturb(x, y)
    raise ValueError(f"not an attack of the standard suite: {attack}")


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


# Forwards an attack makes besides its iterations, per image: its start and final predictions (Square:
# also its first query and the result of its one restart), and pyautoattack's checks of the model
# (5 + 1 + 1, counted with the first attack); measured with PassCounter on a model that no attack breaks.
CHECK_FORWARDS = 7
CALL_FORWARDS = {"apgd-ce": 2 + CHECK_FORWARDS, "apgd-t": 2, "fab-t": 2, "square": 4}


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
