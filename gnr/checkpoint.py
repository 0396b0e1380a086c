"""Atomic checkpoints (:mod:`gnr.atomic`): a crash never leaves a torn one, a full disk never a temp file.

A checkpoint is a plain dict of tensors and Python scalars (model, EMA, optimizer, scheduler, scaler,
RNG states of every rank, data position, config), loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from gnr import atomic
from gnr.errors import GnrError

PREFIX = "step-"


def prepare_dir(directory: Path) -> None:
    """Create a run's checkpoint directory and remove temp files of writes that were killed."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale(directory)
        probe = atomic.temp_path(directory / "probe")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise GnrError(f"cannot write checkpoints to {directory}: {e.strerror or e}") from None


def save(state: dict, directory: Path, step: int, keep_last: int) -> Path:
    """Write ``step-<step>.pt``, then keep only the newest `keep_last`; a failed write raises a
    one-line :class:`GnrError` and leaves the previous checkpoints as they were."""
    path = directory / f"{PREFIX}{step:09d}.pt"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale(directory)
        with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        raise GnrError(f"cannot write checkpoint {path}: {_io_cause(e)}") from None
    for old in sorted(directory.glob(f"{PREFIX}*.pt"))[:-keep_last]:
        old.unlink()
    return path


def _io_cause(e: BaseException) -> str:
    """torch reports a failed write (e.g. ENOSPC) as "unexpected pos" RuntimeError; the OSError it
    replaced says what happened."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, OSError):
            return cause.strerror or str(cause)
        cause = cause.__context__
    return (str(e).splitlines() or [type(e).__name__])[0]


def latest(directory: Path) -> Path | None:
    found = sorted(directory.glob(f"{PREFIX}*.pt")) if directory.is_dir() else []
    return found[-1] if found else None


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Every RNG the training step touches: torch (CPU + CUDA), NumPy (timm Mixup), Python."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gauss": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
