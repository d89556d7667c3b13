"""Tests for kts.maskrcnn (section III.B): config, input checks, training, save/load.

The fast tests never build a TensorFlow model. The ``slow`` tests share one short
training run (quick profile, synthetic bright blobs in kidney-like ellipses).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from kts.config import get_profile
from kts.errors import KtsInputError
from kts.maskrcnn import MaskRCNNConfig, TumorMaskRCNN, anchor_positives, crop_detections, detections_to_labels, paste_masks

QUICK, PAPER = get_profile("quick").maskrcnn, get_profile("paper").maskrcnn
TRAIN_STEPS = 300  # issue 12's sanity bound: 32 crops overfitted to F1 >= 0.95 within 300 steps


def blob_crops(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Kidney-like ellipse with 0-2 bright round tumours per crop, noise; uint16 instance labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, size, size), np.float32)
    labels = np.zeros((n, size, size), np.uint16)
    for i in range(n):
        kidney = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.3 * size)) ** 2 < 1
        image = 40 + 60 * kidney + rng.normal(0, 8, (size, size))
        for j in range(int(rng.integers(0, 3))):
            r = rng.uniform(0.08, 0.14) * size
            cy, cx = rng.uniform(0.3 * size, 0.7 * size), rng.uniform(0.35 * size, 0.65 * size)
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & (labels[i] == 0)
            image[disc] = 170 + rng.normal(0, 8, disc.sum())
            labels[i][disc] = j + 1
        images[i] = np.clip(image, 0, 255)
    return images, labels


# ----------------------------------------------------------------------------- fast

def test_profiles_and_config_validation():
    quick, paper = QUICK, PAPER
    assert paper.backbone == "mobilenetv2" and paper.crop_size == 128 and paper.batch_size == 8
    assert quick.backbone == "mobilenetv2" and quick.crop_size % 2 ** quick.max_level == 0
    assert MaskRCNNConfig.from_dict(json.loads(json.dumps(paper.to_dict()))) == paper
    with pytest.raises(ValueError, match="multiple of 2\\*\\*max_level = 32"):
        MaskRCNNConfig(crop_size=100)
    with pytest.raises(ValueError, match="flip"):
        MaskRCNNConfig(flip="vertical")
    with pytest.raises(ValueError, match="optimizer"):
        MaskRCNNConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr_schedule"):
        MaskRCNNConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="rpn_unmatched_threshold"):
        MaskRCNNConfig(rpn_match_threshold=0.3, rpn_unmatched_threshold=0.5)


def test_crop_detections_keeps_tumours_above_the_threshold_best_first():
    """Model Garden's padded batch outputs -> one crop's detections: class 1 only, score >= threshold, sorted."""
    probs = np.zeros((2, 4, 28, 28), np.float32)
    probs[1] = 1.0
    out = {"num_detections": np.array([0, 3]), "detection_classes": np.array([[0, 0, 0, 0], [1, 0, 1, 1]]),
           "detection_scores": np.array([[0, 0, 0, 0], [0.6, 0.99, 0.9, 0.2]], np.float32),
           "detection_boxes": np.array([np.zeros((4, 4)), [[0, 0, 8, 8], [0, 0, 4, 4], [10, 10, 20, 30], [1, 1, 2, 2]]],
                                       np.float32), "detection_masks": probs}
    crop = crop_detections(out, 1, 0.5, 32, "exact")
    np.testing.assert_allclose(crop["scores"], [0.9, 0.6])  # class 0 and the 4th (past num_detections) dropped
    assert crop["boxes"][0].tolist() == [10, 10, 20, 30] and crop["masks"].shape == (2, 32, 32)
    assert crop["masks"][0, 15, 20] and not crop["masks"][0, 5, 5] and crop["masks"][1, 4, 4]
    assert crop_detections(out, 0, 0.5, 32, "exact")["masks"].shape == (0, 32, 32)


def test_recipe_fields_reach_the_model_garden_config():
    config = dataclasses.replace(QUICK, rpn_match_threshold=0.5,
                                 roi_foreground_fraction=0.5, mask_loss_weight=2.0)
    task = TumorMaskRCNN(config).task_config()  # a config object only: no model is built
    assert task.train_data.parser.rpn_match_threshold == 0.5
    assert task.model.roi_sampler.foreground_fraction == 0.5
    assert task.losses.mask_weight == 2.0
    for profile in (QUICK, PAPER):  # issue 12: weight decay and scale jitter
        task = TumorMaskRCNN(profile).task_config()
        assert task.losses.l2_weight_decay == profile.weight_decay > 0
        assert (task.train_data.parser.aug_scale_min, task.train_data.parser.aug_scale_max) == profile.scale_jitter
        assert profile.scale_jitter[0] < 1 < profile.scale_jitter[1]


def test_learning_rate_warms_up_then_decays_on_a_cosine():
    from kts.maskrcnn import _WarmupSchedule

    schedule = _WarmupSchedule(0.01, warmup_steps=10, total_steps=110, kind="cosine")
    rate = {step: float(schedule(step)) for step in (0, 4, 9, 60, 109)}
    assert rate[0] == pytest.approx(0.001) and rate[4] == pytest.approx(0.005)  # linear warm-up
    assert rate[9] == pytest.approx(0.01, rel=1e-3)                              # the full rate after it
    assert rate[60] == pytest.approx(0.005, rel=1e-3)                            # half way down the cosine
    assert rate[109] < 1e-5                                                      # to zero at the end
    resumed = _WarmupSchedule(0.01, warmup_steps=10, total_steps=110, kind="cosine", offset=50)
    assert float(resumed(10)) == pytest.approx(rate[60], rel=1e-6)  # a resumed chunk continues the curve
    flat = _WarmupSchedule(0.01, warmup_steps=0, kind="constant")
    assert float(flat(0)) == float(flat(1000)) == pytest.approx(0.01)


def test_dihedral_copies_are_the_eight_symmetries():
    from kts.maskrcnn import _dihedral

    item = np.arange(9).reshape(1, 3, 3)
    out = _dihedral(item)
    assert out.shape == (8, 3, 3)
    assert len({o.tobytes() for o in out}) == 8
    assert np.array_equal(out[0], item[0]) and np.array_equal(out[1], np.rot90(item[0]))
    assert np.array_equal(out[4], item[0][:, ::-1])


def test_input_validation_before_any_model_is_built():
    model = TumorMaskRCNN(QUICK)
    good = np.zeros((2, 64, 64), np.float32)
    with pytest.raises(ValueError, match="must be 64x64"):
        model.fit(np.zeros((2, 128, 128)), np.zeros((2, 128, 128)), steps=1)
    with pytest.raises(ValueError, match="shape"):
        model.fit(np.zeros((2, 64, 64, 3)), np.zeros((2, 64, 64)), steps=1)
    with pytest.raises(ValueError, match="images' shape"):
        model.fit(good, np.zeros((3, 64, 64), np.uint16), steps=1)
    with pytest.raises(ValueError, match="0..255"):
        model.fit(good + 1000.0, np.zeros((2, 64, 64), np.uint16), steps=1)
    with pytest.raises(ValueError, match="steps"):
        model.fit(good, np.zeros((2, 64, 64), np.uint16), steps=0)
    with pytest.raises(ValueError, match="must be 64x64"):
        model.predict(np.zeros((1, 96, 96)))
    assert model._model is None  # nothing was built


def test_load_refuses_another_config_without_touching_tensorflow(tmp_path):
    (tmp_path / "maskrcnn_config.json").write_text(json.dumps({"config": QUICK.to_dict()}))
    with pytest.raises(ValueError, match="'quick'.*'paper'|'paper'.*'quick'"):
        TumorMaskRCNN.load(tmp_path, config=PAPER)
    with pytest.raises(KtsInputError, match="maskrcnn_config.json"):
        TumorMaskRCNN.load(tmp_path / "missing")
    with pytest.raises(KtsInputError, match="weights.index"):
        TumorMaskRCNN.load(tmp_path)  # config but no weights
    # fine-tuning from weights of another architecture: refused before anything is built
    model = TumorMaskRCNN(PAPER)
    crops = np.zeros((2, 128, 128), np.float32)
    with pytest.raises(ValueError, match="cannot load into config 'paper'"):
        model.fit(crops, np.zeros((2, 128, 128), np.uint16), steps=1, initial_weights=tmp_path)
    assert model._model is None


def test_detections_to_labels_higher_score_wins():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 0:4, 0:4] = True
    masks[1, 2:6, 2:6] = True
    labels = detections_to_labels({"masks": masks, "scores": np.array([0.6, 0.9])}, (8, 8))
    assert labels.dtype == np.uint16
    assert labels[3, 3] == 1 and labels[0, 0] == 2  # 0.9 instance is label 1 and owns the overlap
    empty = detections_to_labels({"masks": np.zeros((0, 8, 8), bool), "scores": np.zeros(0)}, (8, 8))
    assert not empty.any()


def test_rpn_score_loss_is_the_mean_over_sampled_anchors():
    """Model Garden divides the anchor BCE by num_sampled_rois, not by the sampled anchors (errata E38)."""
    quick = QUICK
    assert quick.effective_rpn_score_weight == pytest.approx(quick.num_sampled_rois / quick.rpn_batch_size_per_im)
    assert TumorMaskRCNN(quick).task_config().losses.rpn_score_weight == pytest.approx(32 / 256)
    literal = dataclasses.replace(quick, rpn_score_loss_weight=1.0)
    assert TumorMaskRCNN(literal).task_config().losses.rpn_score_weight == 1.0
    with pytest.raises(ValueError, match="rpn_score_loss_weight"):
        dataclasses.replace(quick, rpn_score_loss_weight=0.0)


def _ideal_mask_target(mask: np.ndarray, box: np.ndarray, m: int = 28) -> np.ndarray:
    """The m x m mask of ``box`` (yxyx, pixel edges) sampled at its cell centres, bilinearly."""
    from scipy import ndimage

    y0, x0, y1, x1 = box
    ys = y0 + (np.arange(m) + 0.5) * (y1 - y0) / m - 0.5
    xs = x0 + (np.arange(m) + 0.5) * (x1 - x0) / m - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return ndimage.map_coordinates(mask.astype(np.float32), [yy, xx], order=1, mode="constant")


@pytest.mark.parametrize("size", [64, 128])
def test_ground_truth_masks_pasted_back_exactly(size):
    """Issue 12: ground-truth boxes with ground-truth 28x28 masks pasted back give Dice >= 0.99."""
    from kts import metrics

    _, labels = blob_crops(24, size, seed=3)
    exact, v1 = [], []
    for label_map in labels:
        for i in np.unique(label_map)[1:]:
            mask = label_map == i
            rows, cols = np.nonzero(mask)
            box = np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1], np.float32)
            target = _ideal_mask_target(mask, box)[None]
            exact.append(metrics.dice(paste_masks(target, box[None], size, "exact")[0], mask))
            v1.append(metrics.dice(paste_masks(target, box[None], size, "v1")[0], mask))
    assert min(exact) >= 0.99, min(exact)
    assert min(v1) < 0.98  # the older paste dilates and shifts: this test tells them apart


def test_a_covered_duplicate_leaves_no_crescent():
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 2:10, 2:10] = True   # the better detection
    masks[1, 3:11, 3:11] = True   # a shifted duplicate: most of it is covered
    labels = detections_to_labels({"masks": masks, "scores": np.array([0.9, 0.6])}, (16, 16))
    assert labels.max() == 1 and np.array_equal(labels > 0, masks[0])
    kept = detections_to_labels({"masks": masks, "scores": np.array([0.9, 0.6])}, (16, 16), overlap_drop=1.0)
    assert kept.max() == 2  # the literal "higher score wins" leaves the crescent as a second instance


def test_every_tumor_size_gets_positive_anchors():
    """Anchors (scales, levels, match threshold) give the crops' tumours several positives (errata E38)."""
    for config in (QUICK, PAPER):
        _, labels = blob_crops(24, config.crop_size, seed=4)
        counts = anchor_positives(config, labels)
        assert len(counts) > 10
        assert np.median(counts) >= 3 and np.mean(counts == 0) <= 0.1, (config.name, counts)
    old = dataclasses.replace(QUICK, num_scales=1, anchor_size=2.0, rpn_match_threshold=0.7)
    assert np.mean(anchor_positives(old, blob_crops(24, 64, seed=4)[1]) == 0) > 0.5


