"""The CU-Net -> Mask R-CNN cascade of Fig. 4 (sections III.B and IV).

The CU-Net's kidney mask (ground truth while training) is split into connected kidney
regions; each region gives a square crop (with a margin) that is resized to the Mask
R-CNN's input size; tumour instances found in the crops are pasted back into slice
coordinates and merged into one uint16 label map. The alternative reading of the paper
("the kidney segmentation binaries ... used as input to the Mask R-CNN", section IV) is
``mode="masked_image"``: the whole slice multiplied by the kidney mask, resized.

This module is TensorFlow-free: the Mask R-CNN enters only through ``maskrcnn.predict``
(any object with ``predict(crops, score_threshold)`` and ``config.crop_size``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from kts.data import resize_mask
from kts.masks import renumber

MODES = ("crops", "masked_image")
Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), half-open, slice pixels


@dataclasses.dataclass
class CascadeResult:
    """Output of :func:`run_cascade` for N slices of size HxW.

    ``kidney_masks`` uint8 [N,H,W] (0/1); ``tumor_labels`` uint16 [N,H,W] (0 background,
    tumour instances 1..n per slice); ``instances`` per slice a list of dicts with
    ``label``, ``score``, ``box`` (y0, x0, y1, x1 in slice pixels) and ``region`` (the
    kidney box it came from).
    """

    kidney_masks: np.ndarray
    tumor_labels: np.ndarray
    instances: list[list[dict[str, Any]]]
    regions: list[list[Box]]


# ----------------------------------------------------------------------------- kidney regions

def kidney_regions(kidney_mask: Any, min_area: int = 50, margin: int = 8) -> list[Box]:
    """Square boxes around the connected kidney regions of one mask (section III.B, Fig. 4).

    Components smaller than ``min_area`` pixels are ignored (CU-Net speckle). Each box is
    the component's bounding box grown by ``margin`` pixels, squared up around its centre
    and shifted (then, if larger than the image, clipped) to lie inside the image. Boxes
    are ``(y0, x0, y1, x1)`` half-open, ordered left to right. An empty mask gives ``[]``.
    """
    from skimage.measure import label, regionprops

    mask = np.asarray(kidney_mask)
    if mask.ndim != 2:
        raise ValueError(f"kidney_mask must be one 2-D mask [H, W]; got shape {mask.shape}")
    if min_area < 0 or margin < 0:
        raise ValueError(f"min_area and margin must be >= 0; got {min_area}, {margin}")
    h, w = mask.shape
    boxes: list[Box] = []
    for region in regionprops(label(mask > 0, connectivity=2)):
        if region.area < max(min_area, 1):
            continue
        r0, c0, r1, c1 = region.bbox
        side = max(r1 - r0, c1 - c0) + 2 * margin
        boxes.append(_square_box((r0 + r1) / 2.0, (c0 + c1) / 2.0, side, h, w))
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def _square_box(cy: float, cx: float, side: int, h: int, w: int) -> Box:
    def span(centre: float, size: int) -> tuple[int, int]:
        length = min(side, size)
        start = int(math.floor(centre - side / 2.0))
        start = min(max(start, 0), size - length)
        return start, start + length

    y0, y1 = span(cy, h)
    x0, x1 = span(cx, w)
    return (y0, x0, y1, x1)


def _check_boxes(boxes: Sequence[Sequence[int]], shape: tuple[int, int]) -> list[Box]:
    out = []
    for b in boxes:
        if len(b) != 4:
            raise ValueError(f"a box must be (y0, x0, y1, x1); got {b!r}")
        y0, x0, y1, x1 = (int(v) for v in b)
        if not (0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]):
            raise ValueError(f"box {tuple(b)} is empty or outside the image of shape {shape}")
        out.append((y0, x0, y1, x1))
    return out


# ----------------------------------------------------------------------------- crops

def _check_size(crop_size: int) -> int:
    if isinstance(crop_size, bool) or not isinstance(crop_size, (int, np.integer)) or crop_size < 1:
        raise ValueError(f"crop_size must be a positive integer; got {crop_size!r}")
    return int(crop_size)


def extract_crops(image: Any, boxes: Sequence[Sequence[int]], crop_size: int) -> np.ndarray:
    """Cut each box out of a greyscale slice and resize it to ``crop_size`` (area interpolation).

    Returns float32 [n_boxes, crop_size, crop_size]; no boxes gives an empty [0, S, S] array.
    """
    from skimage.transform import resize_local_mean

    size = _check_size(crop_size)
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image must be one greyscale slice [H, W]; got shape {img.shape}")
    crops = [resize_local_mean(img[y0:y1, x0:x1], (size, size), preserve_range=True)
             for y0, x0, y1, x1 in _check_boxes(boxes, img.shape)]
    return np.asarray(crops, np.float32).reshape(-1, size, size)


def extract_label_crops(label_map: Any, boxes: Sequence[Sequence[int]], crop_size: int,
                        min_pixels: int = 4) -> np.ndarray:
    """Label-map crops for the boxes (nearest neighbour), instances renumbered 1..n per crop.

    Instances clipped by the crop keep the part inside; parts smaller than ``min_pixels``
    crop pixels are dropped. Returns uint16 [n_boxes, S, S].
    """
    size = _check_size(crop_size)
    labels = np.asarray(label_map)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D [H, W]; got shape {labels.shape}")
    out = np.zeros((len(boxes), size, size), np.uint16)
    for k, (y0, x0, y1, x1) in enumerate(_check_boxes(boxes, labels.shape)):
        out[k] = renumber(resize_mask(labels[y0:y1, x0:x1], (size, size)), min_pixels)
    return out


def _as_instances(item: Any, crop_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(masks [n,S,S] bool, scores [n]) from a prediction dict or a crop label map."""
    if isinstance(item, dict):
        masks = np.asarray(item.get("masks", np.zeros((0,) + crop_shape, bool))).astype(bool)
        scores = np.asarray(item.get("scores", np.ones(len(masks))), np.float64).reshape(-1)
        if masks.ndim != 3 or len(scores) != len(masks):
            raise ValueError(f"a prediction needs masks [n, S, S] and scores [n]; got {masks.shape}, {scores.shape}")
        return masks, scores
    labels = np.asarray(item)
    if labels.ndim != 2:
        raise ValueError(f"a crop's instances must be a dict(masks, scores) or a 2-D label map; got shape {labels.shape}")
    ids = [i for i in np.unique(labels) if i != 0]
    masks = np.asarray([labels == i for i in ids], bool).reshape((-1,) + labels.shape)
    return masks, np.ones(len(ids))


