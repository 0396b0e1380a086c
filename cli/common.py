"""Shared CLI plumbing: consoles, JSON output, option types reused by several commands."""

import json
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

SET_HELP = "Override any config field, e.g. --set optim.batch_size=128 (repeatable)."
# Every command prints a rich table by default; --json opts in to machine-readable output.
JSON = typer.Option(False, "--json", help="Print JSON on stdout instead of a table.")
MODEL_URI_SCHEMES = ("runs:/", "models:/")  # what --model takes as an MLflow model, not a timm name


def print_json(payload: Any) -> None:
    """Machine-readable output goes to stdout alone, so `gnr ... --json | jq` works."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def show(result: Any, table: Callable[[Any], Any], as_json: bool) -> None:
    """``result`` as JSON on stdout with ``--json``, else as the rich renderable ``table(result)``."""
    if as_json:
        print_json(result)
    else:
        console.print(table(result))


def parse_csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]
