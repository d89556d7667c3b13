"""The paper's figures, drawn from arrays (never from file paths).

Figure 1 (Section I): kidneys with no, mild and moderate tumour, tumours outlined in red.
Figure 3 (Section III.A): an abdominal MR slice (left) and its ground truth for training (right).
``save_figure`` writes PNG and PDF atomically at a fixed dpi with dates stripped, so the same
figure gives the same bytes. Figures are ``matplotlib.figure.Figure`` objects built without
pyplot (no global state, any backend); Jupyter displays them inline.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from kts.io import atomic_path
from kts.phantom import BURDEN_MILD_MAX, BURDEN_MODERATE_MAX

FIGURE_DPI = 150
TUMOR_COLOR = "red"


def _triplet(item: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, kidney_mask, tumor_labels) from a PhantomSlice-like object, a dict or a tuple."""
    if isinstance(item, dict):
        return np.asarray(item["image"]), np.asarray(item["kidney_mask"]), np.asarray(item["tumor_labels"])
    if hasattr(item, "image") and hasattr(item, "kidney_mask") and hasattr(item, "tumor_labels"):
        return np.asarray(item.image), np.asarray(item.kidney_mask), np.asarray(item.tumor_labels)
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return tuple(np.asarray(a) for a in item)  # type: ignore[return-value]
    raise ValueError("each slice must have image, kidney_mask and tumor_labels arrays "
                     "(a PhantomSlice, a dict with those keys or an (image, kidney_mask, tumor_labels) tuple)")


def tumor_burden(kidney_mask: np.ndarray, tumor_labels: np.ndarray) -> float:
    """Tumour pixels over kidney-with-tumour pixels; 0 when the slice has no kidney."""
    kidney = int(np.count_nonzero(kidney_mask))
    return float(np.count_nonzero(tumor_labels)) / kidney if kidney else 0.0