def paste_instances(instances_per_crop: Sequence[Any], boxes: Sequence[Sequence[int]],
                    image_shape: tuple[int, int], min_pixels: int = 1,
                    return_instances: bool = False, overlap_drop: float = 0.5) -> Any:
    """Paste each crop's tumour instances back into slice coordinates (section III.B, Fig. 5).

    ``instances_per_crop[k]`` is ``maskrcnn.predict`` output for crop k (``masks``,
    ``scores``) or a crop label map. Each mask is resized (bilinear) to its box's size,
    thresholded at 0.5 and placed; instances from all crops get new consecutive labels
    1..n, higher scores first, and a pixel claimed by two instances keeps the higher score; an
    instance of which ``overlap_drop`` or more is already claimed is dropped (no crescent-shaped
    leftovers of duplicate detections, as in ``kts.maskrcnn.detections_to_labels``).
    Returns a uint16 label map (and, with ``return_instances``, one dict per label).
    """
    from skimage.transform import resize

    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 2:
        raise ValueError(f"image_shape must be (H, W); got {image_shape!r}")
    boxes = _check_boxes(boxes, shape)
    if len(instances_per_crop) != len(boxes):
        raise ValueError(f"{len(instances_per_crop)} crops of instances but {len(boxes)} boxes")
    pasted = []  # (score, order, full-size mask, region box)
    for k, (item, box) in enumerate(zip(instances_per_crop, boxes)):
        y0, x0, y1, x1 = box
        first = item.get("masks") if isinstance(item, dict) else item
        crop_shape = tuple(np.shape(first)[-2:]) if first is not None and np.ndim(first) >= 2 else (1, 1)
        masks, scores = _as_instances(item, crop_shape)
        for j, (mask, score) in enumerate(zip(masks, scores)):
            small = resize(mask.astype(np.float32), (y1 - y0, x1 - x0), order=1, mode="edge",
                           anti_aliasing=False) >= 0.5
            if not small.any():
                continue
            full = np.zeros(shape, bool)
            full[y0:y1, x0:x1] = small
            pasted.append((float(score), k, j, full, box))
    pasted.sort(key=lambda t: (-t[0], t[1], t[2]))
    out = np.zeros(shape, np.uint16)
    records = []
    for score, _, _, full, box in pasted:
        free = full & (out == 0)
        n_free, area = int(free.sum()), int(full.sum())
        if n_free < max(min_pixels, 1) or (overlap_drop < 1.0 and area - n_free >= overlap_drop * area):
            continue
        label = len(records) + 1
        out[free] = label
        rows, cols = np.nonzero(free)
        records.append({"label": label, "score": score, "region": box,
                        "box": (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)})
    return (out, records) if return_instances else out


