"""The paper's Table 2 (clean and AutoAttack accuracy per ε, plus PGD) and Table 3 (seconds per step,
cost relative to adversarial training) for a set of runs, read back from MLflow.

Accuracies are what ``gnr eval`` logged (``eval/clean``, ``eval/autoattack/eps4``, ...); the cost is
the trainer's ``perf/sec_per_step``. A run's cost is divided by that of the adversarial run with the
same model (the paper's "relative to PGD-3"), when the table has one.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field

from gnr.config import METHODS
from gnr.tracking import RunRecord

EVAL_METRIC = re.compile(r"^eval/(autoattack|pgd\d+)/eps([\d.]+)$")
MISSING = "–"


@dataclass
class ReportTable:
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    title: str = "Table 2 + 3: accuracy (%) and training cost"

    def records(self) -> list[dict[str, str]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def _attack_columns(runs: list[RunRecord]) -> list[tuple[str, str, float]]:
    """(metric, column title, ε) for every attack × ε some run was evaluated with: AutoAttack first."""
    found = {(m.group(1), float(m.group(2))) for r in runs for k in r.metrics if (m := EVAL_METRIC.match(k))}
    found = {(a, e) for a, e in found if e < 64}  # the large-ε sanity check is not a table column
    order = sorted(found, key=lambda ae: (0 if ae[0] == "autoattack" else int(ae[0][3:]), ae[1]))
    return [(f"eval/{a}/eps{e:g}", f"{'AA' if a == 'autoattack' else a.upper()} {e:g}/255", e) for a, e in order]


def _pct(value: float | None) -> str:
    return MISSING if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return MISSING if value is None or math.isnan(value) else format(value, fmt)


def build_report(runs: list[RunRecord], *, finished_only: bool = True) -> ReportTable:
    """One row per run, ordered by method (natural, gradnorm, ..., adversarial) then activation."""
    notes = []
    if finished_only:
        skipped = [r for r in runs if r.status != "FINISHED"]
        runs = [r for r in runs if r.status == "FINISHED"]
        if skipped:
            notes.append(f"skipped {len(skipped)} unfinished run(s): {', '.join(r.run_id[:8] for r in skipped)}")
    rank = {m: i for i, m in enumerate(METHODS)}
    runs = sorted(runs, key=lambda r: (rank.get(r.tags.get("method"), len(rank)), r.tags.get("activation", ""),
                                       r.start_time))
    attacks = _attack_columns(runs)
    columns = ["run", "method", "model", "act", "n", "clean", *(title for _, title, _ in attacks),
               "s/step", "× adversarial", "sanity"]
    rows = []
    for r in runs:
        reference = _adversarial_cost(runs, r.tags.get("model"))
        cost = r.metrics.get("perf/sec_per_step")
        relative = cost / reference if cost is not None and reference else None
        n = r.metrics.get("eval/n")
        rows.append([r.name or r.run_id[:8],
                     r.tags.get("method", "?"), r.tags.get("model", "?"), r.tags.get("activation", "?"),
                     MISSING if n is None else str(int(n)), _pct(r.metrics.get("eval/clean")),
                     *(_pct(r.metrics.get(metric)) for metric, _, _ in attacks),
                     _num(cost, ".4g"), _num(relative, ".3f"), r.tags.get("eval.sanity", MISSING)])
    if any(r.tags.get("eval.sanity") == "failed" for r in runs):
        notes.append("a sanity check failed for some run: see its eval.warnings tag")
    return ReportTable(columns, rows, notes)


def _adversarial_cost(runs: list[RunRecord], model: str | None) -> float | None:
    costs = [r.metrics["perf/sec_per_step"] for r in runs
             if r.tags.get("method") == "adversarial" and r.tags.get("model") == model and "perf/sec_per_step" in r.metrics]
    return costs[-1] if costs else None


def to_markdown(table: ReportTable) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines + [""] + [f"_{n}_" for n in table.notes]).rstrip() + "\n"


def to_csv(table: ReportTable) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return buffer.getvalue()


def report(experiment: str | None = None, run_ids: list[str] | tuple[str, ...] = (),
           uri: str | None = None) -> ReportTable:
    from gnr.tracking import find_runs

    runs = find_runs(experiment=experiment, run_ids=run_ids, uri=uri)
    return build_report(runs, finished_only=not run_ids)
