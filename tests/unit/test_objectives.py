import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gnr.config import ModelConfig, ObjectiveConfig
from gnr.models import build_model
from gnr.objectives import OBJECTIVES, build_objective
from gnr.objectives.edge import edge_map, rms_normalised

EPS = 4 / 255
PARTS = {
    "natural": {"ce"},
    "gradnorm": {"ce", "penalty", "grad_l1", "alpha"},
    "gradnorm-fd": {"ce", "penalty", "grad_l1", "alpha"},
    "adversarial": {"ce", "alpha", "attack_success"},
    "edge": {"ce", "penalty", "alpha"},
}


def soft_targets(batch: int, classes: int) -> torch.Tensor:
    return torch.softmax(3 * torch.randn(batch, classes), dim=1)


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()


def closed_form(model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, ...]:
    """Softmax regression: ∇_x ℓ_i = Wᵀ(p_i − y_i); Eq. 2 written out."""
    W, b = model[1].weight, model[1].bias
    logits = x.flatten(1) @ W.T + b
    ce = -(y * logits.log_softmax(1)).sum(1).mean()
    grad_l1 = ((logits.softmax(1) - y) @ W).abs().sum(1).mean()
    return 0.8 * ce + 1.2 * alpha * EPS * grad_l1, ce, grad_l1


@pytest.mark.parametrize("progress, alpha", [(0.0, 0.0), (2.5, 0.5), (5.0, 1.0), (7.3, 1.0)])
def test_gradnorm_matches_the_closed_form_on_softmax_regression(progress, alpha):
    model = linear_model()
    x = torch.rand(6, 3, 4, 4, dtype=torch.float64)
    y = soft_targets(6, 5).double()
    loss, parts = build_objective(ObjectiveConfig(method="gradnorm"))(model, x, y, progress)
    expected, ce, grad_l1 = closed_form(model, x, y, alpha)
    torch.testing.assert_close(parts["ce"], ce.detach())
    torch.testing.assert_close(parts["grad_l1"], grad_l1.detach())
    torch.testing.assert_close(parts["penalty"], EPS * grad_l1.detach())
    assert parts["alpha"].item() == pytest.approx(alpha)
    torch.testing.assert_close(loss, expected)
    # Nothing detached: the parameter gradient includes the second-order term through ∇_x ℓ.
    ours = torch.autograd.grad(loss, list(model.parameters()))
    reference = torch.autograd.grad(expected, list(model.parameters()))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


def test_ramp_of_zero_length_is_full_weight():
    model = linear_model()
    x, y = torch.rand(2, 3, 4, 4, dtype=torch.float64), soft_targets(2, 5).double()
    _, parts = build_objective(ObjectiveConfig(method="gradnorm", ramp_epochs=0))(model, x, y, 0.0)
    assert parts["alpha"].item() == 1.0


def smooth_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 64), nn.GELU(), nn.Linear(64, 10))


@pytest.mark.parametrize("method", list(OBJECTIVES))
def test_every_objective_returns_its_parts_detached(method):
    model = smooth_mlp().train()
    x, y = torch.rand(4, 3, 8, 8), soft_targets(4, 10)
    loss, parts = build_objective(ObjectiveConfig(method=method))(model, x, y, 6.0)
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    assert set(parts) == PARTS[method]
    assert all(v.ndim == 0 and not v.requires_grad and v.device == x.device for v in parts.values())
    assert all(p.grad is None for p in model.parameters())  # the trainer calls backward itself


def test_natural_is_the_mean_soft_cross_entropy():
    model = smooth_mlp()
    x, y = torch.rand(4, 3, 8, 8), soft_targets(4, 10)
    loss, _ = build_objective(ObjectiveConfig(method="natural"))(model, x, y, 0.0)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))


class ModeRecorder:
    """Records (training flag, input) of every forward of a module."""

    def __init__(self, module: nn.Module):
        self.calls: list[tuple[bool, torch.Tensor]] = []
        module.register_forward_pre_hook(lambda m, args: self.calls.append((m.training, args[0].detach())))


