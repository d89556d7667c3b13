"""Tests for kts.cascade: kidney regions, crops, paste-back, the cascade, blob properties.

TensorFlow-free: the Mask R-CNN is replaced by a small fake with the same ``predict``.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from kts import cascade


def ellipse(shape, cy, cx, ry, rx):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def two_kidneys(shape=(320, 320)):
    return (ellipse(shape, 160, 90, 60, 35) | ellipse(shape, 150, 230, 55, 30)).astype(np.uint8)


class FakeMaskRCNN:
    """Predicts one square instance at a fixed place in every crop (score 0.9)."""

    def __init__(self, crop_size=64, square=(20, 20, 36, 36)):
        self.config = types.SimpleNamespace(crop_size=crop_size)
        self.square = square
        self.calls = 0

    def predict(self, crops, score_threshold=0.5):
        self.calls += 1
        out = []
        for _ in range(len(crops)):
            m = np.zeros((1, self.config.crop_size, self.config.crop_size), bool)
            y0, x0, y1, x1 = self.square
            m[0, y0:y1, x0:x1] = True
            out.append({"boxes": np.array([self.square], np.float32), "scores": np.array([0.9], np.float32),
                        "masks": m})
        return out


def test_kidney_regions_two_ellipses_square_and_inside():
    mask = two_kidneys()
    boxes = cascade.kidney_regions(mask, min_area=50, margin=8)
    assert len(boxes) == 2
    left, right = boxes
    assert left[1] < right[1]  # ordered left to right
    for (y0, x0, y1, x1), centre in zip(boxes, [(160, 90), (150, 230)]):
        assert y1 - y0 == x1 - x0  # squared up
        assert 0 <= y0 and 0 <= x0 and y1 <= 320 and x1 <= 320
        assert y0 < centre[0] < y1 and x0 < centre[1] < x1
    # the left kidney's tallest extent is 2*60 -> side 120 + 2*8 margin
    assert left[2] - left[0] == pytest.approx(119 + 16, abs=2)
    # every kidney pixel lies in one box
    covered = np.zeros_like(mask, bool)
    for y0, x0, y1, x1 in boxes:
        covered[y0:y1, x0:x1] = True
    assert covered[mask > 0].all()


def test_kidney_regions_clips_at_border_and_drops_specks():
    mask = np.zeros((100, 100), np.uint8)
    mask[0:30, 0:20] = 1  # touches the corner
    mask[80, 80] = 1  # speck
    boxes = cascade.kidney_regions(mask, min_area=10, margin=10)
    assert boxes == [(0, 0, 50, 50)]  # side 30 + 20, shifted inside, still square


def test_kidney_regions_empty_and_bad_input():
    assert cascade.kidney_regions(np.zeros((64, 64))) == []
    with pytest.raises(ValueError, match="2-D"):
        cascade.kidney_regions(np.zeros((2, 64, 64)))


def test_extract_crops_area_interpolation_and_labels_nearest():
    image = np.zeros((100, 100), np.float32)
    image[10:50, 10:50] = 200.0
    crops = cascade.extract_crops(image, [(10, 10, 50, 50), (0, 0, 100, 100)], 20)
    assert crops.shape == (2, 20, 20) and crops.dtype == np.float32
    np.testing.assert_allclose(crops[0], 200.0)
    assert crops[1].max() <= 200.0 and crops[1].min() >= 0.0
    assert crops[1][5, 5] == pytest.approx(200.0) and crops[1][15, 15] == pytest.approx(0.0)
    labels = np.zeros((100, 100), np.uint16)
    labels[20:30, 20:30] = 7
    labels[40:60, 40:60] = 3  # clipped by the first box
    lab = cascade.extract_label_crops(labels, [(10, 10, 50, 50)], 20)
    assert lab.dtype == np.uint16
    assert set(np.unique(lab[0])) == {0, 1, 2}  # renumbered 1..n, only nearest-neighbour values
    assert cascade.extract_crops(image, [], 20).shape == (0, 20, 20)
    with pytest.raises(ValueError, match="outside"):
        cascade.extract_crops(image, [(0, 0, 120, 120)], 20)
    with pytest.raises(ValueError, match="crop_size"):
        cascade.extract_crops(image, [(0, 0, 10, 10)], 0)


def test_paste_instances_square_lands_in_the_right_place():
    box = (100, 60, 164, 124)  # 64x64 slice box, crop size 32: scale 2
    crop = np.zeros((32, 32), np.uint16)
    crop[8:16, 4:12] = 1  # -> slice rows 116:132, cols 68:84
    out = cascade.paste_instances([crop], [box], (320, 320))
    assert out.dtype == np.uint16 and out.shape == (320, 320)
    expected = np.zeros((320, 320), bool)
    expected[116:132, 68:84] = True
    assert np.count_nonzero(out) == pytest.approx(expected.sum(), rel=0.15)
    rows, cols = np.nonzero(out)
    assert abs(rows.mean() - 123.5) < 1.0 and abs(cols.mean() - 75.5) < 1.0
    assert (out[expected] == 1).mean() > 0.9


def test_paste_instances_merges_crops_with_new_labels_and_score_priority():
    a = {"masks": np.zeros((2, 10, 10), bool), "scores": np.array([0.6, 0.9])}
    a["masks"][0, 0:5, 0:5] = True
    a["masks"][1, 3:8, 3:8] = True  # overlaps the first; higher score wins the overlap
    b = np.zeros((10, 10), np.uint16)
    b[2:6, 2:6] = 4
    out, records = cascade.paste_instances([a, b], [(0, 0, 10, 10), (20, 20, 30, 30)], (40, 40),
                                           return_instances=True)
    assert sorted(np.unique(out)) == [0, 1, 2, 3]
    assert [r["score"] for r in records] == [1.0, 0.9, 0.6]  # label maps count as score 1
    assert out[4, 4] == 2  # the 0.9 instance owns the overlap
    assert out[22, 22] == 1
    empty = cascade.paste_instances([{"masks": np.zeros((0, 10, 10), bool), "scores": np.zeros(0)}],
                                    [(0, 0, 10, 10)], (40, 40))
    assert empty.shape == (40, 40) and not empty.any()
    with pytest.raises(ValueError, match="boxes"):
        cascade.paste_instances([b, b], [(0, 0, 10, 10)], (40, 40))


def test_training_crops_keep_negatives_and_clip_tumors():
    mask = two_kidneys()
    tumors = np.zeros((320, 320), np.uint16)
    tumors[ellipse((320, 320), 160, 90, 10, 10)] = 1  # in the left kidney only
    image = 50.0 + 100.0 * mask
    crops, labels, sources = cascade.training_crops(
        np.stack([image, image]), np.stack([mask, np.zeros_like(mask)]), np.stack([tumors, tumors]),
        crop_size=64, margin=8, return_sources=True)
    assert crops.shape == (2, 64, 64) and labels.shape == (2, 64, 64)  # the empty slice gives none
    assert [s[0] for s in sources] == [0, 0]
    assert labels[0].max() == 1 and labels[1].max() == 0  # right kidney crop is a negative example
    masked, mlabels = cascade.training_crops(image, mask, tumors, crop_size=64, mode="masked_image")
    assert masked.shape == (1, 64, 64) and mlabels.max() == 1
    assert masked[0][0, 0] == 0.0  # outside the kidney is blanked
    with pytest.raises(ValueError, match="mode"):
        cascade.training_crops(image, mask, tumors, crop_size=64, mode="whole")


def test_run_cascade_with_fake_model_pastes_into_each_kidney():
    mask = two_kidneys()
    probs = mask.astype(np.float32) * 0.9
    images = np.stack([100.0 * mask, 100.0 * mask]).astype(np.float32)
    fake = FakeMaskRCNN()
    res = cascade.run_cascade(images, np.stack([probs, np.zeros_like(probs)]), fake, threshold=0.5)
    assert fake.calls == 1  # one batched predict for all crops
    assert res.tumor_labels.shape == (2, 320, 320) and res.tumor_labels.dtype == np.uint16
    assert res.kidney_masks.dtype == np.uint8 and res.kidney_masks[0].sum() == mask.sum()
    assert sorted(np.unique(res.tumor_labels[0])) == [0, 1, 2]
    assert len(res.instances[0]) == 2 and res.instances[1] == [] and res.regions[1] == []
    assert not res.tumor_labels[1].any()  # no kidney -> empty result, no crash
    for rec, region in zip(res.instances[0], res.regions[0]):
        y0, x0, y1, x1 = rec["box"]
        ry0, rx0, ry1, rx1 = region
        assert ry0 <= y0 < y1 <= ry1 and rx0 <= x0 < x1 <= rx1
    masked = cascade.run_cascade(images[:1], mask[None].astype(bool), fake, mode="masked_image")
    assert masked.regions[0] == [(0, 0, 320, 320)] and masked.tumor_labels[0].max() == 1


def test_run_cascade_empty_and_bad_inputs():
    fake = FakeMaskRCNN()
    res = cascade.run_cascade(np.zeros((2, 64, 64)), np.zeros((2, 64, 64), np.float32), fake)
    assert fake.calls == 0 and res.tumor_labels.shape == (2, 64, 64) and not res.tumor_labels.any()
    with pytest.raises(ValueError, match="shape"):
        cascade.run_cascade(np.zeros((2, 64, 64)), np.zeros((2, 32, 32)), fake)
    with pytest.raises(ValueError, match="mode"):
        cascade.run_cascade(np.zeros((1, 64, 64)), np.zeros((1, 64, 64)), fake, mode="other")
    keras_style = np.zeros((1, 64, 64, 1), np.float32)  # CU-Net output with a channel axis
    assert cascade.run_cascade(np.zeros((1, 64, 64)), keras_style, fake).kidney_masks.shape == (1, 64, 64)


def test_restrict_to_kidney_drops_outside_pixels():
    mask = two_kidneys()
    fake = FakeMaskRCNN(square=(0, 0, 64, 64))  # the whole crop, spilling outside the kidney
    res = cascade.run_cascade(100.0 * mask[None], mask[None], fake, restrict_to_kidney=True)
    assert res.tumor_labels[0].any()
    assert not res.tumor_labels[0][mask == 0].any()
    assert [r["label"] for r in res.instances[0]] == [1, 2]


def test_blob_properties_of_a_known_disc():
    disc = ellipse((200, 200), 80, 120, 20, 20).astype(np.uint16)
    (props,) = cascade.blob_properties(disc, spacing=(0.5, 0.5))
    assert props["area_px"] == pytest.approx(np.pi * 20 ** 2, rel=0.03)
    assert props["centroid_row"] == pytest.approx(80, abs=0.2) and props["centroid_col"] == pytest.approx(120, abs=0.2)
    assert props["solidity"] > 0.97 and props["eccentricity"] < 0.1
    assert props["equivalent_diameter_px"] == pytest.approx(40, rel=0.03)
    assert props["equivalent_diameter_mm"] == pytest.approx(20, rel=0.03)
    assert props["area_mm2"] == pytest.approx(props["area_px"] * 0.25)
    ev = props["inertia_eigenvalues"]
    assert ev[0] == pytest.approx(ev[1], rel=0.05) and ev[0] == pytest.approx(20 ** 2 / 4, rel=0.08)
    assert cascade.blob_properties(np.zeros((10, 10), np.uint16)) == []
    with pytest.raises(ValueError, match="integer"):
        cascade.blob_properties(np.zeros((10, 10), np.float32))
