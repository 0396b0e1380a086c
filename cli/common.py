"""Shared CLI plumbing: consoles, JSON output, option types reused by several commands."""

import json
import sys
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)

SET_HELP = "Override any config field, e.g. --set optim.batch_size=128 (repeatable)."
MODEL_URI_SCHEMES = ("runs:/", "models:/")  # what --model takes as an MLflow model, not a timm name


def print_json(payload: Any) -> None:
    """Machine-readable output goes to stdout alone, so `gnr ... --json | jq` works."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


def parse_csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]
