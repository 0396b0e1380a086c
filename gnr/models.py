"""timm models in pixel space: build by name, load local weights, swap activations, normalise inside.

Every model gnr hands out is a :class:`Normalized` wrapper: it takes pixels in [0, 1] and applies the
timm model's own mean/std itself, so attacks, gradient penalties (``ε`` is in pixels, PAPER.md §1) and
figures never deal with normalised inputs.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from timm.layers import activations as timm_act
from timm.layers import activations_me as timm_act_me
from torch import nn

from gnr.config import ModelConfig
from gnr.doublegrad import use_fast_double_backward
from gnr.errors import GnrError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Elementwise non-linearities between layers. Gates (Sigmoid, Tanh, HardSigmoid in squeeze-excite
# blocks) are not activations in the sense of PAPER.md §2 and are left alone.
ACTIVATION_TYPES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Hardswish,
    timm_act.GELU, timm_act.GELUTanh, timm_act.QuickGELU, timm_act.Swish, timm_act.Mish,
    timm_act.HardSwish, timm_act.HardMish, timm_act.PReLU,
    timm_act_me.SwishMe, timm_act_me.MishMe, timm_act_me.HardSwishMe, timm_act_me.HardMishMe,
)
# Fresh, never in-place: an in-place activation can overwrite a tensor double backward still needs.
REPLACEMENTS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "softplus": nn.Softplus}


class Normalized(nn.Module):
    """Pixels in [0, 1] -> ``inner((x - mean) / std)``; ``inner`` is the timm model."""

    def __init__(self, inner: nn.Module, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.inner = inner
        # Not persistent: they follow from the architecture, so state dicts stay timm-compatible
        # under the ``inner.`` prefix.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.mean) / self.std)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel and torch.compile wrappers, in any nesting order."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def swap_activations(model: nn.Module, act: str) -> int:
    """Replace every activation module in ``model`` with a fresh ``act``; return how many.

    ``keep`` changes nothing. Activations that a model applies functionally (``F.relu`` in forward)
    are not modules and cannot be swapped; timm builds its layers with activation modules.
    """
    if act == "keep":
        return 0
    if act not in REPLACEMENTS:
        raise GnrError(f"unknown activation '{act}' (known: keep, {', '.join(REPLACEMENTS)})")
    count = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, ACTIVATION_TYPES):
                setattr(parent, name, REPLACEMENTS[act]())
                count += 1
    return count


def build_model(cfg: ModelConfig, num_classes: int, img_size: int) -> tuple[Normalized, int]:
    """The configured timm model, wrapped in :class:`Normalized`, and the number of swapped activations.

    ``gnr.doublegrad.fast_layer_counts(model)`` tells how many layers the fast double backward replaced.
    """
    inner = _create(cfg, num_classes, img_size)
    if cfg.weights:
        load_weights(inner, cfg.weights)
    swapped = swap_activations(inner, cfg.act)
    if cfg.fast_double_backward:
        use_fast_double_backward(inner, attention=cfg.fast_attention)  # after the swap: its GELUs too
    pcfg = inner.pretrained_cfg
    return Normalized(inner, pcfg.get("mean", IMAGENET_MEAN), pcfg.get("std", IMAGENET_STD)), swapped


def _create(cfg: ModelConfig, num_classes: int, img_size: int) -> nn.Module:
    if not timm.is_model(cfg.name):
        close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise GnrError(f"unknown model '{cfg.name}'{hint}")
    kwargs = dict(cfg.kwargs)
    # Models with a fixed input size (ViT, Swin, DeiT, ...) size their patch grid / windows from it.
    if timm.models.get_pretrained_cfg_value(cfg.name, "fixed_input_size"):
        kwargs.setdefault("img_size", img_size)
    def create(**depth):
        return timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=num_classes, **depth, **kwargs)

    try:
        # The rate is passed even when 0: some models default to stochastic depth (Swin: 0.1) and must
        # get what the config says. Models without stochastic depth (VGG) reject the argument; 0 is
        # what they do anyway.
        try:
            return create(drop_path_rate=cfg.drop_path)
        except TypeError as e:
            if cfg.drop_path or "drop_path_rate" not in str(e):
                raise
            return create()
    except (OSError, RuntimeError) as e:  # hub unreachable (OSError), no weights published (RuntimeError)
        if not cfg.pretrained:
            raise
        reason = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__  # first sentence
        raise GnrError(f"could not fetch pretrained weights for '{cfg.name}' ({reason}); "
                       "pass a local file with model.weights=PATH instead") from None
    except (TypeError, ValueError, AssertionError) as e:
        raise GnrError(f"cannot build '{cfg.name}' with {kwargs}: {e}") from None


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict (``.safetensors`` or torch pickle) into ``model`` (the timm model).

    timm's loader reads either format (``weights_only=True``), unnests ``state_dict_ema`` /
    ``model_ema`` / ``state_dict`` / ``model`` (EMA first: those are the weights gnr evaluates) and
    strips DDP / compile prefixes; a state dict saved from a :class:`Normalized` loses its ``inner.``.
    """
    path = Path(path)
    if not path.is_file():
        raise GnrError(f"weights file not found: {path}")
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True)
    except Exception as e:  # corrupt file, unsafe pickle, not a dict: say which file, not where
        raise GnrError(f"cannot read weights from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GnrError(f"{path} does not hold a state dict of tensors")
    state = {k.removeprefix("inner."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong_shape = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        problems = [f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise GnrError(f"weights in {path} do not match the model: {'; '.join(problems)}")
    model.load_state_dict(state)
