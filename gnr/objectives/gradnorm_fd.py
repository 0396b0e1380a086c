"""Gradient-norm regularisation by a finite difference (Finlay & Oberman 2019; PAPER.md §6).

With ``d = sign(∇_x ℓ)`` held constant, ``‖∇_x ℓ_i‖₁ ≈ s·(ℓ_i(x + s·h·d_i) − ℓ_i(x)) / h``; averaged
over the batch that is ``s·(mean ℓ(x + s·h·d) − mean ℓ(x)) / h``. Only first derivatives, so fused
attention kernels and torch.compile work. Same weights and ramp as :mod:`gnr.objectives.gradnorm`.
``x + s·h·d`` is not clipped to [0, 1]: the model is defined around the box and clipping would bend
the difference direction.

Four passes in the run's autocast dtype: a forward at ``x``, one backward that gives both ``d`` and
the parameter gradient of ``ℓ(x)``, a forward at ``x + s·h·d`` and the trainer's backward through it.
The first backward's parameter gradient joins the trainer's backward through :class:`_Linearised`,
so ``x``'s graph is back-propagated once: 2.0× natural's FLOPs (the old five passes: 2.35×).

Accuracy is judged on the penalty's *parameter* gradient, the part training uses, against exact
double backprop (README "gradnorm-fd" has the measurements). Three errors:

- Kinks. Where the step moves a max-pool window's maximum or a ReLU's sign, the parameter gradient
  jumps, and a difference picks the jump up at any h (ResNets: 110-520% off). The forward at ``x``
  records which piece each ``nn.MaxPool2d`` / ``nn.ReLU`` is on, and the forward at ``x + s·h·d``
  stays on it (:func:`replayable_kinks`), as double backprop does. Other kinks (ReLU6, hard-swish,
  adaptive max-pooling) are not replayed.
- Truncation. A one-sided difference is off by O(h). The sign ``s`` alternates from call to call, so
  successive steps take forward and backward differences, whose mean is the central difference,
  off by O(h²); the alternating O(h) part is noise that the optimizer averages out.
- Rounding. The two passes round independently and the difference divides that by h. In bf16 that
  is 20-40% per step at h = 1e-3 on the test models (less on larger batches), so h cannot be small;
  fp16 would need the trainer's loss scaling inside this objective's first backward, so under fp16
  autocast the passes run in fp32. :func:`default_step` picks h from the precision of the passes.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from gnr.models import unwrap
from gnr.objectives.base import Objective, input_leaf, soft_ce
from gnr.objectives.gradnorm import penalised


class ReplayMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that can take, in a later forward, the window maxima a recorded forward took."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode = "off"  # "record": remember the argmax of each call; "replay": gather there, in order
        self.pieces: list[torch.Tensor] = []  # per call, the linear piece the recorded forward was on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "replay":
            index = self.pieces.pop(0)
            out = x.flatten(2).gather(2, index.flatten(2)).view(index.shape)
            channels_last = x.is_contiguous(memory_format=torch.channels_last)
            return out.contiguous(memory_format=torch.channels_last) if channels_last else out
        if self.mode == "record":
            out, index = F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                      ceil_mode=self.ceil_mode, return_indices=True)
            self.pieces.append(index)
            return out
        return super().forward(x)


class ReplayReLU(nn.ReLU):
    """``nn.ReLU`` (never in place) that can keep, in a later forward, the signs a recorded forward had."""

    def __init__(self):
        super().__init__()
        self.mode = "off"
        self.pieces: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "replay":
            return x * self.pieces.pop(0)
        if self.mode == "record":
            self.pieces.append(x > 0)
        return F.relu(x)


Kink = ReplayMaxPool2d | ReplayReLU
_kinks: weakref.WeakKeyDictionary[nn.Module, list[Kink]] = weakref.WeakKeyDictionary()


def replayable_kinks(model: nn.Module) -> list[Kink]:
    """The replayable kinks of ``model`` (DDP / compile wrappers looked through). On first sight every
    plain ``nn.MaxPool2d`` and ``nn.ReLU`` is swapped for its replayable twin: no parameters, no
    buffers, the same output until a mode is set, so state dicts and other objectives are unaffected."""
    inner = unwrap(model)
    if inner not in _kinks:
        for parent in list(inner.modules()):
            for name, child in parent.named_children():
                if type(child) is nn.MaxPool2d and not child.return_indices:
                    setattr(parent, name, ReplayMaxPool2d(child.kernel_size, child.stride, child.padding,
                                                          child.dilation, ceil_mode=child.ceil_mode))
                elif type(child) is nn.ReLU:
                    setattr(parent, name, ReplayReLU())
        _kinks[inner] = [m for m in inner.modules() if isinstance(m, (ReplayMaxPool2d, ReplayReLU))]
    return _kinks[inner]


@contextmanager
def kinks_in(kinks: list[Kink], mode: str) -> Iterator[None]:
    """Set every kink to ``mode``; a recording starts afresh, so a step that failed between its record and
    its replay cannot hand its pieces to the next one."""
    for kink in kinks:
        kink.mode = mode
        if mode == "record":
            kink.pieces.clear()
    try:
        yield
    finally:
        for kink in kinks:
            kink.mode = "off"
            if mode == "replay":
                kink.pieces.clear()  # the replayed graph keeps what its backward needs


class _Linearised(torch.autograd.Function):
    """``value`` again, with gradient ``grads`` (times the incoming one) w.r.t. ``params``: a loss
    whose parameter gradient is already known joins a later backward without a second pass."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: list[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, *torch._foreach_mul(ctx.grads, grad)


def pass_precision(device: torch.device):
    """The caller's autocast, except fp16 (see the module docstring), which runs in fp32."""
    fp16 = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
    return torch.autocast(device.type, enabled=False) if fp16 else nullcontext()


def default_step(device: torch.device) -> float:
    """h where ``objective.fd_step`` is unset, inside :func:`pass_precision`: truncation grows with h,
    rounding noise with 1/h, so 1e-4 where the passes compute in full fp32 and 1e-3 where they round to
    bf16 (autocast) or TF32 (CUDA's default for fp32 convolutions)."""
    tf32 = torch.backends.cudnn.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return 1e-3 if torch.is_autocast_enabled(device.type) or (device.type == "cuda" and tf32) else 1e-4


class GradNormFD(Objective):
    passes = 4  # forward at x, backward (d and the parameter gradient), forward at x + s·h·d, backward

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sign = 1.0  # s: +1 and -1 in turn

    def __call__(self, model, x, y_soft, progress):
        kinks = replayable_kinks(model)
        params = [p for p in model.parameters() if p.requires_grad]
        s = self.sign
        self.sign = -s
        with pass_precision(x.device):
            h = self.cfg.fd_step or default_step(x.device)
            x = input_leaf(x)
            # Replay the RNG for the second forward: both points see the same dropout / drop-path
            # masks, otherwise the difference measures the masks, not the gradient.
            rng = torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])
            with rng, kinks_in(kinks, "record"):
                ce = soft_ce(model(x), y_soft)
            grad_x, *grads = torch.autograd.grad(ce, [x, *params], allow_unused=True)
            used = [(p, g) for p, g in zip(params, grads) if g is not None]
            ce = _Linearised.apply(ce.detach(), [g for _, g in used], *(p for p, _ in used))
            with kinks_in(kinks, "replay"):
                ce_h = soft_ce(model(x.detach() + (s * h) * grad_x.sign()), y_soft)
        return penalised(self.cfg, ce, s * (ce_h - ce) / h, progress)
