"""What an evaluation will cost: passes per image of each measure × the model's measured seconds per pass."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from gnr import distributed
from gnr.config import RunConfig
from gnr.eval import speed
from gnr.eval.autoattack import CHECK_FORWARDS, STANDARD, Autocast, AutoAttackResult, upper_bound_passes
from gnr.eval.phases import Phases
from gnr.eval.progress import EvalPlan
from gnr.eval.spec import EvalSpec, Measure


def plan(model: nn.Module, cfg: RunConfig, spec: EvalSpec, images: int, dist: distributed.Dist,
         settings: dict) -> EvalPlan:
    """Time a batch's forward and backward (the real batch on CUDA, at most 8 images elsewhere, where time
    per image hardly depends on the batch), then project this rank's cost (see :class:`EvalPlan`)."""
    probe = min(spec.batch_size, images) if dist.device.type == "cuda" else min(spec.batch_size, images, 8)
    cost = speed.pass_seconds(model, cfg.data.img_size, probe, dist.device, reps=1)
    least, most = 0.0, 0.0
    for m in spec.measures():
        low, high = measure_passes(m, cfg.data.num_classes)
        least += sum(speed.project_seconds(low, images, cost).values())
        most += sum(speed.project_seconds(high, images, cost).values())
    return EvalPlan(images=images, world=dist.world, batch_size=spec.batch_size, device=str(dist.device),
                    settings=settings, pass_seconds=cost, projected_s=(least, most))


def measure_passes(measure: Measure, num_classes: int) -> tuple[dict, dict]:
    """(forward, backward) passes per image of one measure, least and most: AutoAttack costs least when
    APGD-CE breaks every image and most when every image stays robust."""
    if measure.attack == "clean":
        one = {"clean": (1, 0)}
        return one, one
    if measure.attack == "autoattack":
        most = upper_bound_passes(num_classes)
        return {"apgd-ce": most["apgd-ce"]}, most
    steps = int(measure.attack.removeprefix("pgd"))
    one = {measure.name: (steps + 2, steps)}  # clean and final predictions, one gradient per step
    return one, one


def work(passes: dict[str, tuple[int, int]]) -> int:
    """Forward-pass equivalents (a backward costs about two forwards)."""
    return sum(f + 2 * b for f, b in passes.values())


def add_efficiency(rows: list[dict], model: nn.Module, img_size: int, device, phases: Phases) -> None:
    """Per attack row (see :func:`gnr.eval.results.attack_table`): ``model_s``, what its passes alone cost
    (each call × the model's measured time at that batch size, in the row's precision), and
    ``efficiency``, that over the attack's wall time. The rest is the attacks' own work: their
    arithmetic between passes, host syncs, recompiles."""
    for precision in sorted({r["precision"] for r in rows}):
        mine = [r for r in rows if r["precision"] == precision]
        sizes = speed.timed_batches({int(b) for r in mine for b in (*r["forward_calls"], *r["backward_calls"])})
        if not sizes:
            continue
        timed = Autocast(model) if precision == "bf16" else model
        with phases.phase(f"model-pass probe ({precision}) at {len(sizes)} batch sizes, {sizes[0]}..{sizes[-1]}"):
            times = speed.pass_times(timed, img_size, sizes, device)
        for r in mine:
            r["model_s"] = speed.model_seconds(r["forward_calls"], r["backward_calls"], times)
            r["efficiency"] = r["model_s"] / r["seconds"] if r["seconds"] > 0 else None


# -- projecting a full evaluation from a sample ---------------------------------------------------

Z95 = 1.96  # normal approximation to the stratified mean


@dataclass
class Stratum:
    """Images of the pool alike in how robust they look before any attack (their clean logit margin)."""

    name: str
    population: list[int]  # indices into the pool
    sample: list[int] = field(default_factory=list)


