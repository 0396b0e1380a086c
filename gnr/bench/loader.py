"""`gnr bench loader`: images/s of gnr's WebDataset train pipeline beside torchvision's ImageFolder.

Both pipelines read the same JPEG files and apply the same transform object (timm's training recipe
from the default ``augment`` config, then un-normalised to [0, 1]) in the same number of DataLoader
workers. gnr decodes lazily, so its crop can ask libjpeg for a reduced-size decode
(:class:`gnr.data.transforms.DraftRandomResizedCrop`); ImageFolder hands the transform a fully
decoded image, on which that crop behaves exactly like timm's.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterable

from gnr.config import RunConfig
from gnr.data.manifest import manifest_name
from gnr.data.shards import JPEG_SUFFIXES, write_imagefolder
from gnr.errors import GnrError

ROUNDS = 5  # the pipelines alternate and medians are reported: the CPU may be shared with other work
TRANSFORM_FIELDS = {"scale", "hflip", "auto_augment", "color_jitter", "reprob", "remode", "interpolation"}


def bench_loader(data: str | Path, *, batch_size: int = 64, workers: int = 1, img_size: int = 224,
                 batches: int = 8) -> dict:
    """Time `batches` batches of each pipeline after a warm-up batch (worker start, first reads), in
    alternating rounds. Besides wall-clock images/s, images per CPU-second of the main process and
    its workers: on a machine shared with other work, the figure that compares the pipelines."""
    data = Path(data)
    if not data.is_dir():
        raise GnrError(f"--data must be a folder of JPEGs or a shard directory: {data}")
    with tempfile.TemporaryDirectory(prefix="gnr-bench-") as tmp:
        tree, shards = _prepare(data, Path(tmp))
        cfg = RunConfig.model_validate({"data": {"source": str(shards), "img_size": img_size,
                                                 "eval_resize": max(256, img_size), "workers": workers},
                                        "optim": {"batch_size": batch_size}})
        images = _count_images(tree)
        if images < (batches + 1) * batch_size:
            raise GnrError(f"{data} has {images} images; timing {batches} batches of {batch_size} after a warm-up "
                           f"batch needs {(batches + 1) * batch_size} (lower --batches or --batch-size)")
        gnr, folder = [], []
        for epoch in range(ROUNDS):
            gnr.append(_throughput(_gnr_batches(cfg, epoch), batch_size, batches))
            folder.append(_throughput(_imagefolder_batches(tree, cfg), batch_size, batches))
    gnr_summary, folder_summary = _summary(gnr, workers), _summary(folder, workers)
    return {
        "data": str(data), "images": images, "batch_size": batch_size, "workers": workers, "img_size": img_size,
        "timed_batches": batches, "rounds": ROUNDS,
        "transforms": cfg.augment.model_dump(mode="json", include=TRANSFORM_FIELDS),
        "gnr_webdataset": gnr_summary,
        "torchvision_imagefolder": folder_summary,
        "ratio_gnr_to_imagefolder": {
            key: round(gnr_summary[key] / folder_summary[key], 3) for key in ("images_per_s", "images_per_cpu_s")},
    }


def _summary(rounds: list[tuple[float, float]], workers: int) -> dict:
    wall = statistics.median(r[0] for r in rounds)
    return {"images_per_s": round(wall, 1), "images_per_s_per_worker": round(wall / max(workers, 1), 1),
            "images_per_cpu_s": round(statistics.median(r[1] for r in rounds), 1),
            "rounds_images_per_s": [round(r[0], 1) for r in rounds]}


def _prepare(data: Path, tmp: Path) -> tuple[Path, Path]:
    """(ImageNet-style tree, shard directory) holding the same images, building what `data` lacks."""
    if (data / manifest_name("train")).is_file():
        return _extract_tree(data, tmp / "tree"), data
    tree = data if any(p.is_dir() for p in data.iterdir()) else _tree_from_flat(data, tmp / "tree")
    class_map = tmp / "classes.json"  # sorted folder names, as ImageFolder numbers them
    class_map.write_text(json.dumps({d.name: i for i, d in enumerate(sorted(p for p in tree.iterdir() if p.is_dir()))}))
    write_imagefolder(tree, tmp / "shards", "train", class_map=class_map)
    return tree, tmp / "shards"


def _tree_from_flat(folder: Path, tree: Path) -> Path:
    """Symlink ``<wnid>_<name>.JPEG`` files into ``tree/<wnid>/``; a name without '_' is its own class."""
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in JPEG_SUFFIXES:
            target = tree / path.stem.split("_")[0] / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    return tree


def _extract_tree(shards: Path, tree: Path) -> Path:
    """Write the images of a shard directory's train split as ``tree/<class index>/<key>.<ext>``."""
    import webdataset as wds

    from gnr.data.manifest import read_manifest

    manifest = read_manifest(str(shards), "train")
    for sample in wds.tarfile_samples([{"url": url} for url in manifest.urls]):
        target = tree / sample["cls"].decode() / f"{sample['__key__'].replace('/', '_')}.{manifest.image}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(sample[manifest.image])
    return tree


def _count_images(tree: Path) -> int:
    return sum(1 for p in tree.glob("*/*") if p.is_file())


def _gnr_batches(cfg: RunConfig, epoch: int) -> Iterable:
    from gnr.data.loader import train_loader

    return train_loader(cfg, epoch=epoch, rank=0, world=1)


def _imagefolder_batches(tree: Path, cfg: RunConfig) -> Iterable:
    import torch
    from torchvision.datasets import ImageFolder

    from gnr.data.transforms import train_transform

    dataset = ImageFolder(str(tree), transform=train_transform(cfg))
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True,
                                       num_workers=cfg.data.workers)


def _throughput(batches: Iterable, batch_size: int, timed: int) -> tuple[float, float]:
    """(images per second, images per CPU-second) over `timed` batches after a warm-up batch."""
    it = iter(batches)
    next(it)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(timed):
        next(it)
    images = timed * batch_size
    return images / (time.perf_counter() - wall), images / (_cpu_seconds() - cpu)


def _cpu_seconds() -> float:
    """CPU time of this process and its live child processes (the DataLoader workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for child in multiprocessing.active_children():
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total
