"""The dense tumour reference (issue 12 section 1): it learns, resumes, splits instances, refuses bad input."""
import json

import numpy as np
import pytest

from kts import metrics, reference, train

DICE_FLOOR = 0.8  # 4 epochs reach ~0.95 on these discs; untrained models score 0.0-0.06


def discs(n, size=32, seed=0):
    """Kidney-crop stand-ins: 0-2 bright discs (tumour instances 1, 2) on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    crops, labels = [], []
    for _ in range(n):
        lab = np.zeros((size, size), np.uint16)
        for k in range(rng.integers(0, 3)):
            cy, cx, r = rng.uniform(6, size - 6), rng.uniform(6, size - 6), rng.uniform(2.5, 5)
            lab[((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & (lab == 0)] = k + 1
        crops.append(np.clip(70 + 110 * (lab > 0) + rng.normal(0, 20, lab.shape), 0, 255))
        labels.append(lab)
    return np.array(crops, np.float32), np.array(labels)


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


ARGS = dict(z=4, epochs=4, batch_size=8, seed=0, learning_rate=3e-3)


@pytest.fixture(scope="module")
def data():
    return discs(16, seed=1), discs(8, seed=2)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    (x, y), (vx, vy) = data
    out = tmp_path_factory.mktemp("reference")
    return out, reference.train_dense_reference(x, y, vx, vy, out, **ARGS)


def test_training_reaches_a_dice_an_untrained_model_does_not(data, trained):
    from kts.cunet import build_cunet

    (x, y), (vx, vy) = data
    out, result = trained
    assert len(result.history) == ARGS["epochs"]
    # an epoch is the 8 dihedral copies of each crop
    info = json.loads((out / reference.REFERENCE_FILE).read_text())
    assert info["n_train"] == 16 and info["crop_size"] == 32 and info["z"] == 4 and "not the paper" in info["kind"]
    labels = reference.predict_tumor_labels(result.model, vx)
    assert labels.dtype == np.uint16 and labels.shape == vy.shape
    assert metrics.dice(labels > 0, vy > 0) > DICE_FLOOR

    train.set_seed(0)
    untrained = build_cunet((32, 32, 1), z=4)
    assert metrics.dice(reference.predict_tumor_labels(untrained, vx) > 0, vy > 0) < DICE_FLOOR
    train.set_output_prior(untrained, y)
    assert metrics.dice(reference.predict_tumor_labels(untrained, vx) > 0, vy > 0) < DICE_FLOOR


def test_resume_returns_the_finished_run_and_the_loader_gives_the_same_model(data, trained):
    (x, y), (vx, vy) = data
    out, result = trained
    again = reference.train_dense_reference(x, y, vx, vy, out, **ARGS)  # resume=True by default
    assert len(again.history) == ARGS["epochs"]
    loaded = reference.load_dense_reference(out)
    assert loaded.reference_info["best_epoch"] == result.best_epoch
    for model in (again.model, loaded):
        for a, b in zip(result.model.get_weights(), model.get_weights()):
            np.testing.assert_array_equal(a, b)
    probabilities = reference.predict_tumor_probabilities(loaded, vx)
    assert probabilities.dtype == np.float32 and probabilities.shape == vx.shape
    np.testing.assert_array_equal(reference.labels_from_probabilities(probabilities),
                                  reference.predict_tumor_labels(result.model, vx))


def test_resume_refuses_a_folder_trained_otherwise(data, trained, tmp_path):
    (x, y), (vx, vy) = data
    out, _ = trained
    with pytest.raises(ValueError, match="data differ"):
        reference.train_dense_reference(x[::-1], y[::-1], vx, vy, out, **ARGS)
    with pytest.raises(ValueError, match="z: 4 there, 8 now"):
        reference.train_dense_reference(x, y, vx, vy, out, **{**ARGS, "z": 8})
    (tmp_path / train.STATE_FILE).write_text("{}")  # some other training, e.g. a kidney CU-Net
    with pytest.raises(ValueError, match="not a dense tumour reference"):
        reference.train_dense_reference(x, y, vx, vy, tmp_path, **ARGS)
    with pytest.raises(FileNotFoundError, match="no dense tumour reference"):
        reference.load_dense_reference(tmp_path / "empty")


def test_connected_components_separate_discs_and_drop_specks():
    p = np.zeros((1, 32, 32), np.float32)
    p[0][disc((32, 32), 8, 8, 4)] = 0.9
    p[0][disc((32, 32), 22, 22, 5)] = 0.8
    p[0, 30, 2] = 0.99  # a 1-pixel speck: dropped at min_pixels=4
    p[0, 1, 28:30] = 0.4  # below the threshold
    labels = reference.labels_from_probabilities(p, threshold=0.5, min_pixels=4)
    assert labels.dtype == np.uint16
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert labels[0, 8, 8] != labels[0, 22, 22]
    assert labels[0, 30, 2] == 0 and not labels[0, 1].any()
    assert reference.labels_from_probabilities(p, min_pixels=1).max() == 3
    # 8-connectivity: two squares touching at a corner are one instance
    q = np.zeros((1, 16, 16))
    q[0, 2:5, 2:5] = q[0, 5:8, 5:8] = 1.0
    assert reference.labels_from_probabilities(q).max() == 1


def test_quarter_turns_and_the_training_flip_give_all_eight_dihedral_copies():
    crop = np.arange(16 * 16, dtype=np.float32).reshape(1, 16, 16)
    turns = reference.dihedral_rotations(crop)
    copies = np.concatenate([turns, np.flip(turns, axis=2)])  # + the horizontal flip make_dataset adds
    assert len({c.tobytes() for c in copies}) == 8


GOOD_X, GOOD_Y = discs(2, seed=3)


@pytest.mark.parametrize("crops, labels, message", [
    (GOOD_X[0], GOOD_Y[0], r"\[N, S, S\]"),
    (GOOD_X, GOOD_Y[:, :16, :16], "differ in shape"),
    (GOOD_X, GOOD_Y[:1], "differ in shape"),
    (GOOD_X[:, :, :16], GOOD_Y[:, :, :16], "square"),
    (GOOD_X[:, :24, :24], GOOD_Y[:, :24, :24], "divisible by 16"),
    (GOOD_X / 255.0 - 1.0, GOOD_Y, "0..255"),
    (np.where(GOOD_X > 100, np.nan, GOOD_X), GOOD_Y, "NaN"),
    (GOOD_X, GOOD_Y.astype(np.float32), "integer instance label maps"),
    (GOOD_X, GOOD_Y.astype(np.int32) - 1, "negative"),
    (GOOD_X[:0], GOOD_Y[:0], "empty"),
])
def test_bad_training_input_is_refused_before_training(crops, labels, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        reference.train_dense_reference(crops, labels, GOOD_X, GOOD_Y, tmp_path, **ARGS)
    with pytest.raises(ValueError, match=message):
        reference.train_dense_reference(GOOD_X, GOOD_Y, crops, labels, tmp_path, **ARGS)
    assert not list(tmp_path.iterdir())


def test_other_bad_input_is_refused(tmp_path):
    big_x = np.zeros((2, 64, 64), np.float32)
    with pytest.raises(ValueError, match="validation crops are 64x64 but training crops are 32x32"):
        reference.train_dense_reference(GOOD_X, GOOD_Y, big_x, np.zeros(big_x.shape, np.uint16), tmp_path, **ARGS)
    with pytest.raises(ValueError, match="no tumour pixel"):
        reference.train_dense_reference(GOOD_X, np.zeros_like(GOOD_Y), GOOD_X, GOOD_Y, tmp_path, **ARGS)
    with pytest.raises(ValueError, match=r"\[N, S, S\]"):
        reference.labels_from_probabilities(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="threshold"):
        reference.labels_from_probabilities(np.zeros((1, 32, 32)), threshold=1.5)
    with pytest.raises(ValueError, match="min_pixels"):
        reference.labels_from_probabilities(np.zeros((1, 32, 32)), min_pixels=0)
    with pytest.raises(ValueError, match="NaN"):
        reference.labels_from_probabilities(np.full((1, 32, 32), np.nan))


def test_prediction_refuses_crops_of_another_size():
    from kts.cunet import build_cunet

    model = build_cunet((32, 32, 1), z=2)
    with pytest.raises(ValueError, match="built for 32x32"):
        reference.predict_tumor_probabilities(model, np.zeros((1, 64, 64), np.float32))