def pick_figure1_slices(slices: Sequence[Any]) -> dict[str, int]:
    """Indices of the slices Fig. 1 shows: ``{"none": i, "mild": j, "moderate": k}``.

    none: the tumour-free slice with the largest kidney area; mild and moderate: the median
    slice of the burden bands (0, 0.15] and (0.15, 0.40], falling back to the 25th and 75th
    percentiles of the tumour-bearing slices when a band is empty.
    """
    burdens, areas = [], []
    for item in slices:
        _, kidney, tumors = _triplet(item)
        burdens.append(tumor_burden(kidney, tumors))
        areas.append(int(np.count_nonzero(kidney)))
    free = [i for i, b in enumerate(burdens) if b == 0 and areas[i] > 0]
    sick = sorted((b, i) for i, b in enumerate(burdens) if b > 0)
    if not free or len(sick) < 2:
        raise ValueError(f"figure 1 needs a tumour-free slice and two slices with tumours; got {len(free)} "
                         f"tumour-free and {len(sick)} with tumours among {len(burdens)} slices")
    none = max(free, key=lambda i: (areas[i], -i))

    def median_of(band: list[tuple[float, int]]) -> int:
        return band[(len(band) - 1) // 2][1]

    mild_band = [(b, i) for b, i in sick if b <= BURDEN_MILD_MAX]
    moderate_band = [(b, i) for b, i in sick if BURDEN_MILD_MAX < b <= BURDEN_MODERATE_MAX]
    mild = median_of(mild_band) if mild_band else sick[int(0.25 * (len(sick) - 1))][1]
    moderate = median_of(moderate_band) if moderate_band else sick[int(round(0.75 * (len(sick) - 1)))][1]
    if moderate == mild:
        moderate = sick[-1][1]
    return {"none": none, "mild": mild, "moderate": moderate}


def _display_range(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, [1.0, 99.7])
    return float(lo), float(max(hi, lo + 1e-6))


def _show_image(ax, image: np.ndarray) -> None:
    lo, hi = _display_range(image)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_axis_off()


def _outline_tumors(ax, tumor_labels: np.ndarray, linewidth: float = 1.0) -> None:
    """Draw each tumour instance's outline separately (touching tumours keep their own line)."""
    for label in np.unique(tumor_labels):
        if label == 0:
            continue
        ax.contour((tumor_labels == label).astype(np.float32), levels=[0.5], colors=TUMOR_COLOR,
                   linewidths=linewidth)


def figure1(slices: Sequence[Any], *, indices: dict[str, int] | None = None, outline_width: float = 1.0,
            panel_size: float = 3.2) -> Figure:
    """Fig. 1: (a) kidney with no tumour, (b) mild tumour, (c) moderate tumour, tumours outlined in red.

    ``slices``: PhantomSlice objects, dicts or (image, kidney_mask, tumor_labels) tuples; the
    three panels are chosen by tumour burden (:func:`pick_figure1_slices`) unless ``indices``
    names them.
    """
    if len(slices) == 0:
        raise ValueError("figure1 needs at least three slices; got none")
    chosen = indices if indices is not None else pick_figure1_slices(slices)
    panels = (("none", "(a) Kidney with no tumour"), ("mild", "(b) Kidney with mild tumour"),
              ("moderate", "(c) Kidney with moderate tumour"))
    fig = Figure(figsize=(3 * panel_size, panel_size + 0.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (key, title) in zip(axes, panels):
        image, _, tumors = _triplet(slices[chosen[key]])
        _show_image(ax, image)
        _outline_tumors(ax, tumors, outline_width)
        burden = tumor_burden(_triplet(slices[chosen[key]])[1], tumors)
        ax.set_title(f"{title}\ntumour {100 * burden:.0f}% of kidney", fontsize=9)
    fig.suptitle("Abdominal MR images (tumours marked with red line)", fontsize=10)
    return fig


def figure3(image: np.ndarray, kidney_mask: np.ndarray, *, tumor_labels: np.ndarray | None = None,
            title: str | None = None, panel_size: float = 3.6) -> Figure:
    """Fig. 3: an abdominal MR slice (left) and its ground truth for training (right).

    The ground truth is the CU-Net target, the kidney mask including tumours (Section III.A.2);
    with ``tumor_labels`` the tumours are outlined in red on both panels.
    """
    image = np.asarray(image)
    kidney_mask = np.asarray(kidney_mask)
    if image.ndim != 2 or image.shape != kidney_mask.shape:
        raise ValueError(f"image and kidney_mask must be 2-D arrays of the same shape; got {image.shape} "
                         f"and {kidney_mask.shape}")
    fig = Figure(figsize=(2 * panel_size, panel_size + 0.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    _show_image(left, image)
    rows, cols = image.shape
    left.set_title(f"Abdominal MR image ({rows} x {cols})", fontsize=9)
    right.imshow(kidney_mask > 0, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    right.set_axis_off()
    right.set_title("Ground truth (kidney with tumours)", fontsize=9)
    if tumor_labels is not None:
        _outline_tumors(left, np.asarray(tumor_labels))
        _outline_tumors(right, np.asarray(tumor_labels))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig: Figure, path_without_ext: str | os.PathLike, dpi: int = FIGURE_DPI,
                formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` as PNG and PDF beside each other, atomically, at ``dpi``, without dates.

    Same figure, same bytes: the PDF has no CreationDate and neither file names the software.
    """
    base = Path(path_without_ext)
    written = []
    for fmt in formats:
        if fmt == "pdf":
            metadata: dict[str, Any] = {"Software": None, "Creator": None, "Producer": None, "CreationDate": None}
        elif fmt == "png":
            metadata = {"Software": None}
        else:
            raise ValueError(f"formats must be 'png' and/or 'pdf'; got {fmt!r}")
        target = base.with_name(base.name + "." + fmt)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=metadata)
        written.append(target)
    return written
