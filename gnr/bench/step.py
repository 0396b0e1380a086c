"""The cost of one optimizer step per objective, measured in one process on the same model.

A step is the trainer's own (:mod:`gnr.step`): the optimizer it builds, mixup / label smoothing,
autocast, grad scaler, clipping, EMA, channels-last on CUDA, ``torch.compile`` if asked. Inputs are
random pixels and labels: the step's compute does not depend on the data.

Per method: the median of the timed steps (each synchronised); then one separate, counted step
(:class:`~gnr.bench.counter.CostCounter`, eager, so the timings carry no counting overhead) gives
FLOPs, the bytes non-matmul ops write and their number. FLOP/s over the peak of the device for the
autocast dtype is the MFU. For gradnorm-fd, its estimate of the penalty's ‖∇ₓℓ‖₁ is compared with
exact double backprop on the same batch.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time

import numpy as np
import timm
import torch

from gnr.bench.counter import CostCounter
from gnr.config import RunConfig, validate
from gnr.distributed import pick_device
from gnr.doublegrad import fast_layer_counts
from gnr.errors import GnrError
from gnr.eval.scoring import autocast
from gnr.models import build_model
from gnr.objectives import OBJECTIVES
from gnr.objectives.gradnorm import GradNorm
from gnr.step import TrainStep, build_train_step

AMPS = ("auto", "bf16", "fp16", "none")
NUM_CLASSES = 1000  # an ImageNet head, as in the paper's timings

# Dense peak TFLOP/s from the vendors' datasheets (no sparsity): tensor cores for bf16 / fp16,
# plain FP32 (not TF32) for fp32. Matched against torch.cuda.get_device_name(); first match wins.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),  # SXM
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),  # SXM, and GH200
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.05, "fp16": 362.05, "fp32": 91.6}),
    ("L40", {"bf16": 181.05, "fp16": 181.05, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("V100-PCIE", {"fp16": 112.0, "fp32": 14.0}),  # no bf16 tensor cores
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
)
DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


def peak_tflops(device_name: str, dtype: torch.dtype | None) -> float | None:
    """A GPU's dense datasheet peak for ``dtype`` (None: fp32), or None when unknown or not a GPU."""
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if pattern in device_name:
            return peaks.get(DTYPE_KEYS[dtype])
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def bench_config(*, model: str, img_size: int, batch_size: int, method: str, act: str, device: str, amp: str,
                 compile: bool, fast_double_backward: bool = True, fast_attention: bool = True) -> RunConfig:
    """The run configuration a user would train with, but for the benchmark's model and batch."""
    compile = compile and not OBJECTIVES[method].double_backward
    return validate({"data": {"num_classes": NUM_CLASSES, "img_size": img_size, "eval_resize": max(img_size, 256)},
                     "model": {"name": model, "act": act, "fast_double_backward": fast_double_backward,
                               "fast_attention": fast_attention}, "objective": {"method": method},
                     "optim": {"batch_size": batch_size},
                     "runtime": {"device": device, "amp": amp, "compile": compile}})


