"""What every objective shares: the call shape, the soft-target CE, ramps.

An objective is called as ``objective(model, x, y_soft, progress) -> (loss, parts)``:

- ``model``: the training model in train mode (possibly DDP / compile wrapped), taking pixels;
- ``x``: pixels in [0, 1]; ``y_soft``: [B, C] soft targets (mixup / label smoothing applied);
- ``progress``: epochs elapsed as a float (epoch + fraction of the epoch), which drives ramps.

``loss`` is what the trainer calls ``backward()`` on; ``parts`` are detached 0-d tensors on the
loss's device (no ``.item()``, so no device sync per step), keyed among ``ce``, ``penalty``,
``grad_l1``, ``alpha`` and ``attack_success``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from gnr.config import ObjectiveConfig

Parts = dict[str, torch.Tensor]

soft_ce = SoftTargetCrossEntropy()


class Objective(ABC):
    """Base of the objectives; a subclass implements ``__call__``."""

    passes: int = 2
    """Network passes per step (a forward or a backward through the network each), PAPER.md Table 3."""
    double_backward: bool = False
    """Differentiates through an input gradient: needs math attention, cannot run under torch.compile."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    @abstractmethod
    def __call__(self, model: nn.Module, x: torch.Tensor, y_soft: torch.Tensor,
                 progress: float) -> tuple[torch.Tensor, Parts]:
        """The loss to back-propagate and its detached parts for logging."""


def linear_ramp(progress: float, epochs: float) -> float:
    """0 at the start, 1 after ``epochs`` (immediately 1 when ``epochs`` is 0)."""
    return 1.0 if epochs <= 0 else min(1.0, progress / epochs)


def input_leaf(x: torch.Tensor) -> torch.Tensor:
    """A leaf view of the batch to differentiate w.r.t. (the caller's tensor keeps requires_grad=False)."""
    return x.detach().requires_grad_(True)


def detached_parts(device: torch.device, **values: torch.Tensor | float) -> Parts:
    return {k: v.detach() if isinstance(v, torch.Tensor) else torch.full((), v, device=device)
            for k, v in values.items()}
