"""Robust accuracy of a trained model: clean, PGD-k and AutoAttack, sharded over ranks and resumable.

``evaluate(run_id, spec)`` loads the run's exported weights, attacks every selected image exactly
once (split across ``torchrun`` ranks, results gathered on rank 0), keeps each batch's per-image
results on disk so that an interrupted evaluation continues where it stopped, runs the Carlini et
al. (2019) sanity checks, and logs metrics, tags and a per-image CSV into the same MLflow run.

All attacks run in fp32 by default (PAPER.md §4 settings): reduced precision can round small input
gradients to zero and make a model look more robust than it is. ``precision="bf16"`` runs
AutoAttack's iterations in bf16 and re-checks every image in fp32 (:mod:`gnr.autoattack`). The model
is compiled and channels-last on CUDA, and the batch size follows free GPU memory
(:mod:`gnr.eval_speed`); before the first batch a projection of the cost is reported, then each
attack's progress.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from gnr import atomic, distributed, eval_speed, paths
from gnr.autoattack import PRECISIONS, STANDARD as STANDARD_ATTACKS, AttackStats, Recheck, run_autoattack, \
    upper_bound_passes
from gnr.config import RunConfig
from gnr.data.shards import file_sha256
from gnr.errors import GnrError

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]

ATTACK_RE = re.compile(r"^(clean|pgd([1-9]\d*)|autoattack)$")
# Carlini et al. 2019: an unbounded-enough attack must reach ~0 accuracy; more steps or a stronger
# attack must not raise it. SLACK absorbs random-start noise between two attacks.
SANITY_EPS = 64.0
SANITY_MAX_ACC = 0.05
SLACK = 0.005


def pgd_step(eps: float) -> float:
    """PGD step in pixels for a budget ``eps`` in pixels: the paper's 1/255 (PAPER.md §4), but ε/4 where
    that is larger, so a 10-step attack can cross the whole ball at the large sanity ε."""
    return max(1 / 255, eps / 4)


@dataclass(frozen=True)
class Measure:
    """One column of the per-image results: an attack at a budget ``eps`` (in 1/255)."""

    attack: str
    eps: float = 0.0

    @property
    def name(self) -> str:
        return "clean" if self.attack == "clean" else f"{self.attack}/eps{self.eps:g}"

    @property
    def sanity(self) -> bool:
        return self.eps >= SANITY_EPS

    @classmethod
    def parse(cls, name: str) -> "Measure":
        """The measure a column is named after (the inverse of :attr:`name`)."""
        attack, _, eps = name.partition("/eps")
        return cls(attack, float(eps) if eps else 0.0)


def parse_attacks(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in names if n.strip()))
    bad = [n for n in names if not ATTACK_RE.match(n)]
    if bad or not names:
        raise GnrError(f"unknown attack '{(bad or [''])[0]}' (choose from clean, pgd<steps> e.g. pgd10, autoattack)")
    return names


def parse_eps(values: Iterable[str]) -> tuple[float, ...]:
    """Budgets in 1/255 (``"4"`` or ``"4/255"``)."""
    out = []
    for v in values:
        text = v.strip().removesuffix("/255")
        try:
            eps = float(text)
        except ValueError:
            raise GnrError(f"--eps takes numbers in 1/255, e.g. 1,2,4 (got '{v.strip()}')") from None
        if not 0 < eps <= 255:
            raise GnrError(f"--eps must be in (0, 255] (in 1/255), got {v.strip()}")
        out.append(eps)
    if not out:
        raise GnrError("--eps needs at least one budget, e.g. 4")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: attacks × budgets on which images, with which weights."""

    attacks: tuple[str, ...] = ("clean", "pgd10", "autoattack")
    eps: tuple[float, ...] = (1.0, 2.0, 4.0)
    weights: str = "ema"
    data: str | None = None
    split: str | None = None
    ids: str | None = None
    n: int | None = None
    batch_size: int | None = None  # None: from free GPU memory (CUDA), else eval_speed.DEFAULT_BATCH
    device: str = "auto"
    seed: int = 0
    compile: bool | None = None  # None: on CUDA
    precision: str = "fp32"  # or bf16: AutoAttack's iterations in bf16, every verdict re-checked in fp32

    def measures(self) -> list[Measure]:
        """Requested columns, plus PGD-10 at ε = 64/255 for the large-ε sanity check."""
        out = [Measure("clean")] if "clean" in self.attacks else []
        out += [Measure(a, e) for a in self.attacks if a != "clean" for e in self.eps]
        if any(a != "clean" for a in self.attacks):
            out.append(Measure("pgd10", SANITY_EPS))
        return list(dict.fromkeys(out))


