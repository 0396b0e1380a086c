"""What an evaluation reports while it runs (rank 0): the plan, each attack on each batch, each batch."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class BatchProgress:
    """Reported after each batch on rank 0 (its own share of the images)."""

    done: int
    total: int
    images_per_s: float
    accuracy: dict[str, float]
    resumed: bool


@dataclass
class EvalPlan:
    """Reported once on rank 0 before the first batch: what will run and what it should cost.

    The projection is (passes per image, from the attacks' settings) × (seconds per forward and
    backward image of this model at this batch size, timed here). AutoAttack's cost depends on how
    many images stay robust, so it is a range: every image broken by APGD-CE .. every image robust.
    """

    images: int  # this rank's share
    world: int
    batch_size: int
    device: str
    settings: dict  # compile, channels_last, precision
    pass_seconds: dict[str, float]
    projected_s: tuple[float, float]  # (least, most), for this rank's share


@dataclass
class AttackProgress:
    """Reported on rank 0 after each attack of the AutoAttack suite on a batch, and after each other measure."""

    measure: str  # e.g. autoattack/eps4
    attack: str  # apgd-ce | apgd-t | fab-t | square, or the measure's name
    done: int  # images of this rank's share through this attack
    total: int
    robust: int  # of those, still robust after it
    elapsed_s: float
    eta_s: float | None


class ProgressTracker:
    """Turns finished attacks into :class:`AttackProgress` events: images through each attack so far,
    how many stayed robust, and an ETA from the seconds per computed image."""

    def __init__(self, total: int, on_event):
        self.total, self.on_event = total, on_event
        self.started = time.perf_counter()
        self.done: dict[str, int] = {}  # measure -> images of finished batches
        self.robust: dict[str, int] = {}
        self.images, self.computed, self.computed_s = 0, 0, 0.0
        self.batch_started = self.started

    def report(self, measure: str, attack: str, batch_images: int, robust: int, fraction: float) -> None:
        """``fraction`` of the current batch's work is done; ``robust`` of its images survive ``attack``."""
        if not self.on_event:
            return
        now = time.perf_counter()
        work = self.computed + fraction * batch_images
        spent = self.computed_s + now - self.batch_started
        left = self.total - self.images - fraction * batch_images
        self.on_event(AttackProgress(measure, attack, self.done.get(measure, 0) + batch_images, self.total,
                                     self.robust.get(measure, 0) + robust, now - self.started,
                                     spent / work * max(left, 0) if work else None))

    def batch_done(self, images: int, *, computed: bool, robust: dict[str, int]) -> None:
        now = time.perf_counter()
        self.images += images
        if computed:
            self.computed += images
            self.computed_s += now - self.batch_started
        for name, count in robust.items():
            self.done[name] = self.done.get(name, 0) + images
            self.robust[name] = self.robust.get(name, 0) + count
        self.batch_started = now
