"""The training loop: one process or `torchrun` DDP, the paper's recipe built from timm parts.

`train(cfg)` is the single entry point of laptop and cluster runs. It attaches to (or creates) the
MLflow run named by ``cfg.tracking.run_id``, resumes from that run's latest checkpoint if there is
one, and ends the run as FINISHED, FAILED (non-finite loss, crash) or KILLED (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import resource
import signal
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import torch

from gnr import checkpoint, distributed, paths
from gnr.config import RunConfig
from gnr.data.loader import eval_loader, steps_per_epoch, train_loader, with_resolved_source
from gnr.doublegrad import fast_layer_counts
from gnr.errors import GnrError
from gnr.models import build_model
from gnr.eval.scoring import clean_and_pgd_accuracy
from gnr.step import build_train_step
from gnr.tracking import FAILURE_TAG, Tracker, check_reachable, public_config, redact, resolve_uri, system_metrics

# Fields that may differ between the run's stored config and a resumed process (paths, logging);
# anything else (data.workers too: it shapes the batch stream) would silently change the experiment.
RESUME_MAY_DIFFER = ("tracking", "checkpoint", "runtime.device", "data.source", "eval.batch_size")


@dataclass
class RunResult:
    run_id: str
    status: str
    is_main: bool
    method: str
    model: str
    act: str
    steps: int
    epochs: float
    elapsed_s: float
    sec_per_step: float
    metrics: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""
    ui_command: str = ""
    model_uri: str = ""  # the logged MLflow Model (models:/m-...)
    registered: str = ""  # models:/NAME/VERSION when registered

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "is_main"}


class StopRequested:
    """First SIGINT/SIGTERM asks for a clean stop at the next step boundary; a second one aborts."""

    def __init__(self):
        self.flag = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_resumable(cfg: RunConfig, stored: dict) -> None:
    now, then = cfg.flat(), RunConfig.model_validate(stored).flat()
    changed = [k for k in now if now[k] != then.get(k) and not k.startswith(RESUME_MAY_DIFFER)]
    if changed:
        raise GnrError(f"cannot resume run {cfg.tracking.run_id}: config differs in {', '.join(changed[:5])}")


def export_weights(module: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))
    return path


ProgressFn = Callable[[dict[str, Any]], None]
"""Receives ``{"update", "total", "epoch", "loss", ...}`` after each step and ``{"holdout": {...}}``
after each epoch's held-out check, on rank 0 only; the CLI draws it (the core draws nothing)."""


