"""The paper's figures, drawn from arrays (never from file paths).

Figure 1 (Section I): kidneys with no, mild and moderate tumour, tumours outlined in red.
Figure 3 (Section III.A): an abdominal MR slice (left) and its ground truth for training (right).
``save_figure`` writes PNG and PDF atomically at a fixed dpi with dates stripped, so the same
figure gives the same bytes. Figures are ``matplotlib.figure.Figure`` objects built without
pyplot (no global state, any backend). No matplotlib backend shows such figures by itself, so
importing this module inside an IPython kernel (JupyterLab, classic Notebook, papermill) registers
a PNG formatter for them (:func:`show_inline`): a figure that is a cell's last value, or that is
passed to ``display``, appears once as an ``image/png`` output at ``INLINE_DPI``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from kts.io import atomic_path
from kts.metrics import BURDEN_MILD_MAX, BURDEN_MODERATE_MAX, tumor_burden

FIGURE_DPI = 150
INLINE_DPI = 100  # figures shown in a notebook: modest, so executed notebooks stay small
TUMOR_COLOR = "red"


def _inline_png(fig: Figure) -> str | None:
    """The base64 PNG a notebook shows for ``fig``: INLINE_DPI, cropped to the drawing, no software tag."""
    from IPython.core.pylabtools import print_figure

    return print_figure(fig, fmt="png", base64=True, bbox_inches="tight", dpi=INLINE_DPI,
                        metadata={"Software": None})


def show_inline(shell: Any = None) -> bool:
    """Make ``shell`` (default: the running IPython kernel) display ``Figure`` objects as PNG.

    Called when this module is imported. kts builds figures without pyplot, so neither
    ``matplotlib_inline`` (which registers its formatter only once pyplot loads with the inline
    backend) nor ``MPLBACKEND=Agg`` (``kts run``) shows them: without a formatter a cell prints
    ``<Figure size ...>``. A figure format the user already chose (``%matplotlib inline``,
    ``InlineBackend.figure_formats``) is kept. Returns whether a shell now shows figures.
    """
    if shell is None:
        ipython = sys.modules.get("IPython")
        shell = ipython.get_ipython() if ipython is not None else None
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", None)
    if not formatters or "image/png" not in formatters:
        return False
    for mime in ("image/png", "image/svg+xml", "image/jpeg", "application/pdf"):
        if mime in formatters:
            try:
                formatters[mime].lookup_by_type(Figure)
                return True  # a figure format is already set: keep it (one image per figure)
            except KeyError:
                pass
    formatters["image/png"].for_type(Figure, _inline_png)
    return True


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


def _show_image(ax, image: np.ndarray, keep_labels: bool = False) -> None:
    """Grey-scale display at robust percentiles; no ticks or frame. ``keep_labels`` keeps the axis on
    (ticks and spines hidden) so that a y-label (a row title) still shows: ``set_axis_off`` hides it."""
    lo, hi = _display_range(image)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    if not keep_labels:
        ax.set_axis_off()
        return
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


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


# --- Figure 6 (section IV): CU-Net accuracy and loss per epoch ---------------------------------

def figure6(history, *, panel_size: float = 4.0) -> Figure:
    """Accuracy and loss per epoch, training and validation (Fig. 6), from the CSV history of ``kts.train``."""
    columns = set(getattr(history, "columns", []))
    needed = {"epoch", "accuracy", "val_accuracy", "loss", "val_loss"}
    if not needed <= columns:
        raise ValueError(f"figure 6 needs history columns {sorted(needed)}; got {sorted(columns)}")
    fig = Figure(figsize=(2 * panel_size, 0.8 * panel_size), layout="constrained")
    for ax, key, title in zip(fig.subplots(1, 2), ("accuracy", "loss"), ("Accuracy", "Loss")):
        ax.plot(history["epoch"], history[key], marker="o", ms=3, label="training")
        ax.plot(history["epoch"], history[f"val_{key}"], marker="s", ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(f"CU-Net {title.lower()} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


# --- Figure 5 (section IV): input, ground truth, CU-Net kidney segment, Mask R-CNN tumours ---

def figure5(images, kidney_gt, kidney_pred, tumor_pred, *, tumor_gt=None, titles: Sequence[str] | None = None,
            panel_size: float = 2.6) -> Figure:
    """Figure 5's layout, one row per slice: input MR, ground-truth mask, the CU-Net kidney segment
    (the image inside the predicted kidney mask) and the Mask R-CNN tumour lineation (instances in
    colour, ground-truth tumours outlined in red when ``tumor_gt`` is given), a legend saying which is which."""
    images = np.asarray(images)
    n = len(images)
    if n == 0:
        raise ValueError("figure 5 needs at least one slice")
    for name, arr in (("kidney_gt", kidney_gt), ("kidney_pred", kidney_pred), ("tumor_pred", tumor_pred)):
        if np.shape(arr) != images.shape:
            raise ValueError(f"{name} has shape {np.shape(arr)}, images have {images.shape}")
    fig = Figure(figsize=(4 * panel_size, n * panel_size), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n, 4))
    headers = ("Input MR image", "Ground-truth mask", "CU-Net kidney segment", "Mask R-CNN tumour lineation")
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    for row in range(n):
        image = images[row]
        segment = np.where(np.asarray(kidney_pred[row]) > 0, image, 0)
        panels = (image, np.asarray(kidney_gt[row]) > 0, segment, segment)
        for col, ax in enumerate(axes[row]):
            if col == 1:
                ax.imshow(panels[col], cmap="gray", interpolation="nearest")
                ax.set_axis_off()
            else:
                _show_image(ax, panels[col], keep_labels=col == 0)  # column 0 carries the row's title
            if row == 0:
                ax.set_title(headers[col], fontsize=9)
        labels = np.asarray(tumor_pred[row])
        overlay = np.zeros(labels.shape + (4,))
        for k, label in enumerate(np.unique(labels[labels > 0])):
            overlay[labels == label] = (*cmap(k % 10)[:3], 0.55)
        axes[row, 3].imshow(overlay, interpolation="nearest")
        if tumor_gt is not None:
            _outline_tumors(axes[row, 3], np.asarray(tumor_gt[row]))
        if titles is not None:
            axes[row, 0].set_ylabel(titles[row], fontsize=8)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=cmap(0)[:3], alpha=0.55, label="Mask R-CNN tumour (fill; one colour per instance)")]
    if tumor_gt is not None:
        handles.append(Line2D([], [], color=TUMOR_COLOR, lw=1.0, label="ground-truth tumour (outline)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    return fig


def training_curves(history: Sequence[dict], keys: Sequence[str], *, title: str = "",
                    panel_size: float = 4.0) -> Figure:
    """Loss curves per step (e.g. Mask R-CNN's total, RPN, Fast R-CNN and mask losses)."""
    if not history:
        raise ValueError("training_curves needs a non-empty history")
    fig = Figure(figsize=(1.6 * panel_size, 0.9 * panel_size), layout="constrained")
    ax = fig.subplots()
    steps = [h["step"] for h in history]
    for key in keys:
        ax.plot(steps, [h.get(key, np.nan) for h in history], label=key, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def crop_grid(crops, label_maps, *, columns: int = 4, panel_size: float = 1.8) -> Figure:
    """Kidney crops with their tumour instances outlined (the Mask R-CNN's training inputs)."""
    crops = np.asarray(crops)
    if len(crops) == 0:
        raise ValueError("crop_grid needs at least one crop")
    rows = -(-len(crops) // columns)
    fig = Figure(figsize=(columns * panel_size, rows * panel_size), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, crop, labels in zip(axes, crops, label_maps):
        _show_image(ax, crop)
        _outline_tumors(ax, np.asarray(labels))
    return fig


def contrasts_figure(images: Sequence[np.ndarray], kidney_masks: Sequence[np.ndarray], titles: Sequence[str], *,
                     panel_size: float = 3.0) -> Figure:
    """One slice per MR weighting, kidney ground truth outlined (section III.A: intensity varies by scanner)."""
    if not (len(images) == len(kidney_masks) == len(titles)) or not len(images):
        raise ValueError("contrasts_figure needs as many images, kidney masks and titles, at least one of each")
    fig = Figure(figsize=(len(images) * panel_size, panel_size + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(images)))
    for ax, image, mask, title in zip(axes, images, kidney_masks, titles):
        _show_image(ax, np.asarray(image))
        ax.contour((np.asarray(mask) > 0).astype(np.float32), levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_title(title, fontsize=9)
    return fig


def table1_figure(table, *, width: float = 10.0) -> Figure:
    """Table I as bars, one group per partition (section IV): the paper's IoU and accuracy beside ours.

    ``table`` is ``kts.study.table1_from_runs`` output. Left: IoU (paper; ours, kidney stage; ours,
    tumour). Right: accuracy (paper; ours over whole slices, which background flatters; ours inside
    the kidney) and, as the foreground measure kts adds, the tumour Dice. Error bars: s.d. over seeds
    where there are several.
    """
    import pandas as pd

    table = pd.DataFrame(table)
    needed = {"partition", "paper_iou", "paper_accuracy", "iou_mean", "tumor_iou_mean", "accuracy_mean",
              "accuracy_in_kidney_mean", "tumor_dice_mean"}
    missing = sorted(needed - set(table.columns))
    if missing or table.empty:
        raise ValueError(f"table1_figure needs kts.study.table1_from_runs output; missing columns {missing}"
                         if missing else "table1_figure got an empty table")
    panels = (("IoU", [("paper", "paper_iou"), ("ours: kidney stage", "iou"), ("ours: tumour", "tumor_iou")]),
              ("accuracy and Dice", [("paper accuracy", "paper_accuracy"), ("ours: accuracy, whole slice", "accuracy"),
                                     ("ours: accuracy in the kidney", "accuracy_in_kidney"),
                                     ("ours: tumour Dice", "tumor_dice")]))
    fig = Figure(figsize=(width, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    x = np.arange(len(table))
    for ax, (title, bars) in zip(axes, panels):
        step = 0.8 / len(bars)
        for k, (label, key) in enumerate(bars):
            column = key if key.startswith("paper") else f"{key}_mean"
            sd = table.get(f"{key}_sd") if not key.startswith("paper") else None
            errors = None if sd is None or sd.isna().all() else sd.fillna(0.0).to_numpy()
            ax.bar(x + (k - (len(bars) - 1) / 2) * step, table[column].to_numpy(float), step, yerr=errors,
                   label=label, color="0.6" if key.startswith("paper") else None, capsize=2)
        ax.set_xticks(x, [str(p).replace(" VD", "\nVD") for p in table["partition"]], fontsize=8)
        ax.set_ylim(0.0, 1.05)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("score on the test slices")
    return fig


show_inline()
