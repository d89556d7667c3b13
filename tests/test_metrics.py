"""Metrics against hand-computed cases, Keras' BinaryIoU and an independent computation."""
import numpy as np
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
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    assert metrics.iou(empty, empty) == metrics.dice(empty, empty) == 1.0
    assert metrics.iou(full, empty) == metrics.dice(full, empty) == 0.0
    assert metrics.precision(full, empty) == 0.0 and metrics.recall(full, empty) == 1.0
    assert metrics.precision(empty, full) == 1.0 and metrics.recall(empty, full) == 0.0


def test_shape_mismatch_is_value_error():
    with pytest.raises(ValueError, match="shape"):
        metrics.iou(np.zeros((2, 2)), np.zeros((3, 3)))


def test_mean_and_pooled_differ_as_documented():
    small_t = np.zeros((10, 10), bool); small_t[0, 0] = True
    small_p = np.zeros((10, 10), bool)  # misses the tiny object: IoU 0
    big_t = np.zeros((10, 10), bool); big_t[:5] = True
    big_p = big_t.copy()  # perfect: IoU 1
    s = metrics.summarise([small_p, big_p], [small_t, big_t])
    assert s["mean_iou"] == pytest.approx(0.5)
    assert s["pooled_iou"] == pytest.approx(50 / 51)
    assert s["n_images"] == 2


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
    assert s["negative_slices"] == 1 and s["true_negative_slices"] == 1.0
    # a low-overlap prediction is not a match
    weak = _labels((0, 4, 3, 7))  # overlap 4/28
    assert metrics.match_instances(weak, _labels((0, 4, 0, 4)))["tp"] == 0


def test_mask_ap_perfect_and_miss():
    gt = _labels((0, 6, 0, 6), (10, 16, 10, 16))
    masks = np.stack([gt == 1, gt == 2])
    perfect = metrics.mask_ap([gt], [{"masks": masks, "scores": np.array([0.9, 0.8])}])
    assert perfect["AP"] == pytest.approx(1.0)
    none = metrics.mask_ap([gt], [{"masks": np.zeros((0, 20, 20), bool), "scores": np.zeros(0)}])
    assert none["AP"] == 0.0
    assert metrics.mask_ap([np.zeros((5, 5))], [{}])["AP"] == -1.0
