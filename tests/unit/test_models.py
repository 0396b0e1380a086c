import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from torch import nn

from gnr.config import ModelConfig
from gnr.errors import GnrError
from gnr.models import Normalized, build_model, load_weights, swap_activations, unwrap


def test_swap_leaves_no_relu_in_resnet50():
    model, swapped = build_model(ModelConfig(name="resnet50", act="gelu"), num_classes=10, img_size=64)
    assert swapped == 49  # stem + 3 per bottleneck × 16
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert any(isinstance(m, nn.GELU) for m in model.modules())
    assert torch.isfinite(model(torch.rand(1, 3, 64, 64))).all()


def test_swap_replaces_timm_activation_layers_and_keep_changes_nothing():
    from timm.layers.activations import GELUTanh, QuickGELU, Swish

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True), nn.Sequential(GELUTanh(), QuickGELU()),
                          Swish(), nn.SiLU(), nn.Sigmoid())
    assert swap_activations(model, "keep") == 0
    assert swap_activations(model, "softplus") == 5
    assert [type(m) for m in model.modules() if not isinstance(m, (nn.Sequential, nn.Linear))] == \
        [nn.Softplus] * 3 + [nn.Softplus, nn.Softplus, nn.Sigmoid]  # gates stay


def test_normalized_equals_manual_normalisation():
    model, _ = build_model(ModelConfig(name="test_efficientnet"), num_classes=5, img_size=32)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(model.inner.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.inner.pretrained_cfg["std"]).view(1, 3, 1, 1)
    assert mean[0, 0, 0, 0] == pytest.approx(0.485)  # ImageNet stats, not the identity
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.inner((x - mean) / std))
    assert isinstance(model, Normalized) and "mean" not in model.state_dict()


def test_vit_gets_the_image_size_and_cnn_does_not_need_it():
    vit, _ = build_model(ModelConfig(name="test_vit"), num_classes=3, img_size=48)
    assert vit(torch.rand(1, 3, 48, 48)).shape == (1, 3)
    cnn, _ = build_model(ModelConfig(name="test_resnet", drop_path=0.1), num_classes=3, img_size=48)
    assert cnn(torch.rand(1, 3, 40, 40)).shape == (1, 3)


def test_unknown_model_suggests_close_names():
    with pytest.raises(GnrError, match=r"unknown model 'resnet5'.*resnet50"):
        build_model(ModelConfig(name="resnet5"), num_classes=10, img_size=32)


def test_pretrained_without_network_is_a_clear_error():
    code = ("from gnr.config import ModelConfig\nfrom gnr.models import build_model\n"
            "build_model(ModelConfig(name='test_resnet', pretrained=True), 10, 32)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "GnrError: could not fetch pretrained weights for 'test_resnet'" in proc.stderr


@pytest.mark.parametrize("suffix, nest", [(".safetensors", None), (".pt", None), (".pt", "state_dict_ema"),
                                          (".pth", "model")])
def test_weights_round_trip(tmp_path, suffix, nest):
    cfg = ModelConfig(name="test_resnet")
    source, _ = build_model(cfg, num_classes=4, img_size=32)
    state = source.inner.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save({nest: state, "epoch": 3} if nest else state, path)
    loaded, _ = build_model(cfg.model_copy(update={"weights": str(path)}), num_classes=4, img_size=32)
    for key, value in state.items():
        torch.testing.assert_close(loaded.inner.state_dict()[key], value)


def test_weights_saved_from_the_wrapper_load(tmp_path):
    source, _ = build_model(ModelConfig(name="test_resnet"), num_classes=4, img_size=32)
    torch.save({"model": source.state_dict()}, tmp_path / "gnr.pt")  # keys under "inner."
    target, _ = build_model(ModelConfig(name="test_resnet"), num_classes=4, img_size=32)
    load_weights(target.inner, tmp_path / "gnr.pt")
    torch.testing.assert_close(target.inner.fc.weight, source.inner.fc.weight)


def test_weights_mismatch_and_missing_file_are_clear_errors(tmp_path):
    other, _ = build_model(ModelConfig(name="test_resnet"), num_classes=7, img_size=32)
    torch.save(other.inner.state_dict(), tmp_path / "seven.pt")
    with pytest.raises(GnrError, match=r"do not match the model: wrong shape 2 \(e\.g\. fc\.bias\)"):
        build_model(ModelConfig(name="test_resnet", weights=str(tmp_path / "seven.pt")), 4, 32)
    with pytest.raises(GnrError, match="do not match the model: missing"):
        build_model(ModelConfig(name="test_vit", weights=str(tmp_path / "seven.pt")), 7, 32)
    with pytest.raises(GnrError, match="weights file not found"):
        build_model(ModelConfig(name="test_resnet", weights=str(tmp_path / "nope.pt")), 4, 32)


def test_unwrap_strips_compile_wrapper():
    model = nn.Linear(2, 2)
    assert unwrap(torch.compile(model)) is model
    assert unwrap(model) is model


def test_drop_path_zero_reaches_models_that_default_to_stochastic_depth():
    """Swin defaults to drop_path_rate 0.1; model.drop_path=0 must switch it off, and a model
    without stochastic depth (VGG) still builds."""
    def rates(drop_path):
        cfg = ModelConfig(name="swin_tiny_patch4_window7_224", drop_path=drop_path,
                          kwargs={"embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 1, 1)})
        net, _ = build_model(cfg, 10, 224)
        return [m.drop_prob for m in net.modules() if type(m).__name__ == "DropPath"]

    assert rates(0.0) == []  # timm builds Identity where the rate is 0
    assert max(rates(0.2)) == pytest.approx(0.2)
    build_model(ModelConfig(name="vgg11"), 10, 32)
