"""Clean and PGD accuracy of a model over batches (the per-epoch held-out check)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch

from gnr import distributed
from gnr.eval.attacks import pgd


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def clean_and_pgd_accuracy(model: torch.nn.Module, batches: Iterable, *, eps: float, step_size: float, steps: int,
                           device: torch.device, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Accuracy on clean inputs and under L∞ PGD (random start), summed over all ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # n, clean correct, robust correct
    for batch in batches:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            clean = model(x).argmax(1) == y
            x_adv = pgd(model, x, y, eps=eps, step_size=step_size, steps=steps)
            robust = model(x_adv).argmax(1) == y
        counts += torch.stack([torch.tensor(len(y), device=device, dtype=torch.float64),
                               clean.sum().double(), (clean & robust).sum().double()])
    model.train(was_training)
    n, clean_correct, robust_correct = distributed.all_sum(counts).tolist()
    n = max(n, 1.0)
    return {"n": n, "clean_acc": clean_correct / n, "pgd_acc": robust_correct / n}