# -- model and images ---------------------------------------------------------------------------

def build_evaluated_model(cfg: RunConfig, weights_file: str | Path, device: torch.device) -> nn.Module:
    """The run's architecture with ``weights_file`` loaded, in eval mode, parameters frozen."""
    from gnr.models import build_model

    model_cfg = cfg.model.model_copy(update={"pretrained": False, "weights": str(weights_file)})
    model, _ = build_model(model_cfg, cfg.data.num_classes, cfg.data.img_size)
    return model.to(device).eval().requires_grad_(False)


@dataclass
class RunModel:
    model: nn.Module
    cfg: RunConfig
    digest: str  # sha1 of the weights file: a retrained run invalidates cached results


def load_run_model(run_id: str, weights: str = "ema", uri: str | None = None,
                   device: torch.device | str = "cpu") -> RunModel:
    """A run's trained model (``ema`` or ``raw`` weights from MLflow) and the config it was trained with."""
    from gnr.tracking import download_weights, load_run_config

    if weights not in ("ema", "raw"):
        raise GnrError(f"--weights is ema, raw or a local file (got '{weights}')")
    cfg = load_run_config(run_id, uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = download_weights(run_id, weights, tmp, uri)
        return RunModel(build_evaluated_model(cfg, path, torch.device(device)), cfg, file_sha256(path))


def model_source(model_uri: str, uri: str | None = None) -> tuple[str, str]:
    """The run an MLflow model URI came from and the weights (``ema`` or ``raw``) it holds.

    gnr loads those weights (safetensors) from that run rather than the logged model itself: they
    are the same tensors (the tests compare the logits), the run's config rebuilds the eager timm model
    that attacks and gradient statistics differentiate through (the logged model is an exported graph),
    loading runs no code from the store, and results land in, and are cached for, that run.
    """
    from gnr.tracking import load_run_config, model_source_run

    run_id = model_source_run(model_uri, uri)
    return run_id, "ema" if load_run_config(run_id, uri).ema.enabled else "raw"


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


# -- attacks ------------------------------------------------------------------------------------

def predicts(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def robust_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, measure: Measure, seed: int,
                   aa_log: list[str], *, precision: str = "fp32", on_attack=None,
                   rechecks: list[Recheck] | None = None) -> torch.Tensor:
    """Per image: is it classified correctly and does it survive ``measure``'s attack?

    AutoAttack reports each attack of its suite to ``on_attack`` and, in bf16, its fp32 re-check to ``rechecks``.
    """
    from gnr.attacks import pgd

    if measure.attack == "clean":
        return predicts(model, x, y)
    eps = measure.eps / 255
    if measure.attack == "autoattack":
        result = run_autoattack(model, x, y, eps=eps, seed=seed, log=aa_log, precision=precision, on_attack=on_attack)
        if result.recheck is not None and rechecks is not None:
            rechecks.append(result.recheck)
        return result.flags
    steps = int(measure.attack.removeprefix("pgd"))
    x_adv = pgd(model, x, y, eps=eps, step_size=pgd_step(eps), steps=steps, random_start=True)
    return predicts(model, x, y) & predicts(model, x_adv, y)


def autoattack_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seed: int,
                       log: list[str] | None = None) -> torch.Tensor:
    """pyautoattack's standard L∞ evaluation of one batch in fp32: the robust flags of a single
    ``run_standard_evaluation`` call, unchanged; its warnings go to ``log``."""
    return run_autoattack(model, x, y, eps=eps, seed=seed, log=log).flags


