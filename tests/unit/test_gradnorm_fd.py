"""gradnorm-fd against exact double backprop, judged on the penalty's parameter gradient (what training
uses): truncation in fp32, rounding under bf16 autocast, replayed kinks and dropout masks, the dtypes of
its passes, torch.compile."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gnr.bench.counter import CostCounter
from gnr.config import ModelConfig, ObjectiveConfig
from gnr.models import build_model
from gnr.objectives import build_objective
from gnr.objectives.gradnorm_fd import (ReplayMaxPool2d, ReplayReLU, default_step, kinks_in, pass_precision,
                                        replayable_kinks)

# The loss is then the penalty's ‖∇ₓℓ‖₁ alone, and its parameter gradient the penalty's.
PENALTY_ONLY = dict(lambda_ce=0.0, lambda_gn=1.0, eps=1.0, ramp_epochs=0.0)
IMG, CLASSES = 32, 10
aten = torch.ops.aten


def real_batch(imagenet_sample, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(imagenet_sample.iterdir())[:n]
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB").resize((IMG, IMG)))).permute(2, 0, 1)
                     for f in files]).float() / 255
    torch.manual_seed(1)
    return x, torch.softmax(3 * torch.randn(n, CLASSES), dim=1)


def model_of(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(name=name, **kwargs), CLASSES, IMG)
    return model.train()


def penalty_gradient(objective, model, x, y, amp: torch.dtype | None = None) -> tuple[float, torch.Tensor]:
    """(‖∇ₓℓ‖₁ as the objective reports it, its gradient over all parameters, flattened)."""
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        loss, parts = objective(model, x, y, 1.0)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(parts["grad_l1"]), torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                               for g, p in zip(grads, params)])


def fd_steps(model, x, y, amp=None, h: float = 1e-3, n: int = 2) -> list[tuple[float, torch.Tensor]]:
    """``n`` consecutive calls of one gradnorm-fd objective: the sign of its step alternates."""
    objective = build_objective(ObjectiveConfig(method="gradnorm-fd", fd_step=h, **PENALTY_ONLY))
    return [penalty_gradient(objective, model, x, y, amp) for _ in range(n)]


def exact(model, x, y, amp=None) -> tuple[float, torch.Tensor]:
    return penalty_gradient(build_objective(ObjectiveConfig(method="gradnorm", **PENALTY_ONLY)), model, x, y, amp)


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name, h, step_tol, pair_tol", [
    ("test_convnext", 1e-3, 0.10, 0.02),  # LayerNorm, GELU: smooth
    ("test_resnet", 1e-4, 0.08, 0.005),   # BatchNorm, ReLU, max-pool: kinks, replayed
])
def test_a_sign_pair_is_a_central_difference_in_fp32(imagenet_sample, name, h, step_tol, pair_tol):
    # One step is a one-sided difference, off by O(h); two steps take both sides, and their mean is off
    # by O(h²). Without the kink replay the ResNet is 500% off at any h.
    model = model_of(name)
    x, y = real_batch(imagenet_sample, 8)
    value, reference = exact(model, x, y)
    (v1, g1), (v2, g2) = fd_steps(model, x, y, h=h)
    assert error(g1, reference) < step_tol and error(g2, reference) < step_tol
    assert error((g1 + g2) / 2, reference) < pair_tol
    assert abs((v1 + v2) / 2 / value - 1) < pair_tol


@pytest.mark.parametrize("name", ["test_convnext", "test_vit"])
def test_bf16_rounding_error_is_bounded_and_partly_averages_out(imagenet_sample, name):
    # bf16 passes round independently and the difference divides that by h: at h = 1e-3 about 15-20%
    # per step on these tiny batches. Over dithered copies of the batch (each with its exact reference)
    # it falls to about a third (README "gradnorm-fd against exact gradnorm": not all of it averages out).
    model = model_of(name)
    x, y = real_batch(imagenet_sample, 8)
    fd, reference = [], []
    for k in range(4):
        torch.manual_seed(k)
        xk = x + 2e-3 * (torch.rand_like(x) - 0.5)
        reference.append(exact(model, xk, y)[1])
        fd.append([g for _, g in fd_steps(model, xk, y, amp=torch.bfloat16)])
    per_step = [error(g, e) for pair, e in zip(fd, reference) for g in pair]
    assert max(per_step) < 0.4
    mean_error = error(sum(sum(pair) for pair in fd) / 8, sum(reference) / 4)
    assert mean_error < 0.5 * sum(per_step) / 8 and mean_error < 0.1


class OperandDtypes(TorchDispatchMode):
    """The dtypes of the floating operands of every convolution and matmul, forward and backward."""

    KERNELS = {aten.convolution.default, aten.convolution_backward.default, aten.mm.default, aten.addmm.default,
               aten.bmm.default}

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.KERNELS:
            self.dtypes += [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("amp, passes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                         (None, torch.float32)])
def test_the_passes_run_in_the_autocast_dtype_fp16_in_fp32(amp, passes):
    # fp16 would need the trainer's loss scaling inside the objective's own backward.
    model = model_of("test_resnet", act="gelu")
    x, y = torch.rand(2, 3, IMG, IMG), torch.softmax(torch.randn(2, CLASSES), 1)
    objective = build_objective(ObjectiveConfig(method="gradnorm-fd"))
    with OperandDtypes() as seen:
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss, _ = objective(model, x, y, 1.0)
        loss.backward()
    convolutions = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(seen.dtypes) > 2 * 2 * convolutions and set(seen.dtypes) == {passes}
    assert loss.dtype == torch.float32


def test_the_default_step_follows_the_rounding_of_the_passes(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # CUDA's flags are read, no GPU needed
    for amp, h in [(None, 1e-4), (torch.bfloat16, 1e-3), (torch.float16, 1e-4)]:
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None), pass_precision(cpu):
            assert default_step(cpu) == h
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default: TF32 convolutions
    assert default_step(cuda) == 1e-3
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert default_step(cuda) == (1e-4 if torch.get_float32_matmul_precision() == "highest" else 1e-3)


def test_four_passes_cost_twice_natural():
    # Forward at x, one backward for d and the parameter gradient, forward at x + s·h·d, backward: two
    # natural steps (five passes, two of them backward through x, were 2.35×).
    model = model_of("test_resnet", act="gelu")
    x, y = torch.rand(4, 3, IMG, IMG), torch.softmax(torch.randn(4, CLASSES), 1)
    flops = {}
    for method in ("natural", "gradnorm-fd"):
        with CostCounter() as cost:
            loss, _ = build_objective(ObjectiveConfig(method=method))(model, x, y, 1.0)
            loss.backward()
        flops[method] = cost.flops
    assert 1.95 < flops["gradnorm-fd"] / flops["natural"] < 2.05


def test_kinks_are_swapped_once_and_leave_the_model_as_it_was():
    model = model_of("test_resnet")  # timm's ReLUs, in place, and a max-pool
    plain_names = [type(m).__name__ for m in model.modules()]
    assert {"ReLU", "MaxPool2d"} <= set(plain_names)
    x = torch.rand(2, 3, IMG, IMG)
    objective = build_objective(ObjectiveConfig(method="gradnorm-fd"))
    for _ in range(2):
        objective(model, x, torch.full((2, CLASSES), 0.1), 1.0)
    kinks = [m for m in model.modules() if isinstance(m, (ReplayReLU, ReplayMaxPool2d))]
    assert len(kinks) == sum(name in ("ReLU", "MaxPool2d") for name in plain_names)
    assert all(m.mode == "off" and not m.pieces for m in kinks)
    assert not any(m.inplace for m in kinks if isinstance(m, ReplayReLU))
    plain = timm.create_model("test_resnet", num_classes=CLASSES)  # the state dict is timm's, the outputs too
    plain.load_state_dict({k.removeprefix("inner."): v for k, v in model.state_dict().items()})
    torch.testing.assert_close(model.eval()(x), plain.eval()((x - model.mean) / model.std))


def test_dropout_masks_are_replayed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 64), nn.GELU(), nn.Dropout(0.5), nn.Linear(64, 10)).train()
    x, y = torch.rand(16, 3, 8, 8), torch.softmax(3 * torch.randn(16, 10), dim=1)
    torch.manual_seed(7)
    value, reference = exact(model, x, y)
    torch.manual_seed(7)  # the FD's first forward draws the same mask as the exact one; the second replays it
    (fd_value, fd_grad), = fd_steps(model, x, y, n=1)
    assert abs(fd_value / value - 1) < 0.01 and error(fd_grad, reference) < 0.05


class ReusedReLU(nn.Module):
    """One in-place ReLU module called twice per forward, as torchvision's ResNet does, and a max-pool."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.bn, self.act, self.pool = nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.bn(self.conv1(x))))
        return self.head(self.act(self.conv2(x)).mean((2, 3)))


