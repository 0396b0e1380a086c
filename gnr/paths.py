"""Where gnr keeps local state on a laptop: MLflow store, demo shards, checkpoints.

Everything lives under ``$GNR_HOME`` (default ``~/.gnr``) so that one variable moves or isolates it
(tests point it at a temporary directory).
"""

import os
from pathlib import Path

from gnr.errors import GnrError


def home() -> Path:
    path = Path(os.environ.get("GNR_HOME", Path.home() / ".gnr")).expanduser()
    if path.exists() and not path.is_dir():
        raise GnrError(f"GNR_HOME {path} is not a directory; point GNR_HOME at a directory gnr may write to")
    return path


def demo_data_dir() -> Path:
    return home() / "data" / "demo"


def local_tracking_uri() -> str:
    return f"sqlite:///{home() / 'mlflow.db'}"


def local_artifact_root() -> Path:
    return home() / "artifacts"


def eval_cache_root() -> Path:
    """Per-batch evaluation results, kept so an interrupted evaluation resumes. ``$GNR_EVAL_CACHE``
    moves them to storage that outlives the process (the chart's eval pods use the checkpoint volume)."""
    return Path(os.environ.get("GNR_EVAL_CACHE", home() / "eval")).expanduser()


def checkpoint_root() -> Path:
    return home() / "checkpoints"
