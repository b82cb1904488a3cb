"""Progress of long work as plain lines: a count and an estimate of the time left, one line at a time.

``progress(iterable, total=..., desc=..., bar=False)`` is what the kit's long loops (embedding, FLR scoring,
sampling, evaluation, grid runs) iterate through. With ``bar=True`` it is a tqdm bar (the loops' ``progress=True``);
otherwise it prints nothing for work that ends within ``after`` seconds, and for longer work one line to stderr every
``every`` seconds, then one when it ends::

    embedding: 1536/4624 (33 %) after 40 s, about 1 min 20 s left
    embedding: 4624/4624 done in 2 min 01 s

``NCA_KIT_PROGRESS=0`` turns the lines off (``scripts/run_notebooks.py --store`` does, so stored notebook outputs
hold no timings).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable

__all__ = ["progress", "Lines", "enabled", "duration"]


def enabled() -> bool:
    """False when the environment variable ``NCA_KIT_PROGRESS`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("NCA_KIT_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def duration(seconds: float) -> str:
    """``"40 s"``, ``"2 min 05 s"``, ``"1 h 03 min"``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Lines:
    """Counts work done and prints a progress line now and then (see the module docstring); tqdm's ``update``,
    ``close``, iteration and ``with`` are supported, so it stands in for a bar."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "working",
                 initial: int = 0, after: float = 10.0, every: float = 30.0, stream=None, clock=time.monotonic,
                 **_ignored):
        self.iterable, self.desc, self.n = iterable, desc, initial
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.after, self.every, self.stream, self.clock = after, every, stream, clock
        self.on = enabled()
        self.start = self.clock()
        self.initial = initial
        self.printed_at: float | None = None

    def _print(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.stream or sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.on:
            return
        now = self.clock()
        spent = now - self.start
        due = self.printed_at is None and spent >= self.after or (
            self.printed_at is not None and now - self.printed_at >= self.every)
        if not due:
            return
        self.printed_at = now
        done = self.n - self.initial
        if self.total:
            left = (self.total - self.n) * spent / done if done > 0 else None
            share = f" ({100 * self.n / self.total:.0f} %)"
            eta = f", about {duration(left)} left" if left is not None else ""
            self._print(f"{self.n}/{self.total}{share} after {duration(spent)}{eta}")
        else:
            self._print(f"{self.n} after {duration(spent)}")

    def close(self) -> None:
        if self.on and self.printed_at is not None:
            count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
            self._print(f"{count} done in {duration(self.clock() - self.start)}")
            self.printed_at = None

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, *args, **kwargs) -> None:  # tqdm's, for code written against a bar
        pass


def progress(iterable: Iterable | None = None, *, bar: bool = False, **kwargs):
    """A tqdm bar when ``bar`` is true, else :class:`Lines` (same arguments: ``total``, ``desc``, ``initial``)."""
    if bar:
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)
    return Lines(iterable, **{k: v for k, v in kwargs.items() if k in ("total", "desc", "initial")})