def test_a_reused_kink_is_replayed_call_by_call_also_compiled():
    # Without the replay the second step here is 245% off exact; with it a sign pair is within 0.01%.
    torch.manual_seed(0)
    model = ReusedReLU().train()
    x, y = torch.rand(4, 3, 12, 12), torch.softmax(torch.randn(4, CLASSES), 1)
    _, reference = exact(model, x, y)
    eager = fd_steps(model, x, y)
    assert error((eager[0][1] + eager[1][1]) / 2, reference) < 1e-3
    compiled = fd_steps(torch.compile(model), x, y)
    for (v, g), (cv, cg) in zip(eager, compiled):  # the same, but for rounding (divided by h)
        assert cv == pytest.approx(v, rel=1e-3) and error(cg, g) < 1e-3


def test_a_step_that_failed_after_recording_leaves_nothing_for_the_next():
    torch.manual_seed(0)
    model = ReusedReLU().train()
    x, y = torch.rand(4, 3, 12, 12), torch.softmax(torch.randn(4, CLASSES), 1)
    expected = fd_steps(model, x, y, n=1)
    kinks = replayable_kinks(model)
    with kinks_in(kinks, "record"):  # a first pass whose step never reached its replay (e.g. out of memory)
        model(torch.rand(4, 3, 12, 12))
    assert all(k.pieces for k in kinks)
    (value, grad), = fd_steps(model, x, y, n=1)
    assert value == expected[0][0] and torch.equal(grad, expected[0][1])
