"""Segmentation metrics of Table I (IoU, accuracy) beside Dice, tumour instances, and the overfit measure D.

Section IV and Table I report IoU and (pixel) accuracy. Pixel accuracy flatters
segmentation because background dominates a slice, so kts always reports it next to the
foreground Dice and IoU.

The rule for every figure of merit kts shows (notebooks, tables, README; errata E37):

* **Pooled over the whole test set.** Dice, IoU, pixel accuracy, precision and recall count
  TP/FP/FN/TN over all pixels of all images first; instance precision, recall and F1 count
  matched (TP), unmatched predicted (FP) and missed (FN) instances over all images first. A
  large kidney weighs more than a small one; a tumour-free image adds only its false
  positives. These ``pooled_*`` values (and ``tumor_scores``' ``dice``, ``iou`` and
  ``instance_*``) are the numbers that appear in results.
* **Undefined is NaN, never 1.** A ratio whose denominator is zero is NaN, printed "n/a"
  (``format_metric``): precision with nothing predicted (the number of predictions,
  ``n_predicted``, stands beside it), recall with nothing to find, Dice/IoU with both
  prediction and target empty, F1 with no instance at all. Nothing predicted where there is
  something to find is an error: Dice, IoU, recall and F1 are 0 then, and precision n/a.
* **Per-image means are secondary** and are computed only over the images where the metric
  is defined, always with that count beside them (``mean_dice`` with ``mean_dice_n_images``);
  an image with an empty target and an empty prediction does not enter a mean Dice.
* A tumour-free image with no prediction is still a true negative where kts counts those
  (``negative_slices``, ``n_true_negative_slices``, ``true_negative_slices``).

Per image, binary: both empty gives IoU = Dice = precision = recall = NaN; exactly one empty
gives IoU = Dice = 0 and precision 0 (something predicted where nothing is) or NaN (nothing
predicted), recall 0 (something missed) or NaN (nothing to find).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "confusion", "iou", "dice", "pixel_accuracy", "precision", "recall", "score_masks", "format_metric",
    "format_spread", "overfit_measure", "is_overfit", "match_instances", "instance_scores", "tumor_scores",
    "mask_ap", "SCORING",
]

NAN = float("nan")
# The scoring rule's name, stored in every cached run record (study, contrasts): a record scored
# under another rule is scored again from its saved models instead of being reused. Change it
# whenever the definition of a reported figure changes.
SCORING = "E37"


def _binary_pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    return pred.astype(bool), target.astype(bool)


def confusion(pred, target) -> dict[str, int]:
    """Pixel counts TP, FP, FN, TN of binary ``pred`` against binary ``target`` (any shape)."""
    p, t = _binary_pair(pred, target)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = int(p.size - tp - fp - fn)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio(num: int, den: int) -> float:
    """num / den, NaN when den is 0 (undefined, never scored as perfect)."""
    return float(num) / float(den) if den else NAN


def _from_counts(c: Mapping[str, int]) -> dict[str, float]:
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }


def iou(pred, target) -> float:
    """Foreground intersection over union |P and T| / |P or T| (Table I's IoU); NaN when both are empty."""
    return _from_counts(confusion(pred, target))["iou"]


def dice(pred, target) -> float:
    """Dice coefficient 2|P and T| / (|P| + |T|); NaN when both are empty."""
    return _from_counts(confusion(pred, target))["dice"]


def pixel_accuracy(pred, target) -> float:
    """Fraction of pixels labelled correctly, background included (Table I's "accuracy", errata E9)."""
    return _from_counts(confusion(pred, target))["accuracy"]


def precision(pred, target) -> float:
    """TP / (TP + FP); NaN when nothing is predicted (undefined, not perfect)."""
    return _from_counts(confusion(pred, target))["precision"]


def recall(pred, target) -> float:
    """TP / (TP + FN); NaN when the target is empty (nothing to find)."""
    return _from_counts(confusion(pred, target))["recall"]


def _is_missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(np.isnan(value))
    except (TypeError, ValueError):
        return False


def format_metric(value, digits: int = 3) -> str:
    """A figure of merit for a table or notebook: ``"n/a"`` for NaN or None, ints as they are,
    other numbers with ``digits`` decimals (``format_metric(0.5)`` is ``"0.500"``)."""
    if _is_missing(value):
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    return str(value)


def format_spread(mean, sd, digits: int = 3) -> str:
    """``"mean ± sd"`` for a table cell: the s.d. reads "n/a" when undefined (a single seed has
    no spread, never "± 0.000"); the whole cell reads "n/a" when the mean is undefined."""
    if _is_missing(mean):
        return "n/a"
    return f"{format_metric(float(mean), digits)} ± {format_metric(sd if _is_missing(sd) else float(sd), digits)}"


def _mean_defined(values: Sequence[float]) -> tuple[float, int]:
    """Mean over the values that are defined (not NaN) and how many they are; (NaN, 0) when none is."""
    defined = [v for v in values if not np.isnan(v)]
    return (float(np.mean(defined)) if defined else NAN), len(defined)


def score_masks(preds: Iterable, targets: Iterable) -> dict[str, float]:
    """All five metrics over a set of images: ``pooled_<metric>`` (the reported figure) and
    ``mean_<metric>`` (per image, over the ``mean_<metric>_n_images`` images where it is defined).

    ``preds`` and ``targets`` are sequences (or stacked arrays) of binary masks. Also
    ``n_images``, ``n_predicted_pixels`` and ``n_target_pixels`` (all images together).
    """
    per_image = []
    total = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    n = 0
    for p, t in zip(preds, targets, strict=True):
        c = confusion(p, t)
        for key in total:
            total[key] += c[key]
        per_image.append(_from_counts(c))
        n += 1
    if n == 0:
        raise ValueError("score_masks needs at least one image")
    out: dict = {}
    for key in per_image[0]:
        out[f"mean_{key}"], out[f"mean_{key}_n_images"] = _mean_defined([m[key] for m in per_image])
    out.update({f"pooled_{k}": v for k, v in _from_counts(total).items()})
    out["n_images"] = n
    out["n_predicted_pixels"] = total["tp"] + total["fp"]
    out["n_target_pixels"] = total["tp"] + total["fn"]
    return out


# --- the overfit measure D of section III.A.3 -------------------------------------------------

def overfit_measure(history: Mapping[str, Sequence[float]] | object, metric: str = "accuracy",
                    k: int | None = None) -> float:
    """D = (1/k) * sum over the last ``k`` epochs of (metric on I_alpha - metric on I_beta).

    Section III.A.3: the difference between the model's performance on the training set
    I_alpha and on the validation set I_beta, averaged over k epochs. ``history`` is a Keras
    ``History`` (or its ``.history`` dict, or a DataFrame of the CSV log) with ``metric`` and
    ``val_<metric>``. ``k=None`` averages over all epochs. For a loss (lower is better) pass
    e.g. ``metric="loss"`` and read a negative D as overfitting (errata E8).
    """
    hist = getattr(history, "history", history)
    if hasattr(hist, "to_dict") and hasattr(hist, "columns"):
        hist = {c: list(hist[c]) for c in hist.columns}
    if metric not in hist or f"val_{metric}" not in hist:
        raise ValueError(f"history needs '{metric}' and 'val_{metric}' columns; it has {sorted(hist)}")
    train = np.asarray(hist[metric], dtype=float)
    val = np.asarray(hist[f"val_{metric}"], dtype=float)
    if train.size == 0 or train.size != val.size:
        raise ValueError(f"history has {train.size} training and {val.size} validation epochs: need equal, non-zero")
    if k is None:
        k = train.size
    if not isinstance(k, int) or k <= 0 or k > train.size:
        raise ValueError(f"k must be an int in 1..{train.size} (the epochs in the history), got {k!r}")
    return float(np.mean(train[-k:] - val[-k:]))


def is_overfit(history, delta: float = 0.05, metric: str = "accuracy", k: int | None = None) -> bool:
    """True when D >= delta (section III.A.3: "if D >= delta then overfit")."""
    return overfit_measure(history, metric=metric, k=k) >= delta


# --- tumour instances (section III.B) ---------------------------------------------------------

def _instances(label_map) -> tuple[np.ndarray, list[np.ndarray]]:
    label_map = np.asarray(label_map)
    ids = np.unique(label_map)
    ids = ids[ids != 0]
    return ids, [label_map == i for i in ids]


def _pairwise_iou(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    for i, ma in enumerate(a):
        for j, mb in enumerate(b):
            inter = np.count_nonzero(ma & mb)
            if inter:
                out[i, j] = inter / np.count_nonzero(ma | mb)
    return out


def match_instances(pred_labels, gt_labels, iou_threshold: float = 0.5) -> dict:
    """Match predicted to ground-truth tumour instances one-to-one at IoU >= ``iou_threshold``.

    Matching rule: all (prediction, ground truth) pairs with IoU >= threshold are taken
    greedily in order of decreasing IoU, each instance used at most once (with a threshold
    >= 0.5 a match is unique anyway). Returns tp, fp, fn and the matched ``(pred_id, gt_id, iou)``.
    A slice with no tumour and no prediction gives tp = fp = fn = 0 (a true negative).
    """
    if np.shape(pred_labels) != np.shape(gt_labels):
        raise ValueError(f"prediction shape {np.shape(pred_labels)} differs from target shape {np.shape(gt_labels)}")
    pred_ids, pred_masks = _instances(pred_labels)
    gt_ids, gt_masks = _instances(gt_labels)
    ious = _pairwise_iou(pred_masks, gt_masks)
    pairs = sorted(((ious[i, j], i, j) for i in range(len(pred_ids)) for j in range(len(gt_ids))
                    if ious[i, j] >= iou_threshold), reverse=True)
    used_p, used_g, matches = set(), set(), []
    for value, i, j in pairs:
        if i in used_p or j in used_g:
            continue
        used_p.add(i)
        used_g.add(j)
        matches.append((int(pred_ids[i]), int(gt_ids[j]), float(value)))
    tp = len(matches)
    return {"tp": tp, "fp": len(pred_ids) - tp, "fn": len(gt_ids) - tp, "matches": matches}


def instance_scores(pred_label_maps: Iterable, gt_label_maps: Iterable, iou_threshold: float = 0.5) -> dict:
    """Instance detection precision, recall and F1 at IoU >= ``iou_threshold``, pooled over all slices.

    TP, FP and FN are counted over all slices first. Precision is NaN when nothing was
    predicted (``n_predicted`` = 0), recall NaN when there is nothing to find (``n_gt`` = 0),
    F1 = 2TP / (2TP + FP + FN) NaN only when both are 0: a detector that finds nothing scores
    F1 = recall = 0 and precision n/a, never 1. Also the tumour-free slices (``negative_slices``),
    those of them where nothing was predicted (``n_true_negative_slices``, true negatives) and
    their fraction (``true_negative_slices``, NaN without tumour-free slices).
    """
    tp = fp = fn = 0
    n = negatives = negatives_clean = 0
    for pred, gt in zip(pred_label_maps, gt_label_maps, strict=True):
        m = match_instances(pred, gt, iou_threshold)
        tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        n += 1
        if not np.any(gt):
            negatives += 1
            negatives_clean += int(not np.any(pred))
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "tp": tp, "fp": fp, "fn": fn, "n_predicted": tp + fp, "n_gt": tp + fn, "n_images": n,
            "negative_slices": negatives, "n_true_negative_slices": negatives_clean,
            "true_negative_slices": _ratio(negatives_clean, negatives)}


def tumor_scores(pred_label_maps: Iterable, gt_label_maps: Iterable, iou_threshold: float = 0.5) -> dict:
    """The tumour stage's figures of merit on a set of crops or slices (instance label maps, 0 = background).

    Pooled over all images (the reported numbers): ``dice`` and ``iou`` of the tumour pixels
    (union of instances); ``instance_precision``, ``instance_recall`` and ``instance_f1`` at IoU
    >= ``iou_threshold`` from the instance counts ``tp``, ``fp``, ``fn``, with ``n_predicted``
    and ``n_gt`` instances and ``n_images``. Secondary: ``mean_dice``, the per-image Dice
    averaged over the ``mean_dice_n_images`` images where it is defined (an image where both
    the prediction and the target are empty is left out, not scored 1). Also the true-negative
    counts of ``instance_scores``. Undefined values are NaN (see the module docstring).
    """
    preds = [np.asarray(p) for p in pred_label_maps]
    gts = [np.asarray(g) for g in gt_label_maps]
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predicted label maps but {len(gts)} ground-truth maps")
    if not preds:
        raise ValueError("tumor_scores needs at least one image")
    pixels = score_masks([p > 0 for p in preds], [g > 0 for g in gts])
    inst = instance_scores(preds, gts, iou_threshold=iou_threshold)
    return {"dice": pixels["pooled_dice"], "iou": pixels["pooled_iou"],
            "instance_precision": inst["precision"], "instance_recall": inst["recall"], "instance_f1": inst["f1"],
            "tp": inst["tp"], "fp": inst["fp"], "fn": inst["fn"],
            "n_predicted": inst["n_predicted"], "n_gt": inst["n_gt"], "n_images": inst["n_images"],
            "mean_dice": pixels["mean_dice"], "mean_dice_n_images": pixels["mean_dice_n_images"],
            "negative_slices": inst["negative_slices"], "n_true_negative_slices": inst["n_true_negative_slices"],
            "true_negative_slices": inst["true_negative_slices"]}


def mask_ap(predictions: Sequence[Mapping], gt_label_maps: Sequence) -> dict[str, float]:
    """COCO mask average precision of tumour instances, computed by ``pycocotools`` (the field standard).

    ``predictions`` holds one dict per slice with ``masks`` [n, H, W] (bool) and ``scores`` [n];
    ``gt_label_maps`` the true instance label maps (prediction first, truth second, as every metric here).
    Returns ``AP`` (IoU 0.50:0.95), ``AP50`` and ``AP75``; NaN (undefined) where there is no
    ground-truth instance (COCO's -1), 0 when there is one and nothing was predicted.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import contextlib
    import io

    if len(gt_label_maps) != len(predictions):
        raise ValueError(f"{len(gt_label_maps)} ground-truth maps but {len(predictions)} predictions")
    images, annotations, results = [], [], []
    ann_id = 1
    for image_id, (gt, pred) in enumerate(zip(gt_label_maps, predictions), start=1):
        gt = np.asarray(gt)
        images.append({"id": image_id, "height": int(gt.shape[0]), "width": int(gt.shape[1])})
        for mask in _instances(gt)[1]:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            area = float(mask_utils.area(rle))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": rle,
                                "area": area, "bbox": bbox, "iscrowd": 0})
            ann_id += 1
        masks = np.asarray(pred.get("masks", np.zeros((0,) + gt.shape, bool)))
        scores = np.asarray(pred.get("scores", np.zeros((0,))))
        for mask, score in zip(masks, scores):
            rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": image_id, "category_id": 1, "segmentation": rle, "score": float(score)})
    if not annotations:
        return {"AP": NAN, "AP50": NAN, "AP75": NAN}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations,
                           "categories": [{"id": 1, "name": "tumour"}]}
        coco_gt.createIndex()
        if not results:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {name: (NAN if stats[i] < 0 else float(stats[i])) for i, name in enumerate(("AP", "AP50", "AP75"))}


# --------------------------------------------------------------------------- tumour burden (Fig. 1)

#: Tumour burden (tumour pixels / kidney-with-tumour pixels) bounds of the Fig. 1 categories.
BURDEN_MILD_MAX = 0.15
BURDEN_MODERATE_MAX = 0.40


def tumor_burden(kidney_mask, tumor_labels) -> float:
    """Tumour pixels over kidney-with-tumour pixels (Fig. 1's measure); 0 when the slice has no kidney."""
    kidney = int(np.count_nonzero(kidney_mask))
    return float(np.count_nonzero(tumor_labels)) / kidney if kidney else 0.0


def burden_category(burden: float) -> str:
    """Fig. 1's tumour categories from the tumour fraction of the kidney: none, mild, moderate, large."""
    if burden <= 0:
        return "none"
    if burden <= BURDEN_MILD_MAX:
        return "mild"
    if burden <= BURDEN_MODERATE_MAX:
        return "moderate"
    return "large"
