"""Robust accuracy of a trained model: clean, PGD-k and AutoAttack, sharded over ranks and resumable.

``evaluate(run_id, spec)`` loads the run's exported weights, attacks every selected image exactly
once (split across ``torchrun`` ranks, results gathered on rank 0), keeps each batch's per-image
results on disk so that an interrupted evaluation continues where it stopped, runs the Carlini et
al. (2019) sanity checks, and merges metrics, tags and per-image results into the same MLflow run.

All attacks run in fp32 by default (PAPER.md §4 settings): reduced precision can round small input
gradients to zero and make a model look more robust than it is. ``precision="bf16"`` runs
AutoAttack's iterations in bf16 and re-checks every image in fp32 (:mod:`gnr.eval.autoattack`). The
model is compiled and channels-last on CUDA, and the batch size follows free GPU memory
(:mod:`gnr.eval.speed`); before the first batch a projection of the cost is reported, then each
attack's progress.
"""

from __future__ import annotations

import logging
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from torch import nn

from gnr import distributed
from gnr.config import RunConfig
from gnr.data.shards import file_sha256
from gnr.errors import GnrError
from gnr.eval import speed
from gnr.eval.autoattack import PRECISIONS, STANDARD as STANDARD_ATTACKS, AttackStats, Recheck
from gnr.eval.images import image_batches, load_ids
from gnr.eval.phases import Phase, Phases
from gnr.eval.progress import AttackProgress, BatchProgress, EvalPlan, ProgressTracker
from gnr.eval.projection import add_efficiency, measure_passes, plan, work
from gnr.eval.results import (BatchCache, EvalResult, accuracy_of, attack_table, cache_dir, local_table, log_to_run,
                              metric_prefix, recheck_table, sanity_warnings)
from gnr.eval.runs import build_evaluated_model, load_run_model
from gnr.eval.spec import EvalSpec
from gnr.eval.verdicts import robust_correct, seeded

Event = EvalPlan | AttackProgress | Phase


def evaluate(run_id: str, spec: EvalSpec, *, uri: str | None = None,
             on_batch: Callable[[BatchProgress], None] | None = None,
             on_event: Callable[[Event], None] | None = None, profile: bool = False) -> EvalResult:
    """Evaluate a run's ``spec.weights`` (ema | raw) and log the results into that run. A run left
    RUNNING by a process that is gone is reported and marked FAILED first. Rank 0 reports each phase,
    the plan and each attack to ``on_event``; ``profile`` adds each attack's efficiency (see
    :func:`gnr.eval.projection.add_efficiency`) to the result."""
    from gnr.tracking import fix_stale_run, system_metrics

    dist = distributed.init(spec.device)
    phases = Phases(on_event if dist.is_main else None)
    try:
        stale = fix_stale_run(run_id, uri) if dist.is_main else None
        if stale:
            logging.getLogger(__name__).warning(stale)
        with phases.phase(f"load run {run_id} ({spec.weights} weights)"):
            loaded = load_run_model(run_id, spec.weights, uri, dist.device)
        identity = {"run_id": run_id, "weights": loaded.digest}
        with system_metrics(run_id, uri, loaded.cfg, dist):
            return _run(loaded.model, loaded.cfg, run_id, identity, spec, dist, uri, on_batch, phases, profile)
    finally:
        phases.close()
        distributed.close()


def evaluate_external(weights_file: str | Path, cfg: RunConfig, spec: EvalSpec,
                      on_batch: Callable[[BatchProgress], None] | None = None,
                      on_event: Callable[[Event], None] | None = None, profile: bool = False) -> EvalResult:
    """Evaluate a checkpoint from elsewhere (timm, RobustBench) with ``cfg``'s model and data, as a new run."""
    from gnr.tracking import NOTE_TAG, RunWriter, create_run, system_metrics

    path = Path(weights_file).resolve()
    if not path.is_file():
        raise GnrError(f"weights file not found: {path}")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": False, "weights": str(path)})})
    dist = distributed.init(spec.device)
    phases = Phases(on_event if dist.is_main else None)
    writer = None
    status = "FAILED"
    try:
        with phases.phase(f"load {path.name} as {cfg.model.name}"):
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
                          on_batch, phases, profile)
        status = "FINISHED"
        return result
    finally:
        if writer is not None:
            writer.finish(status)
        phases.close()
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
         dist: distributed.Dist, uri: str | None, on_batch, phases: Phases, profile: bool) -> EvalResult:
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
    model, prepared = speed.prepare_model(model, dist.device, compile=spec.compile, phases=phases)
    if spec.batch_size is None:
        with phases.phase("batch size from free memory"):
            spec = replace(spec, batch_size=speed.auto_batch_size(model, cfg.data.img_size, dist.device))
    speed.compile_graphs(model, cfg.data.img_size, spec.batch_size, dist.device, phases)
    mine = _evaluate_shard(model, cfg, spec, split, cache, dist, on_batch if dist.is_main else None, phases,
                           {**prepared, "precision": spec.precision})
    shard = _gather(mine)
    if not shard.rows:
        raise GnrError("no images selected: check --data, --ids and --n")
    measures = spec.measures()
    rows = [shard.rows[k] for k in sorted(shard.rows)]
    accuracy = accuracy_of(rows, measures)
    prefix = metric_prefix(spec.weights, spec.precision, spec.seed)
    attack_warnings = sorted(set(shard.warnings))
    result = EvalResult(run_id=run_id, weights=spec.weights, n=len(rows), accuracy=accuracy,
                        warnings=sanity_warnings(accuracy, measures) + attack_warnings,
                        batches=shard.batches, resumed_batches=shard.resumed, elapsed_s=time.perf_counter() - started,
                        csv_path=str(local_table(run_id, prefix)), metric_prefix=prefix,
                        is_main=dist.is_main,
                        settings={"data": cfg.data.source, "split": split, "ids": spec.ids, "n": spec.n,
                                  "attacks": list(spec.attacks), "eps_255": list(spec.eps), "seed": spec.seed,
                                  "world": dist.world, "batch_size": spec.batch_size, **prepared,
                                  "precision": spec.precision},
                        attacks=attack_table(shard.attacks), rechecks=recheck_table(shard.rechecks),
                        attack_warnings=attack_warnings)
    if dist.is_main and profile:
        add_efficiency(result.attacks, model, cfg.data.img_size, dist.device, phases)
    if dist.is_main:
        with phases.phase(f"log results into run {run_id}"):
            log_to_run(result, rows, uri)
    # Ranks tear the process group down together: a rank that exits while rank 0 still logs was seen
    # aborting at exit ("terminate called without an active exception") under load.
    distributed.barrier()
    return result


