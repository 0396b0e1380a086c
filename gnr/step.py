"""One optimizer update, exactly as the trainer runs it and as `gnr bench step` times it.

:func:`build_train_step` assembles the parts from a :class:`RunConfig` and a built model: the
optimizer (:func:`build_optimizer`), grad scaler, EMA, soft targets (mixup / label smoothing), the
DDP and ``torch.compile`` wrappers and the objective. Calling the :class:`TrainStep` does one update
over ``accum_steps`` micro-batches: inputs to the device (channels-last on CUDA), soft targets,
autocast forward + objective, scaled backward (DDP ``no_sync`` but on the last micro-batch),
unscale + clip, optimizer step, zero_grad, EMA update. The LR schedule stays with the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gnr.config import RunConfig
from gnr.errors import GnrError
from gnr.objectives import Objective, build_objective
from gnr.eval.scoring import autocast

# timm names whose optimizer is torch's own, which has a fused (one kernel per step) CUDA path.
FUSED_ON_CUDA = ("adam", "adamw")

Targets = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def amp_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    amp = cfg.runtime.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def soft_targets(cfg: RunConfig) -> Targets:
    """Mixup/CutMix with label smoothing (timm), or plain smoothed one-hot targets."""
    from timm.data import Mixup
    from timm.data.mixup import one_hot

    a = cfg.augment
    if a.mixup > 0 or a.cutmix > 0:
        return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, switch_prob=a.mixup_switch_prob,
                     label_smoothing=a.smoothing, num_classes=cfg.data.num_classes)
    off = a.smoothing / cfg.data.num_classes
    return lambda x, y: (x, one_hot(y, cfg.data.num_classes, on_value=1.0 - a.smoothing + off, off_value=off))


def build_optimizer(cfg: RunConfig, model: nn.Module, world: int = 1) -> torch.optim.Optimizer:
    """timm's optimizer over the timm model (no weight decay on biases and norms), at the LR scaled to
    the global batch; torch's fused kernel on CUDA where the optimizer has one."""
    import timm.optim

    inner = getattr(model, "inner", model)
    on_cuda = next(inner.parameters()).device.type == "cuda"
    extra = {"fused": True} if on_cuda and cfg.optim.opt.lower() in FUSED_ON_CUDA else {}
    global_batch = cfg.optim.batch_size * cfg.optim.accum_steps * world
    return timm.optim.create_optimizer_v2(inner, opt=cfg.optim.opt, lr=cfg.lr(global_batch),
                                          weight_decay=cfg.optim.weight_decay, eps=cfg.optim.opt_eps, **extra)


@dataclass
class TrainStep:
    model: nn.Module
    """The unwrapped model: its parameters are clipped, stepped and averaged into the EMA."""
    train_model: nn.Module
    """What the objective calls: ``model``, DDP-wrapped and / or compiled."""
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: nn.Module | None
    targets: Targets
    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    accum_steps: int
    clip_grad: float | None

    def __call__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], progress: float,
                 update: int) -> tuple[dict[str, float], bool]:
        """Update number ``update`` (1-based, for the EMA warm-up) over ``accum_steps`` batches of
        ``(pixels, labels)`` from ``batches``. Returns the mean loss parts and a non-finite flag."""
        loss_sum, parts_sum = 0.0, {}
        for i in range(self.accum_steps):
            x, y = next(batches)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x, y_soft = self.targets(x, y)
            last = i == self.accum_steps - 1
            sync = self.train_model.no_sync() if not last and hasattr(self.train_model, "no_sync") else nullcontext()
            with sync:
                with autocast(self.device, self.amp):
                    loss, parts = self.objective(self.train_model, x, y_soft, progress)
                self.scaler.scale(loss / self.accum_steps).backward()
            loss_sum = loss_sum + loss.detach()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v.detach().float()
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=update)
        mean_loss = float(loss_sum) / self.accum_steps
        parts_out = {"loss": mean_loss, **{k: float(v) / self.accum_steps for k, v in parts_sum.items()}}
        return parts_out, not math.isfinite(mean_loss)


def build_train_step(cfg: RunConfig, model: nn.Module, device: torch.device, world: int = 1) -> TrainStep:
    """The step the trainer runs; moves ``model`` to ``device`` (channels-last there on CUDA).

    ``runtime.compile`` compiles the training model; it is refused for objectives that differentiate
    through an input gradient, as torch.compile has no double backward."""
    import timm.utils

    channels_last = cfg.runtime.channels_last and device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    objective = build_objective(cfg.objective)
    train_model = model
    if world > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.runtime.compile:
        if objective.double_backward:
            raise GnrError(f"runtime.compile: torch.compile has no double backward; use gradnorm-fd instead of "
                           f"{cfg.objective.method}")
        train_model = torch.compile(train_model)
    amp = amp_dtype(cfg, device)
    return TrainStep(
        model=model, train_model=train_model, objective=objective, optimizer=build_optimizer(cfg, model, world),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
        ema=timm.utils.ModelEmaV3(model, decay=cfg.ema.decay) if cfg.ema.enabled else None,
        targets=soft_targets(cfg), device=device, amp=amp,
        channels_last=channels_last,
        accum_steps=cfg.optim.accum_steps, clip_grad=cfg.optim.clip_grad)