def margin_strata(logits: torch.Tensor, y: torch.Tensor, bands: int = 3) -> list[Stratum]:
    """The misclassified images, then the correctly classified ones in ``bands`` bands of clean margin
    (true logit minus the largest other): a wide margin tends to survive more attacks, and an image
    that survives them all costs some 70 times one that APGD-CE breaks."""
    correct = logits.argmax(1) == y
    other = logits.clone()
    other[torch.arange(len(y)), y] = -float("inf")
    margin = logits[torch.arange(len(y)), y] - other.max(1).values
    order = [i for i in margin.argsort().tolist() if correct[i]]
    strata = [Stratum("misclassified", [i for i in range(len(y)) if not correct[i]])]
    for k in range(bands):
        part = order[k * len(order) // bands:(k + 1) * len(order) // bands]
        strata.append(Stratum(f"margin band {k + 1}/{bands}", part))
    return [s for s in strata if s.population]


def allocate(strata: list[Stratum], n: int, seed: int = 0) -> None:
    """Draw ``n`` images in all (fewer if the pool is smaller): proportional to each stratum's size, but at
    least two from each stratum where ``n`` allows, so that every stratum's spread can be estimated."""
    sizes = [len(s.population) for s in strata]
    n = min(n, sum(sizes))
    least = 2 if n >= 2 * len(strata) else 1 if n >= len(strata) else 0
    take = [min(least, size) for size in sizes]
    left = n - sum(take)
    if left > 0:
        share = [left * size / sum(sizes) for size in sizes]
        extra = [min(int(q), size - t) for q, size, t in zip(share, sizes, take)]
        order = sorted(range(len(strata)), key=lambda h: share[h] - int(share[h]), reverse=True)
        while sum(extra) < left and any(t + e < size for t, e, size in zip(take, extra, sizes)):
            for h in order:
                if sum(extra) < left and take[h] + extra[h] < sizes[h]:
                    extra[h] += 1
        take = [t + e for t, e in zip(take, extra)]
    g = torch.Generator().manual_seed(seed)
    for s, k in zip(strata, take):
        s.sample = [s.population[i] for i in torch.randperm(len(s.population), generator=g)[:k].tolist()]


def stratified_mean(values: list[list[float]], population: list[int]) -> tuple[float, float | None]:
    """The stratified estimate of the mean over the pool and the half-width of its 95% interval (normal
    approximation, finite-population correction): stratum ``h`` has ``population[h]`` images, of which
    ``values[h]`` are the sampled ones' values. No interval (None) where a stratum is known from a single
    image of several."""
    weights = [size / sum(population) for size in population]
    mean = sum(w * statistics.fmean(v) for w, v in zip(weights, values))
    if any(len(v) == 1 < size for v, size in zip(values, population)):
        return mean, None
    var = sum(w * w * (1 - len(v) / size) * statistics.variance(v) / len(v)
              for w, v, size in zip(weights, values, population) if len(v) > 1)
    return mean, Z95 * math.sqrt(var)


def image_passes(result: AutoAttackResult, num_classes: int) -> list[dict[tuple[str, str], tuple[float, float]]]:
    """Per image of one AutoAttack batch: the (forward, backward) passes spent on it by each (attack, precision).

    An image that survives an attack costs that attack's fixed number of passes
    (:func:`gnr.eval.autoattack.upper_bound_passes`; a test checks it); the images it breaks share what
    is left of its counted passes; pyautoattack's checks (counted with APGD-CE) cost every image of the
    batch the same. The sum over the images is the counted total. A bf16 run adds its fp32 re-check
    (one forward per image) and the fp32 re-attack of its disagreements, spread over the batch."""
    n = len(result.outcome)
    bound = upper_bound_passes(num_classes)
    out: list[dict[tuple[str, str], tuple[float, float]]] = [{} for _ in range(n)]

    def add(i: int, key: tuple[str, str], forward: float, backward: float) -> None:
        f, b = out[i].get(key, (0.0, 0.0))
        out[i][key] = (f + forward, b + backward)

    main = [s for s in result.stats if s.precision != "fp32" or result.recheck is None]
    attacked = [i for i in range(n) if result.outcome[i] != "misclassified"]
    for s in main:
        key = (s.attack, s.precision)
        fixed_f, fixed_b = bound[s.attack]
        forward = s.forward
        if s.attack == STANDARD[0]:
            fixed_f, forward = fixed_f - CHECK_FORWARDS, forward - CHECK_FORWARDS * n
            for i in range(n):
                add(i, key, CHECK_FORWARDS, 0)
        broken = [i for i in attacked if result.outcome[i] == s.attack]
        attacked = [i for i in attacked if result.outcome[i] != s.attack]
        for i in attacked:
            add(i, key, fixed_f, fixed_b)
        for i in broken:
            add(i, key, (forward - fixed_f * len(attacked)) / len(broken), (s.backward - fixed_b * len(attacked)) / len(broken))
    if result.recheck is not None:
        again = [s for s in result.stats if s.precision == "fp32"]
        for i in range(n):
            add(i, ("recheck", "fp32"), 1, 0)
            for s in again:
                add(i, (s.attack, "fp32"), s.forward / n, s.backward / n)
    return out
