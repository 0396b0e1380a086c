import json

import pytest
import torch

from gnr.bench.step import peak_tflops

from tests.conftest import assert_one_line_error, run_gnr


def test_bench_step_measures_autograds_own_double_backward_on_request():
    proc = run_gnr("bench", "step", "--model", "test_resnet", "--act", "gelu", "--img-size", "32", "--batch-size", "4",
                   "--methods", "gradnorm", "--steps", "1", "--warmup", "0", "--device", "cpu",
                   "--no-fast-double-backward", "--json", check=True)
    assert json.loads(proc.stdout)["fast_layers"] == {}


def test_bench_step_json_reports_the_cost_of_every_method_on_a_tiny_model():
    proc = run_gnr("bench", "step", "--model", "test_resnet", "--act", "gelu", "--img-size", "32", "--batch-size", "8",
                   "--steps", "1", "--warmup", "1", "--device", "cpu", "--peak-tflops", "0.5", "--json", check=True)
    result = json.loads(proc.stdout)
    methods = result["methods"]
    assert list(methods) == ["natural", "gradnorm", "gradnorm-fd", "adversarial"]
    assert {m: r["passes"] for m, r in methods.items()} == {"natural": 2, "gradnorm": 5, "gradnorm-fd": 4,
                                                          "adversarial": 8}
    assert result["dtype"] == "fp32" and result["torch"] and result["timm"] and result["device"]
    assert result["peak_tflops"] == 0.5 and result["peak_source"] == "--peak-tflops" and result["memory"]
    assert result["fast_layers"] == {"BatchNorm2d": 15, "Conv2d": 15, "GELU": 12}  # test_resnet, its ReLUs swapped for GELU
    natural = methods["natural"]
    assert natural["ratio_to_natural"] == natural["flop_ratio_to_natural"] == 1.0
    for r in methods.values():
        assert r["sec_per_step"] > 0 and r["gflop_per_image"] > 0 and r["peak_memory_mib"] > 0
        assert r["tflops"] == pytest.approx(r["gflop_per_image"] * 8 / 1e3 / r["sec_per_step"])
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)
        assert r["nonmatmul_mb_per_image"] > 0 and r["nonmatmul_ops"] > 0 and not r["compiled"]
    # Counted, not assumed: the double backward about doubles natural's FLOPs, PGD-3 about triples them.
    assert 1.8 < methods["gradnorm"]["flop_ratio_to_natural"] < 2.4
    assert 2.5 < methods["adversarial"]["flop_ratio_to_natural"] < 3.5
    assert methods["gradnorm"]["nonmatmul_ops"] > 2 * natural["nonmatmul_ops"]
    assert methods["gradnorm"]["peak_memory_mib"] > natural["peak_memory_mib"]
    fd = methods["gradnorm-fd"]  # fp32: within a percent, a ± pair closer than either step
    assert abs(fd["fd_rel_error"]) < 0.01 and fd["fd_pair_error"] < fd["fd_grad_error"] < 0.1
    assert "fd_rel_error" not in natural


def test_bench_step_table_by_default_with_mfu_na_on_cpu():
    proc = run_gnr("bench", "step", "--model", "test_resnet", "--img-size", "32", "--batch-size", "4",
                   "--steps", "1", "--warmup", "0", "--device", "cpu", "--methods", "natural", check=True,
                   env={"COLUMNS": "200"})
    assert "MFU" in proc.stdout and "n/a" in proc.stdout and "natural" in proc.stdout


def test_bench_step_unknown_model_is_one_line():
    assert_one_line_error(run_gnr("bench", "step", "--model", "not_a_model"), "unknown model 'not_a_model'")


def test_bench_step_unknown_method_is_one_line():
    assert_one_line_error(run_gnr("bench", "step", "--model", "test_resnet", "--methods", "natural,pgd"),
                          "unknown method 'pgd'")


def test_bench_step_odd_batch_is_one_line():
    assert_one_line_error(run_gnr("bench", "step", "--model", "test_resnet", "--batch-size", "7"), "must be even")


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4), ("NVIDIA H100 PCIe", torch.bfloat16, 756.5),
    ("NVIDIA H200", None, 66.9), ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0), ("NVIDIA L40S", None, 91.6),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, None), ("Tesla V100-PCIE-32GB", torch.float16, 112.0),
    ("Some Future GPU", torch.bfloat16, None),
])
def test_datasheet_peaks_by_device_name_and_dtype(name, dtype, peak):
    assert peak_tflops(name, dtype) == peak
