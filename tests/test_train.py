"""The training recipe of section IV: it learns, it checkpoints, it resumes exactly, it distributes."""
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from kts import metrics, train


def blobs(n, size=32, seed=0):
    """Bright discs on a noisy background: a task a CU-Net learns in a few epochs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(10, size - 10), rng.uniform(10, size - 10), rng.uniform(4, 8)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        images.append(np.clip(60 + 120 * mask + rng.normal(0, 15, mask.shape), 0, 255))
        masks.append(mask.astype(np.uint8))
    return np.array(images, np.float32), np.array(masks)


QUICK = train.TrainConfig(epochs=8, batch_size=4, learning_rate=3e-3, early_stopping_patience=8,
                          reduce_lr_patience=3)


@pytest.fixture(scope="module")
def data():
    return blobs(12, seed=1), blobs(4, seed=2)


def test_training_drives_loss_down_and_iou_up(data, tmp_path):
    (x, y), (vx, vy) = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train.train_cunet((x, y), (vx, vy), tmp_path, model_kwargs=dict(z=4), config=QUICK, seed=3)
    # Keras's "shuffle=True was passed, but will be ignored" once reached every executed notebook
    assert not [w for w in caught if "shuffle" in str(w.message)], [str(w.message) for w in caught]
    h = result.history
    assert len(h) == QUICK.epochs
    assert h["loss"].iloc[-1] < 0.7 * h["loss"].iloc[0]
    assert h["iou"].iloc[-1] > h["iou"].iloc[0]
    for name in (train.BEST_FILE, train.LAST_FILE, train.HISTORY_FILE, train.STATE_FILE):
        assert (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    import pandas as pd

    assert list(pd.read_csv(tmp_path / train.HISTORY_FILE).columns)[:1] == ["epoch"]
    probabilities = train.predict_probabilities(result.model, vx)
    assert probabilities.shape == vx.shape
    assert metrics.score_masks(probabilities > 0.5, vy)["mean_dice"] > 0.3
    # a fresh process that imports kts.train alone loads it (the fused batch-norm layer once failed to
    # deserialise unless kts.cunet had been imported first)
    code = f"from kts import train; print(train.load_best_model({str(tmp_path)!r}).count_params())"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert int(loaded.stdout.split()[-1]) == result.model.count_params()


def test_resume_ends_where_an_uninterrupted_run_ends(data, tmp_path):
    (x, y), (vx, vy) = data
    config = train.TrainConfig(epochs=4, batch_size=4, early_stopping_patience=5, reduce_lr_patience=1)
    full = train.train_cunet((x, y), (vx, vy), tmp_path / "full", model_kwargs=dict(z=2), config=config, seed=5)
    first = train.TrainConfig(**{**config.__dict__, "epochs": 2})
    train.train_cunet((x, y), (vx, vy), tmp_path / "parts", model_kwargs=dict(z=2), config=first, seed=5)
    resumed = train.train_cunet((x, y), (vx, vy), tmp_path / "parts", model_kwargs=dict(z=2), config=config,
                                seed=5, resume=True)
    assert len(resumed.history) == 4
    # each epoch's wall time survives the interruption (state.json), outside the bitwise-repeatable history.csv
    assert len(full.epoch_seconds) == len(resumed.epoch_seconds) == 4 and min(resumed.epoch_seconds) > 0
    assert "epoch_s" not in (tmp_path / "parts" / train.HISTORY_FILE).read_text()
    np.testing.assert_allclose(resumed.history["loss"], full.history["loss"], rtol=1e-5)
    for a, b in zip(full.model.get_weights(), resumed.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_epoch_times_of_a_run_from_before_they_were_kept_read_none():
    assert train._epoch_seconds({"epoch": 4, "epoch_seconds": [1.5, 2.5]}) == [None, None, 1.5, 2.5]
    assert train._epoch_seconds({"epoch": 2}) == [None, None]


def test_same_seed_same_weights(data, tmp_path, capsys):
    """Same seed, same weights; the progress bar (shown for b) shows epochs and changes nothing."""
    (x, y), (vx, vy) = data
    config = train.TrainConfig(epochs=2, batch_size=4)
    a = train.train_cunet((x, y), (vx, vy), tmp_path / "a", model_kwargs=dict(z=2), config=config, seed=7)
    capsys.readouterr()
    b = train.train_cunet((x, y), (vx, vy), tmp_path / "b", model_kwargs=dict(z=2), config=config, seed=7,
                          progress=True)
    assert "CU-Net epochs" in capsys.readouterr().err
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_random_intensity_curves_are_seeded_and_leave_masks_alone():
    x, y = blobs(6)

    def batches(intensity, seed=0, first_epoch=0):
        ds = train.make_dataset(x, y, batch_size=12, seed=seed, epochs=1, first_epoch=first_epoch, intensity=intensity)
        return [(b[0].numpy(), b[1].numpy()) for b in ds][0]

    plain, lut = batches("none"), batches("random_lut")
    np.testing.assert_array_equal(plain[1], lut[1])  # same order, same masks
    changed = [not np.array_equal(a, b) for a, b in zip(plain[0], lut[0])]
    assert 2 <= sum(changed) <= 10  # about half of the images
    assert lut[0].min() >= 0.0 and lut[0].max() <= 1.0
    np.testing.assert_array_equal(lut[0], batches("random_lut")[0])  # same seed, same curves
    assert not np.array_equal(lut[0], batches("random_lut", first_epoch=1)[0])  # new curves each epoch
    with pytest.raises(ValueError, match="intensity must be one of"):
        train.TrainConfig(intensity="gamma")


def test_flip_doubles_the_set_exactly():
    x, y = blobs(3)
    ds = train.make_dataset(x, y, batch_size=1, seed=0, epochs=1)
    seen = [b[0].numpy()[0, ..., 0] for b in ds]
    assert len(seen) == 6
    expected = {arr.tobytes() for arr in train.prepare_inputs(np.concatenate([x, np.flip(x, axis=2)]))[..., 0]}
    assert {arr.tobytes() for arr in seen} == expected


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(epochs=0), "epochs"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(learning_rate=-1), "learning_rate"),
    (dict(flip="diagonal"), "flip"),
])
def test_bad_config(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        train.TrainConfig(**kwargs)


def test_validation_set_required(data, tmp_path):
    (x, y), _ = data
    with pytest.raises(ValueError, match="validation set is required"):
        train.train_cunet((x, y), None, tmp_path)
    with pytest.raises(ValueError, match="validation set is empty"):
        train.train_cunet((x, y), (x[:0], y[:0]), tmp_path)
    with pytest.raises(ValueError, match="differ in shape"):
        train.train_cunet((x, y[:, :16]), (x, y), tmp_path)
    with pytest.raises(ValueError, match="seed"):
        train.set_seed(-1)


def test_mirrored_strategy_over_two_logical_cpus(tmp_path):
    """Users who outgrow one machine pass a tf.distribute.Strategy; checked here on 2 logical CPUs."""
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from kts import train
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (8, 32, 32)).astype("float32"); y = (x > 128).astype("uint8")
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        r = train.train_cunet((x, y), (x[:2], y[:2]), r"{tmp_path}", model_kwargs=dict(z=2),
                              config=train.TrainConfig(epochs=1, batch_size=4), strategy=strategy)
        print("REPLICAS", strategy.num_replicas_in_sync, "EPOCHS", len(r.history))
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REPLICAS 2 EPOCHS 1" in out.stdout


def test_foreground_iou_equals_keras_binary_iou_bit_for_bit():
    """kts.train.ForegroundIoU replaces BinaryIoU for speed (issue 15): same value, batch after batch."""
    import keras

    from kts.train import ForegroundIoU

    rng = np.random.default_rng(0)
    reference, ours = keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.5), ForegroundIoU()
    assert float(ours.result()) == float(reference.result()) == 0.0  # nothing seen yet
    for _ in range(20):
        truth = (rng.random((3, 40, 40, 1)) > rng.random()).astype("float32")
        predicted = (rng.random((3, 40, 40, 1)) ** rng.random()).astype("float32")
        predicted[0, 0, 0, 0] = 0.5  # the threshold itself counts as foreground in both
        reference.update_state(truth, predicted)
        ours.update_state(truth, predicted)
        assert float(ours.result()) == float(reference.result())
    ours.reset_state()
    ours.update_state(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 1)))
    assert float(ours.result()) == 0.0  # no foreground anywhere: 0 like BinaryIoU, not NaN
    assert ForegroundIoU.from_config(ours.get_config()).threshold == 0.5