# ----------------------------------------------------------------------------- slow (one training)

@pytest.fixture(scope="module")
def trained():
    config = dataclasses.replace(QUICK, flip="none", scale_jitter=(1.0, 1.0), intensity_jitter=0.0)
    images, labels = blob_crops(32, config.crop_size, seed=0)
    images[0], labels[0] = 50.0, 0  # a crop with no tumour must be usable (negative example)
    model = TumorMaskRCNN(config)
    history = model.fit(images, labels, steps=TRAIN_STEPS, seed=0, progress=False)
    return model, history


@pytest.mark.slow
def test_training_learns_to_find_tumors(trained):
    from kts import metrics

    model, history = trained
    assert len(history) == TRAIN_STEPS
    assert set(history[0]) >= {"total_loss", "rpn_score_loss", "rpn_box_loss", "frcnn_cls_loss",
                               "frcnn_box_loss", "mask_loss"}
    first = np.mean([h["total_loss"] for h in history[:10]])
    last = np.mean([h["total_loss"] for h in history[-10:]])
    assert last < 0.5 * first
    train_images, train_labels = blob_crops(32, model.config.crop_size, seed=0)
    train_images[0], train_labels[0] = 50.0, 0
    choice = model.choose_score_threshold(train_images, train_labels)
    assert choice["chosen"] and model.score_threshold == choice["threshold"]
    assert model.evaluate(train_images, train_labels)["f1"] >= 0.95  # the overfit sanity check of issue 12
    test_images, test_labels = blob_crops(16, model.config.crop_size, seed=1)
    result = model.evaluate(test_images, test_labels)
    assert result["recall"] >= 0.8, result
    predictions = model.predict(test_images)
    assert len(predictions) == 16
    for p in predictions:
        n = len(p["scores"])
        assert p["boxes"].shape == (n, 4) and p["masks"].shape == (n, 64, 64) and p["masks"].dtype == bool
        assert np.all(np.diff(p["scores"]) <= 0) and np.all(p["scores"] >= model.score_threshold)
        if n:
            assert np.all(p["boxes"][:, 2] >= p["boxes"][:, 0]) and p["boxes"].max() <= 64.5
    ap = metrics.mask_ap(predictions, list(test_labels))
    assert ap["AP50"] > 0.5, ap


