"""`gnr report`: the paper's Table 2 and Table 3 for a set of runs, read from MLflow."""

from typing import Optional

import typer

from gnr.cli.common import console


def report(
    ctx: typer.Context,
    experiment: Optional[str] = typer.Option(None, "--experiment", help="Every finished run of this experiment."),
    run_id: list[str] = typer.Option([], "--run-id", help="These runs (repeat, or comma-separated)."),
    fmt: str = typer.Option("table", "--format", help="table | markdown | csv"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
) -> None:
    """Clean, AutoAttack per ε and PGD accuracy, seconds per step and cost relative to the adversarial run."""
    import sys

    from gnr.cli.analyze import run_ids_of
    from gnr.analysis.report import report as build, to_csv, to_markdown
    from gnr.errors import GnrError

    if fmt not in ("table", "markdown", "csv"):
        raise GnrError(f"--format is table, markdown or csv (got '{fmt}')")
    table = build(experiment=experiment, run_ids=run_ids_of(run_id, ctx.args), uri=tracking_uri)
    if fmt == "table":
        from gnr.cli.render import report_table

        console.print(report_table(table))
    else:
        sys.stdout.write(to_markdown(table) if fmt == "markdown" else to_csv(table))
