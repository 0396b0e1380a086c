"""The `gnr` command. Thin: parse options, build the config, call one core function, render."""

import sys

import typer

from gnr.cli import analyze, bench, data, evaluate, jobs, report, submit, train, ui
from gnr.cli.common import err_console

app = typer.Typer(
    name="gnr",
    help="Train adversarially robust image classifiers with gradient-norm regularisation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        from gnr import __version__

        typer.echo(f"gnr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """gnr: gradient norm regularisation, adversarial training and robustness evaluation."""


app.command("train")(train.train)
app.command("eval")(evaluate.evaluate)
app.command("report", context_settings={"allow_extra_args": True})(report.report)
app.command("submit")(submit.submit)
app.command("ui")(ui.ui)
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")
app.add_typer(analyze.app, name="analyze")
app.add_typer(jobs.app, name="jobs")


def main() -> None:
    from rich.markup import escape

    from gnr.errors import GnrError

    try:
        app()
    except (GnrError, OSError) as e:  # OSError: a full disk, a read-only or missing path, named by the error
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
