"""What an evaluation is doing, from its first second: each phase (loading, compiling a graph, timing
passes, each attack at each ε) as it starts and as it ends, with its wall time.

A phase can run for minutes without returning to Python that could report it (compiling a graph,
one attack on a large batch), so while one is open a background thread reports it as still running
whenever nothing has been reported for :data:`TICK_S` seconds: a log is never silent for long.
The CLI renders the events (a live line on a terminal, plain lines in a log).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

TICK_S = 10.0  # at most this long without an event while a phase runs (plain progress lines come every 15 s)


@dataclass
class Phase:
    """A phase starting (``start``), still running (``running``, with what it has done so far) or ending
    (``end``, ``elapsed_s`` its wall time)."""

    name: str
    state: str
    elapsed_s: float = 0.0
    detail: str = ""


class Phases:
    """Reports phases, and every other event it forwards, to ``on_event``; nested phases are allowed
    (the innermost is the one reported as running). Without ``on_event`` it only times."""

    def __init__(self, on_event: Callable[[object], None] | None = None, tick_s: float = TICK_S):
        self.on_event, self.tick_s = on_event, tick_s
        self.open: list[tuple[str, float, Callable[[], str] | None]] = []
        self.last = time.monotonic()
        self.lock = threading.RLock()  # the ticker reports a phase only while it is open
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def emit(self, event) -> None:
        """Forward ``event`` (a :class:`Phase` or any other progress event)."""
        if self.on_event is None:
            return
        with self.lock:
            self.last = time.monotonic()
            self.on_event(event)

    @contextmanager
    def phase(self, name: str, progress: Callable[[], str] | None = None) -> Iterator[None]:
        """Reports ``name`` starting and ending; ``progress()`` describes the work done so far in ticks."""
        started = time.monotonic()
        with self.lock:
            self.emit(Phase(name, "start"))
            self.open.append((name, started, progress))
        self._start_ticking()
        try:
            yield
        finally:
            with self.lock:
                self.open.remove((name, started, progress))
                self.emit(Phase(name, "end", time.monotonic() - started))

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def __enter__(self) -> "Phases":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start_ticking(self) -> None:
        if self.on_event is not None and self.thread is None:
            self.thread = threading.Thread(target=self._tick, name="gnr-eval-phases", daemon=True)
            self.thread.start()

    def _tick(self) -> None:
        while not self.stopped.wait(min(1.0, self.tick_s)):
            with self.lock:
                now = time.monotonic()
                if self.open and now - self.last >= self.tick_s:
                    name, started, progress = self.open[-1]
                    self.emit(Phase(name, "running", now - started, progress() if progress else ""))
