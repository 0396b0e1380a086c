import gc

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gnr.bench.counter import CostCounter
from gnr.config import ModelConfig, ObjectiveConfig
from gnr.models import build_model
from gnr.objectives import build_objective


def test_counts_a_matmul_and_a_convolution_exactly():
    a, b = torch.rand(4, 5), torch.rand(5, 3)
    x, w = torch.rand(2, 3, 10, 10), torch.rand(8, 3, 3, 3)
    with CostCounter() as cost:
        a @ b
    assert cost.flops == 2 * 4 * 5 * 3
    with CostCounter() as cost:
        F.conv2d(x, w, padding=1)
    assert cost.flops == 2 * (2 * 8 * 10 * 10) * (3 * 3 * 3)
    assert cost.nonmatmul_ops == 0


def test_non_matmul_bytes_skip_views_and_count_in_place_writes():
    x = torch.rand(2, 8, 10, 10)
    with CostCounter() as cost:
        y = x.view(2, 800).t()  # views: no traffic
        z = torch.relu(x)       # 6400 bytes written
        z.mul_(2)               # another 6400, in place
    assert (cost.nonmatmul_ops, cost.nonmatmul_bytes, cost.flops) == (2, 2 * 6400, 0)
    del y, z


def test_peak_bytes_follow_tensor_lifetimes():
    with CostCounter() as cost:
        a = torch.zeros(1000)  # 4000 bytes
        del a
        b = torch.zeros(2000)  # 8000 bytes, after a was freed
        c = torch.zeros(500)
        del b, c
        gc.collect()
    assert cost.peak_bytes == 8000 + 2000 and cost.live_bytes == 0


def step_flops(model, method: str, x, y) -> int:
    with CostCounter() as cost:
        loss, _ = build_objective(ObjectiveConfig(method=method))(model, x, y, 9.0)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return cost.flops


def test_natural_step_matches_torch_and_double_backward_ops_are_counted():
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(name="test_resnet", act="gelu"), 10, 32)
    x, y = torch.rand(4, 3, 32, 32), torch.softmax(torch.randn(4, 10), 1)
    natural = step_flops(model.train(), "natural", x, y)
    with FlopCounterMode(display=False) as reference:  # works for first-order steps only
        loss, _ = build_objective(ObjectiveConfig(method="natural"))(model, x, y, 9.0)
        loss.backward()
    assert natural == reference.get_total_flops() > 0
    # Forward + input gradient + the double backward: about twice natural's forward + backward.
    # Without the backward-of-backward ops the ratio would be ~1.3.
    assert step_flops(model, "gradnorm", x, y) / natural == pytest.approx(2.05, abs=0.15)
