"""The one way gnr writes a file that holds state: all or nothing, never a torn or half-written file.

The data goes to a temporary file beside the target (``.<name>.<pid>.tmp``), is fsynced, and is
renamed over the target; the directory is fsynced so the rename survives a power cut. On any failure
(a full disk, a permission error, Ctrl-C) the temporary file is removed before the error goes on, so
a failed write never keeps a disk full. A process killed mid-write cannot clean up: its temporary
file is removed by :func:`remove_stale` on the next save or resume.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; when the block succeeds it becomes `path` atomically."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def remove_stale(directory: Path) -> list[Path]:
    """Remove temporary files that writers killed mid-write left in `directory` (which must have a
    single writer, like a run's checkpoint directory). ``*.pt.tmp`` is the name older gnr versions used."""
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.is_file() and (_ours(p) or p.name.endswith(".pt.tmp"))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _ours(path: Path) -> bool:
    name = path.name
    return name.startswith(".") and name.endswith(TMP_SUFFIX) and name.removesuffix(TMP_SUFFIX).rsplit(".", 1)[-1].isdigit()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