# ----------------------------------------------------------------------------- training data

def _as_stack(values: Any, name: str, ndim: int = 3) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == ndim - 1:
        arr = arr[None]
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be [N, H, W] (or one [H, W] slice); got shape {arr.shape}")
    return arr


def masked_image(image: np.ndarray, kidney_mask: np.ndarray, crop_size: int) -> np.ndarray:
    """Section IV's literal reading: the slice times its kidney mask, resized to ``crop_size``."""
    h, w = image.shape
    return extract_crops(np.asarray(image, np.float32) * (np.asarray(kidney_mask) > 0), [(0, 0, h, w)], crop_size)[0]


def training_crops(images: Any, kidney_masks: Any, tumor_labels: Any, crop_size: int, margin: int = 8,
                   min_area: int = 50, mode: str = "crops", return_sources: bool = False,
                   jitter: int = 0, copies: int = 1, seed: int = 0) -> Any:
    """Mask R-CNN training crops from ground-truth kidney masks (section III.B).

    One crop per kidney region of each slice (``mode="crops"``) or one kidney-masked,
    resized slice (``mode="masked_image"``); tumour instances are clipped to the crop and
    renumbered. Slices with no kidney give no crop; kidney crops without tumour are kept as
    negative examples. Returns ``(crops float32 [M,S,S], labels uint16 [M,S,S])`` and, with
    ``return_sources``, a list of ``(slice_index, box)`` per crop.

    ``copies`` > 1 with ``jitter`` > 0 cuts each kidney that many times, its box grown or
    shrunk by up to ``jitter`` pixels per side at random (seeded): crops as loose or tight as
    a CU-Net's kidney mask would cut them (not in the paper; errata E38).
    """
    size = _check_size(crop_size)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    imgs = _as_stack(images, "images")
    kid = _as_stack(kidney_masks, "kidney_masks")
    tum = _as_stack(tumor_labels, "tumor_labels")
    if not (imgs.shape == kid.shape == tum.shape):
        raise ValueError(f"images {imgs.shape}, kidney_masks {kid.shape} and tumor_labels {tum.shape} must match")
    if jitter < 0 or copies < 1:
        raise ValueError(f"jitter must be >= 0 and copies >= 1; got {jitter}, {copies}")
    rng = np.random.default_rng(seed)
    crops, labels, sources = [], [], []
    for i in range(len(imgs)):
        if mode == "crops":
            boxes = kidney_regions(kid[i], min_area=min_area, margin=margin)
            if not boxes:
                continue
            if copies > 1 or jitter > 0:
                boxes = [_jittered(b, jitter, rng, imgs.shape[1:]) for b in boxes for _ in range(max(copies, 1))]
            crops.append(extract_crops(imgs[i], boxes, size))
            labels.append(extract_label_crops(tum[i], boxes, size))
            sources.extend((i, b) for b in boxes)
        else:
            if not np.any(kid[i]):
                continue
            h, w = imgs[i].shape
            crops.append(masked_image(imgs[i], kid[i], size)[None])
            labels.append(extract_label_crops(tum[i], [(0, 0, h, w)], size))
            sources.append((i, (0, 0, h, w)))
    crops_arr = np.concatenate(crops) if crops else np.zeros((0, size, size), np.float32)
    labels_arr = np.concatenate(labels) if labels else np.zeros((0, size, size), np.uint16)
    return (crops_arr, labels_arr, sources) if return_sources else (crops_arr, labels_arr)


