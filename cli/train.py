"""`gnr train METHOD`: build the RunConfig from preset + options, then run the core trainer."""

from pathlib import Path
from typing import Optional

import typer

from gnr.cli.common import SET_HELP, console, print_json


def train(
    method: Optional[str] = typer.Argument(None, help="natural | gradnorm | gradnorm-fd | adversarial | edge"),
    preset: str = typer.Option("demo", "--preset", "-p", help="Shipped preset: demo, swin-b, resnet50."),
    config: Optional[Path] = typer.Option(None, "--config", help="A resolved config YAML (what the chart mounts)."),
    data: Optional[str] = typer.Option(None, "--data", help="Shard directory or URL prefix ('demo' = bundled digits)."),
    model: Optional[str] = typer.Option(None, "--model", help="Any timm model name."),
    act: Optional[str] = typer.Option(None, "--act", help="Swap activations: gelu | relu | silu | softplus | keep."),
    attack: Optional[str] = typer.Option(None, "--attack", help="adversarial: pgd | fgsm."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Per process."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    experiment: Optional[str] = typer.Option(None, "--experiment"),
    register: Optional[str] = typer.Option(None, "--register", metavar="NAME",
                                           help="Register the logged MLflow model under NAME (a new version)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="MLflow run id to continue.", envvar="GNR_RUN_ID"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Train a classifier. [bold]gnr train gradnorm[/] alone runs the whole demo job on this machine."""
    from gnr.config import METHODS, build_config
    from gnr.errors import GnrError

    if method is not None and method not in METHODS:
        raise GnrError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    if method is None and config is None:
        raise GnrError("name a method (e.g. `gnr train gradnorm`) or pass --config FILE")
    fields = {
        "objective.method": method,
        "data.source": data,
        "model.name": model,
        "model.act": act,
        "objective.attack": attack,
        "schedule.epochs": epochs,
        "schedule.max_steps": max_steps,
        "optim.batch_size": batch_size,
        "tracking.uri": tracking_uri,
        "tracking.experiment": experiment,
        "tracking.run_id": resume,
        "tracking.register_as": register,
    }
    cfg = build_config(preset=preset, config_file=config, overrides=overrides, fields=fields)
    if dry_run:
        if as_json:
            print_json(cfg.model_dump(mode="json"))
        else:
            console.print(cfg.to_yaml(), highlight=False, markup=False)
        return

    from gnr.train import train as run_training

    if as_json:
        result = run_training(cfg)
    else:
        from gnr.cli.render import TrainProgress

        with TrainProgress(console) as progress:
            result = run_training(cfg, on_event=progress.update)
    if not result.is_main:
        return
    if as_json:
        print_json(result.summary())
    else:
        from gnr.cli.render import run_summary

        console.print(run_summary(result))
    if result.status == "KILLED":
        raise typer.Exit(130)
