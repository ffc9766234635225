"""Small widgets shared by the views: the notice line, live totals, job progress rows."""

from __future__ import annotations

import threading
import time

import panel as pn
import param

from workbench.ui.jobs import Job
from workbench.ui.state import WorkbenchState

_ALERT = {"info": "primary", "success": "success", "warning": "warning", "error": "danger"}


def notice(state: WorkbenchState) -> pn.viewable.Viewable:
    """The last message for the user (errors stay until the next message) and, below it, the few before
    it with their times, so one notice never hides another. Panes updated in place."""
    alert = pn.pane.Alert("", alert_type="primary", margin=(2, 5), css_classes=["wb-notice"], visible=False)
    history = pn.pane.Markdown(
        "", margin=(0, 10), css_classes=["wb-notice-history"], styles={"font-size": "12px", "color": "#666"}
    )

    def show(*_events):
        alert.object = state.message
        alert.alert_type = _ALERT[state.message_kind]
        alert.visible = bool(state.message)
        older = state.notifications[-6:-1]
        history.object = "  \n".join(f"{t} &middot; {kind}: {text}" for t, kind, text in reversed(older))
        history.visible = bool(older)

    state.param.watch(show, ["message", "message_kind", "notifications"])
    show()
    return pn.Column(alert, history, margin=0, sizing_mode="stretch_width")


def totals_text(state: WorkbenchState) -> str:
    """The totals line as Markdown (all numbers from plan_totals / planedit.predicted_cost)."""
    totals, cost = state.totals, state.cost
    if totals is None:
        return "*no model loaded*"
    ratio = totals.bf16_mb / totals.mb if totals.mb else float("inf")
    if cost is None:
        predicted = "predicted cost: compute sensitivity first"
    elif cost.total is None:
        predicted = f"predicted cost: {len(cost.unpriced)} layer(s) use specs the table lacks"
    else:
        predicted = f"predicted cost: **{cost.total:.4g}**"
    return (
        f"**{totals.mb:.3f} MB** &nbsp; **{totals.avg_bits:.3f}** bits/weight &nbsp; "
        f"**{ratio:.2f}x** smaller than bf16 ({totals.bf16_mb:.3f} MB) &nbsp; {predicted} &nbsp; "
        f"<small>({totals.n_layers} linear layers, embeddings not counted; "
        f"updated in {1000 * state.edit_seconds:.0f} ms)</small>"
    )


def totals_line(state: WorkbenchState) -> pn.viewable.Viewable:
    """Size, average bits, compression vs bf16 and predicted cost of the current plan, live (one pane)."""
    pane = pn.pane.Markdown(totals_text(state), css_classes=["wb-totals"], margin=(0, 10))
    state.param.watch(lambda *_e: setattr(pane, "object", totals_text(state)), ["revision", "cost"])
    return pane


def job_status_text(job: Job) -> str:
    """The status column: the live status while running, else the outcome once ("failed: <why>")."""
    if job.state == "running":
        return job.status
    if job.state == "failed":
        return f"failed: {job.error}"[:300]
    return f"{job.state} in {job.seconds:.1f} s"


class JobRow:
    """One job's row: name, progress bar, status, cancel button (hidden once finished).

    `sync()` copies the job's progress, status and outcome into the widgets; the row watches the job (from
    the job's thread, through `run_ui`) and `jobs_panel` calls `sync()` to catch up when it re-shows it.
    A running job's updates are coalesced to one redraw per `INTERVAL` seconds (an evaluation reports every
    window, thousands of times; every redraw is a message on the server's one event loop, which all the
    browser tabs share); the latest value is always drawn, at most `INTERVAL` late.
    """

    INTERVAL = 0.25

    def __init__(self, job: Job, run_ui=lambda fn: fn()):
        self.job, self._run_ui = job, run_ui
        self._pending, self._last = False, 0.0
        self.bar = pn.indicators.Progress(
            value=int(job.progress * 100), max=100, width=160, height=18, bar_color="primary", margin=(8, 5)
        )
        self.status = pn.pane.Str(job.status, margin=(5, 5), styles={"font-size": "12px"})
        self.cancel = pn.widgets.Button(
            name="cancel",
            button_type="warning",
            width=70,
            height=28,
            disabled=not job.running,
            css_classes=["wb-cancel"],
        )
        self.cancel.on_click(lambda _e: job.cancel())
        job.param.watch(self._changed, ["progress", "status", "state"])
        self.sync()
        name = pn.pane.Markdown(f"**{job.name}**", margin=(5, 5), width=220)
        self.row = pn.Row(name, self.bar, self.cancel, self.status, css_classes=["wb-job"])

    def _changed(self, *_events) -> None:
        """A job param changed (in the job's thread): schedule one redraw, now or after the interval."""
        if self._pending:
            return
        self._pending = True
        delay = self._last + self.INTERVAL - time.monotonic() if self.job.running else 0.0
        if delay <= 0:
            self._run_ui(self._flush)
        else:
            threading.Timer(delay, lambda: self._run_ui(self._flush)).start()

    def _flush(self) -> None:
        self._pending, self._last = False, time.monotonic()
        self.sync()

    def sync(self, *_events) -> None:
        job = self.job
        self.bar.value = int(job.progress * 100)
        self.bar.active = job.running and job.progress == 0
        self.bar.bar_color = JOB_COLORS[job.state]
        self.status.object = job_status_text(job)
        self.cancel.disabled = not job.running
        self.cancel.visible = job.running


JOB_COLORS = {"running": "primary", "done": "success", "failed": "danger", "cancelled": "secondary"}


def jobs_panel(state: WorkbenchState, keep_finished: int = 1) -> pn.viewable.Viewable:
    """Running jobs (and the last few finished ones) of this session; one JobRow (one watcher) per job."""
    rows: dict[Job, JobRow] = {}  # of this panel, for the jobs the state still lists

    def show(jobs):
        for gone in [j for j in rows if j not in jobs]:
            del rows[gone]
        running = [j for j in jobs if j.running]
        finished = [j for j in jobs if not j.running][-keep_finished:]
        shown = []
        for j in finished + running:
            if j in rows:
                rows[j].sync()  # catch up on changes made before the page was connected
            else:
                rows[j] = JobRow(j, state.run_ui)
            shown.append(rows[j].row)
        return pn.Column(*shown, margin=0) if shown else pn.pane.HTML("", height=0, margin=0)

    return pn.bind(show, state.param.jobs)


class View(param.Parameterized):
    """Base of the views: holds the state; `panel()` returns the layout."""

    state = param.ClassSelector(class_=WorkbenchState)

    def __panel__(self):
        return self.panel()