def _jittered(box: Box, jitter: int, rng: np.random.Generator, shape: tuple[int, int]) -> Box:
    """``box`` with each side moved by up to ``jitter`` pixels, kept square and inside the image."""
    if jitter <= 0:
        return box
    y0, x0, y1, x1 = box
    side = max(8, (y1 - y0) + int(rng.integers(-jitter, jitter + 1)) * 2)
    cy = (y0 + y1) / 2.0 + int(rng.integers(-jitter, jitter + 1))
    cx = (x0 + x1) / 2.0 + int(rng.integers(-jitter, jitter + 1))
    return _square_box(cy, cx, side, shape[0], shape[1])


# ----------------------------------------------------------------------------- the cascade

def _kidney_masks(values: Any, threshold: float, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 4 and arr.shape[-1] == 1:  # Keras [N, H, W, 1] probabilities
        arr = arr[..., 0]
    arr = _as_stack(arr, "kidney_probabilities_or_masks")
    if arr.shape != shape:
        raise ValueError(f"kidney probabilities/masks have shape {arr.shape}; the images have {shape}")
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return (arr > 0).astype(np.uint8)
    if not np.all(np.isfinite(arr)):
        raise ValueError("kidney probabilities contain NaN or infinite values")
    return (arr >= threshold).astype(np.uint8)


def run_cascade(images: Any, kidney_probabilities_or_masks: Any, maskrcnn: Any, threshold: float = 0.5,
                score_threshold: float | None = None, mode: str = "crops", margin: int = 8, min_area: int = 50,
                restrict_to_kidney: bool = False) -> CascadeResult:
    """Fig. 4: kidney mask -> kidney regions -> Mask R-CNN tumour instances -> slice label map.

    ``kidney_probabilities_or_masks``: the CU-Net's sigmoid output (thresholded at
    ``threshold``) or binary masks (bool/integer, used as they are). ``maskrcnn``: a trained
    :class:`kts.maskrcnn.TumorMaskRCNN` (only ``predict`` and ``config.crop_size`` are used);
    ``score_threshold`` None lets it use its own (chosen on validation crops).
    ``restrict_to_kidney`` drops tumour pixels outside the kidney mask. A slice without
    kidney gives an empty label map and no instances.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
    imgs = _as_stack(images, "images").astype(np.float32)
    kidneys = _kidney_masks(kidney_probabilities_or_masks, threshold, imgs.shape)
    size = _check_size(maskrcnn.config.crop_size)
    n, h, w = imgs.shape
    tumors = np.zeros((n, h, w), np.uint16)
    per_slice: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    regions: list[list[Box]] = [[] for _ in range(n)]
    crops, owners = [], []  # one predict call for all crops of all slices
    for i in range(n):
        if mode == "crops":
            boxes = kidney_regions(kidneys[i], min_area=min_area, margin=margin)
            if boxes:
                crops.append(extract_crops(imgs[i], boxes, size))
        else:
            boxes = [(0, 0, h, w)] if kidneys[i].sum() >= max(min_area, 1) else []
            if boxes:
                crops.append(masked_image(imgs[i], kidneys[i], size)[None])
        regions[i] = boxes
        owners.extend([i] * len(boxes))
    if crops:
        predictions = (maskrcnn.predict(np.concatenate(crops)) if score_threshold is None
                       else maskrcnn.predict(np.concatenate(crops), score_threshold=score_threshold))
        if len(predictions) != len(owners):
            raise ValueError(f"maskrcnn.predict returned {len(predictions)} results for {len(owners)} crops")
        start = 0
        for i in range(n):
            k = len(regions[i])
            if not k:
                continue
            labels, records = paste_instances(predictions[start:start + k], regions[i], (h, w),
                                              return_instances=True)
            start += k
            if restrict_to_kidney:
                labels, records = _restrict(labels, records, kidneys[i])
            tumors[i] = labels
            per_slice[i] = records
    return CascadeResult(kidney_masks=kidneys, tumor_labels=tumors, instances=per_slice, regions=regions)


def _restrict(labels: np.ndarray, records: list[dict[str, Any]], kidney: np.ndarray):
    """Drop tumour pixels outside the kidney; renumber 1..n and update the records."""
    kept = np.where(kidney > 0, labels, 0)
    old_ids = [int(i) for i in np.unique(kept) if i != 0]
    by_label = {r["label"]: r for r in records}
    out = renumber(kept)
    new_records = []
    for new, old in enumerate(old_ids, start=1):
        region = out == new
        rows, cols = np.nonzero(region)
        new_records.append({**by_label[old], "label": new, "box": (int(rows.min()), int(cols.min()),
                                                                   int(rows.max()) + 1, int(cols.max()) + 1)})
    return out, new_records


# ----------------------------------------------------------------------------- blob properties

def blob_properties(label_map: Any, spacing: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Properties of each tumour instance ("blob"), as promised in section I.

    Location (centroid), scale (area, equivalent diameter; also in mm / mm^2 when
    ``spacing`` = (row, col) pixel spacing in mm), inertia (inertia-tensor eigenvalues,
    orientation, Hu moments), convexity (solidity) and eccentricity, from
    ``skimage.measure.regionprops``. An empty map gives ``[]``.
    """
    from skimage.measure import regionprops

    labels = np.asarray(label_map)
    if labels.ndim != 2:
        raise ValueError(f"label_map must be 2-D [H, W]; got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label_map must hold integer instance labels; got dtype {labels.dtype}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 2 or min(spacing) <= 0:
            raise ValueError(f"spacing must be (row_mm, col_mm) > 0; got {spacing!r}")
    out = []
    for r in regionprops(labels.astype(np.int32)):
        cy, cx = r.centroid
        props: dict[str, Any] = {
            "label": int(r.label),
            "centroid_row": float(cy), "centroid_col": float(cx),
            "bbox": tuple(int(v) for v in r.bbox),
            "area_px": int(r.area),
            "equivalent_diameter_px": float(r.equivalent_diameter_area),
            "perimeter_px": float(r.perimeter),
            "inertia_eigenvalues": tuple(float(v) for v in r.inertia_tensor_eigvals),
            "orientation_rad": float(r.orientation),
            "hu_moments": tuple(float(v) for v in r.moments_hu),
            "solidity": float(r.solidity),
            "eccentricity": float(r.eccentricity),
        }
        if spacing is not None:
            area_mm2 = r.area * spacing[0] * spacing[1]
            props.update({
                "centroid_row_mm": float(cy * spacing[0]), "centroid_col_mm": float(cx * spacing[1]),
                "area_mm2": float(area_mm2),
                "equivalent_diameter_mm": float(2.0 * math.sqrt(area_mm2 / math.pi)),
            })
        out.append(props)
    return out
