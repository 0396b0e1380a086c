"""Evaluation: robust accuracy of trained models (clean, PGD-k, standard AutoAttack), what it costs, and
where the results live. The CLI, the analyses and the benchmarks use what this module exports.

- :mod:`~gnr.eval.spec`: what to measure (attacks × ε) and the sanity checks across measures.
- :mod:`~gnr.eval.runs` / :mod:`~gnr.eval.images`: the evaluated model, the evaluated images.
- :mod:`~gnr.eval.attacks`: PGD / FGSM, shared with adversarial training; :mod:`~gnr.eval.scoring`: the
  trainer's held-out check; :mod:`~gnr.eval.autoattack`: the standard suite one attack at a time.
- :mod:`~gnr.eval.verdicts`: per image, one measure's verdict.
- :mod:`~gnr.eval.speed`: how the attacked model runs (compiled, channels-last, batch size) and its pass times.
- :mod:`~gnr.eval.engine`: the evaluation itself, sharded over ranks and resumable.
- :mod:`~gnr.eval.results`: per-batch results on disk, the run's merged table, metrics and tags.
- :mod:`~gnr.eval.phases` / :mod:`~gnr.eval.progress`: what it is doing (each phase, from the first second),
  how far it is; :mod:`~gnr.eval.projection`: what it will cost, and what each attack's passes cost.
"""

from gnr.eval.attacks import FGSM_STEP, fgsm, pgd, summed_ce
from gnr.eval.autoattack import (PRECISIONS, STANDARD, AttackStats, Autocast, AutoAttackResult, PassCounter, Recheck,
                                 run_autoattack, upper_bound_passes)
from gnr.eval.engine import evaluate, evaluate_external
from gnr.eval.images import Batch, image_batches, load_ids, normalise_id
from gnr.eval.phases import Phase, Phases
from gnr.eval.progress import AttackProgress, BatchProgress, EvalPlan
from gnr.eval.projection import (Stratum, add_efficiency, allocate, image_passes, margin_strata, measure_passes,
                                 stratified_mean)
from gnr.eval.results import EvalResult, ResultTable, attack_table, metric_prefix, write_rows
from gnr.eval.runs import RunModel, build_evaluated_model, load_run_model, model_source
from gnr.eval.scoring import autocast, clean_and_pgd_accuracy
from gnr.eval.spec import EvalSpec, Measure, parse_attacks, parse_eps, pgd_step, sanity_warnings
from gnr.eval.speed import (compile_graphs, fastest_batch, model_seconds, pass_seconds, pass_times, prepare_model,
                            project_seconds)
from gnr.eval.verdicts import predicts, robust_correct, seeded

__all__ = ["AttackProgress", "AttackStats", "AutoAttackResult", "Autocast", "Batch", "BatchProgress", "EvalPlan",
           "EvalResult", "EvalSpec", "FGSM_STEP", "Measure", "PRECISIONS", "PassCounter", "Phase", "Phases",
           "Recheck", "ResultTable", "RunModel", "STANDARD", "Stratum", "add_efficiency", "allocate", "attack_table",
           "autocast", "build_evaluated_model", "clean_and_pgd_accuracy", "compile_graphs", "evaluate",
           "evaluate_external", "fastest_batch", "fgsm", "image_batches", "image_passes", "load_ids",
           "load_run_model", "margin_strata", "measure_passes", "metric_prefix", "model_seconds", "model_source",
           "normalise_id", "parse_attacks", "parse_eps", "pass_seconds", "pass_times", "pgd", "pgd_step", "predicts",
           "prepare_model", "project_seconds", "robust_correct", "run_autoattack", "sanity_warnings", "seeded",
           "stratified_mean", "summed_ce", "upper_bound_passes", "write_rows"]
