"""The CU-Net training recipe of sections III.A.3 and IV, used by the notebooks and the split study alike.

Section IV: binary cross-entropy loss, the Adam optimizer, flip augmentation that doubles
the training set, early stopping, learning-rate reduction on plateaus, and a validation
set I_beta watched during training. kts adds what a reproducible run needs: one seed for
everything, op determinism, atomic checkpoints (``best.keras``, ``last.keras``), a CSV
history (Figure 6 is drawn from it), and exact resumption after an interruption.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kts import cunet  # noqa: F401 - registers the CU-Net's custom layers, so its checkpoints load anywhere
from kts import io as kts_io
from kts.config import FLIPS, INTENSITY, TrainConfig  # noqa: F401 - the recipe's settings live with the profiles

HISTORY_FILE = "history.csv"
BEST_FILE = "best.keras"
LAST_FILE = "last.keras"
STATE_FILE = "state.json"


@dataclasses.dataclass
class TrainResult:
    """What :func:`train_cunet` returns: the best model, its history and where things were written."""

    model: Any
    history: Any  # pandas.DataFrame, one row per epoch
    out_dir: Path
    best_epoch: int
    stopped_early: bool
    # wall seconds of each epoch (training steps and validation, not the checkpoint writes) as state.json
    # recorded them; None for epochs trained before kts kept them
    epoch_seconds: list = dataclasses.field(default_factory=list)


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and TensorFlow/Keras; turn on TF op determinism (same seed, same bits on CPU)."""
    import tensorflow as tf

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def prepare_inputs(images) -> np.ndarray:
    """Images in 0..255 (section III.A.2) -> float32 [N, H, W, 1] in 0..1, the CU-Net's input."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, 1] greyscale, got shape {np.shape(images)}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or Inf values")
    return x / np.float32(255.0)


def prepare_masks(masks) -> np.ndarray:
    """Binary kidney masks -> float32 [N, H, W, 1] of 0/1."""
    y = np.asarray(masks)
    if y.ndim == 3:
        y = y[..., None]
    return (y > 0).astype(np.float32)


def make_dataset(images, masks, batch_size: int, seed: int, flip: str = "horizontal",
                 first_epoch: int = 0, epochs: int = 1, augment: bool = True, intensity: str = "none",
                 tissue_labels=None, synth_config=None, label_pool=None):
    """The training ``tf.data`` pipeline: originals plus flipped copies, reshuffled each epoch.

    The order of epoch ``e`` depends only on ``(seed, e)`` (a stateless shuffle), so a run
    resumed at epoch ``e`` sees the very batches the uninterrupted run saw. With
    ``intensity="random_lut"`` every other image (by a stateless coin per epoch and item)
    goes through :func:`kts.synth.random_lut`; with ``"synth"`` a share ``synth_config.p_synthetic``
    (default :data:`kts.synth.DEFAULT`) is re-synthesised from ``tissue_labels`` (int [N, H, W],
    aligned with ``images``) by :func:`kts.synth.synthesise`, mask deformed alike. ``label_pool``
    (label maps int [M, H, W], e.g. ``kts.phantom.label_map_pool``, and their kidney masks) adds M label
    maps of other anatomy: each
    synthetic draw then takes its label map uniformly from the item's own and the pool's, so an
    epoch keeps its length and cost.
    """
    import tensorflow as tf

    from kts import synth

    x = tf.constant(prepare_inputs(images))
    y = tf.constant(prepare_masks(masks))
    n = int(x.shape[0])
    axis = {"horizontal": 2, "vertical": 1}[flip]
    total = 2 * n if augment else n

    if intensity not in INTENSITY:
        raise ValueError(f"intensity must be one of {INTENSITY}, got {intensity!r}")
    if intensity == "synth":
        if tissue_labels is None or np.shape(tissue_labels) != tuple(x.shape[:3]):
            raise ValueError(f"intensity='synth' needs tissue_labels [N, H, W] aligned with the images "
                             f"{tuple(x.shape[:3])}, got {None if tissue_labels is None else np.shape(tissue_labels)}; "
                             "the phantom's come from kts.phantom.tissue_label_maps(dataset)")
        tissue = tf.constant(np.asarray(tissue_labels, np.int32))
        n_labels = int(np.max(tissue_labels)) + 1
        synth_config = synth.DEFAULT if synth_config is None else synth_config
        n_pool = 0 if label_pool is None else len(label_pool[0])
        if n_pool:
            if not np.shape(label_pool[0])[1:] == np.shape(label_pool[1])[1:3] == tuple(x.shape[1:3]):
                raise ValueError(f"label_pool must be (label maps [M, H, W], kidney masks [M, H, W]) with the "
                                 f"images' {tuple(x.shape[1:3])}, got {np.shape(label_pool[0])} and "
                                 f"{np.shape(label_pool[1])}")
            pool = np.asarray(label_pool[0], np.int32)
            pool_tissue = tf.constant(pool)
            pool_masks = tf.constant(prepare_masks(label_pool[1]))
            n_labels = max(n_labels, int(pool.max()) + 1)

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(total, dtype=tf.int64),
                                                         seed=tf.stack([tf.cast(seed, tf.int64), epoch]))

        def take(i):
            j = i % n
            xi, yi = tf.gather(x, j), tf.gather(y, j)
            if augment:
                flipped = i >= n
                xi = tf.where(flipped, tf.reverse(xi, [axis - 1]), xi)
                yi = tf.where(flipped, tf.reverse(yi, [axis - 1]), yi)
            if intensity == "random_lut":
                item_seed = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + epoch, i])
                coin = tf.random.stateless_uniform([], seed=item_seed + 1)
                xi = tf.where(coin < 0.5, synth.random_lut(xi, item_seed), xi)
            if intensity == "synth":
                # the item's own streams: (seed, epoch, item) folded, then split for the coin and the draw
                item_seed = tf.random.experimental.stateless_fold_in(
                    tf.stack([tf.cast(seed, tf.int64), epoch]), i)
                coin_seed, draw_seed = tf.unstack(tf.random.experimental.stateless_split(item_seed, 2))
                labels, label_mask = tf.gather(tissue, j), tf.gather(y, j)
                if n_pool:  # the draw's label map: the item's own (k < n) or one of the pool's
                    k = tf.random.stateless_uniform([], seed=tf.random.experimental.stateless_fold_in(item_seed, 1),
                                                    maxval=n + n_pool, dtype=tf.int32)
                    pool_k = tf.maximum(k - n, 0)
                    labels = tf.where(k < n, labels, tf.gather(pool_tissue, pool_k))
                    label_mask = tf.where(k < n, label_mask, tf.gather(pool_masks, pool_k))
                if augment:
                    labels = tf.where(i >= n, tf.reverse(labels, [axis - 1]), labels)
                    label_mask = tf.where(i >= n, tf.reverse(label_mask, [axis - 1]), label_mask)
                coin = tf.random.stateless_uniform([], seed=coin_seed)
                xi, yi = tf.cond(coin < synth_config.p_synthetic,
                                 lambda: synth.synthesise(labels, label_mask, draw_seed, n_labels, synth_config),
                                 lambda: (xi, yi))
            return xi, yi

        return tf.data.Dataset.from_tensor_slices(order).map(take).batch(batch_size)

    epochs_ds = tf.data.Dataset.range(first_epoch, first_epoch + epochs)
    return epochs_ds.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(n_images: int, batch_size: int, augment: bool = True) -> int:
    total = 2 * n_images if augment else n_images
    return -(-total // batch_size)


def set_output_prior(model, masks, layer: str = "I_out") -> float:
    """Start the sigmoid output at the training set's kidney fraction (Lin et al., 2017, "prior" init).

    Kidneys cover about 2 % of a slice. From a zero bias (p = 0.5 everywhere) Adam moves the
    output bias about one learning rate per step, so it would spend thousands of steps learning
    "mostly background" before learning kidneys. Returns the prior used.
    """
    prior = float(np.clip(np.mean(np.asarray(masks) > 0), 1e-4, 0.5))
    output = model.get_layer(layer)
    if output.bias is not None:
        output.bias.assign(np.full(output.bias.shape, np.log(prior / (1 - prior)), dtype="float32"))
    return prior


@keras.saving.register_keras_serializable(package="kts")
class ForegroundIoU(keras.metrics.Metric):
    """Foreground IoU, TP / (TP + FP + FN) of ``y_pred >= threshold``, for Table I's IoU column.

    The value of ``keras.metrics.BinaryIoU(target_class_ids=[1])`` for 0/1 masks, bit for bit (the
    same int64 counts and the same float32 arithmetic; a test compares them), from three integer sums per
    batch instead of a confusion matrix, which Keras fills with a scatter that op determinism
    makes about 14x slower (issue 15: the metrics were 11 % of a paper-profile training step).
    """

    def __init__(self, threshold: float = 0.5, name: str = "iou", dtype=None):
        super().__init__(name=name, dtype=dtype or "float32")
        self.threshold = threshold
        self.true_positives = self.add_variable(shape=(), initializer="zeros", dtype="int64", name="true_positives")
        self.predicted = self.add_variable(shape=(), initializer="zeros", dtype="int64", name="predicted")
        self.actual = self.add_variable(shape=(), initializer="zeros", dtype="int64", name="actual")

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError("ForegroundIoU does not take sample weights")
        ops = keras.ops
        actual = ops.cast(ops.convert_to_tensor(y_true), "int64")
        predicted = ops.cast(ops.convert_to_tensor(y_pred, dtype="float32") >= self.threshold, "int64")
        self.true_positives.assign(self.true_positives + ops.sum(actual * predicted))
        self.predicted.assign(self.predicted + ops.sum(predicted))
        self.actual.assign(self.actual + ops.sum(actual))

    def result(self):
        ops = keras.ops
        denominator = ops.cast(self.predicted + self.actual - self.true_positives, "float32")
        valid = ops.cast(denominator > 1e-9, "float32")
        iou = ops.where(valid > 0, ops.cast(self.true_positives, "float32") / (denominator + keras.backend.epsilon()),
                        0.0)
        return iou / (valid + keras.backend.epsilon())  # BinaryIoU's mean over its one valid class

    def reset_state(self):
        for variable in (self.true_positives, self.predicted, self.actual):
            variable.assign(0)

    def get_config(self):
        return {"threshold": self.threshold, "name": self.name, "dtype": self.dtype}


def compile_cunet(model, learning_rate: float, jit_compile: bool | str = "auto") -> None:
    """Binary cross-entropy and Adam (section IV), with accuracy and foreground IoU as metrics (Table I).

    ``jit_compile`` goes to ``model.compile`` (the benchmark measures XLA with ``True``).
    """
    model.compile(jit_compile=jit_compile,
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), ForegroundIoU(threshold=0.5, name="iou")],
    )


def _check_pair(images, masks, what: str) -> None:
    if images is None or masks is None:
        raise ValueError(f"{what} images and masks are required")
    if len(images) == 0:
        raise ValueError(f"{what} set is empty")
    if np.shape(images)[:3] != np.shape(masks)[:3]:
        raise ValueError(f"{what} images {np.shape(images)} and masks {np.shape(masks)} differ in shape")
    if not np.all(np.isfinite(np.asarray(images, dtype=np.float32))):
        raise ValueError(f"{what} images contain NaN or Inf values; extract them with kts.data.build_dataset "
                         "(which refuses such slices) or drop the slices")


def train_cunet(train: tuple, validation: tuple | None, out_dir: str | os.PathLike, *,
                model_kwargs: dict | None = None, config: TrainConfig = TrainConfig(), seed: int = 0,
                strategy=None, resume: bool = False, verbose: int = 0, progress: bool | str = False,
                tissue_labels=None, label_pool=None) -> TrainResult:
    """Train a CU-Net with the paper's recipe (section IV); return the best model and its history.

    ``train`` and ``validation`` are ``(images, kidney_masks)`` with images in 0..255; the
    validation set I_beta is required (section III.A.3). ``model_kwargs`` go to
    :func:`kts.cunet.build_cunet` (the input shape is taken from the images). ``strategy``: an
    optional ``tf.distribute.Strategy`` (e.g. ``MirroredStrategy`` over several GPUs) under whose
    scope the model is built and trained. ``resume=True`` continues from ``out_dir/last.keras``
    and ends where an uninterrupted run would have ended. ``progress=True`` shows one bar over
    the epochs (:class:`EpochProgress`) with the loss and the monitored value (a string: the bar's
    label). ``tissue_labels``
    (int [N, H, W], aligned with the training images) and ``label_pool`` (label maps of other anatomy and
    their kidney masks; :func:`make_dataset`) feed ``config.intensity="synth"``.
    """
    from kts.cunet import build_cunet

    if validation is None:
        raise ValueError("a validation set is required (section III.A.3 trains with I_beta watched); "
                         "pass validation=(images, masks)")
    _check_pair(*train, "training")
    _check_pair(*validation, "validation")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    images, masks = train
    height, width = np.shape(images)[1:3]
    kwargs = dict(model_kwargs or {})
    kwargs.setdefault("input_shape", (int(height), int(width), 1))
    if tuple(kwargs["input_shape"][:2]) != (height, width):
        raise ValueError(f"model input_shape {kwargs['input_shape']} does not match images {height}x{width}")

    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    state = _load_state(out_dir) if resume else None
    with scope:
        if state is not None:
            last = checkpoint_path(out_dir, LAST_FILE, state)
            model = keras.saving.load_model(last, safe_mode=True)
            saved_shape = tuple(model.input_shape[1:3])
            if saved_shape != (height, width):
                raise ValueError(f"{last}: resume=True, but this checkpoint was trained on "
                                 f"{saved_shape[0]}x{saved_shape[1]} images and these are {height}x{width}; "
                                 "train in a new out_dir (or pass resume=False to start afresh there)")
        else:
            model = build_cunet(**kwargs)
            set_output_prior(model, masks)
            compile_cunet(model, config.learning_rate)

    first_epoch = state["epoch"] if state else 0
    history_rows = state["history"] if state else []
    if first_epoch >= config.epochs or (state and state.get("stopped")):
        return _finish(out_dir, history_rows, state.get("stopped", False) if state else False)

    callbacks = _callbacks(out_dir, config, seed, state, history_rows)
    checkpoint_cb = callbacks[-1]
    if progress:
        label = progress if isinstance(progress, str) else "CU-Net epochs"
        callbacks = callbacks + [EpochProgress(config.epochs, first_epoch, config.monitor, desc=label)]
    val_x, val_y = prepare_inputs(validation[0]), prepare_masks(validation[1])
    dataset = make_dataset(images, masks, config.batch_size, seed, config.flip,
                           first_epoch=first_epoch, epochs=config.epochs - first_epoch, intensity=config.intensity,
                           tissue_labels=tissue_labels, label_pool=label_pool)
    model.fit(dataset, validation_data=(val_x, val_y), validation_batch_size=config.batch_size,
              epochs=config.epochs, initial_epoch=first_epoch,
              steps_per_epoch=steps_per_epoch(len(images), config.batch_size),
              shuffle=False,  # make_dataset shuffles (statelessly, per epoch); Keras warns on shuffle=True
              callbacks=callbacks, verbose=verbose)
    return _finish(out_dir, checkpoint_cb.rows, checkpoint_cb.stopped)


def _callbacks(out_dir: Path, config: TrainConfig, seed: int, state: dict | None, history_rows: list):
    early_stopping_cb = keras.callbacks.EarlyStopping(
        monitor=config.monitor, patience=config.early_stopping_patience, restore_best_weights=True, verbose=0)
    reduce_lr_cb = keras.callbacks.ReduceLROnPlateau(
        monitor=config.monitor, factor=config.reduce_lr_factor, patience=config.reduce_lr_patience,
        min_lr=config.min_learning_rate, verbose=0)
    checkpoint_cb = CheckpointCallback(out_dir, config, seed, early_stopping_cb, reduce_lr_cb, history_rows, state)
    # Keras calls callbacks in list order: the checkpoint runs after EarlyStopping and
    # ReduceLROnPlateau have reset themselves (train begin) and updated themselves (epoch end).
    return [early_stopping_cb, reduce_lr_cb, checkpoint_cb]


class EpochProgress(keras.callbacks.Callback):
    """A progress bar over the epochs (``tqdm.auto``: a widget in Jupyter, text in a console).

    It stops where early stopping stops (section IV), so the bar may end before ``epochs``."""

    def __init__(self, epochs: int, first_epoch: int = 0, monitor: str = "val_loss", desc: str = "CU-Net epochs"):
        super().__init__()
        self.epochs, self.first_epoch, self.monitor, self.desc = int(epochs), int(first_epoch), monitor, desc
        self.bar = None

    def on_train_begin(self, logs=None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.epochs, initial=self.first_epoch, desc=self.desc, leave=False)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        shown = {key: f"{logs[key]:.4f}" for key in ("loss", self.monitor) if key in logs}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def on_train_end(self, logs=None):
        if self.bar is not None:
            self.bar.close()


def _callback_state(cb) -> dict:
    return {"wait": int(cb.wait), "best": float(cb.best) if cb.best is not None else None}


class CheckpointCallback(keras.callbacks.Callback):
    """After each epoch, writes ``best.keras``, ``last.keras``, ``history.csv`` and ``state.json`` atomically.

    ``state.json`` holds what Keras keeps only in memory (the early-stopping and learning-rate
    callbacks' counters, the best value), so that a resumed run continues exactly.
    """

    def __init__(self, out_dir: Path, config: TrainConfig, seed: int, early_stopping_cb, reduce_lr_cb,
                 history_rows: list, state: dict | None = None):
        super().__init__()
        self.out_dir, self.config, self.seed = out_dir, config, seed
        self.early_stopping_cb, self.reduce_lr_cb = early_stopping_cb, reduce_lr_cb
        self.rows = list(history_rows)
        self.state = state
        self.best_value = state["best_value"] if state else float("inf")
        self.best_epoch = state["best_epoch"] if state else 0
        self.files = dict(state.get("files", {})) if state else {}
        # one entry per epoch; None for epochs trained before kts kept their times
        self.epoch_seconds = _epoch_seconds(state) if state else []
        self.stopped = False
        self.epoch_started = None

    def on_train_begin(self, logs=None):
        if not self.state:
            return
        for cb, key in ((self.early_stopping_cb, "early_stopping"), (self.reduce_lr_cb, "reduce_lr")):
            cb.wait = self.state[key]["wait"]
            cb.best = self.state[key]["best"]
        best_model = keras.saving.load_model(checkpoint_path(self.out_dir, BEST_FILE, self.state), safe_mode=True)
        self.early_stopping_cb.best_weights = best_model.get_weights()
        self.early_stopping_cb.best_epoch = self.best_epoch - 1

    def on_epoch_begin(self, epoch, logs=None):
        # Dropout's random stream restarts at a point fixed by (layer seed, epoch): Keras does
        # not save a SeedGenerator's counter, and this keeps a resumed run on the same masks.
        for layer in self.model.layers:
            generator = getattr(layer, "seed_generator", None)
            if generator is not None:
                state = keras.ops.convert_to_numpy(generator.state)
                generator.state.assign(np.array([state[0], epoch * 1_000_003], dtype=state.dtype))
        self.epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.epoch_started is not None:  # kept out of history.csv, which stays bitwise repeatable
            self.epoch_seconds.append(round(time.perf_counter() - self.epoch_started, 3))
        logs = dict(logs or {})
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in sorted(logs.items()) if k != "learning_rate"})
        row["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.rows.append(row)
        value = float(logs.get(self.config.monitor, np.inf))
        self.files[LAST_FILE] = _save_model(self.model, self.out_dir / LAST_FILE)
        if value < self.best_value:  # the best epoch so far: its checkpoint is the one just written
            self.best_value, self.best_epoch = value, epoch + 1
            self.files[BEST_FILE] = _copy_checkpoint(self.out_dir / LAST_FILE, self.out_dir / BEST_FILE)
        _write_history(self.out_dir / HISTORY_FILE, self.rows)
        es = self.early_stopping_cb
        self.stopped = bool(es.wait >= es.patience and epoch > 0)
        # state.json is the commit point of the epoch: it names the checkpoint files (by hash)
        # that belong to it, so an interrupt between two of these writes is harmless.
        kts_io.write_json(self.out_dir / STATE_FILE, {
            "epoch": epoch + 1, "seed": self.seed, "config": dataclasses.asdict(self.config),
            "best_value": self.best_value, "best_epoch": self.best_epoch,
            "early_stopping": _callback_state(es), "reduce_lr": _callback_state(self.reduce_lr_cb),
            "history": self.rows, "stopped": self.stopped, "files": dict(self.files),
            "epoch_seconds": self.epoch_seconds,
        })


def _previous(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def _save_model(model, path: Path) -> str:
    """Save atomically, keeping the version before as ``*.prev.keras``; return the new file's sha256."""
    return _write_checkpoint(path, model.save)


def _copy_checkpoint(source: Path, path: Path) -> str:
    """``source`` copied to ``path`` as :func:`_save_model` writes: a byte copy of the checkpoint just
    saved costs milliseconds where a second ``model.save`` of the same weights took about half a second
    in every improving epoch (issue 15)."""
    import shutil

    return _write_checkpoint(path, lambda tmp: shutil.copyfile(source, tmp))


def _write_checkpoint(path: Path, write) -> str:
    if path.exists():
        os.replace(path, _previous(path))
    with kts_io.atomic_path(path) as tmp:
        write(tmp)
    return kts_io.sha256_file(path)


def load_best_model(out_dir: str | os.PathLike):
    """The best CU-Net a :func:`train_cunet` folder holds (``best.keras``, else ``last.keras``), checked
    against its ``state.json``; ``ValueError`` naming the folder when it holds neither."""
    out_dir = Path(out_dir)
    state = _load_state(out_dir) or {}
    name = BEST_FILE if BEST_FILE in state.get("files", {}) or (out_dir / BEST_FILE).exists() else LAST_FILE
    if not (out_dir / name).exists() and name not in state.get("files", {}):
        raise ValueError(f"{out_dir}: no {BEST_FILE} or {LAST_FILE}; give the folder a CU-Net was trained into "
                         "(e.g. work/study/70-6-seed0/cunet)")
    return keras.saving.load_model(checkpoint_path(out_dir, name, state), safe_mode=True)


def checkpoint_path(out_dir: Path, name: str, state: dict | None) -> Path:
    """The checkpoint file that belongs to the epoch ``state.json`` records (the file or its ``.prev``)."""
    path = Path(out_dir) / name
    expected = (state or {}).get("files", {}).get(name)
    if expected is None:
        return path
    for candidate in (path, _previous(path)):
        if candidate.exists() and kts_io.sha256_file(candidate) == expected:
            return candidate
    raise ValueError(f"{path}: no checkpoint matches {Path(out_dir) / STATE_FILE} (epoch {state.get('epoch')}); "
                     "delete the folder to train afresh")


def _write_history(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    with kts_io.atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")


def _load_state(out_dir: Path) -> dict | None:
    path = out_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: unreadable training state ({exc}); delete the folder to start afresh") from exc


def _epoch_seconds(state: dict) -> list:
    """``state.json``'s epoch times, one per epoch trained (``None`` first for epochs from before they were kept)."""
    seconds = list(state.get("epoch_seconds", []))
    return [None] * (int(state.get("epoch", len(seconds))) - len(seconds)) + seconds


def _finish(out_dir: Path, rows: list[dict], stopped: bool) -> TrainResult:
    import pandas as pd

    state = _load_state(out_dir) or {}
    model = load_best_model(out_dir)
    history = pd.DataFrame(rows)
    return TrainResult(model=model, history=history, out_dir=out_dir,
                       best_epoch=int(state.get("best_epoch", len(rows))), stopped_early=bool(stopped),
                       epoch_seconds=_epoch_seconds(state) if state else [])


def predict_probabilities(model, images, batch_size: int = 8) -> np.ndarray:
    """Kidney probabilities [N, H, W] for images in 0..255."""
    x = prepare_inputs(images)
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0))[..., 0]