def top_kernels(run_step, device: torch.device, n: int) -> dict:
    """The ``n`` kernels with the most self time in one step under ``torch.profiler``: CUDA kernels on
    a GPU, aten ops on a CPU (whose kernels they are)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run_step()

    def self_us(event) -> float:
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    events = [e for e in prof.key_averages() if self_us(e) > 0 and (not cuda or e.device_type.name == "CUDA")]
    total = sum(self_us(e) for e in events)
    top = sorted(events, key=self_us, reverse=True)[:n]
    return {"unit": "CUDA kernel self time" if cuda else "CPU self time of aten ops", "total_ms": total / 1e3,
            "top": [{"name": e.key, "self_ms": self_us(e) / 1e3, "share": self_us(e) / total, "calls": e.count}
                    for e in top]}


def fd_errors(step: TrainStep, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """gradnorm-fd against exact double backprop on the same batch and dropout masks, both under the
    step's autocast (as the gradnorm method would train): the relative error of the penalty's value
    ‖∇ₓℓ‖₁ (mean of the two signs the objective alternates between), of its parameter gradient per
    step (mean of the two), and of the mean gradient of the two steps (a central difference)."""
    cfg = step.objective.cfg.model_copy(update={"lambda_ce": 0.0, "lambda_gn": 1.0, "eps": 1.0, "ramp_epochs": 0})
    x, y_soft = step.targets(batch[0].clone(), batch[1])
    params = [p for p in step.model.parameters() if p.requires_grad]
    fd = type(step.objective)(cfg)
    results = []
    for objective in (fd, fd, GradNorm(cfg)):  # the FD objective: one step of each sign
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            with autocast(step.device, step.amp):
                loss, parts = objective(step.model, x, y_soft, 1.0)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten().float() for p, g in zip(params, grads)])
        results.append((float(parts["grad_l1"]), flat))
    (v1, g1), (v2, g2), (value, exact) = results

    def error(g: torch.Tensor) -> float:
        return float((g - exact).norm() / exact.norm())

    return {"fd_rel_error": (v1 + v2) / 2 / value - 1, "fd_grad_error": (error(g1) + error(g2)) / 2,
            "fd_pair_error": error((g1 + g2) / 2)}


def bench_step(*, model: str, img_size: int, batch_size: int, methods: list[str], act: str, device: str,
               amp: str, steps: int, warmup: int, compile: bool = False, peak: float | None = None,
               fast_double_backward: bool = True, fast_attention: bool = True, kernels: int = 0,
               kernels_method: str = "gradnorm") -> dict:
    """Time, count and (``kernels`` > 0) profile one optimizer step per method; see the module doc."""
    unknown = [m for m in methods if m not in OBJECTIVES]
    if unknown or not methods:
        raise GnrError(f"unknown method '{unknown[0] if unknown else ''}' (known: {', '.join(OBJECTIVES)})")
    if amp not in AMPS:
        raise GnrError(f"unknown amp '{amp}' (known: {', '.join(AMPS)})")
    if steps < 1 or warmup < 0:
        raise GnrError("--steps must be >= 1 and --warmup >= 0")
    if batch_size < 2 or batch_size % 2:
        raise GnrError("--batch-size must be even: mixup, as in training, pairs the images of a batch")
    if peak is not None and peak <= 0:
        raise GnrError("--peak-tflops must be > 0")
    if kernels and kernels_method not in methods:
        raise GnrError(f"--kernels profiles {kernels_method}, which is not among --methods")
    dev = pick_device(device, 0)
    configs = {m: bench_config(model=model, img_size=img_size, batch_size=batch_size, method=m, act=act,
                               device=device, amp=amp, compile=compile, fast_double_backward=fast_double_backward,
                               fast_attention=fast_attention) for m in methods}
    torch.manual_seed(0)  # the same weights, batch and mixup draws on every run
    np.random.seed(0)
    net, swapped = build_model(configs[methods[0]].model, NUM_CLASSES, img_size)
    net.train()
    batch = (torch.rand(batch_size, 3, img_size, img_size, device=dev),
             torch.randint(0, NUM_CLASSES, (batch_size,), device=dev))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    results, dtype, update = {}, None, 0
    for method, cfg in configs.items():
        step = build_train_step(cfg, net, dev)
        dtype = step.amp
        progress = cfg.objective.ramp_epochs  # ramps done: full penalty weight, full attack step

        def one_step(run: TrainStep = step) -> float:
            nonlocal update
            update += 1
            batches = iter([(batch[0].clone(), batch[1])])  # a fresh batch, as from the loader: mixup works in place
            sync()
            start = time.perf_counter()
            run(batches, progress, update)
            sync()
            return time.perf_counter() - start

        for _ in range(warmup):
            one_step()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        seconds = statistics.median(one_step() for _ in range(steps))
        row = {"sec_per_step": seconds, "images_per_second": batch_size / seconds,
               "passes": step.objective.passes, "compiled": step.train_model is not step.model}
        if dev.type == "cuda":
            row["peak_memory_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        with CostCounter() as cost:
            one_step(dataclasses.replace(step, train_model=step.model))
        if dev.type != "cuda":
            row["peak_memory_mib"] = (state_bytes(step) + cost.peak_bytes) / 2**20
        row.update(gflop_per_image=cost.flops / batch_size / 1e9, tflops=cost.flops / seconds / 1e12,
                   nonmatmul_mb_per_image=cost.nonmatmul_bytes / batch_size / 1e6,
                   nonmatmul_ops=cost.nonmatmul_ops, flops=cost.flops)
        if method == "gradnorm-fd":
            row.update(fd_errors(step, batch))
        if kernels and method == kernels_method:
            row["kernels"] = top_kernels(one_step, dev, kernels)
        results[method] = row
        del step
    peak_value = peak or (peak_tflops(device_name(dev), dtype) if dev.type == "cuda" else None)
    natural = results.get("natural")
    for row in results.values():
        row["mfu"] = row["tflops"] / peak_value if peak_value else None
        row["ratio_to_natural"] = row["sec_per_step"] / natural["sec_per_step"] if natural else None
        row["flop_ratio_to_natural"] = row["flops"] / natural["flops"] if natural else None
    return {
        "model": model, "img_size": img_size, "batch_size": batch_size, "act": act,
        "activations_swapped": swapped, "fast_layers": fast_layer_counts(net), "device": device_name(dev),
        "dtype": DTYPE_KEYS[dtype],
        "peak_tflops": peak_value, "peak_source": "--peak-tflops" if peak else ("datasheet" if peak_value else None),
        "memory": ("cuda max_memory_allocated over the timed steps" if dev.type == "cuda" else
                   "weights, optimizer state and EMA copy, plus the peak of the tensors alive in the counted step"),
        "torch": torch.__version__, "timm": timm.__version__, "steps": steps, "warmup": warmup,
        "methods": results,
    }


def state_bytes(step: TrainStep) -> int:
    """Bytes of the tensors a step starts from: model, optimizer state, EMA copy."""
    tensors = list(step.model.state_dict().values())
    tensors += [v for s in step.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    if step.ema is not None:
        tensors += list(step.ema.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors)
