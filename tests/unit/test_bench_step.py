import json

from tests.conftest import assert_one_line_error, run_gnr


def test_bench_step_reports_every_method_on_a_tiny_model():
    proc = run_gnr("bench", "step", "--model", "test_resnet", "--img-size", "32", "--batch-size", "8",
                   "--steps", "1", "--warmup", "1", "--device", "cpu", "--json", check=True)
    result = json.loads(proc.stdout)
    methods = result["methods"]
    assert list(methods) == ["natural", "gradnorm", "gradnorm-fd", "adversarial"]
    assert methods["natural"]["ratio_to_natural"] == 1.0
    assert {m: r["passes"] for m, r in methods.items()} == {"natural": 2, "gradnorm": 5, "gradnorm-fd": 5,
                                                          "adversarial": 8}
    assert all(r["sec_per_step"] > 0 for r in methods.values())
    assert result["dtype"] == "float32" and result["torch"] and result["timm"] and result["device"]


def test_bench_step_unknown_model_is_one_line():
    assert_one_line_error(run_gnr("bench", "step", "--model", "not_a_model"), "unknown model 'not_a_model'")


def test_bench_step_unknown_method_is_one_line():
    assert_one_line_error(run_gnr("bench", "step", "--model", "test_resnet", "--methods", "natural,pgd"),
                          "unknown method 'pgd'")
