"""How the evaluated model runs under attack: compiled, channels-last, at a batch size that fits, and
what a pass through it costs.

AutoAttack is first-order and the evaluated model is frozen, so compiling it (``torch.compile``)
and storing activations channels-last change only how its forward and backward run, not what they
compute (up to float reassociation; a CPU test checks that the per-image flags stay the same).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from gnr.eval.phases import Phases

DEFAULT_BATCH = 100  # images per attacked batch where free memory cannot be read (CPU)
MAX_BATCH = 1000
MEMORY_SHARE = 0.6  # of the free GPU memory: the attacks keep several copies of a batch besides the activations
PROBE_BATCH = 8


def prepare_model(model: nn.Module, device: torch.device, *, compile: bool | None = None,
                  channels_last: bool | None = None, phases: Phases | None = None) -> tuple[nn.Module, dict]:
    """The model to attack and how it was prepared: channels-last and compiled where asked, by default
    on CUDA (compiling pays off over thousands of images, not over a few on a CPU). Each graph the
    compiler builds is a phase of ``phases``."""
    cuda = device.type == "cuda"
    channels_last = cuda if channels_last is None else channels_last
    compiled = cuda if compile is None else compile
    if not (channels_last or compiled):
        return model, {"compile": False, "channels_last": False}
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Prepared(model, channels_last, _GraphCounter(phases or Phases()) if compiled else None), \
        {"compile": compiled, "channels_last": channels_last}


class _GraphCounter:
    """inductor, reporting each graph it is given as a phase and counting them: a recompile mid-attack
    costs as much as the first compile, so their number is checked by a test and shown in the log."""

    def __init__(self, phases: Phases):
        self.phases, self.graphs = phases, 0

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        with self.phases.phase(f"compile graph {self.graphs} ({len(gm.graph.nodes)} nodes)"):
            return compile_fx(gm, example_inputs)


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
    """Runs the frozen ``model`` (compiled or not) on a channels-last copy of its input where asked; inputs
    and their gradients keep the default layout.

    A compiled model needs a forward without gradients and a forward with the input's gradient, built
    before the attacks (:func:`compile_graphs`). So that no attack adds a graph, a forward with gradients
    enabled but nothing to differentiate (pyautoattack's checks) runs without them, the batch dimension
    is dynamic (the attacks shrink the batch as images get broken; only that dimension, since symbolic
    image sizes break some models in inductor, timm's ConvNeXt stem), and a batch of one image goes
    through as two copies of it (dynamo specialises a dimension of size one, which would be a graph of
    its own)."""

    def __init__(self, model: nn.Module, channels_last: bool, compiler: _GraphCounter | None = None):
        super().__init__()
        self.channels_last, self.compiler = channels_last, compiler
        self.model = torch.compile(model, backend=compiler) if compiler else model

    @property
    def graphs(self) -> int:
        """Graphs compiled so far."""
        return self.compiler.graphs if self.compiler else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.requires_grad:
            with torch.no_grad():
                return self.forward(x)
        single = self.compiler is not None and x.shape[0] == 1
        if single:
            x = torch.cat([x, x])
        x = _ContiguousGrad.apply(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        out = self.model(x)
        return out[:1] if single else out


def compile_graphs(model: nn.Module, img_size: int, batch_size: int, device: torch.device, phases: Phases) -> None:
    """Build a compiled model's graphs before the attacks, each its own phase: the forward, then the forward
    and backward (the backward compiles at its first call), at ``batch_size`` and every halving of it down
    to two images. A dynamic batch dimension still carries the guards of size-dependent kernel choices
    (a convolution's backend, e.g. oneDNN from 16 images, cuDNN's depthwise heuristics), so a batch that
    shrinks past one would compile again mid-attack; building them all here keeps the attacks free of it."""
    if not isinstance(model, Prepared) or model.compiler is None:
        return
    sizes = sorted({max(batch_size >> k, 2) for k in range(batch_size.bit_length())}, reverse=True)
    with phases.phase(f"compile: forward at batch sizes {', '.join(map(str, sizes))}"), torch.no_grad():
        for b in sizes:
            model(_images(b, img_size, device))
    with phases.phase("compile: forward and backward at the same sizes"):
        for b in sizes:
            _forward_backward(model, _images(b, img_size, device))


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


def pass_times(model: nn.Module, img_size: int, batch_sizes, device: torch.device,
               reps: int = 5, budget_s: float = 0.5) -> dict[int, tuple[float, float]]:
    """Seconds per call of a forward (no grad) and of a forward with a backward to the input, at each batch
    size: the fastest of at least ``reps`` timed calls (more, up to 20, while within ``budget_s``) after
    a warm-up call. The fastest, not the median: on a shared machine the slower calls measure the
    neighbours, and what a pass costs is what it costs undisturbed."""

    def timed(fn, x) -> float:
        fn(x)
        times: list[float] = []
        while len(times) < reps or (len(times) < 20 and sum(times) < budget_s):
            _sync(device)
            t0 = time.perf_counter()
            fn(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    out = {}
    for b in sorted(set(batch_sizes)):
        x = _images(b, img_size, device)
        with torch.no_grad():
            forward = timed(model, x)
        out[b] = (forward, timed(lambda z: _forward_backward(model, z), x))
    return out


def pass_seconds(model: nn.Module, img_size: int, batch_size: int, device: torch.device,
                 reps: int = 5) -> dict[str, float]:
    """Seconds per image of a forward (no grad) and of a backward to the input (forward + backward minus
    forward) at ``batch_size``."""
    forward, both = pass_times(model, img_size, [batch_size], device, reps)[batch_size]
    return {"forward_s": forward / batch_size, "backward_s": max(both - forward, 0.0) / batch_size}


def timed_batches(sizes, most: int = 12) -> list[int]:
    """The batch sizes to time for calls at ``sizes``: all of them, or ``most`` spread geometrically between
    the smallest and the largest (the cost of the others is interpolated, see :func:`model_seconds`)."""
    sizes = sorted(set(sizes))
    if len(sizes) <= most:
        return sizes
    lo, hi = sizes[0], sizes[-1]
    return sorted({round(lo * (hi / lo) ** (i / (most - 1))) for i in range(most)})


def model_seconds(forward_calls: dict[int, int], backward_calls: dict[int, int],
                  times: dict[int, tuple[float, float]]) -> float:
    """What the model passes alone cost: each forward call at its batch size × the forward's time there,
    each backward call × (forward and backward − forward); sizes not timed are interpolated linearly."""
    sizes = sorted(times)

    def at(b: int, which: int) -> float:
        if b in times:
            return times[b][which]
        lo = max([s for s in sizes if s < b], default=sizes[0])
        hi = min([s for s in sizes if s > b], default=sizes[-1])
        if lo == hi:
            return times[lo][which] * b / lo
        w = (b - lo) / (hi - lo)
        return (1 - w) * times[lo][which] + w * times[hi][which]

    return sum(n * at(int(b), 0) for b, n in forward_calls.items()) + \
        sum(n * max(at(int(b), 1) - at(int(b), 0), 0.0) for b, n in backward_calls.items())


def fastest_batch(model: nn.Module, img_size: int, device: torch.device, candidates, mix: tuple[float, float],
                  reps: int = 1) -> tuple[int, dict[str, float]]:
    """The batch size, of ``candidates``, at which ``mix`` = (forward, backward) passes cost least per image,
    and the seconds per forward and backward image there."""
    times = pass_times(model, img_size, candidates, device, reps)
    per_image = {b: {"forward_s": f / b, "backward_s": max(fb - f, 0.0) / b} for b, (f, fb) in times.items()}
    best = min(per_image, key=lambda b: mix[0] * per_image[b]["forward_s"] + mix[1] * per_image[b]["backward_s"])
    return best, per_image[best]


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
