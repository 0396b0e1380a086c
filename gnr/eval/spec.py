"""What an evaluation measures: attacks × budgets (:class:`EvalSpec`, one :class:`Measure` per column of
the per-image results), parsed from the command line, and the Carlini et al. (2019) checks across them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from gnr.errors import GnrError

ATTACK_RE = re.compile(r"^(clean|pgd([1-9]\d*)|autoattack)$")
# Carlini et al. 2019: an unbounded-enough attack must reach ~0 accuracy; more steps or a stronger
# attack must not raise it. SLACK absorbs random-start noise between two attacks.
SANITY_EPS = 64.0
SANITY_MAX_ACC = 0.05
SLACK = 0.005


def pgd_step(eps: float) -> float:
    """PGD step in pixels for a budget ``eps`` in pixels: the paper's 1/255 (PAPER.md §4), but ε/4 where
    that is larger, so a 10-step attack can cross the whole ball at the large sanity ε."""
    return max(1 / 255, eps / 4)


@dataclass(frozen=True)
class Measure:
    """One column of the per-image results: an attack at a budget ``eps`` (in 1/255)."""

    attack: str
    eps: float = 0.0

    @property
    def name(self) -> str:
        return "clean" if self.attack == "clean" else f"{self.attack}/eps{self.eps:g}"

    @property
    def sanity(self) -> bool:
        return self.eps >= SANITY_EPS

    @classmethod
    def parse(cls, name: str) -> "Measure":
        """The measure a column is named after (the inverse of :attr:`name`)."""
        attack, _, eps = name.partition("/eps")
        return cls(attack, float(eps) if eps else 0.0)


def parse_attacks(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    bad = [n for n in names if not ATTACK_RE.match(n)]
    if bad or not names:
        raise GnrError(f"unknown attack '{(bad or [''])[0]}' (choose from clean, pgd<steps> e.g. pgd10, autoattack)")
    return names


def parse_eps(values: Iterable[str]) -> tuple[float, ...]:
    """Budgets in 1/255 (``"4"`` or ``"4/255"``)."""
    out = []
    for v in values:
        text = v.strip().removesuffix("/255")
        try:
            eps = float(text)
        except ValueError:
            raise GnrError(f"--eps takes numbers in 1/255, e.g. 1,2,4 (got '{v.strip()}')") from None
        if not 0 < eps <= 255:
            raise GnrError(f"--eps must be in (0, 255] (in 1/255), got {v.strip()}")
        out.append(eps)
    if not out:
        raise GnrError("--eps needs at least one budget, e.g. 4")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: attacks × budgets on which images, with which weights."""

    attacks: tuple[str, ...] = ("clean", "pgd10", "autoattack")
    eps: tuple[float, ...] = (1.0, 2.0, 4.0)
    weights: str = "ema"
    data: str | None = None
    split: str | None = None
    ids: str | None = None
    n: int | None = None
    batch_size: int | None = None  # None: from free GPU memory (CUDA), else eval_speed.DEFAULT_BATCH
    device: str = "auto"
    seed: int = 0
    compile: bool | None = None  # None: on CUDA
    precision: str = "fp32"  # or bf16: AutoAttack's iterations in bf16, every verdict re-checked in fp32

    def measures(self) -> list[Measure]:
        """Requested columns, plus PGD-10 at ε = 64/255 for the large-ε sanity check."""
        out = [Measure("clean")] if "clean" in self.attacks else []
        out += [Measure(a, e) for a in self.attacks if a != "clean" for e in self.eps]
        if any(a != "clean" for a in self.attacks):
            out.append(Measure("pgd10", SANITY_EPS))
        return list(dict.fromkeys(out))



def sanity_warnings(accuracy: dict[str, float], measures: list[Measure]) -> list[str]:
    """Carlini et al. 2019 checks on the aggregate accuracies; one readable line per failure."""
    out = []
    for m in measures:
        if m.sanity and accuracy[m.name] > SANITY_MAX_ACC:
            out.append(f"{m.name}: accuracy {accuracy[m.name]:.1%} at ε={m.eps:g}/255 should be ~0 "
                       "(gradient masking or a broken attack?)")
    for eps in sorted({m.eps for m in measures if m.attack != "clean"}):
        pgds = sorted((int(m.attack[3:]), m.name) for m in measures if m.eps == eps and m.attack.startswith("pgd"))
        for (_, weak), (_, strong) in zip(pgds, pgds[1:]):
            if accuracy[strong] > accuracy[weak] + SLACK:
                out.append(f"{strong} ({accuracy[strong]:.1%}) is above {weak} ({accuracy[weak]:.1%}): "
                           "more steps must not help the model")
        aa = f"autoattack/eps{eps:g}"
        if aa in accuracy and pgds:
            best_pgd = min(pgds, key=lambda p: accuracy[p[1]])[1]
            if accuracy[aa] > accuracy[best_pgd] + SLACK:
                out.append(f"{aa} ({accuracy[aa]:.1%}) is above {best_pgd} ({accuracy[best_pgd]:.1%}): "
                           "AutoAttack should be the stronger attack")
    return out
