"""How the evaluated model runs under attack: compiled, channels-last, at a batch size that fits, and
what a pass through it costs.

AutoAttack is first-order and the evaluated model is frozen, so compiling it (``torch.compile``)
and storing activations channels-last change only how its forward and backward run, not what they
compute (up to float reassociation; a CPU test checks that the per-image flags stay the same).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

DEFAULT_BATCH = 100  # images per attacked batch where free memory cannot be read (CPU)
MAX_BATCH = 1000
MEMORY_SHARE = 0.6  # of the free GPU memory: the attacks keep several copies of a batch besides the activations
PROBE_BATCH = 8


def prepare_model(model: nn.Module, device: torch.device, *, compile: bool | None = None,
                  channels_last: bool | None = None) -> tuple[nn.Module, dict]:
    """The model to attack and how it was prepared: channels-last and compiled where asked, by default
    on CUDA (compiling pays off over thousands of images, not over a few on a CPU)."""
    cuda = device.type == "cuda"
    channels_last = cuda if channels_last is None else channels_last
    compiled = cuda if compile is None else compile
    if not (channels_last or compiled):
        return model, {"compile": False, "channels_last": False}
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Prepared(torch.compile(model) if compiled else model, channels_last), \
        {"compile": compiled, "channels_last": channels_last}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose gradient comes back in the default layout: pyautoattack ``view``s input gradients,
    and channels-last or compiled backwards may return other strides."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class Prepared(nn.Module):
    """Runs ``model`` (compiled or not) on a channels-last copy of its input where asked; inputs and
    their gradients keep the default layout. The batch dimension is marked dynamic, so a compiled
    model is not recompiled for each batch size (AutoAttack attacks the images still robust); only
    that dimension, since symbolic image sizes break some models in inductor (timm's ConvNeXt stem)."""

    def __init__(self, model: nn.Module, channels_last: bool):
        super().__init__()
        self.model, self.channels_last = model, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _ContiguousGrad.apply(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return self.model(x)


def auto_batch_size(model: nn.Module, img_size: int, device: torch.device) -> int:
    """Images per batch from free GPU memory: the peak memory of a forward and input-gradient backward of
    :data:`PROBE_BATCH` images, scaled to :data:`MEMORY_SHARE` of what is free; :data:`DEFAULT_BATCH` off CUDA."""
    if device.type != "cuda":
        return DEFAULT_BATCH
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _forward_backward(model, _images(PROBE_BATCH, img_size, device))
    per_image = max((torch.cuda.max_memory_allocated(device) - base) / PROBE_BATCH, 1)
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_BATCH, MEMORY_SHARE * free // per_image)))


def pass_seconds(model: nn.Module, img_size: int, batch_size: int, device: torch.device,
                 reps: int = 3) -> dict[str, float]:
    """Seconds per image of a forward (no grad) and of a backward to the input (forward + backward minus
    forward), medians of ``reps`` timed batches after one warm-up of each."""
    x = _images(batch_size, img_size, device)

    def timed(fn) -> float:
        fn(x)
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / batch_size

    with torch.no_grad():
        forward = timed(model)
    both = timed(lambda z: _forward_backward(model, z))
    return {"forward_s": forward, "backward_s": max(both - forward, 0.0)}


def _images(batch_size: int, img_size: int, device: torch.device) -> torch.Tensor:
    return torch.rand(batch_size, 3, img_size, img_size, device=device)


def _forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        torch.autograd.grad(model(x).logsumexp(1).sum(), x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def project_seconds(passes: dict[str, tuple[float, float]], images: int, cost: dict[str, float],
                    world: int = 1) -> dict[str, float]:
    """Seconds per attack for ``images`` images over ``world`` processes: (forward, backward) passes per
    image × the seconds per image of each pass (:func:`pass_seconds`)."""
    return {attack: images / world * (f * cost["forward_s"] + b * cost["backward_s"])
            for attack, (f, b) in passes.items()}
