"""How a run presents itself in MLflow: its name and its description, from the config alone."""

import pytest

from gnr.config import build_config
from gnr.tracking import run_description, run_name


@pytest.mark.parametrize("preset, fields, name", [
    ("demo", {}, "gradnorm-test_convnext-gelu"),
    ("swin-b", {}, "gradnorm-swin_base_patch4_window7_224"),  # keeps its own activations
    ("resnet50", {"objective.method": "adversarial", "model.act": "silu"}, "adversarial-resnet50-silu"),
    ("demo", {"tracking.run_name": "mine"}, "mine"),
])
def test_run_name_comes_from_the_config(preset, fields, name):
    assert run_name(build_config(preset, fields=fields)) == name


def test_description_names_method_model_budget_batch_and_preset():
    cfg = build_config("resnet50", fields={"objective.method": "adversarial", "optim.batch_size": 32,
                                           "optim.accum_steps": 4})
    text = run_description(cfg)
    for part in ("**adversarial**, PGD-3", "`resnet50`", "GELU", "ε = 4/255", "batch 32 per process",
                 "4 accumulation steps", "preset `resnet50`"):
        assert part in text, (part, text)
