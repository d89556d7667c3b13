"""Metrics against hand-computed cases, Keras' BinaryIoU and an independent computation.

The rule under test (kts.metrics' docstring, errata E37): figures pooled over the test set,
undefined values NaN ("n/a") and never 1, per-image means only over the images where defined.
"""
import json
import math

import numpy as np
import pandas as pd
import pytest

from kts import metrics


def test_hand_computed_case():
    target = np.zeros((4, 4), bool)
    target[:2, :2] = True  # 4 pixels
    pred = np.zeros((4, 4), bool)
    pred[:2, 1:3] = True  # 4 pixels, 2 overlap
    assert metrics.confusion(pred, target) == {"tp": 2, "fp": 2, "fn": 2, "tn": 10}
    assert metrics.iou(pred, target) == pytest.approx(2 / 6)
    assert metrics.dice(pred, target) == pytest.approx(4 / 8)
    assert metrics.pixel_accuracy(pred, target) == pytest.approx(12 / 16)
    assert metrics.precision(pred, target) == pytest.approx(0.5)
    assert metrics.recall(pred, target) == pytest.approx(0.5)


def test_empty_mask_conventions():
    """Undefined is NaN, never 1: nothing predicted has no precision, nothing to find no recall."""
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    assert math.isnan(metrics.iou(empty, empty)) and math.isnan(metrics.dice(empty, empty))
    assert math.isnan(metrics.precision(empty, empty)) and math.isnan(metrics.recall(empty, empty))
    assert metrics.iou(full, empty) == metrics.dice(full, empty) == 0.0
    assert metrics.precision(full, empty) == 0.0 and math.isnan(metrics.recall(full, empty))
    assert math.isnan(metrics.precision(empty, full)) and metrics.recall(empty, full) == 0.0
    assert metrics.pixel_accuracy(empty, empty) == 1.0  # every pixel is labelled correctly: defined


def test_shape_mismatch_is_value_error():
    with pytest.raises(ValueError, match="shape"):
        metrics.iou(np.zeros((2, 2)), np.zeros((3, 3)))


def test_mean_and_pooled_differ_as_documented():
    small_t = np.zeros((10, 10), bool); small_t[0, 0] = True
    small_p = np.zeros((10, 10), bool)  # misses the tiny object: IoU 0
    big_t = np.zeros((10, 10), bool); big_t[:5] = True
    big_p = big_t.copy()  # perfect: IoU 1
    s = metrics.score_masks([small_p, big_p], [small_t, big_t])
    assert s["mean_iou"] == pytest.approx(0.5)
    assert s["pooled_iou"] == pytest.approx(50 / 51)
    assert s["n_images"] == 2 and s["mean_iou_n_images"] == 2


def test_per_image_means_skip_undefined_images_and_count_them():
    """An image where prediction and target are both empty leaves the mean Dice (it used to add a 1)."""
    empty = np.zeros((4, 4), bool)
    target = np.zeros((4, 4), bool); target[:2, :2] = True  # 4 pixels
    half = np.zeros((4, 4), bool); half[:2, :1] = True  # 2 of them: Dice 2*2 / (2 + 4)
    s = metrics.score_masks([empty, target, half], [empty, target, target])
    assert s["mean_dice"] == pytest.approx((1.0 + 4 / 6) / 2)  # was (1 + 1 + 4/6) / 3
    assert s["mean_dice_n_images"] == 2 and s["mean_iou_n_images"] == 2 and s["n_images"] == 3
    assert s["mean_precision_n_images"] == 2 and s["mean_recall_n_images"] == 2
    assert s["mean_accuracy_n_images"] == 3  # accuracy is defined on every image
    assert s["pooled_dice"] == pytest.approx(2 * 6 / (6 + 8))
    assert (s["n_predicted_pixels"], s["n_target_pixels"]) == (6, 8)
    none = metrics.score_masks([empty, empty], [empty, empty])
    assert math.isnan(none["mean_dice"]) and none["mean_dice_n_images"] == 0 and math.isnan(none["pooled_dice"])


def test_against_keras_binary_iou_and_independent_formula():
    import keras

    rng = np.random.default_rng(0)
    for _ in range(5):
        t = rng.random((32, 32)) > 0.6
        p = rng.random((32, 32)) > 0.5
        m = keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.5)
        m.update_state(t.astype("float32"), p.astype("float32"))
        assert metrics.iou(p, t) == pytest.approx(float(m.result()), abs=1e-6)
        inter, union = np.logical_and(p, t).sum(), np.logical_or(p, t).sum()
        assert metrics.dice(p, t) == pytest.approx(2 * inter / (p.sum() + t.sum()))
        assert metrics.iou(p, t) == pytest.approx(inter / union)