@contextmanager
def seeded(seed: int, device: torch.device):
    """A fixed RNG stream for one batch (PGD random starts), leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


# -- per-batch results on disk ------------------------------------------------------------------

class BatchCache:
    """Per-image results of finished batches, one JSON file per batch, written atomically.

    Rows are keyed by image id, so a rerun (same or different number of ranks) skips every batch
    whose images already carry every requested measure.
    """

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        for path in sorted(self.root.glob("batch-*.json")):
            for row in json.loads(path.read_text()):
                rows.setdefault(row["id"], {}).update(row)
        return rows

    def write(self, rows: list[dict]) -> Path:
        digest = hashlib.sha1("\n".join(r["id"] for r in rows).encode()).hexdigest()[:16]
        names = sorted(k for k in rows[0] if k not in ("id", "label"))
        path = self.root / f"batch-{digest}-{hashlib.sha1(','.join(names).encode()).hexdigest()[:8]}.json"
        return atomic.write_text(path, json.dumps(rows))


def cache_dir(identity: dict) -> Path:
    """``$GNR_EVAL_CACHE/<run id>/<hash of what makes a per-image result valid>``.

    Batch size, ``--n`` and ``--ids`` only choose images, so they are not part of the hash: a
    larger evaluation reuses a smaller one's images.
    """
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return paths.eval_cache_root() / identity["run_id"] / digest


# -- the evaluation -----------------------------------------------------------------------------

@dataclass
class BatchProgress:
    """Reported after each batch on rank 0 (its own share of the images)."""

    done: int
    total: int
    images_per_s: float
    accuracy: dict[str, float]
    resumed: bool


@dataclass
class EvalPlan:
    """Reported once on rank 0 before the first batch: what will run and what it should cost.

    The projection is (passes per image, from the attacks' settings) × (seconds per forward and
    backward image of this model at this batch size, timed here). AutoAttack's cost depends on how
    many images stay robust, so it is a range: every image broken by APGD-CE .. every image robust.
    """

    images: int  # this rank's share
    world: int
    batch_size: int
    device: str
    settings: dict  # compile, channels_last, precision
    pass_seconds: dict[str, float]
    projected_s: tuple[float, float]  # (least, most), for this rank's share


@dataclass
class AttackProgress:
    """Reported on rank 0 after each attack of the AutoAttack suite on a batch, and after each other measure."""

    measure: str  # e.g. autoattack/eps4
    attack: str  # apgd-ce | apgd-t | fab-t | square, or the measure's name
    done: int  # images of this rank's share through this attack
    total: int
    robust: int  # of those, still robust after it
    elapsed_s: float
    eta_s: float | None


@dataclass
class EvalResult:
    run_id: str
    weights: str
    n: int
    accuracy: dict[str, float]
    warnings: list[str]
    batches: int
    resumed_batches: int
    elapsed_s: float
    csv_path: str  # the run's merged table under metric_prefix, a local copy of what is logged
    metric_prefix: str
    is_main: bool = True
    settings: dict = field(default_factory=dict)
    attacks: list[dict] = field(default_factory=list)  # per ε and attack: images, robust, seconds, passes
    rechecks: dict[str, dict] = field(default_factory=dict)  # bf16 only: per measure, the fp32 re-check counts
    attack_warnings: list[str] = field(default_factory=list)  # pyautoattack's, also in warnings
    logged: dict = field(default_factory=dict)  # what the run holds now: every evaluation under metric_prefix

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "is_main"}


def evaluate(run_id: str, spec: EvalSpec, *, uri: str | None = None,
             on_batch: Callable[[BatchProgress], None] | None = None,
             on_event: Callable[[EvalPlan | AttackProgress], None] | None = None) -> EvalResult:
    """Evaluate a run's ``spec.weights`` (ema | raw) and log the results into that run. A run left
    RUNNING by a process that is gone is reported and marked FAILED first."""
    from gnr.tracking import fix_stale_run, system_metrics

    dist = distributed.init(spec.device)
    try:
        stale = fix_stale_run(run_id, uri) if dist.is_main else None
        if stale:
            logging.getLogger(__name__).warning(stale)
        loaded = load_run_model(run_id, spec.weights, uri, dist.device)
        identity = {"run_id": run_id, "weights": loaded.digest}
        with system_metrics(run_id, uri, loaded.cfg, dist):
            return _run(loaded.model, loaded.cfg, run_id, identity, spec, dist, uri, on_batch, on_event)
    finally:
        distributed.close()


def evaluate_external(weights_file: str | Path, cfg: RunConfig, spec: EvalSpec,
                      on_batch: Callable[[BatchProgress], None] | None = None,
                      on_event: Callable[[EvalPlan | AttackProgress], None] | None = None) -> EvalResult:
    """Evaluate a checkpoint from elsewhere (timm, RobustBench) with ``cfg``'s model and data, as a new run."""
    from gnr.tracking import NOTE_TAG, RunWriter, create_run, system_metrics

    path = Path(weights_file).resolve()
    if not path.is_file():
        raise GnrError(f"weights file not found: {path}")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": False, "weights": str(path)})})
    dist = distributed.init(spec.device)
    writer = None
    status = "FAILED"
    try:
        model = build_evaluated_model(cfg, path, dist.device)  # a bad file fails before a run exists
        note = f"Evaluation of external weights `{path.name}` as `{cfg.model.name}` (no training)."
        run_id = create_run(cfg, tags={"source": "external", "weights_file": str(path), NOTE_TAG: note},
                            status="RUNNING", entry_point="gnr eval") \
            if dist.is_main else None
        run_id = distributed.broadcast_object(run_id)
        writer = RunWriter(run_id, cfg.tracking.uri) if dist.is_main else None
        identity = {"run_id": run_id, "weights": file_sha256(path)}
        with system_metrics(run_id, cfg.tracking.uri, cfg, dist):
            result = _run(model, cfg, run_id, identity, replace(spec, weights="file"), dist, cfg.tracking.uri,
                          on_batch, on_event)
        status = "FINISHED"
        return result
    finally:
        if writer is not None:
            writer.finish(status)
        distributed.close()


