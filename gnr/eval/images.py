"""Which images an evaluation attacks: a split, the first ``n`` of it, or the ids of a list (RobustBench's 5000)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Iterator

import torch

from gnr.config import RunConfig
from gnr.errors import GnrError

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


def load_ids(ids: str) -> list[str]:
    """``robustbench`` (the shipped 5000 RobustBench ImageNet ids) or a file with one id per line."""
    if ids == "robustbench":
        text = (resources.files("gnr.assets") / "imagenet_test_image_ids.txt").read_text()
    else:
        path = Path(ids)
        if not path.is_file():
            raise GnrError(f"--ids: no such file {path} (or use --ids robustbench)")
        text = path.read_text()
    return [normalise_id(line) for line in text.splitlines() if line.strip()]


def normalise_id(key: str) -> str:
    """Ids and shard keys compare without image extension: ``n01440764/ILSVRC2012_val_00000293``."""
    key = key.strip()
    stem, dot, ext = key.rpartition(".")
    return stem if dot and ext.lower() in ("jpeg", "jpg", "png", "webp") else key


def image_batches(cfg: RunConfig, *, split: str | None = None, ids: str | None = None, n: int | None = None,
                  batch_size: int = 100, rank: int = 0, world: int = 1) -> Iterator[Batch]:
    """This rank's share of the evaluated images: ``split`` of ``cfg.data.source``, restricted to ``ids``
    (first ``n`` of the list) or to the first ``n`` images."""
    from gnr.data.loader import eval_loader

    if ids is None:
        yield from eval_loader(cfg, split=split, rank=rank, world=world, limit=n, batch_size=batch_size)
        return
    wanted = set(load_ids(ids)[:n])
    kept: list[tuple[torch.Tensor, torch.Tensor, str]] = []
    for x, y, keys in eval_loader(cfg, split=split, rank=rank, world=world, batch_size=batch_size):
        kept += [(x[i], y[i], k) for i, k in enumerate(keys) if normalise_id(k) in wanted]
        while len(kept) >= batch_size:
            yield _stack(kept[:batch_size])
            kept = kept[batch_size:]
    if kept:
        yield _stack(kept)


def _stack(items: list[tuple[torch.Tensor, torch.Tensor, str]]) -> Batch:
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]), [i[2] for i in items]
