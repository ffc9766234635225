"""The app's charts as plain figures: the verify points on the Pareto chart (issue 11's screenshot)."""

from __future__ import annotations

import itertools
import math

import pytest

pytest.importorskip("plotly")

from workbench.ui import charts  # noqa: E402

# the verify view of docs/screenshots/verify.png (stories260K, allocation at 4.5 bits/weight): this plan and
# uniform int4_g128 lie 0.001 MB and 0.13 decades apart, and their labels used to overlap
CHECKS = [
    dict(label="this plan", kind="plan", mb=0.146, avg_bits=4.5, predicted=0.1545, kl=0.1728),
    dict(label="uniform int4_g128", kind="uniform", mb=0.145, avg_bits=4.473, predicted=0.1953, kl=0.2321),
    dict(label="uniform int4_g32", kind="uniform", mb=0.163, avg_bits=5.025, predicted=0.1514, kl=0.1978),
]
FRONT_MB = [0.098 + 0.4 * i / 99 for i in range(100)]
FRONT_COST = [5 * 10 ** (-5.7 * i / 98) for i in range(99)] + [0.0]  # all layers bf16: cost 0


def test_verify_labels_do_not_overlap_and_markers_match_the_legend():
    fig = charts.pareto_figure(FRONT_MB, FRONT_COST, current_mb=0.146, current_cost=0.1545, checks=CHECKS)
    for name in ("measured KL", "predicted"):  # one colour per trace: the legend shows what is drawn
        trace = next(t for t in fig.data if t.name == name)
        assert isinstance(trace.marker.color, str), (name, trace.marker.color)
        assert list(trace.y) == [c["kl" if name == "measured KL" else "predicted"] for c in CHECKS]
    notes = list(fig.layout.annotations)
    assert [a.text for a in notes] == ["this plan", "int4_g128", "int4_g32"]
    assert notes[0].font.color == charts.ALERT and notes[1].font.color == charts.CHECK_INK
    assert [a.y for a in notes] == pytest.approx([math.log10(c["kl"]) for c in CHECKS])  # log axis units
    # placed in pixels: at any pixel scale down to 900 x 220, no two label boxes meet and none covers a marker
    for w, h in ((900, 220), (1300, 310)):
        pts = [(c["mb"] * w / 0.4, -math.log10(c["kl"]) * h / 5.7) for c in CHECKS]
        marks = pts + [(c["mb"] * w / 0.4, -math.log10(c["predicted"]) * h / 5.7) for c in CHECKS]
        texts = [a.text for a in notes]
        offsets = charts.label_offsets(pts, texts, marks)
        boxes = [charts.label_box(x + ax, y + ay, t) for (x, y), (ax, ay), t in zip(pts, offsets, texts)]
        for a, b in itertools.combinations(boxes, 2):
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (w, boxes)
        for (mx, my), box in itertools.product(marks, boxes):
            assert not (box[0] < mx + 6 and mx - 6 < box[2] and box[1] < my + 6 and my - 6 < box[3])


def test_label_offsets_keep_a_lone_label_above_its_point():
    assert charts.label_offsets([(100.0, 100.0)], ["int8_ch"]) == [(0, -20)]
