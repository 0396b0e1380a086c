"""Seconds per optimizer step for each objective, measured in one process on the same model.

A step is what the trainer does per batch: forward + objective + backward + AdamW step. Inputs are
random pixels and soft targets: the step's compute does not depend on the data. Every step is
synchronised and timed; the median is reported (robust to a slow first step after a method switch).
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time

import timm
import torch

from gnr.config import ModelConfig, ObjectiveConfig
from gnr.distributed import pick_device
from gnr.errors import GnrError
from gnr.models import build_model
from gnr.objectives import OBJECTIVES, build_objective

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
NUM_CLASSES = 1000  # an ImageNet head, as in the paper's timings


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto`` is bf16 on CUDA and full precision elsewhere."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp not in AMP_DTYPES:
        raise GnrError(f"unknown amp '{amp}' (known: auto, {', '.join(AMP_DTYPES)})")
    return AMP_DTYPES[amp]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def bench_step(*, model: str, img_size: int, batch_size: int, methods: list[str], act: str, device: str,
               amp: str, steps: int, warmup: int) -> dict:
    unknown = [m for m in methods if m not in OBJECTIVES]
    if unknown or not methods:
        raise GnrError(f"unknown method '{unknown[0] if unknown else ''}' (known: {', '.join(OBJECTIVES)})")
    if steps < 1 or warmup < 0:
        raise GnrError("--steps must be >= 1 and --warmup >= 0")
    dev = pick_device(device, 0)
    dtype = autocast_dtype(amp, dev)
    net, swapped = build_model(ModelConfig(name=model, act=act), NUM_CLASSES, img_size)
    memory_format = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    net = net.to(dev, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    x = torch.rand(batch_size, 3, img_size, img_size, device=dev).contiguous(memory_format=memory_format)
    y_soft = torch.softmax(torch.randn(batch_size, NUM_CLASSES, device=dev), dim=1)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    results = {}
    for method in methods:
        cfg = ObjectiveConfig(method=method)
        objective = build_objective(cfg)
        progress = cfg.ramp_epochs  # ramps done: full penalty weight, full attack step

        def one_step() -> float:
            sync()
            start = time.perf_counter()
            autocast = (torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext())
            with autocast:
                loss, _ = objective(net, x, y_soft, progress)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            sync()
            return time.perf_counter() - start

        for _ in range(warmup):
            one_step()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        seconds = statistics.median(one_step() for _ in range(steps))
        results[method] = {"sec_per_step": seconds, "images_per_second": batch_size / seconds,
                           "passes": objective.passes}
        if dev.type == "cuda":
            results[method]["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    natural = results.get("natural", {}).get("sec_per_step")
    for r in results.values():
        r["ratio_to_natural"] = r["sec_per_step"] / natural if natural else None
    return {
        "model": model, "img_size": img_size, "batch_size": batch_size, "act": act,
        "activations_swapped": swapped, "device": device_name(dev),
        "dtype": str(dtype or torch.float32).removeprefix("torch."),
        "torch": torch.__version__, "timm": timm.__version__, "steps": steps, "warmup": warmup,
        "methods": results,
    }
