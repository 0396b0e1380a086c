"""Natural training: mean soft-target cross entropy."""

from __future__ import annotations

from gnr.objectives.base import Objective, detached_parts, soft_ce


class Natural(Objective):
    def __call__(self, model, x, y_soft, progress):
        ce = soft_ce(model(x), y_soft)
        return ce, detached_parts(x.device, ce=ce)