@pytest.mark.slow
def test_empty_crop_and_threshold_one_give_empty_predictions(trained):
    model, _ = trained
    flat = np.full((2, 64, 64), 60.0, np.float32)
    labels = model.predict_labels(flat, score_threshold=1.0)
    assert labels.shape == (2, 64, 64) and labels.dtype == np.uint16 and not labels.any()
    assert model.predict(np.zeros((0, 64, 64))) == []


@pytest.mark.slow
def test_fine_tuning_starts_from_the_given_weights(trained, tmp_path):
    """fit(initial_weights=...) continues from saved weights (errata E35): one near-zero step keeps the detector
    (one step from scratch finds nothing: the untrained model's recall is 0)."""
    model, _ = trained
    model.save(tmp_path / "pretrained")
    images, labels = blob_crops(16, model.config.crop_size, seed=1)
    slow = dataclasses.replace(model.config, learning_rate=1e-7, warmup_steps=0)
    tuned = TumorMaskRCNN(slow)
    tuned.fit(images[:4], labels[:4], steps=1, seed=0, progress=False, initial_weights=tmp_path / "pretrained")
    assert tuned.evaluate(images, labels)["recall"] >= 0.8


@pytest.mark.slow
def test_save_load_round_trip_gives_identical_predictions(trained, tmp_path):
    model, _ = trained
    images, _ = blob_crops(6, model.config.crop_size, seed=2)
    before = model.predict(images, score_threshold=0.3)
    model.save(tmp_path / "ckpt")
    model.save(tmp_path / "ckpt")  # overwriting is fine
    assert (tmp_path / "ckpt" / "maskrcnn_config.json").is_file()
    loaded = TumorMaskRCNN.load(tmp_path / "ckpt")
    assert loaded.config == model.config and loaded.score_threshold == model.score_threshold
    after = loaded.predict(images, score_threshold=0.3)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a["scores"], b["scores"])
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
        np.testing.assert_array_equal(a["masks"], b["masks"])
    # a config JSON edited to another architecture: a clear error, not a deep TF crash
    cfg_file = tmp_path / "ckpt" / "maskrcnn_config.json"
    saved = json.loads(cfg_file.read_text())
    saved["config"] = dataclasses.replace(model.config, fc_dims=128, name="edited").to_dict()
    cfg_file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="do not fit config 'edited'"):
        TumorMaskRCNN.load(tmp_path / "ckpt")


def test_only_the_unused_mobilenet_block_warning_is_hidden():
    import logging

    from kts.maskrcnn import _UnusedBlockFilter

    def record(msg):
        return logging.LogRecord("tensorflow", logging.WARNING, __file__, 1, msg, None, None)

    f = _UnusedBlockFilter()
    assert not f.filter(record("Gradients do not exist for variables ['conv2dbn_block_1/batch_normalization/gamma:0', "
                               "'conv2dbn_block_1/batch_normalization/beta:0'] when minimizing the loss."))
    assert f.filter(record("Gradients do not exist for variables ['rpn_head/conv/kernel:0'] when minimizing the loss."))
    assert f.filter(record("something else"))
