"""Training objectives, one module each, all called as ``objective(model, x, y_soft, progress)``.

See :mod:`gnr.objectives.base` for the call contract. A new regulariser is one new module plus one
line in :data:`OBJECTIVES`.
"""

from gnr.config import ObjectiveConfig
from gnr.objectives.adversarial import Adversarial
from gnr.objectives.base import Objective, Parts
from gnr.objectives.edge import Edge
from gnr.objectives.gradnorm import GradNorm
from gnr.objectives.gradnorm_fd import GradNormFD
from gnr.objectives.natural import Natural

OBJECTIVES: dict[str, type[Objective]] = {
    "natural": Natural,
    "gradnorm": GradNorm,
    "gradnorm-fd": GradNormFD,
    "adversarial": Adversarial,
    "edge": Edge,
}


def build_objective(cfg: ObjectiveConfig) -> Objective:
    return OBJECTIVES[cfg.method](cfg)


__all__ = ["OBJECTIVES", "Objective", "Parts", "build_objective"]