@dataclass
class Shard:
    """One rank's part of an evaluation."""

    rows: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    batches: int = 0
    resumed: int = 0
    attacks: list[tuple[str, AttackStats]] = field(default_factory=list)  # (measure, stats) per batch
    rechecks: list[tuple[str, Recheck]] = field(default_factory=list)


def _run(model: nn.Module, cfg: RunConfig, run_id: str, identity: dict, spec: EvalSpec,
         dist: distributed.Dist, uri: str | None, on_batch, on_event=None) -> EvalResult:
    from gnr.data.loader import with_resolved_source

    started = time.perf_counter()
    if spec.precision not in PRECISIONS:
        raise GnrError(f"--precision is one of {', '.join(PRECISIONS)} (got '{spec.precision}')")
    cfg = with_resolved_source(cfg, spec.data, dist.is_main)
    split = spec.split or cfg.data.val_split
    if spec.precision != "fp32":  # bf16 verdicts are kept apart from exact ones
        identity = {**identity, "precision": spec.precision}
    cache = BatchCache(cache_dir({**identity, "source": cfg.data.source, "split": split, "seed": spec.seed,
                                 "img_size": cfg.data.img_size, "eval_resize": cfg.data.eval_resize}))
    model, prepared = eval_speed.prepare_model(model, dist.device, compile=spec.compile)
    if spec.batch_size is None:
        spec = replace(spec, batch_size=eval_speed.auto_batch_size(model, cfg.data.img_size, dist.device))
    main = dist.is_main
    mine = _evaluate_shard(model, cfg, spec, split, cache, dist, on_batch if main else None,
                           on_event if main else None, {**prepared, "precision": spec.precision})
    shard = _gather(mine)
    if not shard.rows:
        raise GnrError("no images selected: check --data, --ids and --n")
    measures = spec.measures()
    rows = [shard.rows[k] for k in sorted(shard.rows)]
    accuracy = _accuracy(rows, measures)
    prefix = metric_prefix(spec.weights, spec.precision, spec.seed)
    attack_warnings = sorted(set(shard.warnings))
    result = EvalResult(run_id=run_id, weights=spec.weights, n=len(rows), accuracy=accuracy,
                        warnings=sanity_warnings(accuracy, measures) + attack_warnings,
                        batches=shard.batches, resumed_batches=shard.resumed, elapsed_s=time.perf_counter() - started,
                        csv_path=str(paths.eval_cache_root() / run_id / prefix / TABLE_FILE), metric_prefix=prefix,
                        is_main=dist.is_main,
                        settings={"data": cfg.data.source, "split": split, "ids": spec.ids, "n": spec.n,
                                  "attacks": list(spec.attacks), "eps_255": list(spec.eps), "seed": spec.seed,
                                  "world": dist.world, "batch_size": spec.batch_size, **prepared,
                                  "precision": spec.precision},
                        attacks=attack_table(shard.attacks), rechecks=recheck_table(shard.rechecks),
                        attack_warnings=attack_warnings)
    if dist.is_main:
        log_to_run(result, rows, uri)
    # Ranks tear the process group down together: a rank that exits while rank 0 still logs was seen
    # aborting at exit ("terminate called without an active exception") under load.
    distributed.barrier()
    return result


