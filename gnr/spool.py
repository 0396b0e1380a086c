"""A durable local buffer of MLflow calls that could not be sent while the tracking server was down.

One JSON object per line (``{"op": "metrics" | "tags" | "artifact" | "text", ...}``), appended and
fsynced before the call is considered done, so nothing is lost if the process then dies. It lives
beside the run's checkpoints; the next process that attaches to the run (``gnr train --resume``)
sends it in order and empties it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gnr import atomic
from gnr.errors import GnrError

NAME = "mlflow-spool.jsonl"


class Spool:
    def __init__(self, path: Path):
        self.path = path

    def append(self, op: dict) -> None:
        try:
            with open(self.path, "a+b") as f:
                # A process killed mid-append left a line without its newline: end it first, so this
                # call does not merge into it (read() then skips only the torn, never-acknowledged one).
                torn = False
                if f.seek(0, os.SEEK_END):
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
                f.write((("\n" if torn else "") + json.dumps(op) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise GnrError(f"cannot buffer MLflow data in {self.path}: {e.strerror or e}") from None

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        ops = []
        for line in self.path.read_text().splitlines():
            try:
                ops.append(json.loads(line))
            except ValueError:  # a line torn by a process killed mid-append: its call was never done
                continue
        return ops

    def replace(self, ops: list[dict]) -> None:
        """Keep only `ops` (those not sent yet); an empty spool is removed."""
        if ops:
            atomic.write_text(self.path, "".join(json.dumps(op) + "\n" for op in ops))
        else:
            self.path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.read())


def compact(ops: list[dict]) -> list[dict]:
    """An artifact uploaded twice (``checkpoints/last.pt`` after every epoch) is sent once, at the
    place of its last upload; everything else keeps its order."""
    last = {}
    for i, op in enumerate(ops):
        if op["op"] == "artifact":
            last[(op["path"], op.get("artifact_path"))] = i
    return [op for i, op in enumerate(ops)
            if op["op"] != "artifact" or last[(op["path"], op.get("artifact_path"))] == i]