@pytest.mark.parametrize("attack, progress, attack_forwards, scale", [
    ("pgd", 0.7, 0, 0.0),     # epoch 0: random noise in the ball only
    ("pgd", 2.5, 3, 0.4),     # epoch 2 of 5
    ("pgd", 11.0, 3, 1.0),
    ("fgsm", 11.0, 1, 1.0),
])
def test_adversarial_attacks_in_eval_mode_and_trains_on_x_adv(attack, progress, attack_forwards, scale):
    model = smooth_mlp().train()
    recorder = ModeRecorder(model)
    x, y = torch.rand(4, 3, 8, 8), soft_targets(4, 10)
    objective = build_objective(ObjectiveConfig(method="adversarial", attack=attack))
    loss, parts = objective(model, x, y, progress)
    modes = [training for training, _ in recorder.calls]
    assert modes == [False] * attack_forwards + [True] and model.training
    x_adv = recorder.calls[-1][1]
    assert 0 < (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    assert parts["alpha"].item() == pytest.approx(scale)
    assert objective.passes == (8 if attack == "pgd" else 4)
    torch.testing.assert_close(loss, F.cross_entropy(model(x_adv), y))


def test_edge_teacher_marks_edges_and_is_rms_normalised():
    x = torch.zeros(2, 3, 16, 16)
    x[..., 8:] = 1.0  # a vertical step edge between columns 7 and 8
    teacher = edge_map(x)
    assert teacher.shape == x.shape and torch.equal(teacher[:, 0], teacher[:, 2])
    assert teacher[0, 0, 8, 7] > 10 * teacher[0, 0, 8, 1] and teacher[0, 0, 8, 0] < 1e-3
    normalised = rms_normalised(teacher)
    assert normalised.pow(2).mean().sqrt().item() == pytest.approx(1.0)
    assert torch.equal(rms_normalised(torch.zeros(3)), torch.zeros(3))


@pytest.mark.parametrize("progress, alpha", [(0.5, 1.0), (10.9, 1.9), (1000.0, 19.0)])
def test_edge_weight_schedule(progress, alpha):
    model = smooth_mlp().train()
    loss, parts = build_objective(ObjectiveConfig(method="edge"))(model, torch.rand(4, 3, 8, 8),
                                                                  soft_targets(4, 10), progress)
    assert parts["alpha"].item() == pytest.approx(alpha)
    torch.testing.assert_close(loss.detach(), parts["ce"] + alpha * parts["penalty"])


ATTENTION_MODELS = {
    "vit": ModelConfig(name="test_vit"),
    "swin": ModelConfig(name="swin_tiny_patch4_window7_224",
                        kwargs=dict(embed_dim=16, depths=(2, 1), num_heads=(1, 2), window_size=4)),
}


@pytest.mark.parametrize("arch", list(ATTENTION_MODELS))
@pytest.mark.parametrize("method", ["gradnorm", "edge", "gradnorm-fd"])
def test_objectives_run_on_attention_models_with_fused_sdpa(arch, method):
    torch.manual_seed(0)
    model, _ = build_model(ATTENTION_MODELS[arch], num_classes=10, img_size=32)
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attention
    for module in attention:  # timm's Swin keeps SDPA behind TIMM_FUSED_ATTN=2: turn it on for all
        module.fused_attn = True
    loss, parts = build_objective(ObjectiveConfig(method=method))(model.train(), torch.rand(2, 3, 32, 32),
                                                                  soft_targets(2, 10), 6.0)
    loss.backward()
    assert torch.isfinite(loss) and parts["penalty"] > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_objectives_run_through_ddp(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, _ = build_model(ModelConfig(name="test_resnet", act="gelu"), num_classes=10, img_size=32)
        ddp = nn.parallel.DistributedDataParallel(model.train())
        x, y = torch.rand(2, 3, 32, 32), soft_targets(2, 10)
        for method in OBJECTIVES:
            loss, _ = build_objective(ObjectiveConfig(method=method))(ddp, x, y, 6.0)
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters()), method
            model.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()


def test_passes_and_double_backward_flags():
    flags = {m: (build_objective(ObjectiveConfig(method=m)).passes,
                 build_objective(ObjectiveConfig(method=m)).double_backward) for m in OBJECTIVES}
    assert flags == {"natural": (2, False), "gradnorm": (5, True), "gradnorm-fd": (4, False),
                     "adversarial": (8, False), "edge": (5, True)}