def test_overfit_measure_on_crafted_history():
    history = {"accuracy": [0.8, 0.9, 0.95, 0.99], "val_accuracy": [0.8, 0.85, 0.85, 0.84]}
    assert metrics.overfit_measure(history) == pytest.approx((0 + 0.05 + 0.10 + 0.15) / 4)
    assert metrics.overfit_measure(history, k=2) == pytest.approx(0.125)
    assert metrics.is_overfit(history, delta=0.1, k=2)
    assert not metrics.is_overfit(history, delta=0.1)

    class FakeHistory:  # a keras.callbacks.History
        pass

    fake = FakeHistory()
    fake.history = history
    assert metrics.overfit_measure(fake, k=1) == pytest.approx(0.15)


@pytest.mark.parametrize("history, kwargs, fragment", [
    ({"accuracy": [0.9]}, {}, "val_accuracy"),
    ({"accuracy": [0.9], "val_accuracy": [0.8]}, {"k": 2}, "k must be"),
    ({"accuracy": [], "val_accuracy": []}, {}, "non-zero"),
])
def test_overfit_measure_bad_input(history, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        metrics.overfit_measure(history, **kwargs)


def _labels(*boxes, shape=(20, 20)):
    out = np.zeros(shape, np.uint16)
    for i, (y0, y1, x0, x1) in enumerate(boxes, start=1):
        out[y0:y1, x0:x1] = i
    return out


def test_instance_matching_hand_made():
    gt = _labels((0, 4, 0, 4), (10, 14, 10, 14))
    pred = _labels((0, 4, 1, 5), (15, 19, 15, 19))  # first overlaps 12/20 = 0.6, second is a false positive
    m = metrics.match_instances(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["matches"][0][:2] == (1, 1)
    s = metrics.instance_scores([pred, np.zeros((20, 20))], [gt, np.zeros((20, 20))])
    assert s["precision"] == s["recall"] == s["f1"] == pytest.approx(0.5)
    assert (s["tp"], s["fp"], s["fn"], s["n_predicted"], s["n_gt"], s["n_images"]) == (1, 1, 1, 2, 2, 2)
    assert s["negative_slices"] == 1 and s["n_true_negative_slices"] == 1 and s["true_negative_slices"] == 1.0
    # a low-overlap prediction is not a match
    weak = _labels((0, 4, 3, 7))  # overlap 4/28
    assert metrics.match_instances(weak, _labels((0, 4, 0, 4)))["tp"] == 0


def test_mask_ap_perfect_and_miss():
    gt = _labels((0, 6, 0, 6), (10, 16, 10, 16))
    masks = np.stack([gt == 1, gt == 2])
    perfect = metrics.mask_ap([{"masks": masks, "scores": np.array([0.9, 0.8])}], [gt])
    assert perfect["AP"] == pytest.approx(1.0)
    none = metrics.mask_ap([{"masks": np.zeros((0, 20, 20), bool), "scores": np.zeros(0)}], [gt])
    assert none["AP"] == 0.0
    assert math.isnan(metrics.mask_ap([{}], [np.zeros((5, 5))])["AP"])  # no tumour: undefined, not -1


def _half_tumor_free_set():
    """Four crops, two with a tumour each and two tumour-free; a detector that predicts nothing."""
    gt = [_labels((2, 8, 2, 8)), _labels((10, 16, 4, 12)), _labels(), _labels()]
    return [np.zeros((20, 20), np.uint16) for _ in gt], gt


def test_a_detector_that_finds_nothing_scores_zero_not_half():
    """Issue 17: per-crop Dice with "both empty = 1" gave such a detector Dice 0.5 and precision 1."""
    pred, gt = _half_tumor_free_set()
    pixels = metrics.score_masks([p > 0 for p in pred], [g > 0 for g in gt])
    assert pixels["mean_dice"] == 0.0  # was 0.5: the tumour-free crops each added a Dice of 1
    assert pixels["pooled_dice"] == 0.0 and math.isnan(pixels["pooled_precision"])
    inst = metrics.instance_scores(pred, gt)
    assert math.isnan(inst["precision"])  # was 1.0
    assert inst["f1"] == 0.0 and inst["recall"] == 0.0
    s = metrics.tumor_scores(pred, gt)
    assert s["dice"] == 0.0 and s["iou"] == 0.0  # pooled over all crops
    assert s["instance_f1"] == 0.0 and s["instance_recall"] == 0.0
    assert math.isnan(s["instance_precision"]) and s["n_predicted"] == 0 and s["n_gt"] == 2
    assert metrics.format_metric(s["instance_precision"]) == "n/a"
    assert (s["tp"], s["fp"], s["fn"], s["n_images"]) == (0, 0, 2, 4)
    assert s["mean_dice"] == 0.0 and s["mean_dice_n_images"] == 2  # the tumour-free crops are left out
    assert s["negative_slices"] == 2 and s["n_true_negative_slices"] == 2 and s["true_negative_slices"] == 1.0


def test_tumor_scores_hand_made_detection():
    gt = [_labels((0, 4, 0, 4), (10, 14, 10, 14)), _labels()]
    pred = [_labels((0, 4, 1, 5), (15, 19, 15, 19)), _labels((0, 2, 0, 2))]  # a match, two false positives
    s = metrics.tumor_scores(pred, gt)
    assert (s["tp"], s["fp"], s["fn"], s["n_predicted"], s["n_gt"]) == (1, 2, 1, 3, 2)
    assert s["instance_precision"] == pytest.approx(1 / 3) and s["instance_recall"] == pytest.approx(0.5)
    assert s["instance_f1"] == pytest.approx(2 / 5)
    # pixels: gt 32, pred 16 + 16 + 4, overlap 12
    assert s["dice"] == pytest.approx(2 * 12 / (32 + 36)) and s["iou"] == pytest.approx(12 / (32 + 36 - 12))
    assert s["mean_dice"] == pytest.approx((24 / 64 + 0.0) / 2) and s["mean_dice_n_images"] == 2
    assert s["negative_slices"] == 1 and s["n_true_negative_slices"] == 0  # predicted on the tumour-free slice
    with pytest.raises(ValueError, match="ground-truth"):
        metrics.tumor_scores(pred, gt[:1])


def test_nothing_to_find_and_nothing_claimed_is_undefined_not_perfect():
    empty = [_labels(), _labels()]
    s = metrics.tumor_scores(empty, empty)
    for key in ("dice", "iou", "instance_precision", "instance_recall", "instance_f1", "mean_dice"):
        assert math.isnan(s[key]), key
    assert s["mean_dice_n_images"] == 0 and s["true_negative_slices"] == 1.0  # still true negatives


def _kidney_case():
    kidney = np.zeros((1, 20, 20), np.uint8)
    kidney[0, 2:12, 2:12] = 1  # 100 pixels
    tumor = np.zeros((1, 20, 20), np.uint16)
    tumor[0, 4:8, 4:8] = 1  # 16 pixels, inside the kidney
    return kidney, tumor


def test_tumor_predicted_outside_the_kidney_lowers_accuracy_in_kidney():
    """Issue 17: counting only the pixels inside the true kidney never saw such a tumour as an error."""
    from kts import workflow

    kidney, tumor = _kidney_case()
    exact = workflow.score_cascade(kidney, tumor, kidney, tumor)
    assert exact["accuracy_in_kidney"] == 1.0
    outside = tumor.copy()
    outside[0, 14:19, 14:19] = 2  # 25 pixels of tumour predicted outside the kidney
    s = workflow.score_cascade(kidney, outside, kidney, tumor)
    assert s["accuracy_in_kidney"] == pytest.approx(100 / 125)  # was 1.0
    assert s["accuracy_in_kidney_pixels"] == 125 and exact["accuracy_in_kidney_pixels"] == 100
    assert s["instance_fp"] == 1 and s["n_predicted_instances"] == 2 and s["instance_precision"] == 0.5


def test_score_cascade_reports_nothing_found_as_such():
    from kts import workflow

    kidney, tumor = _kidney_case()
    free_kidney = kidney.copy()
    kidneys = np.concatenate([kidney, free_kidney])
    gt = np.concatenate([tumor, np.zeros_like(tumor)])  # one slice with a tumour, one tumour-free
    s = workflow.score_cascade(kidneys, np.zeros_like(gt), kidneys, gt)
    assert s["tumor_dice"] == 0.0 and s["instance_f1"] == 0.0 and s["instance_recall"] == 0.0
    assert s["tumor_mean_dice"] == 0.0  # was 0.5
    assert math.isnan(s["instance_precision"])  # was 1.0
    assert s["n_predicted_instances"] == 0 and s["tumor_mean_dice_n_slices"] == 1
    assert s["n_tumor_free_slices"] == 1 and s["true_negative_slices"] == 1.0
    assert s["accuracy_in_kidney"] == pytest.approx((200 - 16) / 200)
    assert s["kidney_dice"] == 1.0 and s["kidney_mean_dice_n_slices"] == 2 and s["n_test_slices"] == 2


@pytest.mark.parametrize("value, digits, text", [
    (float("nan"), 3, "n/a"), (None, 3, "n/a"), (np.float32("nan"), 3, "n/a"), (0.5, 3, "0.500"),
    (np.float64(0.12345), 2, "0.12"), (0.0, 3, "0.000"), (7, 3, "7"), (np.int64(7), 3, "7"), ("x", 3, "x"),
])
def test_format_metric(value, digits, text):
    assert metrics.format_metric(value, digits) == text


def test_format_spread_of_one_seed_is_not_zero():
    assert metrics.format_spread(0.8671, float("nan")) == "0.867 ± n/a"
    assert metrics.format_spread(0.8671, 0.0123) == "0.867 ± 0.012"
    assert metrics.format_spread(float("nan"), float("nan")) == "n/a"


def _runs(seeds):
    from kts import study

    rows = []
    for seed, value in seeds:
        row = {key: value for key in study.REPORTED}
        row.update(partition="TD-70% VD-6%", seed=seed, n_test_slices=7, instance_precision=float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def test_table1_with_one_seed_prints_no_spread():
    """With one seed the s.d. is undefined: Table I printed "± 0.000", as if seeds had agreed."""
    from kts import study

    table = study.table1_from_runs(_runs([(0, 0.8)]))
    assert math.isnan(table.loc[0, "iou_sd"]) and table.loc[0, "iou_mean"] == pytest.approx(0.8)
    text = study.to_markdown(table)
    assert "± 0.000" not in text and "0.800 ± n/a" in text
    two = study.table1_from_runs(_runs([(0, 0.8), (1, 0.6)]))
    assert two.loc[0, "iou_sd"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert "0.700 ± 0.141" in study.to_markdown(two)
    assert math.isnan(two.loc[0, "instance_precision_mean"])  # undefined in every seed: undefined


def test_table1_frames_its_columns_and_test_set_sizes():
    """Issue 13: our IoU is labelled the kidney stage's, tumour IoU and accuracy inside the kidney stand
    beside the paper's columns, and the note says the test sets differ per row."""
    from kts import study

    runs = pd.concat([_runs([(0, 0.8)]), _runs([(0, 0.5)]).assign(partition="TD-60% VD-20%", n_test_slices=5)])
    runs["tumor_iou"] = [0.61, 0.42]
    table = study.table1_from_runs(runs)
    text = study.to_markdown(table)
    header = text.splitlines()[0]
    for column in ("our IoU (kidney stage)", "our IoU (tumour)", "our accuracy (inside the kidney)"):
        assert column in header
    assert "0.610 ± n/a" in text and "0.420 ± n/a" in text
    note = study.table1_note(table)
    assert "5-7 slices, different in each row" in note and "not directly comparable" in note
    assert "every spread reads n/a" in note


def test_study_rescores_a_record_scored_under_an_older_rule(tmp_path, monkeypatch):
    """A metrics.json of the old rule must not be reused as it is (its precision 1.0 would survive)."""
    from kts import data, study, workflow

    run_dir = workflow.run_folder(tmp_path, "TD-70% VD-6%", 0)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"iou": 0.9, "instance_precision": 1.0, "wall_s": 12.0}))

    class Rescored(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Rescored

    monkeypatch.setattr(data, "split_partition", refuse)  # the first step after the cache check
    with pytest.raises(Rescored):
        study.run_one(type("Dataset", (), {"index": None})(), "TD-70% VD-6%", 0, None, tmp_path,
                      tmp_path / "predictions")
    current = {**{key: 0.5 for key in study.REPORTED}, "iou": 0.9, "scoring": metrics.SCORING}
    (run_dir / "metrics.json").write_text(json.dumps(current))
    assert study.run_one(None, "TD-70% VD-6%", 0, None, tmp_path, tmp_path / "predictions") == current


def test_each_profile_runs_table1_partitions_the_paper_reports():
    from kts import config, study

    assert config.get_profile("paper").table1_partitions == tuple(study.PAPER_TABLE1)
    quick = config.get_profile("quick").table1_partitions
    assert set(quick) < set(study.PAPER_TABLE1) and "TD-70% VD-6%" in quick  # the partition notebooks 02-04 share


def test_study_rescores_a_record_written_before_the_tumor_rename(tmp_path, monkeypatch):
    """A run folder from before 'tumour_dice' became 'tumor_dice' is rescored from its models, not reused."""
    from kts import data, study, workflow

    run_dir = workflow.run_folder(tmp_path, "TD-70% VD-6%", 0)
    run_dir.mkdir(parents=True)
    old = {**{key.replace("tumor", "tumour"): 0.5 for key in study.REPORTED}, "scoring": metrics.SCORING}
    (run_dir / "metrics.json").write_text(json.dumps(old))

    class Rescored(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Rescored

    monkeypatch.setattr(data, "split_partition", refuse)
    with pytest.raises(Rescored):
        study.run_one(type("Dataset", (), {"index": None})(), "TD-70% VD-6%", 0, None, tmp_path, tmp_path / "p")
