"""scripts/gpu-cost.sh, the one device call that takes every GPU cost figure, runs end to end.

A GPU session has minutes of device time and no network: a script that stops halfway costs a
machine start. Here it runs its whole sequence on CPU with tiny models (GNR_COST_SMOKE=1): every
`gnr bench step` after (with its top kernels) / before / without attention levels, the demo training
run, `gnr bench eval` fp32 and bf16, the summary.
"""

import json
import os
import subprocess

import pytest

from tests.conftest import BIN, ROOT

pytestmark = pytest.mark.integration


def test_the_gpu_cost_script_runs_every_measurement_and_summarises_them(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(GNR_COST_SMOKE="1", OUT=str(out), GNR_HOME=str(tmp_path / "home"), PATH=f"{BIN}:{env['PATH']}")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-cost.sh")], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1500)
    assert proc.returncode == 0, proc.stdout
    steps = ["step-test_vit-after", "step-test_vit-before", "step-test_vit-after-no-attention",
             "step-test_resnet-after", "step-test_resnet-before"]
    for name in [*steps, "train-demo", "eval-fp32", "eval-bf16"]:
        assert f"gpu-cost: {name} rc=0 " in proc.stdout, proc.stdout
        assert (out / f"{name}.json").is_file()
    after, before, no_attention = (json.loads((out / f"{s}.json").read_text()) for s in steps[:3])
    assert before["fast_layers"] == {} and after["fast_layers"]["Attention"] > 0
    assert "Attention" not in no_attention["fast_layers"] and no_attention["fast_layers"]["LayerNorm"] > 0
    for model in ("test_vit", "test_resnet"):  # each model's top kernels of one gradnorm step, at the end
        assert f"{model} (4): top kernels of one gradnorm step, CPU self time of aten ops" in proc.stdout
    for name in steps:  # one table row per measurement, in the order the files sort
        model, variant = name.removeprefix("step-").split("-", 1)
        assert f"| {model} (4) | {variant} |" in proc.stdout
    bf16 = json.loads((out / "eval-bf16.json").read_text())
    assert [e["eps_255"] for e in bf16["eps"]] == [4.0] and "recheck" in bf16["eps"][0]
    assert proc.stdout.count("| bf16 (re-check:") == 1 and proc.stdout.count("| fp32 |") == 1
    assert proc.stdout.rstrip().endswith("no level-2 kernel ran unfused")  # CPU runs level 2 eagerly by design
    # On a GPU, a level 2 that fell back to eager would make "after" a timing of the wrong path: flagged.
    (out / "step-test_vit-after.log").write_text("W1126 torch._dynamo hit config.recompile_limit (8)\n")
    summary = subprocess.run([str(BIN / "python"), str(ROOT / "scripts" / "gpu_cost_summary.py"), str(out)],
                             capture_output=True, text=True, check=True).stdout
    assert summary.rstrip().endswith("WARNING step-test_vit-after.log: W1126 torch._dynamo hit config.recompile_limit (8)")
