"""Segmentation metrics of Table I (IoU, accuracy) beside Dice, and the overfit measure D.

Section IV and Table I report IoU and (pixel) accuracy. Pixel accuracy flatters
segmentation because background dominates a slice, so kts always reports it next to the
foreground Dice and IoU.

Conventions for empty masks (per image, binary):

* both prediction and target empty: IoU = Dice = precision = recall = 1 (nothing to find,
  nothing claimed: a correct answer);
* exactly one of them empty: IoU = Dice = 0; precision is 0 when something was predicted
  where nothing is, 1 when nothing was predicted (no false claim); recall likewise.

Aggregation, both named: ``mean`` is the mean of per-image values; ``pooled`` counts
TP/FP/FN/TN over all pixels of all images first (a large kidney weighs more).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "confusion", "iou", "dice", "pixel_accuracy", "precision", "recall", "summarise",
    "overfit_measure", "is_overfit", "match_instances", "instance_scores", "mask_ap",
]


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


def _ratio(num: int, den: int, empty: float) -> float:
    return float(num) / float(den) if den else float(empty)


def _from_counts(c: Mapping[str, int]) -> dict[str, float]:
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    return {
        "iou": _ratio(tp, tp + fp + fn, 1.0),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, 1.0),
        "precision": _ratio(tp, tp + fp, 1.0),
        "recall": _ratio(tp, tp + fn, 1.0),
    }


def iou(pred, target) -> float:
    """Foreground intersection over union |P and T| / |P or T| (Table I's IoU); 1 when both are empty."""
    return _from_counts(confusion(pred, target))["iou"]


def dice(pred, target) -> float:
    """Dice coefficient 2|P and T| / (|P| + |T|); 1 when both are empty."""
    return _from_counts(confusion(pred, target))["dice"]


def pixel_accuracy(pred, target) -> float:
    """Fraction of pixels labelled correctly, background included (Table I's "accuracy", errata E9)."""
    return _from_counts(confusion(pred, target))["accuracy"]


def precision(pred, target) -> float:
    """TP / (TP + FP); 1 when nothing is predicted."""
    return _from_counts(confusion(pred, target))["precision"]


def recall(pred, target) -> float:
    """TP / (TP + FN); 1 when the target is empty."""
    return _from_counts(confusion(pred, target))["recall"]


def summarise(preds: Iterable, targets: Iterable) -> dict[str, float]:
    """All five metrics over a set of images, both ``mean_<metric>`` (per image) and ``pooled_<metric>``.

    ``preds`` and ``targets`` are sequences (or stacked arrays) of binary masks.
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
        raise ValueError("summarise needs at least one image")
    out = {f"mean_{k}": float(np.mean([m[k] for m in per_image])) for k in per_image[0]}
    out.update({f"pooled_{k}": v for k, v in _from_counts(total).items()})
    out["n_images"] = n
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
    """Instance detection precision, recall and F1 at IoU >= ``iou_threshold``, counted over all slices.

    Also the fraction of tumour-free slices where nothing was predicted (``true_negative_slices``).
    With no instance anywhere (nothing to find, nothing claimed) precision = recall = F1 = 1.
    """
    tp = fp = fn = 0
    negatives = negatives_clean = 0
    for pred, gt in zip(pred_label_maps, gt_label_maps, strict=True):
        m = match_instances(pred, gt, iou_threshold)
        tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        if not np.any(gt):
            negatives += 1
            negatives_clean += int(not np.any(pred))
    prec = _ratio(tp, tp + fp, 1.0)
    rec = _ratio(tp, tp + fn, 1.0)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn, 1.0)
    return {"precision": prec, "recall": rec, "f1": f1, "tp": tp, "fp": fp, "fn": fn,
            "negative_slices": negatives,
            "true_negative_slices": _ratio(negatives_clean, negatives, 1.0)}


def mask_ap(gt_label_maps: Sequence, predictions: Sequence[Mapping]) -> dict[str, float]:
    """COCO mask average precision of tumour instances, computed by ``pycocotools`` (the field standard).

    ``predictions`` holds one dict per slice with ``masks`` [n, H, W] (bool) and ``scores`` [n].
    Returns ``AP`` (IoU 0.50:0.95), ``AP50`` and ``AP75``; -1 where COCO finds no ground truth.
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
        return {"AP": -1.0, "AP50": -1.0, "AP75": -1.0}
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
    return {"AP": float(stats[0]), "AP50": float(stats[1]), "AP75": float(stats[2])}
