"""`gnr eval`: clean / PGD / AutoAttack accuracy of a run, logged back into the same MLflow run."""

import os
from pathlib import Path
from typing import Optional

import typer

from gnr.cli.common import MODEL_URI_SCHEMES, SET_HELP, console, err_console, parse_csv, print_json


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
    eps: str = typer.Option("1,2,4", "--eps", help="L∞ budgets in 1/255."),
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
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
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
    spec = EvalSpec(attacks=parse_attacks(parse_csv(attacks)), eps=parse_eps(parse_csv(eps)),
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
            result = evaluate_external(Path(weights), cfg, spec, on_batch=on_batch)
        else:
            from gnr.evaluate import evaluate as run_eval

            result = run_eval(run_id, spec, uri=tracking_uri, on_batch=on_batch)
    if not result.is_main:
        return
    if as_json:
        print_json(result.summary())
    else:
        from gnr.cli.render import eval_summary

        console.print(eval_summary(result))


def _progress_bar(quiet: bool):
    """A rich progress bar (images/s, running accuracies) on stderr; nothing for --json or torchrun ranks > 0."""
    from contextlib import nullcontext

    if quiet:
        return None, nullcontext()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
                        TimeElapsedColumn(), TextColumn("{task.fields[acc]}"), console=err_console, transient=True)
    task = progress.add_task("eval", total=None, speed="", acc="")

    def on_batch(p) -> None:
        acc = "  ".join(f"{k} {100 * v:.1f}%" for k, v in p.accuracy.items())
        speed = "resumed" if p.resumed else f"{p.images_per_s:.1f} img/s"
        progress.update(task, completed=p.done, total=p.total, speed=speed, acc=acc)

    return on_batch, progress


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
    args = ["--weights", spec.weights, "--attacks", ",".join(spec.attacks), "--eps", ",".join(f"{e:g}" for e in spec.eps),
            "--batch-size", str(spec.batch_size), "--seed", str(spec.seed)]
    for flag, value in (("--data", spec.data), ("--split", spec.split), ("--ids", spec.ids), ("--limit", spec.n)):
        if value is not None:
            args += [flag, str(value)]
    return args
