"""Where per-image results live: each batch's on disk while an evaluation runs (resumable), then the
run's merged table in MLflow with metrics and tags; summaries of seconds and passes per attack."""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from gnr import atomic, paths
from gnr.eval.autoattack import AttackStats, Recheck
from gnr.eval.spec import Measure, sanity_warnings


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


def metric_prefix(weights: str, precision: str = "fp32", seed: int = 0) -> str:
    """Where an evaluation's metrics and table go in its run: ``eval`` for the exported (EMA) weights in
    fp32 with seed 0, else a name that says what differs (``eval-raw``, ``eval-bf16``, ``eval-seed1``), so
    that verdicts of other weights, precision or random starts never replace these."""
    parts = ["eval"] + ([weights] if weights not in ("ema", "file") else []) + \
        ([precision] if precision != "fp32" else []) + ([f"seed{seed}"] if seed else [])
    return "-".join(parts)


def attack_table(entries: Iterable[tuple[str, AttackStats]]) -> list[dict]:
    """Per measure and attack, summed over batches (and ranks): images attacked, still robust, seconds, passes
    (and the calls behind them per batch size)."""
    table: dict[tuple[str, str, str], dict] = {}
    for measure, s in entries:
        row = table.setdefault((measure, s.attack, s.precision), {
            "measure": measure, "attack": s.attack, "precision": s.precision, "eps_255": s.eps,
            "images": 0, "robust": 0, "seconds": 0.0, "forward": 0, "backward": 0,
            "forward_calls": Counter(), "backward_calls": Counter()})
        for key in ("images", "robust", "seconds", "forward", "backward"):
            row[key] += getattr(s, key)
        row["forward_calls"].update(s.forward_calls)
        row["backward_calls"].update(s.backward_calls)
    return [{**row, "forward_calls": dict(row["forward_calls"]), "backward_calls": dict(row["backward_calls"])}
            for row in table.values()]


def recheck_table(entries: Iterable[tuple[str, Recheck]]) -> dict[str, dict]:
    """Per measure, the bf16 runs' fp32 re-check counts summed over batches (and ranks)."""
    out: dict[str, dict] = {}
    for measure, r in entries:
        row = out.setdefault(measure, {"checked": 0, "agreed": 0, "disagreed": 0, "flipped": 0})
        for key in row:
            row[key] += getattr(r, key)
    return out


def accuracy_of(rows: Iterable[dict], measures: list[Measure]) -> dict[str, float]:
    rows = list(rows)
    n = max(len(rows), 1)
    return {m.name: sum(r[m.name] for r in rows) / n for m in measures}


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


def local_table(run_id: str, prefix: str) -> Path:
    """This machine's copy of the run's merged table under ``prefix``."""
    return paths.eval_cache_root() / run_id / prefix / TABLE_FILE


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