def metric_prefix(weights: str, precision: str = "fp32", seed: int = 0) -> str:
    """Where an evaluation's metrics and table go in its run: ``eval`` for the exported (EMA) weights in
    fp32 with seed 0, else a name that says what differs (``eval-raw``, ``eval-bf16``, ``eval-seed1``), so
    that verdicts of other weights, precision or random starts never replace these."""
    parts = ["eval"] + ([weights] if weights not in ("ema", "file") else []) + \
        ([precision] if precision != "fp32" else []) + ([f"seed{seed}"] if seed else [])
    return "-".join(parts)


def _evaluate_shard(model: nn.Module, cfg: RunConfig, spec: EvalSpec, split: str, cache: BatchCache,
                    dist: distributed.Dist, on_batch, on_event=None, settings: dict | None = None) -> Shard:
    """This rank's images, batch by batch: cached results where every measure is on disk, else attacked."""
    measures = spec.measures()
    done = cache.load()
    distributed.barrier()  # every rank has read the cache before any rank writes to it
    shard = Shard()
    computed_images, computed_s = 0, 0.0
    total = _expected_images(cfg, spec, split, dist.world)
    tracker = _Tracker(total, on_event)
    if on_event:
        on_event(plan(model, cfg, spec, total, dist, settings or {}))
    for x, y, keys in image_batches(cfg, split=split, ids=spec.ids, n=spec.n, batch_size=spec.batch_size,
                                    rank=dist.rank, world=dist.world):
        shard.batches += 1
        todo = [m for m in measures if any(m.name not in done.get(k, {}) for k in keys)]
        if todo:
            t0 = time.perf_counter()
            rows = _attack_batch(model, x.to(dist.device), y.to(dist.device), keys, todo, spec, shard, tracker)
            cache.write(rows)
            for row in rows:
                done.setdefault(row["id"], {}).update(row)
            computed_images += len(keys)
            computed_s += time.perf_counter() - t0
        else:
            shard.resumed += 1
        for k in keys:
            shard.rows[k] = {"id": k, "label": done[k]["label"], **{m.name: done[k][m.name] for m in measures}}
        tracker.batch_done(len(keys), computed=bool(todo), robust={m.name: sum(shard.rows[k][m.name] for k in keys)
                                                                   for m in measures})
        if on_batch:
            on_batch(BatchProgress(len(shard.rows), total, computed_images / computed_s if computed_s else 0.0,
                                   _accuracy(shard.rows.values(), measures), resumed=not todo))
    return shard


def plan(model: nn.Module, cfg: RunConfig, spec: EvalSpec, images: int, dist: distributed.Dist,
         settings: dict) -> EvalPlan:
    """Time a batch's forward and backward (the real batch on CUDA, at most 8 images elsewhere, where time
    per image hardly depends on the batch), then project this rank's cost (see :class:`EvalPlan`)."""
    probe = min(spec.batch_size, images) if dist.device.type == "cuda" else min(spec.batch_size, images, 8)
    cost = eval_speed.pass_seconds(model, cfg.data.img_size, probe, dist.device, reps=1)
    least, most = 0.0, 0.0
    for m in spec.measures():
        low, high = measure_passes(m, cfg.data.num_classes)
        least += sum(eval_speed.project_seconds(low, images, cost).values())
        most += sum(eval_speed.project_seconds(high, images, cost).values())
    return EvalPlan(images=images, world=dist.world, batch_size=spec.batch_size, device=str(dist.device),
                    settings=settings, pass_seconds=cost, projected_s=(least, most))


