"""Notebook 06's explorer without a browser: the cascade on one slice, its scores, the pictures, the text.

TensorFlow-free and fast: the Mask R-CNN is a fake that finds one square per crop, the CU-Net's
output a probability ramp whose threshold moves the kidney's edge.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
from matplotlib.figure import Figure

from kts import explorer, metrics

SIZE = 96


class FakeMaskRCNN:
    """One square tumour in the middle of every crop, score 0.8 (and a weaker one, 0.3, in the corner)."""

    def __init__(self, crop_size=32):
        self.config = types.SimpleNamespace(crop_size=crop_size)
        self.score_threshold = 0.5
        self.calls = []

    def predict(self, crops, score_threshold=None):
        threshold = self.score_threshold if score_threshold is None else score_threshold
        self.calls.append((len(crops), threshold))
        s = self.config.crop_size
        out = []
        for _ in crops:
            masks = np.zeros((2, s, s), bool)
            masks[0, s // 2 - 4:s // 2 + 4, s // 2 - 4:s // 2 + 4] = True
            masks[1, 1:5, 1:5] = True
            scores = np.array([0.8, 0.3], np.float32)
            keep = scores >= threshold
            out.append({"masks": masks[keep], "scores": scores[keep], "boxes": np.zeros((int(keep.sum()), 4))})
        return out


def _disc(cy, cx, r):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2


@pytest.fixture
def scene():
    """A kidney disc with a tumour at its centre; CU-Net probabilities falling off from the centre."""
    kidney = _disc(48, 48, 20).astype(np.uint8)
    tumor = _disc(48, 48, 5).astype(np.uint16)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    probability = np.clip(1.0 - np.hypot(yy - 48, xx - 48) / 40.0, 0, 1).astype(np.float32)
    image = (kidney * 120 + tumor * 80 + 20).astype(np.float32)
    return image, kidney, tumor, probability


def test_the_cunet_threshold_recuts_the_crops_and_reruns_mask_rcnn(scene):
    image, kidney, tumor, probability = scene
    model = FakeMaskRCNN()
    low = explorer.cascade_slice(image, probability, model, threshold=0.3)
    high = explorer.cascade_slice(image, probability, model, threshold=0.7)
    assert len(model.calls) == 2, "Mask R-CNN runs again at each threshold"
    assert low.kidney_pred.sum() > high.kidney_pred.sum() > 0
    (y0, x0, y1, x1), = low.regions
    (v0, u0, v1, u1), = high.regions
    assert (y1 - y0) > (v1 - v0), "a lower threshold gives a larger kidney, hence a larger crop"
    assert low.tumor_pred.max() == 1 and low.instances[0]["score"] == pytest.approx(0.8)
    assert low.score_threshold == 0.5, "None takes the model's own score threshold"


def test_the_score_threshold_reaches_mask_rcnn(scene):
    image, _, _, probability = scene
    model = FakeMaskRCNN()
    strict = explorer.cascade_slice(image, probability, model, 0.5, score_threshold=0.5)
    lenient = explorer.cascade_slice(image, probability, model, 0.5, score_threshold=0.2)
    assert model.calls[-1][1] == 0.2
    assert len(strict.instances) == 1 and len(lenient.instances) == 2


def test_a_slice_without_kidney_gives_no_crop_and_no_tumor(scene):
    image, _, _, probability = scene
    model = FakeMaskRCNN()
    res = explorer.cascade_slice(image, probability * 0.1, model, threshold=0.5)
    assert res.regions == [] and not res.tumor_pred.any() and model.calls == []


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_bad_thresholds_are_refused_by_name(scene, bad):
    image, _, _, probability = scene
    with pytest.raises(ValueError, match="CU-Net threshold"):
        explorer.cascade_slice(image, probability, FakeMaskRCNN(), threshold=bad)


def test_mismatched_shapes_are_refused(scene):
    image, _, _, probability = scene
    with pytest.raises(ValueError, match="same shape"):
        explorer.cascade_slice(image, probability[:50], FakeMaskRCNN())


def test_slice_scores_are_those_of_kts_metrics(scene):
    image, kidney, tumor, probability = scene
    res = explorer.cascade_slice(image, probability, FakeMaskRCNN(), threshold=0.5)
    sc = explorer.slice_scores(res.kidney_pred, kidney, res.tumor_pred, tumor)
    assert sc["kidney_iou"] == pytest.approx(metrics.iou(res.kidney_pred, kidney))
    assert sc["kidney_dice"] == pytest.approx(metrics.dice(res.kidney_pred, kidney))
    assert sc["tumor_dice"] == pytest.approx(metrics.tumor_scores([res.tumor_pred], [tumor])["dice"])
    counts = metrics.confusion(res.kidney_pred, kidney)
    assert (sc["kidney_tp"], sc["kidney_fp"], sc["kidney_fn"]) == (counts["tp"], counts["fp"], counts["fn"])
    assert sc["n_gt"] == 1 and sc["n_predicted"] == 1


def test_tumor_free_slice_with_nothing_predicted_is_na_not_one():
    empty = np.zeros((8, 8), np.uint16)
    kidney = np.zeros((8, 8), np.uint8)
    kidney[2:6, 2:6] = 1
    sc = explorer.slice_scores(kidney, kidney, empty, empty)
    assert sc["kidney_iou"] == 1.0 and np.isnan(sc["tumor_dice"]) and np.isnan(sc["instance_f1"])
    html = explorer.scores_html(sc)
    assert "n/a" in html and "kts-tumor-dice" in html


def test_instance_rows_list_matches_with_iou_false_alarms_and_misses():
    gt = np.zeros((20, 20), np.uint16)
    gt[2:6, 2:6] = 1          # found by prediction 1
    gt[12:16, 12:16] = 2      # missed
    pred = np.zeros((20, 20), np.uint16)
    pred[2:6, 2:7] = 1        # IoU 16/20 with true 1
    pred[12:14, 2:4] = 2      # a false alarm
    rows = explorer.instance_rows(pred, gt, [{"label": 1, "score": 0.9}, {"label": 2, "score": 0.6}])
    assert [r["outcome"] for r in rows] == ["found", "false alarm", "missed"]
    assert rows[0]["predicted"] == 1 and rows[0]["true"] == 1 and rows[0]["iou"] == pytest.approx(0.8)
    assert rows[0]["score"] == pytest.approx(0.9)
    assert rows[1]["true"] is None and rows[1]["iou"] == 0.0
    assert rows[2]["predicted"] is None and rows[2]["score"] is None
    text = explorer.instances_html(rows)
    assert text.count("kts-instance'") == 3 and "0.800" in text


def test_outcome_map_codes_tp_fp_fn():
    pred = np.array([[1, 1, 0, 0]])
    gt = np.array([[1, 0, 1, 0]])
    assert explorer.outcome_map(pred, gt).tolist() == [[1, 2, 3, 0]]
    with pytest.raises(ValueError, match="shape"):
        explorer.outcome_map(pred, gt.T)


@pytest.mark.parametrize("mode", list(explorer.MODES))
def test_view_figure_draws_a_legend_of_what_is_shown(scene, mode):
    image, kidney, tumor, probability = scene
    res = explorer.cascade_slice(image, probability, FakeMaskRCNN(), threshold=0.5)
    fig = explorer.view_figure(image, kidney, tumor, res.kidney_pred, res.tumor_pred, mode=mode,
                               regions=res.regions)
    assert isinstance(fig, Figure)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    if mode == "predictions":
        assert {"true kidney", "true tumour", "CU-Net kidney", "Mask R-CNN tumour", "kidney crop"} <= set(labels)
    else:
        assert "kidney correct (TP)" in labels and "tumour missed (FN)" in labels
    off = explorer.view_figure(image, kidney, tumor, res.kidney_pred, res.tumor_pred, mode=mode,
                               layers={"image": True})
    assert not off.legends, "nothing switched on, nothing to explain"


def test_unknown_layer_and_mode_are_refused(scene):
    image, kidney, tumor, _ = scene
    with pytest.raises(ValueError, match="unknown layer"):
        explorer.view_figure(image, kidney, tumor, kidney, tumor, layers={"maskrcnn_": True})
    with pytest.raises(ValueError, match="mode"):
        explorer.view_figure(image, kidney, tumor, kidney, tumor, mode="tp")


def test_scores_html_shows_the_case_and_only_what_is_switched_on():
    sc = explorer.slice_scores(np.ones((4, 4)), np.ones((4, 4)), np.zeros((4, 4), int), np.zeros((4, 4), int))
    both = explorer.scores_html(sc, case="case-003 · T2", threshold=0.5, score_threshold=0.45)
    assert "case-003 · T2" in both and "kts-kidney-iou" in both and "kts-tumor-dice" in both
    assert "threshold 0.50" in both and "0.45" in both
    kidney_only = explorer.scores_html(sc, layers={"cunet": True})
    assert "kts-kidney-iou" in kidney_only and "kts-tumor-dice" not in kidney_only


def test_slice_label_is_what_a_student_reads():
    assert explorer.slice_label("case-007", "t2", 1, 2, 7) == "case-007 · T2 · 1 tumour (3 of 7)"
    assert explorer.slice_label("case-001", "t1_post", 0) == "case-001 · T1 post-contrast · no tumour"
    assert explorer.slice_label("c", None, 3) == "c · 3 tumours"


def test_threshold_grid_reruns_the_cascade_per_panel(scene):
    image, kidney, tumor, probability = scene
    model = FakeMaskRCNN()
    fig = explorer.threshold_grid(image, kidney, tumor, probability, model, (0.3, 0.5, 0.7), case="case-1")
    assert len(model.calls) == 3
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 3 and all("kidney IoU" in t for t in titles)
    assert len({t.splitlines()[1] for t in titles}) == 3, "each threshold gives its own kidney IoU"
    with pytest.raises(ValueError, match="at least one"):
        explorer.threshold_grid(image, kidney, tumor, probability, model, ())


def test_explorer_widget_updates_scores_and_caches_the_cascade(scene):
    pytest.importorskip("ipywidgets")
    image, kidney, tumor, probability = scene
    model = FakeMaskRCNN()
    ex = explorer.Explorer([image, image], [kidney, kidney], [tumor, tumor], [probability, probability * 0.9],
                           model, labels=["case-a", "case-b"], threshold=0.5)
    first = dict(ex.last_scores)
    assert "kts-kidney-iou" in ex.scores.value and "case-a" in ex.scores.value
    assert ex.threshold.continuous_update is False and ex.score_threshold.continuous_update is False
    assert ex.score_threshold.value == 0.5, "starts at the model's own score threshold"
    ex.threshold.value = 0.3
    assert ex.last_scores["kidney_iou"] != first["kidney_iou"]
    calls = len(model.calls)
    ex.threshold.value = 0.5
    assert len(model.calls) == calls, "going back to a threshold already seen reuses its cascade"
    ex.layers["maskrcnn"].value = False
    assert "kts-tumor-dice" not in ex.scores.value and ex.instances.value == ""
    ex.slice.value = 1
    assert "case-b" in ex.scores.value
    descriptions = [ex.slice.description, ex.threshold.description, ex.score_threshold.description,
                    *(box.description for box in ex.layers.values())]
    assert not any("_" in d for d in descriptions), "labels a student reads, not parameter names"
