"""Write WebDataset shards: an ImageNet folder tree (original JPEG bytes) or the bundled digits demo.

A split becomes ``<split>-000000.tar, <split>-000001.tar, ...`` plus the manifest ``<split>.json``
(sample count and sha256 per shard). Each sample is ``<key>.jpg`` (or ``.png``) and ``<key>.cls``
(the class index as ASCII). Every file is written under a temporary name and renamed when complete,
and the manifest is written last, so an interrupted write never leaves a shard or a split that
looks complete. Shards are byte-reproducible: the same input and seed give the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from gnr import atomic, paths
from gnr.data.manifest import Manifest, Shard, manifest_name, shard_name
from gnr.errors import GnrError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
JPEG_SUFFIXES = {".jpeg", ".jpg"}
DEMO_SHARD_SIZE = 256
ROBUSTBENCH_IDS = "robustbench"

Sample = tuple[str, int, bytes]  # key, class index, encoded image


def asset(name: str) -> Path:
    return Path(str(resources.files("gnr") / "assets" / name))


# -- writing a split ---------------------------------------------------------------------------

def write_split(samples: Iterable[Sample], out: str | Path, split: str, *, total: int, classes: list[str],
                image: str, shard_size: int = 1000, overwrite: bool = False, progress: bool = False,
                ids: dict | None = None, skipped: list[str] | None = None) -> Manifest:
    """Write `samples` (in the given order) as shards of `shard_size` plus the manifest.

    `skipped` names the inputs that `samples` leaves out; it may grow while `samples` is consumed."""
    out = Path(out)
    if shard_size < 1:
        raise GnrError(f"--shard-size must be at least 1, got {shard_size}")
    _claim(out, split, overwrite)
    shards = []
    with _progress_bar(f"writing {split} shards", total, enabled=progress) as advance:
        for index, chunk in enumerate(_chunks(samples, shard_size)):
            shards.append(_write_shard(out / shard_name(split, index), chunk, image))
            advance(len(chunk))
    manifest = Manifest(split=split, image=image, classes=tuple(classes), shards=tuple(shards), ids=ids,
                        skipped=tuple(skipped or ()))
    atomic.write_text(out / manifest_name(split), manifest.to_json())
    _remove_stale_shards(out, split, keep={s.name for s in shards})
    return manifest


def _claim(out: Path, split: str, overwrite: bool) -> None:
    """Refuse to touch an existing split unless asked; when asked, retract its manifest first."""
    existing = _split_files(out, split)
    if existing and not overwrite:
        raise GnrError(f"{out} already holds the {split} split ({existing[0].name}, ...); "
                       "pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / manifest_name(split)).unlink(missing_ok=True)


def _split_files(out: Path, split: str) -> list[Path]:
    return sorted(p for p in [out / manifest_name(split), *out.glob(f"{split}-*.tar")] if p.exists())


def _remove_stale_shards(out: Path, split: str, keep: set[str]) -> None:
    """An overwrite that wrote fewer shards than before leaves no orphans behind."""
    for path in out.glob(f"{split}-*.tar"):
        if path.name not in keep:
            path.unlink()


def _write_shard(path: Path, samples: tuple[Sample, ...], image: str) -> Shard:
    import webdataset as wds  # imports torch: not before there is something to write

    with atomic.replacing(path) as tmp:
        with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as tar:
            for key, label, data in samples:
                tar.write({"__key__": key, image: data, "cls": str(label).encode()})
        digest = file_sha256(tmp)
    return Shard(name=path.name, count=len(samples), sha256=digest)


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[tuple[Sample, ...]]:
    it = iter(samples)
    while chunk := tuple(islice(it, size)):
        yield chunk


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _progress_bar(description: str, total: int, *, enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# -- ImageNet folder tree ----------------------------------------------------------------------

def write_imagefolder(root: str | Path, out: str | Path, split: str, *, ids: str | None = None,
                      class_map: str | Path | None = None, shard_size: int = 1000, seed: int = 0,
                      overwrite: bool = False, progress: bool = False, strict: bool = False) -> Manifest:
    """Shard ``root/<wnid>/*.JPEG`` with the original bytes, keyed ``<wnid>/<file stem>``.

    Class indices come from `class_map` (JSON wnid -> index; default: the standard ImageNet-1k order).
    `ids` keeps only the listed ``<wnid>/<file>`` entries (a file, or ``robustbench`` for the
    5000-image robustness test set). Train shards are shuffled with `seed`; val keeps sorted order.
    Each file must decode as an image: one that does not is skipped with a warning and listed in the
    manifest's ``skipped``, or, with `strict`, stops the write with a one-line error.
    """
    if split not in SPLITS:
        raise GnrError(f"--split must be one of {' | '.join(SPLITS)}, got '{split}'")
    root = Path(root)
    files = _find_jpegs(root)
    index = _read_class_map(class_map)
    provenance = None
    if ids is not None:
        files, provenance = _select_ids(files, ids, root)
    if split == "train":
        random.Random(seed).shuffle(files)
    labels = [_class_index(index, path.parent.name, class_map) for path in files]
    skipped: list[str] = []
    samples = _decodable(files, labels, strict=strict, skipped=skipped)
    return write_split(samples, out, split, total=len(files), classes=sorted(index, key=index.get), image="jpg",
                       shard_size=shard_size, overwrite=overwrite, progress=progress, ids=provenance, skipped=skipped)


def _decodable(files: list[Path], labels: list[int], *, strict: bool, skipped: list[str]) -> Iterator[Sample]:
    for path, label in zip(files, labels):
        data = path.read_bytes()
        problem = decode_problem(data)
        if problem is None:
            yield _sample_key(path), label, data
            continue
        if strict:
            raise GnrError(f"{path} is not a decodable image ({problem}); remove it, or drop --strict to skip such files")
        log.warning("skipping %s: not a decodable image (%s)", path, problem)
        skipped.append(f"{path.parent.name}/{path.name}")


def decode_problem(data: bytes) -> str | None:
    """Why `data` does not decode as an image, or None. Cheap: JPEGs decode at 1/8 scale (draft mode)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (img.width // 8 or 1, img.height // 8 or 1))
            img.load()
    except Image.UnidentifiedImageError:
        return "not an image format PIL knows"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"
    return None


def _find_jpegs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise GnrError(f"image folder not found: {root}")
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in JPEG_SUFFIXES and p.is_file())
    if not files:
        raise GnrError(f"no JPEG files under {root} (expected {root}/<wnid>/*.JPEG)")
    return files


def _read_class_map(class_map: str | Path | None) -> dict[str, int]:
    path = Path(class_map) if class_map else asset("imagenet_class_to_id_map.json")
    try:
        index = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError) as e:
        raise GnrError(f"cannot read class map {path}: expected JSON {{wnid: index}} ({e})") from None
    if sorted(index.values()) != list(range(len(index))):
        raise GnrError(f"class map {path} must number its classes 0..{len(index) - 1}, each once")
    return index


def _class_index(index: dict[str, int], wnid: str, class_map: str | Path | None) -> int:
    if wnid not in index:
        raise GnrError(f"class folder '{wnid}' is not in the class map "
                       f"({class_map or 'ImageNet-1k'}); pass --class-map")
    return index[wnid]


def _select_ids(files: list[Path], ids: str, root: Path) -> tuple[list[Path], dict]:
    path = asset("imagenet_test_image_ids.txt") if ids == ROBUSTBENCH_IDS else Path(ids)
    if not path.is_file():
        raise GnrError(f"ids file not found: {path}")
    wanted = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    kept = [p for p in files if f"{p.parent.name}/{p.name}" in wanted]
    if not kept:
        raise GnrError(f"none of the {len(wanted)} ids in {ids} is under {root} (lines look like <wnid>/<file>)")
    return kept, {"source": ids, "listed": len(wanted), "found": len(kept)}


def _sample_key(path: Path) -> str:
    """``<wnid>/<stem>``; dots would split the key from its extension inside the tar, so they become '_'."""
    return f"{path.parent.name}/{path.stem.replace('.', '_')}"


# -- bundled demo: scikit-learn's handwritten digits -----------------------------------------------

def write_demo(out: str | Path, *, seed: int = 0, overwrite: bool = False,
               progress: bool = False) -> dict[str, Manifest]:
    """Train/val shards of the 1797 8x8 digits, upscaled to 32x32 RGB PNGs, split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = list(range(len(digits.target)))
    train, val = train_test_split(indices, test_size=0.2, stratify=digits.target, random_state=seed)
    classes = [str(c) for c in digits.target_names]
    manifests = {}
    for split, chosen in (("train", train), ("val", sorted(val))):
        samples = ((f"digit-{i:04d}", int(digits.target[i]), _digit_png(digits.images[i])) for i in chosen)
        manifests[split] = write_split(samples, out, split, total=len(chosen), classes=classes, image="png",
                                       shard_size=DEMO_SHARD_SIZE, overwrite=overwrite, progress=progress)
    return manifests


def _digit_png(pixels: np.ndarray) -> bytes:
    """8x8 intensities in 0..16 -> 32x32 RGB PNG (lossless)."""
    grey = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8))
    buffer = io.BytesIO()
    grey.resize((32, 32), Image.Resampling.BICUBIC).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def ensure_demo() -> Path:
    """The demo shards under ``$GNR_HOME/data/demo``, built on first use.

    Safe when several processes (e.g. torchrun ranks) race: each builds in its own temporary
    directory and renames it into place; the rename is atomic and only the first one succeeds.
    """
    target = paths.demo_data_dir()
    if _demo_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_demo(staging)
        os.rename(staging, target)
    except OSError as e:
        if not _demo_complete(target):
            raise GnrError(f"cannot create the demo shards at {target}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _demo_complete(path: Path) -> bool:
    return all((path / manifest_name(split)).is_file() for split in SPLITS)