def measure_passes(measure: Measure, num_classes: int) -> tuple[dict, dict]:
    """(forward, backward) passes per image of one measure, least and most: AutoAttack costs least when
    APGD-CE breaks every image and most when every image stays robust."""
    if measure.attack == "clean":
        one = {"clean": (1, 0)}
        return one, one
    if measure.attack == "autoattack":
        most = upper_bound_passes(num_classes)
        return {"apgd-ce": most["apgd-ce"]}, most
    steps = int(measure.attack.removeprefix("pgd"))
    one = {measure.name: (steps + 2, steps)}  # clean and final predictions, one gradient per step
    return one, one


def _work(passes: dict[str, tuple[int, int]]) -> int:
    """Forward-pass equivalents (a backward costs about two forwards)."""
    return sum(f + 2 * b for f, b in passes.values())


class _Tracker:
    """Turns finished attacks into :class:`AttackProgress` events: images through each attack so far,
    how many stayed robust, and an ETA from the seconds per computed image."""

    def __init__(self, total: int, on_event):
        self.total, self.on_event = total, on_event
        self.started = time.perf_counter()
        self.done: dict[str, int] = {}  # measure -> images of finished batches
        self.robust: dict[str, int] = {}
        self.images, self.computed, self.computed_s = 0, 0, 0.0
        self.batch_started = self.started

    def report(self, measure: str, attack: str, batch_images: int, robust: int, fraction: float) -> None:
        """``fraction`` of the current batch's work is done; ``robust`` of its images survive ``attack``."""
        if not self.on_event:
            return
        now = time.perf_counter()
        work = self.computed + fraction * batch_images
        spent = self.computed_s + now - self.batch_started
        left = self.total - self.images - fraction * batch_images
        self.on_event(AttackProgress(measure, attack, self.done.get(measure, 0) + batch_images, self.total,
                                     self.robust.get(measure, 0) + robust, now - self.started,
                                     spent / work * max(left, 0) if work else None))

    def batch_done(self, images: int, *, computed: bool, robust: dict[str, int]) -> None:
        now = time.perf_counter()
        self.images += images
        if computed:
            self.computed += images
            self.computed_s += now - self.batch_started
        for name, count in robust.items():
            self.done[name] = self.done.get(name, 0) + images
            self.robust[name] = self.robust.get(name, 0) + count
        self.batch_started = now


