"""Read shards for training and evaluation: exact under DDP, deterministic under worker processes.

Training (:func:`train_loader`): an epoch has a fixed length taken from the manifest,
``steps_per_epoch`` batches on every rank, so DDP never waits on a rank that ran dry. All ranks and
workers walk the same endless chain of seeded shard permutations, each taking every n-th shard, then
shuffle samples in a seeded buffer. Each sample's augmentation is seeded by its position in its
worker's stream, and DataLoader workers serve batches round-robin, so ``(seed, epoch, rank, world)``
(and the worker count) fix every batch; resuming mid-epoch (``skip_batches``) skips samples before
decoding them and yields exactly the tail of the uninterrupted epoch.

Evaluation (:func:`eval_loader`): the first ``limit`` samples of a split in manifest order, cut into
contiguous ranges, one per (rank, worker): every sample is seen exactly once, with no padding.

Corrupt data is never silent. A shard that is unreadable, truncated (fewer samples than its manifest
entry) or holds an undecodable image is skipped by training, with one warning per shard and process
and a count on the returned :class:`TrainBatches`; evaluation stops with a :class:`GnrError` naming it.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from itertools import count, islice
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from gnr import distributed
from gnr.config import RunConfig
from gnr.data.manifest import Manifest, read_manifest
from gnr.data.transforms import eval_transform, open_image, seeded, train_transform
from gnr.errors import GnrError

log = logging.getLogger(__name__)
_warned_shards: set[str] = set()  # a corrupt shard is warned about once per process

# PIL's exceptions for bytes it cannot decode (UnidentifiedImageError and "truncated" are OSErrors).
DECODE_ERRORS = (OSError, SyntaxError)
_SHUFFLE, _AUGMENT = 0, 1  # purposes mixed into a worker's seed


def resolve_source(source: str) -> str:
    """A concrete shard location: ``demo`` becomes the bundled demo shards (built on first use)."""
    if source == "demo":
        from gnr.data.shards import ensure_demo

        return str(ensure_demo())
    return os.path.expanduser(source)


def with_resolved_source(cfg: RunConfig, source: str | None = None, is_main: bool = True) -> RunConfig:
    """A copy of ``cfg`` reading ``source`` (default: its own) as a concrete location.
    Rank 0 builds the demo shards first, so ranks never race to write them."""
    source = source or cfg.data.source
    if is_main:
        resolve_source(source)
    distributed.barrier()
    out = cfg.model_copy(deep=True)
    out.data.source = resolve_source(source)
    return out


def steps_per_epoch(cfg: RunConfig, world: int) -> int:
    return _steps(_manifest(cfg, cfg.data.train_split).total, cfg.optim.batch_size, world)


def train_loader(cfg: RunConfig, *, epoch: int, rank: int, world: int, skip_batches: int = 0) -> TrainBatches:
    """This rank's batches ``(images float32 [B,3,H,W] in [0,1], labels int64 [B])`` for `epoch`,
    minus the first `skip_batches` (to resume mid-epoch)."""
    manifest = _manifest(cfg, cfg.data.train_split)
    steps = _steps(manifest.total, cfg.optim.batch_size, world)
    skip = min(max(skip_batches, 0), steps)
    stream = _TrainStream(manifest, cfg, epoch=epoch, rank=rank, world=world, steps=steps, skip=skip)
    return TrainBatches(_data_loader(stream, cfg, seed=derive_seed(cfg.runtime.seed, epoch, rank, world)), steps - skip)


def eval_loader(cfg: RunConfig, *, split: str | None = None, rank: int = 0, world: int = 1, limit: int | None = None,
                batch_size: int | None = None) -> EvalBatches:
    """This rank's share of the first `limit` samples (default: all) of `split` (default: the val split),
    as ``(images float32 [B,3,H,W] in [0,1], labels int64 [B], keys list[str])``."""
    manifest = _manifest(cfg, split or cfg.data.val_split)
    total = manifest.total if limit is None else min(limit, manifest.total)
    stream = _EvalStream(manifest, cfg, rank=rank, world=world, total=total,
                         batch_size=batch_size or cfg.eval.batch_size)
    return EvalBatches(_data_loader(stream, cfg, seed=derive_seed(cfg.runtime.seed, rank, world)), len(stream))


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers by numpy's SeedSequence (python's hash() of a tuple would not be stable)."""
    return int(np.random.SeedSequence([p % (1 << 64) for p in parts]).generate_state(1)[0])


def _manifest(cfg: RunConfig, split: str) -> Manifest:
    return read_manifest(resolve_source(cfg.data.source), split)


