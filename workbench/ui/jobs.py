"""Background jobs for the app: one thread per long computation, with param-driven progress and cancel.

A `Job` runs `fn(ctx)` in a daemon thread. The function reports progress through `ctx.report(fraction,
text)`, so the UI thread never blocks: views watch `Job.progress` / `Job.status` and Panel schedules the
widget updates on the session's event loop. `ctx.report` has the signature of the core's progress callbacks
(`workbench.progress`), so a job passes it (or a `stage` of it) straight to the core and the bar fills.

Cancellation is cooperative: `cancel()` sets a flag, and the next `ctx.report` (from the job or from inside
the core's loops) raises `JobCancelled`, which unwinds the core through its `finally` blocks (hooks removed,
weights restored). A step with no progress hook runs to its end; its result is then dropped (`ctx.check()`
after the function), so a cancelled job never hands a result to the state.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import param

from workbench.errors import WorkbenchError

log = logging.getLogger("workbench.jobs")
_LIVE: weakref.WeakSet = weakref.WeakSet()  # started jobs, for the exit hook


@atexit.register
def _stop_all_jobs(timeout: float = 10.0) -> None:
    """Cancel and join running jobs when Python exits: a daemon thread still inside torch when the
    interpreter finalizes aborts the process."""
    for job in list(_LIVE):
        if job.running:
            job.cancel()
    for job in list(_LIVE):
        job.join(timeout)


class JobCancelled(Exception):
    """Raised inside a job's thread when the user cancelled it (or closed the tab)."""


class JobContext:
    """What a running job sees: progress reporting and the cancel flag."""

    def __init__(self, job: Job):
        self._job = job

    @property
    def cancelled(self) -> bool:
        return self._job.cancel_requested()

    def check(self) -> None:
        """Raise JobCancelled if the user asked to stop."""
        if self._job.cancel_requested():
            raise JobCancelled(self._job.name)

    def report(self, fraction: float | None = None, text: str | None = None) -> None:
        """Publish progress (fraction in [0, 1]) and a one-line status; raise JobCancelled when cancelled.

        A `workbench.progress` callback: pass it to the core as `progress=` to fill the bar from its loops.
        """
        self.check()
        if fraction is not None:
            self._job.progress = max(0.0, min(1.0, float(fraction)))
        if text is not None:
            self._job.status = text


class Job(param.Parameterized):
    """One background computation. `state` is "running" | "done" | "failed" | "cancelled"."""

    name = param.String(default="job")
    state = param.Selector(default="running", objects=["running", "done", "failed", "cancelled"])
    progress = param.Number(default=0.0, bounds=(0.0, 1.0))
    status = param.String(default="")
    error = param.String(default="")
    seconds = param.Number(default=0.0)

    def __init__(
        self,
        name: str,
        fn: Callable[[JobContext], Any],
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ):
        super().__init__(name=name, status="starting")
        self._fn, self._on_done, self._on_error = fn, on_done, on_error
        self._cancel = threading.Event()
        self.result: Any = None
        self._thread = threading.Thread(target=self._run, name=f"workbench-job-{name}", daemon=True)

    def start(self) -> Job:
        self._t0 = time.perf_counter()
        log.info("job '%s' started", self.name)
        _LIVE.add(self)
        self._thread.start()
        return self

    def _run(self) -> None:
        ctx = JobContext(self)
        try:
            result = self._fn(ctx)
            ctx.check()  # cancelled during a step without progress: drop the result
        except JobCancelled:
            self._finish("cancelled", "cancelled")
            return
        except WorkbenchError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # any failure is shown in the app; the plan is never touched
            traceback.print_exc()
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        self.result = result
        try:
            if self._on_done is not None:
                self._on_done(result)
        except Exception as exc:
            traceback.print_exc()
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        self._finish("done", "done", progress=1.0)

    def _fail(self, message: str) -> None:
        self.error = message
        if self._on_error is not None:
            try:
                self._on_error(message)
            except Exception:
                traceback.print_exc()
        self._finish("failed", message)

    def _finish(self, state: str, status: str, progress: float | None = None) -> None:
        self.seconds = time.perf_counter() - self._t0
        log.info("job '%s' %s after %.1f s", self.name, state, self.seconds)
        with param.parameterized.batch_call_watchers(self):
            if progress is not None:
                self.progress = progress
            self.status = status
            self.state = state

    @property
    def running(self) -> bool:
        return self.state == "running"

    def cancel(self) -> None:
        """Ask the job to stop: its next progress report raises JobCancelled in its own thread."""
        if not self.running:
            return
        self._cancel.set()
        self.status = "cancelling"

    def cancel_requested(self) -> bool:
        """Whether `cancel()` was called (the job may still be finishing its current step)."""
        return self._cancel.is_set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread (tests and shutdown)."""
        self._thread.join(timeout)