def _evaluate_shard(model: nn.Module, cfg: RunConfig, spec: EvalSpec, split: str, cache: BatchCache,
                    dist: distributed.Dist, on_batch, phases: Phases, settings: dict) -> Shard:
    """This rank's images, batch by batch: cached results where every measure is on disk, else attacked."""
    measures = spec.measures()
    done = cache.load()
    distributed.barrier()  # every rank has read the cache before any rank writes to it
    shard = Shard()
    computed_images, computed_s = 0, 0.0
    total = _expected_images(cfg, spec, split, dist.world)
    tracker = ProgressTracker(total, phases.emit)
    if dist.is_main:
        with phases.phase("model-pass probe"):
            projected = plan(model, cfg, spec, total, dist, settings)
        phases.emit(projected)
    for x, y, keys in image_batches(cfg, split=split, ids=spec.ids, n=spec.n, batch_size=spec.batch_size,
                                    rank=dist.rank, world=dist.world):
        shard.batches += 1
        todo = [m for m in measures if any(m.name not in done.get(k, {}) for k in keys)]
        if todo:
            t0 = time.perf_counter()
            rows = _attack_batch(model, x.to(dist.device), y.to(dist.device), keys, todo, spec, shard, tracker, phases)
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
                                   accuracy_of(shard.rows.values(), measures), resumed=not todo))
    return shard


def _expected_images(cfg: RunConfig, spec: EvalSpec, split: str, world: int) -> int:
    """This rank's share of the selected images (an upper bound with ``--ids``: not all may be present)."""
    from gnr.data.manifest import read_manifest

    available = read_manifest(cfg.data.source, split).total
    chosen = len(load_ids(spec.ids)[:spec.n]) if spec.ids else min(spec.n or available, available)
    return -(-min(chosen, available) // world)


def _attack_batch(model, x, y, keys, measures, spec: EvalSpec, shard: Shard, tracker: ProgressTracker,
                  phases: Phases) -> list[dict]:
    batch_seed = (spec.seed * 1_000_003 + zlib.crc32("\n".join(keys).encode())) % 2**63
    columns = {}
    costs = [work(measure_passes(m, 1000)[1]) for m in measures]  # ETA weights: the worst case of each
    for i, m in enumerate(measures):
        def on_attack(stats: AttackStats, m=m, i=i) -> None:
            shard.attacks.append((m.name, stats))
            if stats.precision != "fp32" or spec.precision == "fp32":  # not a bf16 disagreement's re-attack
                most = measure_passes(m, 1000)[1]
                upto = work({a: most[a] for a in STANDARD_ATTACKS[:STANDARD_ATTACKS.index(stats.attack) + 1]})
                tracker.report(m.name, stats.attack, len(keys), stats.robust,
                               (sum(costs[:i]) + upto) / sum(costs))

        rechecks: list[Recheck] = []
        with seeded(batch_seed, x.device), \
                phases.phase(f"{m.name} on {len(keys)} images") if m.attack != "autoattack" else nullcontext():
            flags = robust_correct(model, x, y, m, spec.seed, shard.warnings, precision=spec.precision,
                                   on_attack=on_attack, rechecks=rechecks, phases=phases)
        shard.rechecks += [(m.name, r) for r in rechecks]
        columns[m.name] = flags.tolist()
        if m.attack != "autoattack":
            tracker.report(m.name, m.name, len(keys), int(flags.sum()), sum(costs[:i + 1]) / sum(costs))
    labels = y.tolist()
    return [{"id": k, "label": labels[i], **{name: bool(c[i]) for name, c in columns.items()}}
            for i, k in enumerate(keys)]


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