def _steps(total: int, batch_size: int, world: int) -> int:
    return max(1, total // (batch_size * world))


def _data_loader(stream: IterableDataset, cfg: RunConfig, *, seed: int) -> DataLoader:
    """Batches are formed in the workers (``batch_size=None``); the generator fixes the workers' seeds."""
    return DataLoader(stream, batch_size=None, num_workers=cfg.data.workers,
                      generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.cuda.is_available() and cfg.runtime.device != "cpu")


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


# -- corrupt data ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardProblem:
    """Samples of a shard that could not be used."""

    url: str
    lost: int
    reason: str


class Unreadable(Exception):
    def __init__(self, problem: ShardProblem):
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True)
class _Failure:
    """A GnrError raised in a worker, carried to the main process as data (DataLoader would re-raise
    it wrapped in the worker's traceback, and the CLI owes the user one line)."""

    message: str


def _guarded(items: Iterator) -> Iterator:
    try:
        yield from items
    except GnrError as e:
        yield _Failure(str(e))


def _raise_failures(items: Iterable) -> Iterator:
    for item in items:
        if isinstance(item, _Failure):
            raise GnrError(item.message)
        yield item


def read_shard(url: str, expected: int, image: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in order; raises `Unreadable` when the tar is damaged, a sample lacks
    its image or class, or the shard ends before the `expected` count of its manifest entry."""
    read = 0
    try:
        for sample in wds.tarfile_samples([{"url": url}]):
            if image not in sample or "cls" not in sample:
                raise ValueError(f"sample {sample['__key__']} lacks its {image} or cls entry")
            read += 1
            yield sample
    except Exception as e:  # tarfile, gopen and pipe errors all say the same: this shard is damaged
        raise Unreadable(ShardProblem(url, expected - read, _describe(e))) from None
    if read < expected:
        raise Unreadable(ShardProblem(url, expected - read, f"ends after {read} of {expected} samples"))


def _describe(e: BaseException) -> str:
    first = str(e.args[0]).split(" @ ")[0] if e.args else ""  # webdataset appends " @ <stream repr>"
    return f"{type(e).__name__}: {first.splitlines()[0] if first else 'no detail'}"


# -- training ----------------------------------------------------------------------------------

class TrainBatches:
    """One epoch of one rank's training batches; iterate for ``(images, labels)``.

    Samples lost to corrupt shards are skipped, not replaced by padding: the epoch keeps its length.
    Each such shard is warned about once per process (logger ``gnr.data.loader``) and counted in
    `skipped` (one entry per lost shard part or sample), `skipped_shards` (shard URL -> samples lost)
    and `skipped_samples` (their sum). An epoch may pass a shard twice (the shard chain wraps
    around): a loss met again is the same loss, counted once.
    """

    def __init__(self, loader: DataLoader, length: int):
        self._loader, self._length = loader, length
        self.skipped: dict[tuple[str, str], int] = {}  # (shard URL, what was lost) -> samples

    @property
    def skipped_shards(self) -> dict[str, int]:
        return count_by_shard(self.skipped)

    @property
    def skipped_samples(self) -> int:
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, problems in _raise_failures(self._loader):
            for problem in problems:
                self._record(problem)
            yield images, labels

    def _record(self, problem: ShardProblem) -> None:
        self.skipped[(problem.url, problem.reason)] = problem.lost
        if problem.url not in _warned_shards:
            _warned_shards.add(problem.url)
            log.warning("skipping corrupt shard %s: %s (%d samples lost)", problem.url, problem.reason, problem.lost)


def count_by_shard(skipped: dict[tuple[str, str], int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (url, _), lost in skipped.items():
        out[url] = out.get(url, 0) + lost
    return out


class _Losses:
    """Problems met since the last batch, and a guard against a split with nothing usable in it."""

    def __init__(self, manifest: Manifest):
        self.pending: list[ShardProblem] = []
        self.manifest, self.lost_in_a_row = manifest, 0

    def add(self, problem: ShardProblem) -> None:
        self.pending.append(problem)
        self.lost_in_a_row += problem.lost
        if self.lost_in_a_row > self.manifest.total:
            raise GnrError(f"no usable sample in a whole pass over the {self.manifest.split} shards "
                           f"(last: {problem.url}: {problem.reason})")

    def used_one(self) -> None:
        self.lost_in_a_row = 0

    def take(self) -> tuple[ShardProblem, ...]:
        taken, self.pending = tuple(self.pending), []
        return taken


class _TrainStream(IterableDataset):
    """One rank's epoch. Worker w of W produces global batches w, w+W, w+2W, ...: exactly the order in
    which DataLoader collects them round-robin."""

    def __init__(self, manifest: Manifest, cfg: RunConfig, *, epoch: int, rank: int, world: int, steps: int,
                 skip: int):
        self.manifest, self.cfg = manifest, cfg
        self.epoch, self.rank, self.world, self.steps, self.skip = epoch, rank, world, steps, skip
        self.transform = train_transform(cfg)

    def __iter__(self) -> Iterator:
        return _guarded(self._batches())

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[ShardProblem, ...]]]:
        slot, workers = _worker_slot()
        # After skipping k batches, DataLoader's first worker must serve batch k of the full epoch.
        worker = (slot + self.skip) % workers
        batch_size = self.cfg.optim.batch_size
        skipped = len(range(worker, self.skip, workers))
        remaining = len(range(worker, self.steps, workers)) - skipped
        seed = (self.cfg.runtime.seed, self.epoch, self.rank, self.world, worker)
        losses = _Losses(self.manifest)
        shards = _shard_chain(self.manifest.urls, seed=derive_seed(self.cfg.runtime.seed, self.epoch),
                              consumer=self.rank * workers + worker, consumers=self.world * workers)
        buffer = self.cfg.data.shuffle_buffer  # filled before the first draw, so no epoch starts poorly mixed
        samples = wds.shuffle(buffer, initial=buffer, rng=random.Random(derive_seed(*seed, _SHUFFLE)))(
            self._readable(shards, losses))
        numbered = islice(enumerate(samples), skipped * batch_size, None)  # skipped before decoding
        augmented = self._augmented(numbered, derive_seed(*seed, _AUGMENT), losses)
        for batch in islice(_chunks(augmented, batch_size), remaining):
            images, labels = default_collate(batch)  # in a worker, stacks straight into shared memory
            yield images, labels, losses.take()

    def _readable(self, shards: Iterator[str], losses: _Losses) -> Iterator[dict[str, Any]]:
        counts = dict(zip(self.manifest.urls, self.manifest.counts))
        for url in shards:
            try:
                yield from read_shard(url, counts[url], self.manifest.image)
            except Unreadable as e:
                losses.add(e.problem)

    def _augmented(self, numbered: Iterator[tuple[int, dict]], base_seed: int,
                   losses: _Losses) -> Iterator[tuple[torch.Tensor, int]]:
        in_worker = get_worker_info() is not None  # with workers=0, the trainer's RNG streams must not move
        for position, sample in numbered:
            try:
                with seeded((base_seed + position) % (1 << 32), restore=not in_worker):
                    image = self.transform(open_image(sample[self.manifest.image]))
            except DECODE_ERRORS as e:
                losses.add(ShardProblem(sample["__url__"], 1, f"{sample['__key__']}: {_describe(e)}"))
                continue
            losses.used_one()
            yield image, int(sample["cls"])


def _shard_chain(urls: list[str], *, seed: int, consumer: int, consumers: int) -> Iterator[str]:
    """Every `consumers`-th shard, from `consumer` on, of an endless chain of seeded permutations.

    All ranks and workers walk the same chain, so within one permutation they read different shards,
    and nobody runs dry, however few shards there are."""

    def chain() -> Iterator[str]:
        for cycle in count():
            order = list(urls)
            random.Random(derive_seed(seed, cycle)).shuffle(order)
            yield from order

    return islice(chain(), consumer, None, consumers)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


# -- evaluation --------------------------------------------------------------------------------

class EvalBatches:
    """This rank's evaluation batches; iterate for ``(images, labels, keys)``."""

    def __init__(self, loader: DataLoader, length: int):
        self._loader, self._length = loader, length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        return _raise_failures(self._loader)


class _EvalStream(IterableDataset):
    """Samples [0, total) of a split in manifest order; consumer c of C (ranks x workers) reads the
    contiguous range [c*total/C, (c+1)*total/C), touching only the shards that hold it."""

    def __init__(self, manifest: Manifest, cfg: RunConfig, *, rank: int, world: int, total: int, batch_size: int):
        self.manifest, self.cfg = manifest, cfg
        self.rank, self.world, self.total, self.batch_size = rank, world, total, batch_size
        self.workers = max(cfg.data.workers, 1)
        self.transform = eval_transform(cfg)

    def _range(self, worker: int, workers: int) -> range:
        consumer, consumers = self.rank * workers + worker, self.world * workers
        return range(consumer * self.total // consumers, (consumer + 1) * self.total // consumers)

    def __len__(self) -> int:
        return sum(math.ceil(len(self._range(w, self.workers)) / self.batch_size) for w in range(self.workers))

    def __iter__(self) -> Iterator:
        return _guarded(self._batches())

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        share = self._range(*_worker_slot())
        for batch in _chunks(self._samples(share.start, share.stop), self.batch_size):
            images, labels, keys = default_collate([(self._decode(s), int(s["cls"]), s["__key__"]) for s in batch])
            yield images, labels, keys

    def _samples(self, lo: int, hi: int) -> Iterator[dict[str, Any]]:
        start = 0
        for url, n in zip(self.manifest.urls, self.manifest.counts):
            stop = start + n
            if start < hi and lo < stop:
                wanted = islice(read_shard(url, n, self.manifest.image), max(lo - start, 0), min(hi, stop) - start)
                try:
                    yield from wanted
                except Unreadable as e:
                    raise GnrError(f"corrupt shard {url}: {e.problem.reason}") from None
            start = stop

    def _decode(self, sample: dict[str, Any]) -> torch.Tensor:
        try:
            return self.transform(open_image(sample[self.manifest.image]).convert("RGB"))
        except DECODE_ERRORS as e:
            raise GnrError(f"corrupt image {sample['__key__']} in shard {sample['__url__']}: {_describe(e)}") from None
