"""DissectionResult: IoU definition, labels and ties, detectors, and the files of
SPEC §5 — checked against values worked out by hand."""
import csv
import json

import numpy as np
import pytest

from netdissect_fast.result import DissectionResult


def small_result():
    # 3 units, labels 0..4; categories: a (labels 1, 2), b (label 3); label 4 ignored.
    primary = np.array([-1, 0, 0, 1, -1], np.int16)
    I = np.array([[0, 10, 10, 0, 0],     # unit 0: tie between labels 1 and 2
                  [0, 0, 0, 5, 0],       # unit 1: label 3
                  [0, 0, 0, 0, 0]])      # unit 2: nothing
    A_cat = np.array([[40, 0], [30, 20], [0, 0]])
    G = np.array([0, 30, 30, 10, 0])
    return DissectionResult(thresholds=[0.5, 1.0, 2.0], intersection=I, cat_activation=A_cat, label_pixels=G,
                            categories=["a", "b"], label_names=["-", "one", "two", "three", "ignored"],
                            primary_category=primary, meta={"layer": "x"}, images=7)


def test_iou_is_intersection_over_union_with_zero_denominators():
    r = small_result()
    iou = r.iou
    assert iou[0, 1] == 10 / (40 + 30 - 10)
    assert iou[1, 3] == 5 / (20 + 10 - 5)
    assert iou[2].sum() == 0 and iou[:, 0].sum() == 0 and iou[:, 4].sum() == 0
    np.testing.assert_array_equal(r.activation[1], [0, 30, 30, 20, 0])


def test_best_label_ties_go_to_the_lowest_number_and_summary():
    r = small_result()
    rows = r.table()
    assert rows[0]["label"] == 1 and rows[0]["category"] == "a"
    assert rows[1]["label"] == 3 and rows[1]["category"] == "b"
    assert rows[2]["category"] is None and rows[2]["iou"] == 0
    s = r.summary(0.04)
    assert s["detectors"] == {"a": 1, "b": 1} and s["unique_detectors"] == {"a": 1, "b": 1}
    assert r.summary(0.2)["total_detectors"] == 0 + (10 / 60 > 0.2) + (5 / 25 > 0.2)
    # NetDissect-Lite counts IoU >= threshold: exactly 0.2 is a detector only then
    assert r.summary(0.2, inclusive=True)["detectors"]["b"] == 1
    assert r.summary(0.2)["detectors"]["b"] == 0


def test_save_writes_spec_files_and_loads_back(tmp_path):
    r = small_result()
    d = r.save(tmp_path / "out", report=False)
    with open(d / "tally.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["unit", "category", "label", "score"]
    assert rows[0][4:9] == ["a-label", "a-truth", "a-activation", "a-intersect", "a-iou"]
    assert [row[0] for row in rows[1:]] == ["2", "1", "3"]  # sorted by score, units 1-based
    assert rows[1][1:3] == ["b", "three"] and float(rows[1][3]) == pytest.approx(0.2)
    assert rows[2][4:8] == ["one", "30", "40", "10"]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["unique_detectors"] == {"a": 1, "b": 1} and summary["meta"]["layer"] == "x"
    back = DissectionResult.load(d)
    for name in ("thresholds", "intersection", "cat_activation", "label_pixels", "iou"):
        np.testing.assert_array_equal(getattr(back, name), getattr(r, name))
    assert back.label_names == r.label_names and back.images == 7
    with pytest.raises(FileNotFoundError, match="not a saved dissection result"):
        DissectionResult.load(tmp_path / "nothing")


def test_inconsistent_shapes_are_rejected():
    with pytest.raises(ValueError, match="inconsistent"):
        DissectionResult([0.5], np.zeros((2, 3)), np.zeros((2, 1)), np.zeros(3), ["a"], ["-", "x", "y"],
                         [-1, 0, 0])
