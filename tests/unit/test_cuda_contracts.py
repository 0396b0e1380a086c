"""The training step, as CUDA runs it (bf16 autocast, channels-last), keeps CUDA's operand contracts.

CPU kernels accept mixed dtypes and any strides; CUDA's refuse the first (every LayerNorm model
crashed in its first backward on an H200) and serve odd strides with legacy kernels (57% of a
ResNet-50 gradnorm step). tests/cuda_contracts.py says what is checked.
"""

import pytest
import torch

from gnr.config import validate
from gnr.step import build_train_step
from gnr.models import build_model
from tests.cuda_contracts import CudaContracts

TINY_SWIN = {"embed_dim": 8, "depths": (2, 1), "num_heads": (1, 2), "window_size": 4}  # a shifted block
TINY_SWIN_49 = TINY_SWIN | {"window_size": 7}  # 49 keys, as Swin-B's windows: padded to 56
ARCHS = {  # the presets' architectures at test size: name, act, kwargs, fast_attention
    "swin": ("swin_tiny_patch4_window7_224", "keep", TINY_SWIN_49, True),
    "swin-no-fast-attention": ("swin_tiny_patch4_window7_224", "keep", TINY_SWIN, False),
    "vit": ("test_vit", "keep", {}, True),  # 5 tokens
    "vit-no-fast-attention": ("test_vit", "keep", {}, False),
    "resnet-gelu": ("resnet18", "gelu", {}, False),
    "convnext": ("test_convnext", "keep", {}, False),
}
METHODS = ("natural", "gradnorm", "adversarial")  # adversarial: PGD-3
IMG, BATCH = 32, 4


def channels_last_bf16_step(arch: str, method: str, img: int = IMG):
    name, act, kwargs, attention = ARCHS[arch]
    cfg = validate({"data": {"num_classes": 10, "img_size": img, "eval_resize": img},
                    "model": {"name": name, "act": act, "kwargs": kwargs, "fast_attention": attention},
                    "objective": {"method": method, "attack_steps": 3}, "optim": {"batch_size": BATCH},
                    "runtime": {"device": "cpu", "amp": "bf16"}})
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, cfg.data.num_classes, img)
    step = build_train_step(cfg, model, torch.device("cpu"))
    step.model.to(memory_format=torch.channels_last)  # as build_train_step does on CUDA
    step.channels_last = True
    return step, cfg.objective.ramp_epochs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_gets_operands_cuda_takes(arch, method):
    """Dtypes and convolution layouts everywhere; with fast attention, gradnorm's batched matmuls
    (all of them attention's explicit levels) on aligned rows too."""
    img = 56 if "swin" in arch else IMG  # 49-key windows on a 14×14 grid
    step, progress = channels_last_bf16_step(arch, method, img)
    batch = (torch.rand(BATCH, 3, img, img), torch.randint(0, 10, (BATCH,)))
    aligned = method == "gradnorm" and ARCHS[arch][3]
    with CudaContracts(channels_last=True, aligned_bmm=aligned) as contracts:
        parts, nonfinite = step(iter([batch]), progress, 1)
    assert not nonfinite
    assert contracts.calls["convolution"] and contracts.calls["mm"] + contracts.calls["addmm"]
    if arch != "resnet-gelu":
        assert contracts.calls["native_layer_norm"] and contracts.calls["native_layer_norm_backward"]
    if aligned:
        assert contracts.calls["bmm"]
    assert not contracts.violations, f"{arch} {method}:\n{contracts.report()}"
