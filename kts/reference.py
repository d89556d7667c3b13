"""A dense reference for the tumour stage: what the phantom's kidney crops allow (issue 12, section 1).

This is **not the paper's method**. The paper finds tumours with a Mask R-CNN (section III.B,
:mod:`kts.maskrcnn`) on the kidney crops cut by :mod:`kts.cascade`. This module trains kts's own
CU-Net (:func:`kts.cunet.build_cunet`, usually narrower than the kidney stage's) on exactly the
same crops and cases to label each crop pixel tumour vs rest, and turns the probability map into
instances by connected components. Scored with the same metrics (:mod:`kts.metrics`: tumour
Dice, instance F1 at IoU >= 0.5, mask AP), it measures how well the tumours in these crops can be
delineated at all by a model of this size trained on this little data: a ceiling to set Mask
R-CNN's figures beside (issue 12 asks for Mask R-CNN's tumour Dice >= 0.95 x the reference's).
Report it in an extended table, never in the paper's Table I columns.

What it does not measure: detection of touching tumours (connected components merge them into
one instance; the phantom's tumours per kidney are usually separate) and anything about the
cascade's kidney stage (the crops given are the crops scored).

Training reuses the paper's CU-Net recipe, :func:`kts.train.train_cunet` (binary cross-entropy,
Adam, early stopping on validation loss with the best weights restored, ReduceLROnPlateau, one
seed with op determinism, atomic checkpoints and exact resumption, output bias set to the
tumour-pixel prior by :func:`kts.train.set_output_prior`), with the tumour masks as targets and
all eight dihedral copies of each crop per epoch (see :func:`train_dense_reference`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from kts import io as kts_io

REFERENCE_FILE = "reference.json"
KIND = "dense tumour reference (issue 12 section 1; not the paper's method)"
DIVISOR = 16  # build_cunet pools four times by 2


# ----------------------------------------------------------------------------- input checks

def _check_crops(crops, what: str) -> np.ndarray:
    x = np.asarray(crops)
    if x.ndim != 3:
        raise ValueError(f"{what} crops must be a stack [N, S, S] of greyscale crops; got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{what} crops are empty (shape {x.shape})")
    n, h, w = x.shape
    if h != w:
        raise ValueError(f"{what} crops must be square [N, S, S]; got {h}x{w}")
    if h % DIVISOR:
        raise ValueError(f"{what} crop size {h} must be divisible by {DIVISOR} (the CU-Net pools 4 times by 2); "
                         "kts.cascade cuts 64 or 128")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{what} crops must be numeric; got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} crops contain NaN or Inf values")
    if x.min() < -0.5 or x.max() > 255.5:  # tolerate resampling round-off, as kts.maskrcnn does
        raise ValueError(f"{what} crops must hold grey levels in 0..255 (as kts.cascade cuts them); "
                         f"got values in {x.min():g}..{x.max():g}")
    return np.clip(x, 0.0, 255.0)


def _check_labels(labels, crops: np.ndarray, what: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype != bool and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} labels must be integer instance label maps (0 = background); got dtype {y.dtype}")
    if y.shape != crops.shape:
        raise ValueError(f"{what} labels {y.shape} and {what} crops {crops.shape} differ in shape; "
                         "each crop needs its label map of the same size")
    if np.any(y < 0):
        raise ValueError(f"{what} labels contain negative values; instance ids are 1..n, 0 is background")
    return y


def _check_pair(crops, labels, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = _check_crops(crops, what)
    return x, _check_labels(labels, x, what)


def dihedral_rotations(crops: np.ndarray) -> np.ndarray:
    """The four quarter-turns of each square crop, stacked [4N, S, S] (turn 0 first).

    Together with the left-right flip that :func:`kts.train.make_dataset` adds to every image,
    they give each crop's eight dihedral copies exactly once per epoch.
    """
    x = np.asarray(crops)
    return np.concatenate([np.rot90(x, k, axes=(1, 2)) for k in range(4)])


def _fingerprint(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- training

def train_dense_reference(train_crops, train_labels, val_crops, val_labels, out_dir: str | os.PathLike,
                          z: int = 8, epochs: int = 40, batch_size: int = 8, seed: int = 0, resume: bool = True,
                          verbose: int = 0, *, learning_rate: float = 1e-3, patience: int = 10,
                          progress: bool = True):
    """Train the dense tumour reference on kidney crops; returns :class:`kts.train.TrainResult`.

    A reference, not the paper's method (issue 12, section 1; see the module docstring): a
    CU-Net of base width ``z`` at the crops' size ``S`` predicts tumour vs rest in each crop.
    ``train_crops``/``val_crops`` are float [N, S, S] grey levels in 0..255 (S divisible by 16,
    e.g. kts.cascade's 64 or 128), ``train_labels``/``val_labels`` the matching uint16 instance
    label maps (0 = background; every instance becomes "tumour").

    The recipe is :func:`kts.train.train_cunet`'s, called with the tumour masks:

    * Loss: binary cross-entropy alone, as the CU-Net recipe compiles it. Soft Dice was not
      added: it would need a second compile/training path beside ``train_cunet`` (losing its
      tested checkpoints and exact resumption), and early stopping would then watch a loss
      that is not comparable across runs. Class imbalance (tumours cover a few per cent of a
      crop) is met instead by :func:`kts.train.set_output_prior`, which ``train_cunet`` applies:
      the sigmoid starts at the training set's tumour-pixel fraction, not at 0.5.
    * Augmentation: every epoch sees all eight dihedral copies of each crop, once each: the
      four quarter-turns are stacked here (:func:`dihedral_rotations`) and ``train_cunet``'s
      left-right flip doubles them. An "epoch" is therefore 8 N crops, ``ceil(8 N / batch_size)``
      steps. (Tumour vs rest in a crop has no preferred orientation, unlike the kidney stage's
      whole slices, whose up-down orientation the paper keeps.)
    * Adam at ``learning_rate``; EarlyStopping on ``val_loss`` with ``patience`` epochs and the
      best weights restored; ReduceLROnPlateau after ``max(1, patience // 2)`` epochs.
    * Seeded: ``train_cunet`` calls :func:`kts.train.set_seed` (``keras.utils.set_random_seed``
      plus TF op determinism), so one seed gives the same weights on CPU.

    ``out_dir`` receives ``train_cunet``'s checkpoints (``best.keras``, ``last.keras``,
    ``history.csv``, ``state.json``) and ``reference.json`` (the settings and a fingerprint of
    the training and validation data). ``resume=True`` continues an interrupted run, or returns
    the finished one at once; it refuses (ValueError) a folder trained with other data or
    settings, or one that holds some other training (e.g. a kidney CU-Net). ``epochs`` may be
    raised on resume to train longer. Load the result later with :func:`load_dense_reference`.
    """
    from kts.train import STATE_FILE, TrainConfig, train_cunet

    x, y = _check_pair(train_crops, train_labels, "training")
    vx, vy = _check_pair(val_crops, val_labels, "validation")
    if vx.shape[1:] != x.shape[1:]:
        raise ValueError(f"validation crops are {vx.shape[1]}x{vx.shape[2]} but training crops are "
                         f"{x.shape[1]}x{x.shape[2]}; cut both at the same crop size")
    tumor = y > 0
    if not tumor.any():
        raise ValueError("training labels contain no tumour pixel; the reference has nothing to learn")
    if not isinstance(z, int) or isinstance(z, bool) or z <= 0:
        raise ValueError(f"z (base filters) must be a positive int, got {z!r}")
    if not isinstance(patience, int) or isinstance(patience, bool) or patience <= 0:
        raise ValueError(f"patience must be a positive int, got {patience!r}")
    config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, flip="horizontal",
                         early_stopping_patience=patience, reduce_lr_patience=max(1, patience // 2))

    out = Path(out_dir)
    settings = {
        "kind": KIND, "crop_size": int(x.shape[1]), "z": z, "seed": seed, "batch_size": batch_size,
        "learning_rate": float(learning_rate), "patience": patience, "loss": "binary_crossentropy",
        "augmentation": "dihedral (4 quarter-turns x left-right flip, each once per epoch)",
        "n_train": int(len(x)), "n_val": int(len(vx)),
        "train_tumor_fraction": float(tumor.mean()),
        "data_sha256": _fingerprint(x, tumor, vx, vy > 0),
    }
    if resume and (out / STATE_FILE).exists():
        _check_resumable(out, settings)
    else:  # written before training, so that an interrupted run can be resumed
        out.mkdir(parents=True, exist_ok=True)
        kts_io.write_json(out / REFERENCE_FILE, settings)

    result = train_cunet((dihedral_rotations(x), dihedral_rotations(tumor.astype(np.uint8))),
                         (vx, (vy > 0).astype(np.uint8)), out, model_kwargs={"z": z}, config=config,
                         seed=seed, resume=resume, verbose=verbose,
                         progress="dense reference epochs" if progress else False)
    kts_io.write_json(out / REFERENCE_FILE, {**settings, "epochs": epochs, "best_epoch": result.best_epoch,
                                             "epochs_run": int(len(result.history)),
                                             "stopped_early": result.stopped_early})
    return result


def _check_resumable(out: Path, settings: dict) -> None:
    path = out / REFERENCE_FILE
    if not path.exists():
        raise ValueError(f"{out}: holds a training (state.json) but no {REFERENCE_FILE}, so it is not a dense "
                         "tumour reference; use another out_dir, or resume=False to train afresh there")
    saved = _read_reference(path)
    if "train_tumour_fraction" in saved:  # written before identifiers were spelled "tumor" (2026-12-07)
        saved["train_tumor_fraction"] = saved.pop("train_tumour_fraction")
    differ = kts_io.differences({k: saved.get(k) for k in settings if k != "data_sha256"},
                                {k: v for k, v in settings.items() if k != "data_sha256"})
    if saved.get("data_sha256") != settings["data_sha256"]:
        differ.append("the training/validation data differ")
    if differ:
        shown = ", ".join(differ)
        raise ValueError(f"{out}: resume=True, but this reference was trained with other settings ({shown}); "
                         "use another out_dir, or resume=False to train afresh there")


def _read_reference(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: unreadable ({exc}); delete the folder and train afresh") from exc


def load_dense_reference(out_dir: str | os.PathLike):
    """The best checkpoint of a reference trained by :func:`train_dense_reference` in ``out_dir``.

    The model carries ``reference_info`` (the contents of ``reference.json``). Raises
    FileNotFoundError when ``out_dir`` holds no finished reference, and ValueError when its
    checkpoints do not match its ``state.json`` (see :func:`kts.train.checkpoint_path`).
    """
    import keras

    from kts.train import BEST_FILE, STATE_FILE, checkpoint_path

    out = Path(out_dir)
    path = out / REFERENCE_FILE
    if not path.exists() or not (out / STATE_FILE).exists():
        raise FileNotFoundError(f"{out}: no dense tumour reference ({REFERENCE_FILE} and {STATE_FILE}); "
                                "train one with kts.reference.train_dense_reference")
    info = _read_reference(path)
    state = _read_reference(out / STATE_FILE)
    model = keras.saving.load_model(checkpoint_path(out, BEST_FILE, state), safe_mode=True)
    model.reference_info = info
    return model


# ----------------------------------------------------------------------------- prediction

def predict_tumor_probabilities(model, crops, batch_size: int = 8) -> np.ndarray:
    """Tumour probabilities float32 [N, S, S] for crops [N, S, S] in 0..255 (the reference's sigmoid output)."""
    from kts.train import predict_probabilities

    x = _check_crops(crops, "prediction")
    expected = tuple(model.input_shape[1:3])
    if x.shape[1:] != expected:
        raise ValueError(f"crops are {x.shape[1]}x{x.shape[2]} but the model was built for "
                         f"{expected[0]}x{expected[1]} crops")
    return predict_probabilities(model, x, batch_size=batch_size).astype(np.float32)


def labels_from_probabilities(probabilities, threshold: float = 0.5, min_pixels: int = 4) -> np.ndarray:
    """Instance label maps uint16 [N, S, S] from tumour probabilities [N, S, S].

    Pixels with probability >= ``threshold`` are tumour; each 8-connected component is one
    instance, numbered 1..n per crop in raster order of its first pixel; components of fewer
    than ``min_pixels`` pixels are dropped (as :func:`kts.cascade.extract_label_crops` drops
    ground-truth fragments of fewer than 4 crop pixels).
    """
    from scipy import ndimage

    p = np.asarray(probabilities)
    if p.ndim != 3:
        raise ValueError(f"probabilities must be a stack [N, S, S]; got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.floating) and p.dtype != bool:
        raise ValueError(f"probabilities must be floats in 0..1; got dtype {p.dtype}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or Inf values")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, (int, np.integer)) or min_pixels < 1:
        raise ValueError(f"min_pixels must be a positive int, got {min_pixels!r}")
    structure = np.ones((3, 3), bool)
    out = np.zeros(p.shape, np.uint16)
    for i, crop in enumerate(p):
        components, n = ndimage.label(crop >= threshold, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        keep = sizes >= min_pixels
        keep[0] = False
        new_ids = np.zeros(n + 1, np.uint16)
        new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint16)
        out[i] = new_ids[components]
    return out


def predict_tumor_labels(model, crops, threshold: float = 0.5, min_pixels: int = 4,
                         batch_size: int = 8) -> np.ndarray:
    """Tumour instances uint16 [N, S, S] predicted by the dense reference for crops [N, S, S] in 0..255.

    :func:`predict_tumor_probabilities` thresholded at ``threshold``, then
    :func:`labels_from_probabilities` (8-connected components, fewer than ``min_pixels``
    pixels dropped). Callers who also want the probabilities call the two steps themselves.
    """
    return labels_from_probabilities(predict_tumor_probabilities(model, crops, batch_size),
                                     threshold=threshold, min_pixels=min_pixels)


def predict_detections(model, crops, threshold: float = 0.5, min_pixels: int = 4) -> list[dict[str, np.ndarray]]:
    """Per crop ``{"masks" [n,S,S] bool, "scores" [n]}``: each component scored by its mean probability.

    The shape :func:`kts.metrics.mask_ap` takes, so the reference gets a mask AP beside Mask R-CNN's.
    """
    probabilities = predict_tumor_probabilities(model, crops)
    labels = labels_from_probabilities(probabilities, threshold=threshold, min_pixels=min_pixels)
    out = []
    for prob, label_map in zip(probabilities, labels):
        ids = [i for i in np.unique(label_map) if i]
        masks = np.array([label_map == i for i in ids], bool).reshape(len(ids), *label_map.shape)
        out.append({"masks": masks, "scores": np.array([float(prob[m].mean()) for m in masks], np.float32)})
    return out
