"""Progress of the core's long loops: a tqdm bar on a terminal, or a callback that sees the fraction done.

Every long core function takes `progress: Progress`: `True` prints a tqdm bar on stderr, `False` is silent,
and a callable `fn(fraction, text)` receives the fraction of the work done in [0, 1] and a one-line status
(the app's progress bars fill from it). A callback may raise to stop the work: that is the app's
cooperative cancellation (`ui.jobs.JobCancelled`); the core undoes its hooks and fake quantization in
`finally` blocks, so a stopped loop leaves the model as it found it.

`stage(progress, lo, hi)` maps a sub-task's fractions into [lo, hi] of its caller's, so a function made of
several loops (evaluation: reference, quantization, comparison) fills one bar once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

ProgressFn = Callable[[float, str], None]
Progress = bool | ProgressFn
T = TypeVar("T")


class _CallbackBar:
    """tqdm's `update` / context-manager surface over a callback: reports done / total after each step."""

    def __init__(self, total: int, desc: str, unit: str, fn: ProgressFn):
        self.total, self.desc, self.unit, self.fn, self.n = max(int(total), 1), desc, unit, fn, 0
        fn(0.0, f"{desc}: 0/{total} {unit}s")

    def update(self, n: int = 1) -> None:
        self.n += n
        self.fn(min(1.0, self.n / self.total), f"{self.desc}: {self.n}/{self.total} {self.unit}s")

    def close(self) -> None:
        pass

    def __enter__(self) -> _CallbackBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str, progress: Progress, unit: str = "item"):
    """A bar with `update(n)` used as a context manager: tqdm for True/False, callback-driven otherwise."""
    if callable(progress):
        return _CallbackBar(total, desc, unit, progress)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress, leave=False)


def track(items: Iterable[T], desc: str, progress: Progress, unit: str = "item") -> Iterator[T]:
    """Iterate `items` (a sized collection) reporting after each one, like `tqdm(items)`."""
    items = list(items)
    with progress_bar(len(items), desc, progress, unit) as bar:
        for item in items:
            yield item
            bar.update(1)


def stage(progress: Progress, lo: float, hi: float) -> Progress:
    """The part [lo, hi] of `progress`'s range, for one step of a longer computation (bools pass through)."""
    if not callable(progress):
        return progress
    return lambda fraction, text: progress(lo + (hi - lo) * fraction, text)


def note(progress: Progress, fraction: float, text: str) -> None:
    """Report one point (e.g. before a step without a loop) when `progress` is a callback."""
    if callable(progress):
        progress(fraction, text)


def prints(progress: Progress) -> bool:
    """Whether `progress` asks for terminal output (True), not a callback or silence."""
    return progress is True
