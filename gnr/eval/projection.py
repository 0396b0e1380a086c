"""What an evaluation will cost: passes per image of each measure × the model's measured seconds per pass."""

from __future__ import annotations

from torch import nn

from gnr import distributed
from gnr.config import RunConfig
from gnr.eval import speed
from gnr.eval.autoattack import upper_bound_passes
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