def _expected_images(cfg: RunConfig, spec: EvalSpec, split: str, world: int) -> int:
    """This rank's share of the selected images (an upper bound with ``--ids``: not all may be present)."""
    from gnr.data.manifest import read_manifest

    available = read_manifest(cfg.data.source, split).total
    chosen = len(load_ids(spec.ids)[:spec.n]) if spec.ids else min(spec.n or available, available)
    return -(-min(chosen, available) // world)


def _attack_batch(model, x, y, keys, measures, spec: EvalSpec, shard: Shard, tracker: _Tracker) -> list[dict]:
    batch_seed = (spec.seed * 1_000_003 + zlib.crc32("\n".join(keys).encode())) % 2**63
    columns = {}
    costs = [_work(measure_passes(m, 1000)[1]) for m in measures]  # ETA weights: the worst case of each
    for i, m in enumerate(measures):
        def on_attack(stats: AttackStats, m=m, i=i) -> None:
            shard.attacks.append((m.name, stats))
            if stats.precision != "fp32" or spec.precision == "fp32":  # not a bf16 disagreement's re-attack
                most = measure_passes(m, 1000)[1]
                upto = _work({a: most[a] for a in STANDARD_ATTACKS[:STANDARD_ATTACKS.index(stats.attack) + 1]})
                tracker.report(m.name, stats.attack, len(keys), stats.robust,
                               (sum(costs[:i]) + upto) / sum(costs))

        rechecks: list[Recheck] = []
        with seeded(batch_seed, x.device):
            flags = robust_correct(model, x, y, m, spec.seed, shard.warnings, precision=spec.precision,
                                   on_attack=on_attack, rechecks=rechecks)
        shard.rechecks += [(m.name, r) for r in rechecks]
        columns[m.name] = flags.tolist()
        if m.attack != "autoattack":
            tracker.report(m.name, m.name, len(keys), int(flags.sum()), sum(costs[:i + 1]) / sum(costs))
    labels = y.tolist()
    return [{"id": k, "label": labels[i], **{name: bool(c[i]) for name, c in columns.items()}}
            for i, k in enumerate(keys)]


def attack_table(entries: Iterable[tuple[str, AttackStats]]) -> list[dict]:
    """Per measure and attack, summed over batches (and ranks): images attacked, still robust, seconds, passes."""
    table: dict[tuple[str, str, str], dict] = {}
    for measure, s in entries:
        row = table.setdefault((measure, s.attack, s.precision), {
            "measure": measure, "attack": s.attack, "precision": s.precision, "eps_255": s.eps,
            "images": 0, "robust": 0, "seconds": 0.0, "forward": 0, "backward": 0})
        for key in ("images", "robust", "seconds", "forward", "backward"):
            row[key] += getattr(s, key)
    return list(table.values())


def recheck_table(entries: Iterable[tuple[str, Recheck]]) -> dict[str, dict]:
    """Per measure, the bf16 runs' fp32 re-check counts summed over batches (and ranks)."""
    out: dict[str, dict] = {}
    for measure, r in entries:
        row = out.setdefault(measure, {"checked": 0, "agreed": 0, "disagreed": 0, "flipped": 0})
        for key in row:
            row[key] += getattr(r, key)
    return out


def _gather(mine: Shard) -> Shard:
    """Every rank's shard combined, on every rank; an image evaluated by two ranks is an error."""
    out = Shard()
    for part in distributed.all_gather_object(mine):
        twice = out.rows.keys() & part.rows.keys()
        if twice:
            raise GnrError(f"image {sorted(twice)[0]} was evaluated by two ranks: the loader's sharding is broken")
        out.rows.update(part.rows)
        out.warnings += part.warnings
        out.batches += part.batches
        out.resumed += part.resumed
        out.attacks += part.attacks
        out.rechecks += part.rechecks
    return out


def _accuracy(rows: Iterable[dict], measures: list[Measure]) -> dict[str, float]:
    rows = list(rows)
    n = max(len(rows), 1)
    return {m.name: sum(r[m.name] for r in rows) / n for m in measures}


def sanity_warnings(accuracy: dict[str, float], measures: list[Measure]) -> list[str]:
    """Carlini et al. 2019 checks on the aggregate accuracies; one readable line per failure."""
    out = []
    for m in measures:
        if m.sanity and accuracy[m.name] > SANITY_MAX_ACC:
            out.append(f"{m.name}: accuracy {accuracy[m.name]:.1%} at ε={m.eps:g}/255 should be ~0 "
                       "(gradient masking or a broken attack?)")
    for eps in sorted({m.eps for m in measures if m.attack != "clean"}):
        pgds = sorted((int(m.attack[3:]), m.name) for m in measures if m.eps == eps and m.attack.startswith("pgd"))
        for (_, weak), (_, strong) in zip(pgds, pgds[1:]):
            if accuracy[strong] > accuracy[weak] + SLACK:
                out.append(f"{strong} ({accuracy[strong]:.1%}) is above {weak} ({accuracy[weak]:.1%}): "
                           "more steps must not help the model")
        aa = f"autoattack/eps{eps:g}"
        if aa in accuracy and pgds:
            best_pgd = min(pgds, key=lambda p: accuracy[p[1]])[1]
            if accuracy[aa] > accuracy[best_pgd] + SLACK:
                out.append(f"{aa} ({accuracy[aa]:.1%}) is above {best_pgd} ({accuracy[best_pgd]:.1%}): "
                           "AutoAttack should be the stronger attack")
    return out


def write_rows(rows: list[dict], path: Path) -> Path:
    """A CSV with the first row's keys as header (booleans as 1/0), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: int(v) if isinstance(v, bool) else v for k, v in r.items()} for r in rows)
    return path


# -- what a run holds: every evaluation's per-image results, merged -------------------------------

TABLE_FILE = "per_image.csv"
SUMMARY_FILE = "summary.json"


@dataclass
class ResultTable:
    """Per-image results of every evaluation logged under one prefix: a row per image id, a column per
    measure, cells as written (1 / 0, empty where that measure never ran on that image).

    A later evaluation adds images and measures and rewrites only the cells it computed itself, so
    nothing an earlier one logged is dropped (an AutoAttack evaluation can cost GPU-hours)."""

    measures: list[str] = field(default_factory=list)
    rows: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path | None) -> "ResultTable":
        if path is None or not path.is_file():
            return cls()
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        return cls().add(rows)

    def add(self, rows: Iterable[dict]) -> "ResultTable":
        for row in rows:
            cells = self.rows.setdefault(row["id"], {"id": row["id"]})
            for key, value in row.items():
                if key == "id" or value == "":
                    continue
                if key != "label" and key not in self.measures:
                    self.measures.append(key)
                cells[key] = str(int(value)) if isinstance(value, bool) else str(value)
        return self

    def counts(self) -> dict[str, int]:
        return {m: sum(m in r for r in self.rows.values()) for m in self.measures}

    def accuracy(self) -> dict[str, float]:
        """Per measure, over the images it ran on."""
        return {m: sum(r.get(m) == "1" for r in self.rows.values()) / max(n, 1) for m, n in self.counts().items()}

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "label", *self.measures], restval="")
            w.writeheader()
            w.writerows(self.rows[k] for k in sorted(self.rows))
        return path


def log_to_run(result: EvalResult, rows: list[dict], uri: str | None) -> None:
    """Merge ``rows`` into the run's table under the result's prefix (what is logged, else the local copy),
    keep it locally (``result.csv_path``) and log it, with metrics ``<prefix>/<measure>`` (e.g.
    ``eval/autoattack/eps4``) and ``<prefix>/n`` over the merged table, the sanity tags, and
    ``summary.json``: the merged accuracy and every evaluation's own summary."""
    from gnr.tracking import RunWriter, download_if_logged

    p, local = result.metric_prefix, Path(result.csv_path).parent
    writer = RunWriter(result.run_id, uri)
    with tempfile.TemporaryDirectory() as tmp:
        logged_table = download_if_logged(result.run_id, f"{p}/{TABLE_FILE}", tmp, uri)
        logged_summary = download_if_logged(result.run_id, f"{p}/{SUMMARY_FILE}", tmp, uri)
        table = ResultTable.read(local / TABLE_FILE).add(ResultTable.read(logged_table).rows.values()).add(rows)
        before = _read_json(logged_summary) or _read_json(local / SUMMARY_FILE)
    evaluations = before.get("evaluations", [before] if before else []) + [
        {k: v for k, v in result.summary().items() if k != "logged"}]
    accuracy = table.accuracy()
    measures = [Measure.parse(m) for m in table.measures]
    warnings = sanity_warnings(accuracy, measures) + sorted({w for e in evaluations for w in e.get("attack_warnings", [])})
    result.logged = {"accuracy": accuracy, "images": table.counts(), "n": len(table.rows), "warnings": warnings}
    table.write(local / TABLE_FILE)
    summary = atomic.write_text(local / SUMMARY_FILE, json.dumps({**result.logged, "evaluations": evaluations}, indent=2))
    writer.log_metrics({**{f"{p}/{k}": v for k, v in accuracy.items()}, f"{p}/n": len(table.rows)}, step=0)
    writer.set_tags({f"{p}.sanity": "failed" if warnings else "passed",
                     f"{p}.warnings": " | ".join(warnings)[:5000] or "none",
                     f"{p}.settings": json.dumps(result.settings)})
    writer.log_artifact(local / TABLE_FILE, p)
    writer.log_artifact(summary, p)


def _read_json(path: Path | None) -> dict:
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}
