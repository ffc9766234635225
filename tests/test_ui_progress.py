"""Progress bars that fill and cooperative cancellation, on stories260K: the job functions of ui/tasks.py
called directly with a recording `report`, and the state's jobs cancelled mid-way (the model restored, no
result adopted)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("panel")

from workbench.model.data import load_text  # noqa: E402
from workbench.ui import tasks  # noqa: E402
from workbench.ui.jobs import JobCancelled  # noqa: E402
from workbench.ui.session import ModelSession  # noqa: E402
from workbench.ui.state import WorkbenchState  # noqa: E402


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "stories_excerpt.txt"
    path.write_text(load_text("tinystories")[:6000])
    return str(path)


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache, so statistics and references are computed (their loops report), not read."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))


def recorder():
    seen: list[tuple[float, str]] = []

    def report(fraction, text):
        if fraction is not None:
            seen.append((fraction, text))

    return seen, report


def test_statistics_fill_the_bar_batch_by_batch(stories, excerpt, fresh_cache):
    seen, report = recorder()
    ins = tasks.statistics(ModelSession(stories), excerpt, 6, 32, report)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    steps = [t for _, t in seen if t.startswith("activations:")]
    assert steps[-1] == "activations: 6/6 batchs" and len(steps) == 7  # 0/6 .. 6/6
    assert sum(t.startswith("weights:") for _, t in seen) == 37  # 0/36 .. 36/36 layers
    assert len(ins.activations) == 36


def test_evaluation_fills_reference_quantization_and_comparison(stories, excerpt, fresh_cache):
    from workbench.plan.plan import Plan

    resolved = Plan("int4_g32").resolve(stories.model)
    seen, report = recorder()
    ev = {"text": excerpt, "seq_len": 32, "max_tokens": 256}
    result = tasks.evaluation(ModelSession(stories), resolved, ev, {}, report)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    windows = result.n_windows
    ref = [f for f, t in seen if t.startswith("reference:")]
    assert len(ref) == windows + 1 and max(ref) == pytest.approx(0.35)
    quant = [f for f, t in seen if t.startswith("quantize:")]
    assert len(quant) == 37 and min(quant) == pytest.approx(0.35) and max(quant) == pytest.approx(0.55)
    assert sum(t.startswith("evaluate:") for _, t in seen) == windows + 1 and result.kl > 0


def test_a_raising_report_stops_the_evaluation_and_restores_the_weights(stories, excerpt, fresh_cache):
    from workbench.plan.plan import Plan

    session = ModelSession(stories)
    with session.use() as private:
        before = {n: p.detach().clone() for n, p in private.model.named_parameters()}

    def report(fraction, text):
        if fraction is not None and fraction > 0.7:  # inside the comparison, weights fake-quantized
            raise JobCancelled("evaluate")

    resolved = Plan("int2_g32").resolve(stories.model)
    with pytest.raises(JobCancelled):
        tasks.evaluation(session, resolved, {"text": excerpt, "seq_len": 32, "max_tokens": 512}, {}, report)
    with session.use() as private:
        for n, p in private.model.named_parameters():
            assert torch.equal(p, before[n]), n


def test_cancelling_a_state_job_adopts_nothing_and_frees_the_session(stories, excerpt, fresh_cache):
    s = WorkbenchState()
    s.set_model(stories)
    s.set_default("int4_g32")
    with s.session.use():  # another job holds the model: this one waits, and is cancelled meanwhile
        job = s.evaluate(text=excerpt, seq_len=32, max_tokens=1024)
        job.cancel()
    job.join(30)
    assert job.state == "cancelled" and job.progress < 1.0 and s.evaluations == []
    assert s.message == f"{job.name}: cancelled" and s.message_kind == "warning"
    again = s.evaluate(wait=True, text=excerpt, seq_len=32, max_tokens=256)  # the session is usable again
    assert again.state == "done" and len(s.evaluations) == 1 and again.progress == 1.0


def test_a_job_row_coalesces_a_flood_of_reports_and_draws_the_end():
    import time

    from workbench.ui.jobs import Job
    from workbench.ui.views.common import JobRow

    redraws = []

    def run_ui(fn):
        redraws.append(time.monotonic())
        fn()

    def flood(ctx):
        for i in range(2000):
            ctx.report((i + 1) / 2000, f"step {i + 1}")
            time.sleep(0.0005)

    job = Job("flood", flood)
    row = JobRow(job, run_ui)
    job.start().join(30)
    time.sleep(2 * JobRow.INTERVAL)
    assert job.state == "done" and row.bar.value == 100 and row.status.object.startswith("done in")
    gaps = [b - a for a, b in zip(redraws, redraws[1:-1])]  # the last one (the outcome) is drawn at once
    assert len(redraws) < 100 and min(gaps, default=1.0) >= JobRow.INTERVAL * 0.9, (len(redraws), gaps)


def test_calibration_stages_fill_their_own_share_of_the_scan_bar():
    """Uniform plans, the check and the refinement each move the bar (it sat at 85% through all three)."""
    from workbench.ui.tasks import calibration_fraction

    msgs = [
        "calibrating: uniform int8_ch measured on the scan windows (1/9)",
        "calibrating: uniform int2_g32 measured on the scan windows (9/9)",
        "calibrating: check: allocation = int4_g32 measured on the scan windows (1/8)",
        "calibrating: check: allocation 5.0 bits measured on the scan windows (8/8)",
        "calibrating: refine = int3_g64: move 1/4 (13 layers up) measured on the scan windows (1/4)",
        "calibrating: refine = nf4_g64: move 2/4 (6 layers up) measured on the scan windows (3/4)",
    ]
    f = [calibration_fraction(m) for m in msgs]
    assert f == sorted(f) and len(set(f)) == len(f) and 0.85 <= f[0] and f[-1] < 1.0
    assert calibration_fraction("Fisher pass") is None