class Trainer:
    def __init__(self, cfg: RunConfig, dist: distributed.Dist, on_event: ProgressFn | None = None):
        import timm.scheduler

        self.cfg, self.dist = cfg, dist
        self.on_event = on_event if dist.is_main else None
        self.run_id, self.tracker = "", None
        self.device = dist.device
        self.spe = steps_per_epoch(cfg, dist.world)
        self.updates_per_epoch = max(1, self.spe // cfg.optim.accum_steps)
        self.total_updates = cfg.schedule.epochs * self.updates_per_epoch
        if cfg.schedule.max_steps:
            self.total_updates = min(self.total_updates, cfg.schedule.max_steps)
        self.global_batch = cfg.optim.batch_size * cfg.optim.accum_steps * dist.world

        model, self.replaced = build_model(cfg.model, cfg.data.num_classes, cfg.data.img_size)
        self.model = model
        self.train_step = build_train_step(cfg, model, self.device, dist.world)
        step = self.train_step
        self.amp, self.ema, self.optimizer, self.scaler = step.amp, step.ema, step.optimizer, step.scaler
        self.scheduler, _ = timm.scheduler.create_scheduler_v2(
            self.optimizer, sched="cosine", num_epochs=cfg.schedule.epochs, warmup_epochs=cfg.schedule.warmup_epochs,
            warmup_lr=cfg.schedule.warmup_lr, min_lr=cfg.schedule.min_lr, step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch)
        self.update = 0  # optimizer steps done
        self.best_pgd = -1.0
        self.skipped_total = 0  # training samples lost to corrupt shards, all epochs so far
        self.step_times: list[float] = []
        self.last_eval: dict[str, float] = {}
        self.logged_model = None  # mlflow ModelInfo, set by finish()

    def attach(self, run_id: str, tracker: Tracker | None) -> None:
        """Bind to the MLflow run: checkpoints live under <checkpoint.dir>/<run id>."""
        self.resuming = self.cfg.tracking.run_id is not None
        self.run_id, self.tracker = run_id, tracker
        self.cfg.tracking.run_id = run_id
        self.ckpt_dir = Path(self.cfg.checkpoint.dir or paths.checkpoint_root()) / run_id
        if self.dist.is_main:
            checkpoint.prepare_dir(self.ckpt_dir)
        if tracker is not None:
            tracker.attach_spool(self.ckpt_dir)

    # -- state -------------------------------------------------------------------------------
    def state(self, rng: list[dict]) -> dict:
        return {
            "update": self.update, "best_pgd": self.best_pgd, "skipped_total": self.skipped_total,
            "config": public_config(self.cfg).model_dump(mode="json"),
            "model": self.model.state_dict(), "state_dict_ema": self.ema.state_dict() if self.ema else {},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng,
        }

    def save(self) -> Path | None:
        """Rank 0 writes the checkpoint; every rank must call this, as each contributes its RNG streams."""
        rng = distributed.all_gather_object(checkpoint.rng_state())
        if not self.dist.is_main:
            return None
        return checkpoint.save(self.state(rng), self.ckpt_dir, self.update, self.cfg.checkpoint.keep_last)

    def resume(self) -> bool:
        """Load the run's latest checkpoint (local dir first, then the copy logged to MLflow)."""
        path = checkpoint.latest(self.ckpt_dir)
        if path is None and self.tracker is not None and self.resuming:
            path = self._fetch_logged_checkpoint()
        path = distributed.broadcast_object(str(path) if path else None)
        if path is None:
            return False
        state = checkpoint.load(Path(path))
        check_resumable(self.cfg, state["config"])
        self.model.load_state_dict(state["model"])
        if self.ema:
            self.ema.load_state_dict(state["state_dict_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.update, self.best_pgd = state["update"], state["best_pgd"]
        self.skipped_total = state.get("skipped_total", 0)
        if len(state["rng"]) == self.dist.world:
            checkpoint.set_rng_state(state["rng"][self.dist.rank])
        else:  # resumed on another number of ranks: distinct but reproducible streams
            torch.manual_seed(self.cfg.runtime.seed + 1000 * self.dist.rank + self.update)
        return True

    def _fetch_logged_checkpoint(self) -> Path | None:
        try:
            from gnr.tracking import download

            return download(self.run_id, "checkpoints/last.pt", self.ckpt_dir / "from-mlflow")
        except GnrError:
            return None

    # -- loop --------------------------------------------------------------------------------
    def run(self, stop: StopRequested) -> str:
        cfg = self.cfg
        self.model.train()
        last_save = time.monotonic()
        while self.update < self.total_updates:
            epoch, done_in_epoch = divmod(self.update, self.updates_per_epoch)
            micro = self.updates_per_epoch * cfg.optim.accum_steps
            batches = train_loader(cfg, epoch=epoch, rank=self.dist.rank, world=self.dist.world,
                                   skip_batches=done_in_epoch * cfg.optim.accum_steps)
            window = Window()
            it = iter(islice(batches, micro - done_in_epoch * cfg.optim.accum_steps))
            while self.update < self.total_updates and self.update // self.updates_per_epoch == epoch:
                t0 = time.perf_counter()
                parts, nonfinite = self.step(it)
                self.step_times.append(time.perf_counter() - t0)
                window.add(parts, self.global_batch)
                if self.on_event:
                    self.on_event({"update": self.update, "total": self.total_updates, **parts,
                                   "epoch": self.update / self.updates_per_epoch, "images": self.global_batch})
                # An epoch's last step is saved by end_epoch, after the held-out check.
                due = (time.monotonic() - last_save > cfg.checkpoint.every_minutes * 60
                       and self.update % self.updates_per_epoch != 0)
                flags = distributed.all_sum(torch.tensor([nonfinite, float(stop.flag), float(due)], device=self.device))
                nonfinite, stopping, due = (bool(f > 0) for f in flags.tolist())
                if nonfinite:
                    raise NonFiniteLoss(f"non-finite loss at step {self.update}; the last good checkpoint is kept")
                if self.update % cfg.tracking.log_every == 0:
                    self._log_window(window)
                    window = Window()
                if stopping:
                    self.save()
                    return "KILLED"
                if due:
                    self.save()
                    last_save = time.monotonic()
            if self.update % self.updates_per_epoch == 0 or self.update >= self.total_updates:
                self.end_epoch(skipped=batches.skipped)
        return "FINISHED"

    def step(self, batches) -> tuple[dict[str, float], float]:
        """One optimizer update over `accum_steps` micro-batches. Returns (mean parts, non-finite flag)."""
        parts, nonfinite = self.train_step(batches, self.update / self.updates_per_epoch, self.update + 1)
        self.update += 1
        self.scheduler.step_update(self.update)
        return parts, float(nonfinite)

    def _log_window(self, window: "Window") -> None:
        if self.tracker is None or not window.steps:
            return
        elapsed = time.perf_counter() - window.start
        metrics = {f"train/{k}": v / window.steps for k, v in window.parts.items()}
        metrics.update({"train/lr": self.optimizer.param_groups[0]["lr"], "train/images_per_s": window.images / elapsed,
                        "train/sec_per_step": elapsed / window.steps, "train/memory_mb": memory_mb(self.device),
                        "train/epoch": self.update / self.updates_per_epoch})
        self.tracker.log_metrics(metrics, step=self.update)

    def end_epoch(self, skipped: dict[tuple[str, str], int] | None = None) -> dict[str, float]:
        """Score the held-out set, checkpoint, log. Without a held-out set (``eval.holdout=0``) every
        checkpoint is the best one, so ``best.pt`` is the last."""
        cfg = self.cfg
        scored = self.ema.module if self.ema else self.model
        result = {}
        if cfg.eval.holdout:
            batches = eval_loader(cfg, rank=self.dist.rank, world=self.dist.world, limit=cfg.eval.holdout,
                                  batch_size=cfg.eval.batch_size)
            result = clean_and_pgd_accuracy(scored, batches, eps=cfg.eval.eps, step_size=cfg.eval.pgd_step_size,
                                            steps=cfg.eval.pgd_steps, device=self.device, amp_dtype=self.amp)
        score = result.get("pgd_acc")
        is_best = score is None or score > self.best_pgd
        if score is not None and is_best:
            self.best_pgd = score
        lost = self._skipped_this_epoch(skipped or {})
        self.skipped_total += lost
        path = self.save()
        if self.tracker is not None:
            metrics = {"epoch": self.update / self.updates_per_epoch, "data/skipped_samples": lost,
                       "data/skipped_samples_total": self.skipped_total}
            if result:
                metrics.update({"holdout/clean_acc": result["clean_acc"], f"holdout/pgd{cfg.eval.pgd_steps}_acc": score})
            self.tracker.log_metrics(metrics, step=self.update)
            self._log_checkpoint(path, "last.pt")
            if is_best:
                self._log_checkpoint(path, "best.pt")
        self.last_eval = result
        if self.on_event and result:
            self.on_event({"holdout": result, "epoch": self.update / self.updates_per_epoch})
        return result

    def _skipped_this_epoch(self, mine: dict[tuple[str, str], int]) -> int:
        """Samples lost this epoch over all ranks, each loss once (ranks may meet the same bad shard)."""
        merged: dict[tuple[str, str], int] = {}
        for part in distributed.all_gather_object(mine):
            merged.update(part)
        return sum(merged.values())

    def _log_checkpoint(self, path: Path, name: str) -> None:
        staged = self.ckpt_dir / "logged" / name
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.unlink(missing_ok=True)
        staged.hardlink_to(path)
        self.tracker.log_artifact(staged, "checkpoints")

    def finish(self) -> dict[str, float]:
        """Log the weights `gnr eval --run-id` loads: EMA (evaluated, as in the paper) and raw; then the
        evaluated one (EMA, else raw) as the run's MLflow Model, registered if ``tracking.register_as``."""
        if self.tracker is None:
            return {}
        out = self.ckpt_dir / "weights"
        out.mkdir(parents=True, exist_ok=True)
        if self.ema:
            self.tracker.log_artifact(export_weights(self.ema.module, out / "ema.safetensors"), "weights")
        self.tracker.log_artifact(export_weights(self.model, out / "raw.safetensors"), "weights")
        timed = self.step_times[min(3, len(self.step_times) - 1):] if self.step_times else [float("nan")]
        final = {"perf/sec_per_step": sum(timed) / len(timed), "perf/steps": self.update}
        self.tracker.log_metrics(final, step=self.update)
        if self.tracker.offline_since is not None:  # server down: `gnr train --resume` logs the model
            return final
        example, *_ = next(iter(eval_loader(self.cfg, limit=2, batch_size=2)))
        self.logged_model = self.tracker.log_model(self.ema.module if self.ema else self.model, example,
                                                   self.cfg.tracking.register_as)
        return final


class Window:
    """Running sums of the loss parts between two metric logs."""

    def __init__(self):
        self.start, self.steps, self.images, self.parts = time.perf_counter(), 0, 0, {}

    def add(self, parts: dict[str, float], images: int) -> None:
        self.steps += 1
        self.images += images
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v


class NonFiniteLoss(GnrError):
    pass


def _start_run(cfg: RunConfig, dist: distributed.Dist) -> tuple[str, Tracker | None]:
    """Rank 0 creates or attaches to the MLflow run; every rank learns its id."""
    tracker = Tracker(cfg) if dist.is_main else None
    run_id = distributed.broadcast_object(tracker.run_id if tracker else None)
    return run_id, tracker


def _model_fields(info, register_as: str | None) -> dict[str, str]:
    if info is None:
        return {}
    version = info.registered_model_version
    return {"model_uri": info.model_uri, "registered": f"models:/{register_as}/{version}" if version else ""}


def train(cfg: RunConfig, on_event: ProgressFn | None = None) -> RunResult:
    cfg = cfg.model_copy(deep=True)
    dist = distributed.init(cfg.runtime.device)
    tracker = None
    status = "FAILED"
    started = time.perf_counter()
    try:
        torch.manual_seed(cfg.runtime.seed + dist.rank)
        if cfg.runtime.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        check_reachable(resolve_uri(cfg.tracking.uri))
        trainer = Trainer(with_resolved_source(cfg, is_main=dist.is_main), dist, on_event)  # bad model / data fail here, before a run exists
        run_id, tracker = _start_run(cfg, dist)
        trainer.attach(run_id, tracker)
        trainer.resume()
        if tracker:
            tracker.set_tags({"activations_replaced": trainer.replaced, "world_size": dist.world,
                              **{f"fast_layers.{k}": n for k, n in fast_layer_counts(trainer.model).items()}})
        with StopRequested() as stop, system_metrics(run_id, cfg.tracking.uri, cfg, dist):
            status = trainer.run(stop)
        final = trainer.finish() if status == "FINISHED" else {}
        metrics = {**{f"holdout/{k}": v for k, v in trainer.last_eval.items()}, **final}
        return RunResult(
            run_id=run_id, status=status, is_main=dist.is_main, method=cfg.objective.method, model=cfg.model.name,
            act=cfg.model.act, steps=trainer.update, epochs=trainer.update / trainer.updates_per_epoch,
            elapsed_s=time.perf_counter() - started, sec_per_step=final.get("perf/sec_per_step", float("nan")),
            metrics=metrics, tracking_uri=redact(tracker.uri) if tracker else "", ui_command=tracker.ui_command() if tracker else "",
            **_model_fields(trainer.logged_model, cfg.tracking.register_as))
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:
        if tracker is not None:  # the reason stays with the run
            tracker.set_tags({FAILURE_TAG: str(e) if isinstance(e, GnrError) else f"{type(e).__name__}: {e}"})
        raise
    finally:
        if tracker is not None:
            tracker.finish(status)
        distributed.close()
