"""`gnr eval`: clean / PGD / AutoAttack accuracy of a run, logged back into the same MLflow run."""

import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from gnr.cli.common import JSON, MODEL_URI_SCHEMES, SET_HELP, console, err_console, parse_csv, print_json


def evaluate(
    run_id: Optional[str] = typer.Option(None, "--run-id", help="MLflow run whose weights to evaluate.",
                                         envvar="GNR_RUN_ID"),
    weights: str = typer.Option("ema", "--weights", help="ema | raw (the run's) or a local .safetensors/.pt file "
                                "(evaluated as a new run; pair with --model / --preset / --set)."),
    data: Optional[str] = typer.Option(None, "--data", help="Shard directory or URL prefix. Default: the run's."),
    split: Optional[str] = typer.Option(None, "--split", help="Default: the run's data.val_split."),
    ids: Optional[str] = typer.Option(None, "--ids", help="robustbench (the 5000 RobustBench ImageNet ids) or a file."),
    n: Optional[int] = typer.Option(None, "--n", "--limit", min=1,
                                    help="Evaluate the first N images (spell it --limit under torchrun, which claims --n)."),
    attacks: str = typer.Option("clean,pgd10,autoattack", "--attacks", help="Any of clean, pgd<steps>, autoattack."),
    eps: Optional[str] = typer.Option(None, "--eps", help="L∞ budgets in 1/255, e.g. 1,2,4. Default: the run's "
                                      "eval.eps (8 for the demo preset, 4 for swin-b)."),
    batch_size: int = typer.Option(100, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed", help="PGD random starts and AutoAttack's seed."),
    model: Optional[str] = typer.Option(None, "--model", help="An MLflow model to evaluate instead of --run-id "
                                        "(runs:/ID/model, models:/NAME/VERSION, models:/NAME@ALIAS; results go to "
                                        "the run it came from); with --weights PATH: the timm model name."),
    preset: str = typer.Option("demo", "--preset", "-p", help="With --weights PATH: preset for data / model."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="With --weights PATH: experiment of the new run."),
    submit: bool = typer.Option(False, "--submit", help="Run this evaluation as a cluster job instead."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="With --submit: GPUs (torchrun processes)."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="With --submit: Kubernetes namespace."),
    image: Optional[str] = typer.Option(None, "--image", help="With --submit: container image."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --submit: print what would be submitted."),
    as_json: bool = JSON,
) -> None:
    """Evaluate a run's weights and log [bold]eval/*[/] metrics, sanity checks and a per-image CSV into it."""
    from gnr.errors import GnrError
    from gnr.evaluate import EvalSpec, model_source, parse_attacks, parse_eps

    external = weights not in ("ema", "raw")
    if model and model.startswith(MODEL_URI_SCHEMES):
        if run_id or external:
            raise GnrError("--model URI names the run and its weights: leave out --run-id and --weights PATH")
        run_id, weights = model_source(model, tracking_uri)
    if not external and not run_id:
        raise GnrError("name the run to evaluate with --run-id ID or --model URI (or pass --weights PATH)")
    # eps (): the run's own budget, resolved once the run's config is at hand (in the pod for --submit)
    spec = EvalSpec(attacks=parse_attacks(parse_csv(attacks)), eps=parse_eps(parse_csv(eps)) if eps is not None else (),
                    weights="file" if external else weights, data=data, split=split, ids=ids, n=n,
                    batch_size=batch_size, device=device, seed=seed)
    if submit:
        return _submit(run_id, spec, gpus=gpus, namespace=namespace, image=image, dry_run=dry_run)

    on_batch, progress = _progress_bar(as_json or os.environ.get("RANK", "0") != "0")
    with progress:
        if external:
            from gnr.config import build_config
            from gnr.evaluate import evaluate_external

            cfg = build_config(preset=preset, overrides=overrides, fields={
                "model.name": model, "tracking.uri": tracking_uri, "tracking.experiment": experiment})
            result = evaluate_external(Path(weights), cfg, _with_run_eps(spec, lambda: cfg), on_batch=on_batch)
        else:
            from gnr.evaluate import evaluate as run_eval
            from gnr.tracking import load_run_config

            spec = _with_run_eps(spec, lambda: load_run_config(run_id, tracking_uri))
            result = run_eval(run_id, spec, uri=tracking_uri, on_batch=on_batch)
    if not result.is_main:
        return
    if as_json:
        print_json(result.summary())
    else:
        from gnr.cli.render import eval_summary

        console.print(eval_summary(result))


def _with_run_eps(spec, run_config):
    """Without --eps: the budget the run was trained and scored at (its eval.eps), in 1/255."""
    return spec if spec.eps else replace(spec, eps=(round(run_config().eval.eps * 255, 4),))


def _progress_bar(quiet: bool):
    """Images done / total, running accuracies, img/s and ETA on stderr (a bar on a terminal, else plain
    lines at a steady interval); nothing for --json or torchrun ranks > 0."""
    from contextlib import nullcontext

    if quiet:
        return None, nullcontext()
    from gnr.cli.render import ProgressReport, percent

    report = ProgressReport("eval", err_console, unit="images", transient=True)

    def on_batch(p) -> None:
        acc = "  ".join(f"{k} {percent(v)}" for k, v in p.accuracy.items())
        report.update(p.done, p.total, acc, images_per_s=None if p.resumed else p.images_per_s)

    return on_batch, report


def _submit(run_id: Optional[str], spec, *, gpus: int, namespace: Optional[str], image: Optional[str],
            dry_run: bool) -> None:
    """Install the chart's eval job: the same evaluation under torchrun, one process per GPU."""
    from gnr.cli.submit import show, submit_eval
    from gnr.errors import GnrError

    if not run_id or spec.weights == "file":
        raise GnrError("--submit evaluates a run's weights: pass --run-id (and --weights ema or raw)")
    show(submit_eval(run_id, gpus=gpus, namespace=namespace, image=image, extra_args=pod_args(spec),
                     dry_run=dry_run), dry_run=dry_run)


def pod_args(spec) -> list[str]:
    """`gnr eval` options reproducing ``spec`` in the pod (``--limit``: torchrun claims ``--n``)."""
    args = ["--weights", spec.weights, "--attacks", ",".join(spec.attacks),
            *(["--eps", ",".join(f"{e:g}" for e in spec.eps)] if spec.eps else []),  # none: the pod takes the run's
            "--batch-size", str(spec.batch_size), "--seed", str(spec.seed)]
    for flag, value in (("--data", spec.data), ("--split", spec.split), ("--ids", spec.ids), ("--limit", spec.n)):
        if value is not None:
            args += [flag, str(value)]
    return args
