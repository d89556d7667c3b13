"""Notebook 06's explorer: one test slice through the whole cascade of Fig. 4, with its scores beside it.

The CU-Net threshold drives the whole cascade: at each threshold the kidney mask is cut again
into kidney regions, the crops are cut again and the Mask R-CNN runs again on them (section
III.B; ``kts.cascade.run_cascade``, about 25 ms per crop), keeping detections above the Mask
R-CNN score threshold. The scores are those of the shown slice, computed by ``kts.metrics``
(pooled over the slice's pixels; undefined is "n/a", errata E37); tumour instances are matched
one-to-one at IoU >= 0.5 (``kts.metrics.match_instances``).

Everything but :class:`Explorer` is widget-free (tested in ``tests/test_explorer.py``):
:func:`cascade_slice`, :func:`slice_scores`, :func:`instance_rows`, :func:`outcome_map`,
:func:`view_figure`, :func:`scores_html`, :func:`instances_html` and :func:`threshold_grid`, the
static figure for readers without a live kernel. :class:`Explorer` lays them out with ipywidgets.
"""
from __future__ import annotations

import dataclasses
import html
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from kts import cascade, metrics
from kts.plots import _show_image

# What the student sees: the name of each layer (and of the widgets' check boxes).
LAYERS = {"image": "MR image", "ground_truth": "Ground truth (outlines)", "cunet": "CU-Net kidney",
          "maskrcnn": "Mask R-CNN tumours", "crops": "Kidney crops fed to Mask R-CNN"}
MODES = {"predictions": "Predictions", "outcome": "Outcome map (TP / FP / FN)"}
WEIGHTING_NAMES = {"t1_post": "T1 post-contrast", "t2": "T2", "t1_pre": "T1 pre-contrast"}
IOU_MATCH = 0.5  # an instance is found when it overlaps a true tumour with IoU >= 0.5 (kts.metrics)

# Colours (RGBA). Overlays: ground truth as outlines, predictions as fills.
GT_KIDNEY_COLOR = "lime"
GT_TUMOR_COLOR = "red"
CUNET_COLOR = (0.2, 0.4, 1.0, 0.35)
MASKRCNN_COLOR = (1.0, 0.6, 0.0, 0.6)
CROP_COLOR = "yellow"
# Outcome map: per pixel, prediction against ground truth.
OUTCOME_COLORS = {
    "kidney": {"TP": (0.30, 0.69, 0.29, 0.40), "FP": (1.00, 0.85, 0.18, 0.55), "FN": (0.00, 0.74, 0.83, 0.55)},
    "tumour": {"TP": (0.10, 0.47, 0.22, 0.85), "FP": (0.89, 0.10, 0.11, 0.85), "FN": (0.60, 0.31, 0.64, 0.85)},
}
OUTCOME_NAMES = {"TP": "correct (TP)", "FP": "false alarm (FP)", "FN": "missed (FN)"}
OUTCOME_CODES = {"TP": 1, "FP": 2, "FN": 3}  # outcome_map's values; 0 = neither predicted nor true


def _check_threshold(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
    return value


def weighting_name(weighting: str | None) -> str:
    """``"t1_post"`` -> ``"T1 post-contrast"`` (unknown names are shown as they are)."""
    return WEIGHTING_NAMES.get(str(weighting), str(weighting)) if weighting else ""


def slice_label(case_id: str, weighting: str | None = None, n_tumors: int | None = None,
                position: int | None = None, total: int | None = None) -> str:
    """What the slice chooser shows: ``"case-007 · T2 · 1 tumour (3 of 7)"``."""
    parts = [str(case_id)]
    if weighting:
        parts.append(weighting_name(weighting))
    if n_tumors is not None:
        parts.append("no tumour" if n_tumors == 0 else f"{n_tumors} tumour" + ("s" if n_tumors > 1 else ""))
    text = " · ".join(parts)
    if position is not None and total is not None:
        text += f" ({position + 1} of {total})"
    return text


# ----------------------------------------------------------------------------- the cascade on one slice

@dataclasses.dataclass
class SliceResult:
    """The cascade's output for one slice: kidney mask [H,W] (0/1), tumour label map [H,W] (instances 1..n),
    the instances (label, score, box, region) and the kidney regions (crops) Mask R-CNN saw."""

    kidney_pred: np.ndarray
    tumor_pred: np.ndarray
    instances: list[dict[str, Any]]
    regions: list[tuple[int, int, int, int]]
    threshold: float
    score_threshold: float


def cascade_slice(image, kidney_probability, maskrcnn, threshold: float = 0.5,
                  score_threshold: float | None = None) -> SliceResult:
    """Fig. 4 on one slice at a CU-Net ``threshold``: kidney regions and crops re-cut, Mask R-CNN re-run.

    ``maskrcnn`` is a trained :class:`kts.maskrcnn.TumorMaskRCNN` (or anything with ``predict`` and
    ``config.crop_size``); ``score_threshold`` None takes its own (chosen on validation crops).
    """
    threshold = _check_threshold(threshold, "the CU-Net threshold")
    if score_threshold is not None:
        score_threshold = float(score_threshold)
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"the Mask R-CNN score threshold must be in [0, 1], got {score_threshold!r}")
    image = np.asarray(image, np.float32)
    probability = np.asarray(kidney_probability, np.float32)
    if probability.ndim == 3 and probability.shape[-1] == 1:
        probability = probability[..., 0]
    if image.ndim != 2 or probability.shape != image.shape:
        raise ValueError(f"one slice [H, W] and its kidney probabilities of the same shape are needed; "
                         f"got {image.shape} and {probability.shape}")
    result = cascade.run_cascade(image[None], probability[None], maskrcnn, threshold=threshold,
                                 score_threshold=score_threshold)
    used = getattr(maskrcnn, "score_threshold", None) if score_threshold is None else score_threshold
    return SliceResult(kidney_pred=result.kidney_masks[0], tumor_pred=result.tumor_labels[0],
                       instances=result.instances[0], regions=list(result.regions[0]), threshold=threshold,
                       score_threshold=float(used) if used is not None else float("nan"))


# ----------------------------------------------------------------------------- scores

def slice_scores(kidney_pred, kidney_gt, tumor_pred, tumor_gt, iou_threshold: float = IOU_MATCH) -> dict:
    """The shown slice's figures of merit (``kts.metrics``; undefined values are NaN, shown "n/a").

    Kidney: ``kidney_iou``, ``kidney_dice`` and pixel counts ``kidney_tp/fp/fn``. Tumour:
    ``tumor_dice``, ``tumor_iou`` (pixels of all instances), instances ``instance_tp/fp/fn``,
    ``n_predicted``, ``n_gt``, ``instance_precision/recall/f1`` and ``matches``
    ``(predicted label, true label, IoU)`` at IoU >= ``iou_threshold``.
    """
    kidney_pred, kidney_gt = np.asarray(kidney_pred) > 0, np.asarray(kidney_gt) > 0
    counts = metrics.confusion(kidney_pred, kidney_gt)
    tumor = metrics.tumor_scores([np.asarray(tumor_pred)], [np.asarray(tumor_gt)], iou_threshold=iou_threshold)
    matched = metrics.match_instances(np.asarray(tumor_pred), np.asarray(tumor_gt), iou_threshold=iou_threshold)
    return {"kidney_iou": metrics.iou(kidney_pred, kidney_gt), "kidney_dice": metrics.dice(kidney_pred, kidney_gt),
            "kidney_tp": counts["tp"], "kidney_fp": counts["fp"], "kidney_fn": counts["fn"],
            "tumor_dice": tumor["dice"], "tumor_iou": tumor["iou"],
            "instance_tp": tumor["tp"], "instance_fp": tumor["fp"], "instance_fn": tumor["fn"],
            "n_predicted": tumor["n_predicted"], "n_gt": tumor["n_gt"],
            "instance_precision": tumor["instance_precision"], "instance_recall": tumor["instance_recall"],
            "instance_f1": tumor["instance_f1"], "matches": matched["matches"]}


def instance_rows(tumor_pred, tumor_gt, instances: Sequence[dict] = (), iou_threshold: float = IOU_MATCH
                  ) -> list[dict]:
    """One row per tumour instance: matched pairs with their IoU, then false alarms, then missed tumours.

    Each row: ``outcome`` ("found", "false alarm", "missed"), ``predicted`` (label or None), ``score``
    (the Mask R-CNN's, from ``instances``), ``true`` (label or None) and ``iou`` (of the pair; for an
    unmatched instance its best overlap with any instance of the other side, 0 if none).
    """
    pred, gt = np.asarray(tumor_pred), np.asarray(tumor_gt)
    matched = metrics.match_instances(pred, gt, iou_threshold=iou_threshold)["matches"]
    scores = {int(r["label"]): float(r["score"]) for r in instances}
    pred_ids = [int(i) for i in np.unique(pred) if i != 0]
    gt_ids = [int(i) for i in np.unique(gt) if i != 0]

    def best(label, mine, others):
        return max((metrics.iou(mine == label, others == o) for o in np.unique(others) if o != 0), default=0.0)

    rows = [{"outcome": "found", "predicted": p, "score": scores.get(p), "true": g, "iou": v}
            for p, g, v in sorted(matched, key=lambda m: m[0])]
    done_p, done_g = {m[0] for m in matched}, {m[1] for m in matched}
    rows += [{"outcome": "false alarm", "predicted": p, "score": scores.get(p), "true": None,
              "iou": best(p, pred, gt)} for p in pred_ids if p not in done_p]
    rows += [{"outcome": "missed", "predicted": None, "score": None, "true": g, "iou": best(g, gt, pred)}
             for g in gt_ids if g not in done_g]
    return rows


def outcome_map(pred, gt) -> np.ndarray:
    """Per pixel: 1 correct (TP, predicted and true), 2 false alarm (FP), 3 missed (FN), 0 neither (uint8)."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    out = np.zeros(pred.shape, np.uint8)
    out[pred & gt] = OUTCOME_CODES["TP"]
    out[pred & ~gt] = OUTCOME_CODES["FP"]
    out[~pred & gt] = OUTCOME_CODES["FN"]
    return out


# ----------------------------------------------------------------------------- the picture

def _layers(layers) -> dict[str, bool]:
    chosen = {name: True for name in LAYERS} if layers is None else {name: False for name in LAYERS}
    if layers is not None:
        items = layers.items() if isinstance(layers, dict) else ((name, True) for name in layers)
        for name, on in items:
            if name not in LAYERS:
                raise ValueError(f"unknown layer {name!r}; choose from {list(LAYERS)}")
            chosen[name] = bool(on)
    return chosen


def _fill(ax, mask, color) -> None:
    overlay = np.zeros(np.shape(mask) + (4,))
    overlay[np.asarray(mask, bool)] = color
    ax.imshow(overlay, interpolation="nearest")


def _legend_handles(layers: dict[str, bool], mode: str) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    if layers["ground_truth"] and mode == "predictions":
        handles += [Line2D([], [], color=GT_KIDNEY_COLOR, lw=1.5, label="true kidney"),
                    Line2D([], [], color=GT_TUMOR_COLOR, lw=1.5, label="true tumour")]
    if mode == "predictions":
        if layers["cunet"]:
            handles.append(Patch(color=CUNET_COLOR, label="CU-Net kidney"))
        if layers["maskrcnn"]:
            handles.append(Patch(color=MASKRCNN_COLOR, label="Mask R-CNN tumour"))
    else:
        for organ, on in (("kidney", layers["cunet"]), ("tumour", layers["maskrcnn"])):
            if on:
                handles += [Patch(color=OUTCOME_COLORS[organ][k], label=f"{organ} {OUTCOME_NAMES[k]}")
                            for k in ("TP", "FP", "FN")]
    if layers["crops"] and layers["maskrcnn"]:
        handles.append(Patch(facecolor="none", edgecolor=CROP_COLOR, linestyle="--", label="kidney crop"))
    return handles


def draw_slice(ax, image, kidney_gt, tumor_gt, kidney_pred, tumor_pred, *, layers=None, mode: str = "predictions",
               regions: Sequence[Sequence[int]] = ()) -> list:
    """Draw one slice with the chosen layers on ``ax``; returns the legend handles of what was drawn.

    ``mode="predictions"``: CU-Net kidney in blue, Mask R-CNN tumours in orange (each numbered), ground truth
    as outlines (kidney green, tumours red). ``mode="outcome"``: each prediction coloured against the ground
    truth, pixel by pixel: correct (TP), false alarm (FP), missed (FN) - kidney light, tumour dark.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    layers = _layers(layers)
    image = np.asarray(image)
    ax.set_axis_off()
    if layers["image"]:
        _show_image(ax, image)
    else:
        ax.imshow(np.zeros(image.shape), cmap="gray", vmin=0, vmax=1)
    kidney_gt, tumor_gt = np.asarray(kidney_gt), np.asarray(tumor_gt)
    kidney_pred, tumor_pred = np.asarray(kidney_pred), np.asarray(tumor_pred)
    if mode == "predictions":
        if layers["cunet"]:
            _fill(ax, kidney_pred > 0, CUNET_COLOR)
        if layers["maskrcnn"]:
            _fill(ax, tumor_pred > 0, MASKRCNN_COLOR)
        if layers["ground_truth"]:
            if np.any(kidney_gt):
                ax.contour((kidney_gt > 0).astype(np.float32), levels=[0.5], colors=GT_KIDNEY_COLOR, linewidths=1.0)
            for label in np.unique(tumor_gt):
                if label:
                    ax.contour((tumor_gt == label).astype(np.float32), levels=[0.5], colors=GT_TUMOR_COLOR,
                               linewidths=1.0)
    else:
        for organ, on, pred, gt in (("kidney", layers["cunet"], kidney_pred, kidney_gt),
                                    ("tumour", layers["maskrcnn"], tumor_pred, tumor_gt)):
            if on:
                codes = outcome_map(pred, gt)
                for key, code in OUTCOME_CODES.items():
                    _fill(ax, codes == code, OUTCOME_COLORS[organ][key])
    if layers["crops"] and layers["maskrcnn"]:
        from matplotlib.patches import Rectangle

        for y0, x0, y1, x1 in regions:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=CROP_COLOR,
                                   linestyle="--", linewidth=1.0))
    if layers["maskrcnn"]:
        for label in np.unique(tumor_pred):
            if label:
                rows, cols = np.nonzero(tumor_pred == label)
                ax.annotate(str(int(label)), (cols.max() + 1, rows.min()), color="white", fontsize=8,
                            fontweight="bold", xytext=(2, 2), textcoords="offset points")
    return _legend_handles(layers, mode)


def view_figure(image, kidney_gt, tumor_gt, kidney_pred, tumor_pred, *, layers=None, mode: str = "predictions",
                regions: Sequence[Sequence[int]] = (), title: str = "",
                panel_size: float = 4.2) -> Figure:
    """The explorer's picture: one slice, the chosen layers, and a colour legend below it."""
    fig = Figure(figsize=(panel_size, panel_size + 0.9), layout="constrained")
    ax = fig.subplots()
    handles = draw_slice(ax, image, kidney_gt, tumor_gt, kidney_pred, tumor_pred, layers=layers, mode=mode,
                         regions=regions)
    if title:
        ax.set_title(title, fontsize=9)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=7, frameon=False)
    return fig


# ----------------------------------------------------------------------------- the text beside it

def scores_html(scores: dict, *, case: str = "", threshold: float | None = None,
                score_threshold: float | None = None, layers=None) -> str:
    """The scores beside the picture, as HTML: the case, then the scores of the switched-on predictions.

    Each score sits in an element of class ``kts-<name>`` (``kts-kidney-iou``, ``kts-tumor-dice``, ...)."""
    layers = _layers(layers)

    def section(head):
        return f"<tr><th colspan=2 style='text-align:left;padding-top:.5em'>{head}</th></tr>"

    def row(name, label, value):
        return (f"<tr><td>{html.escape(label)}</td>"
                f"<td class='kts-{name}' style='text-align:right;padding-left:1em'><b>{value}</b></td></tr>")

    parts = ["<div class='kts-scores' style='font-size:13px;line-height:1.4'>"]
    if case:
        parts.append(f"<div><b>Case</b> <span class='kts-case'>{html.escape(case)}</span></div>")
    parts.append("<table>")
    if layers["cunet"]:
        head = "CU-Net kidney" + (f" (threshold {threshold:.2f})" if threshold is not None else "")
        parts.append(section(html.escape(head)))
        parts.append(row("kidney-iou", "kidney IoU", metrics.format_metric(scores["kidney_iou"])))
        parts.append(row("kidney-dice", "kidney Dice", metrics.format_metric(scores["kidney_dice"])))
        parts.append(row("kidney-pixels", "pixels correct / false alarm / missed",
                         f"{scores['kidney_tp']} / {scores['kidney_fp']} / {scores['kidney_fn']}"))
    if layers["maskrcnn"]:
        head = "Mask R-CNN tumours" + (f" (score &ge; {score_threshold:.2f})" if score_threshold is not None else "")
        parts.append(section(head))
        parts.append(row("tumor-dice", "tumour Dice", metrics.format_metric(scores["tumor_dice"])))
        parts.append(row("tumor-iou", "tumour IoU", metrics.format_metric(scores["tumor_iou"])))
        parts.append(row("tumours-found", "true tumours found",
                         f"{scores['instance_tp']} of {scores['n_gt']}"))
        parts.append(row("false-alarms", "false alarms", str(scores["instance_fp"])))
    if not (layers["cunet"] or layers["maskrcnn"]):
        parts.append("<tr><td><i>Switch on CU-Net or Mask R-CNN to see their scores.</i></td></tr>")
    parts.append("</table>")
    parts.append("<div style='color:#666;font-size:11px'>Scores of this slice; n/a: nothing predicted "
                 "and nothing to find.</div></div>")
    return "".join(parts)


def instances_html(rows: Sequence[dict]) -> str:
    """The tumour instances, matched (with their IoU), false alarms and missed, as an HTML table."""
    if not rows:
        return ("<div class='kts-instances' style='font-size:13px'><b>Tumour instances</b><br>"
                "<i>none predicted, none in the ground truth</i></div>")
    body = []
    for r in rows:
        predicted = "-" if r["predicted"] is None else f"{r['predicted']}"
        score = "" if r["score"] is None else f"{r['score']:.2f}"
        true = "-" if r["true"] is None else f"{r['true']}"
        body.append(f"<tr class='kts-instance'><td>{predicted}</td><td>{score}</td><td>{true}</td>"
                    f"<td>{metrics.format_metric(r['iou'])}</td><td>{html.escape(r['outcome'])}</td></tr>")
    return ("<div class='kts-instances' style='font-size:13px'><b>Tumour instances</b> "
            f"(found = IoU &ge; {IOU_MATCH:g} with a true tumour)"
            "<table><tr><th>Mask R-CNN #</th><th>score</th><th>true #</th><th>IoU</th><th></th></tr>"
            + "".join(body) + "</table></div>")


# ----------------------------------------------------------------------------- the static grid

def threshold_grid(image, kidney_gt, tumor_gt, kidney_probability, maskrcnn,
                   thresholds: Sequence[float] = (0.3, 0.5, 0.7), *, score_threshold: float | None = None,
                   mode: str = "predictions", layers=None, case: str = "", panel_size: float = 3.2) -> Figure:
    """The explorer without a kernel: one slice through the cascade at several CU-Net thresholds.

    Each panel re-runs the whole cascade (:func:`cascade_slice`) and names its kidney IoU and tumour
    Dice; one colour legend for all panels.
    """
    thresholds = [_check_threshold(t, "each threshold") for t in thresholds]
    if not thresholds:
        raise ValueError("threshold_grid needs at least one threshold")
    fig = Figure(figsize=(len(thresholds) * panel_size, panel_size + 1.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(thresholds)))
    handles = []
    for ax, t in zip(axes, thresholds):
        res = cascade_slice(image, kidney_probability, maskrcnn, t, score_threshold)
        sc = slice_scores(res.kidney_pred, kidney_gt, res.tumor_pred, tumor_gt)
        handles = draw_slice(ax, image, kidney_gt, tumor_gt, res.kidney_pred, res.tumor_pred, layers=layers,
                             mode=mode, regions=res.regions)
        ax.set_title(f"CU-Net threshold {t:.2f}\nkidney IoU {metrics.format_metric(sc['kidney_iou'])}, "
                     f"tumour Dice {metrics.format_metric(sc['tumor_dice'])}", fontsize=9)
    if case:
        fig.suptitle(case, fontsize=10)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8,
                   frameon=False)
    return fig


# ----------------------------------------------------------------------------- the widget

class Explorer:
    """The interactive explorer of notebook 06 (ipywidgets): choose a test slice and thresholds, toggle layers.

    ``images``, ``kidney_gt``, ``tumor_gt`` and ``probabilities`` (the CU-Net's sigmoid output) hold the
    test slices, ``index`` the one shown first; ``maskrcnn`` re-runs on the crops each time the CU-Net threshold moves. ``labels`` names
    each slice in the chooser (default: its number). ``widget`` is what a notebook displays; ``update()``
    redraws (the controls call it, with ``continuous_update=False`` on the sliders).
    """

    def __init__(self, images, kidney_gt, tumor_gt, probabilities, maskrcnn, *, labels: Sequence[str] | None = None,
                 threshold: float = 0.5, score_threshold: float | None = None, index: int = 0):
        import ipywidgets as widgets

        self.images, self.kidney_gt, self.tumor_gt = images, kidney_gt, tumor_gt
        self.probabilities, self.maskrcnn = probabilities, maskrcnn
        n = len(images)
        if not (len(kidney_gt) == len(tumor_gt) == len(probabilities) == n) or n == 0:
            raise ValueError("the explorer needs as many images, kidney masks, tumour maps and probabilities, "
                             "at least one of each")
        self.labels = list(labels) if labels is not None else [f"slice {i + 1} of {n}" for i in range(n)]
        if len(self.labels) != n:
            raise ValueError(f"{len(self.labels)} labels for {n} slices")
        if score_threshold is None:
            score_threshold = getattr(maskrcnn, "score_threshold", 0.5)
        self._cache: dict[tuple, SliceResult] = {}
        style, wide = {"description_width": "initial"}, widgets.Layout(width="420px")
        if not 0 <= int(index) < n:
            raise ValueError(f"slice index {index!r} is outside the {n} test slices (0 to {n - 1})")
        self.slice = widgets.Dropdown(options=[(label, i) for i, label in enumerate(self.labels)], value=int(index),
                                      description="Test slice:", style=style, layout=widgets.Layout(width="460px"))
        self.threshold = widgets.FloatSlider(value=round(float(threshold), 2), min=0.05, max=0.95, step=0.05,
                                             description="CU-Net threshold (kidney):", continuous_update=False,
                                             readout_format=".2f", style=style, layout=wide)
        self.score_threshold = widgets.FloatSlider(value=round(float(score_threshold), 2), min=0.05, max=0.95,
                                                   step=0.05, description="Mask R-CNN minimum score (tumours):",
                                                   continuous_update=False, readout_format=".2f", style=style,
                                                   layout=wide)
        self.layers = {name: widgets.Checkbox(value=True, description=text, indent=False,
                                              layout=widgets.Layout(width="auto"))
                       for name, text in LAYERS.items()}
        self.mode = widgets.RadioButtons(options=[(text, key) for key, text in MODES.items()], value="predictions",
                                         description="Colour by:", style=style)
        self.view = widgets.Output(layout=widgets.Layout(min_width="430px"))
        self.scores = widgets.HTML()
        self.instances = widgets.HTML()
        for w, name in ((self.view, "view"), (self.scores, "scores"), (self.instances, "instances"),
                        (self.threshold, "threshold"), (self.score_threshold, "score-threshold"),
                        (self.slice, "slice"), (self.mode, "mode")):
            w.add_class(f"kts-explorer-{name}")
        for name, box in self.layers.items():
            box.add_class(f"kts-explorer-layer-{name}")
        self.widget = widgets.VBox([
            self.slice,
            widgets.HBox([self.threshold, self.score_threshold]),
            widgets.HBox(list(self.layers.values())),
            self.mode,
            widgets.HBox([self.view, widgets.VBox([self.scores, self.instances],
                                                  layout=widgets.Layout(padding="0 0 0 12px"))]),
        ])
        self.widget.add_class("kts-explorer")
        for control in (self.slice, self.threshold, self.score_threshold, self.mode, *self.layers.values()):
            control.observe(lambda _change: self.update(), names="value")
        self.last_scores: dict = {}
        self.update()

    def result(self, index: int, threshold: float, score_threshold: float) -> SliceResult:
        """The cascade on slice ``index`` (cached per thresholds: moving back costs nothing)."""
        key = (int(index), round(float(threshold), 4), round(float(score_threshold), 4))
        if key not in self._cache:
            self._cache[key] = cascade_slice(self.images[index], self.probabilities[index], self.maskrcnn,
                                             threshold, score_threshold)
        return self._cache[key]

    def update(self) -> dict:
        """Re-run the cascade for the chosen slice and thresholds, redraw, and show the scores.

        Runs inside the picture's Output widget, so that an error shows there as a traceback (in a
        kernel) instead of vanishing into the kernel's log."""
        from IPython.display import display

        with self.view:
            i, t, s = self.slice.value, self.threshold.value, self.score_threshold.value
            layers = {name: box.value for name, box in self.layers.items()}
            res = self.result(i, t, s)
            scores = slice_scores(res.kidney_pred, self.kidney_gt[i], res.tumor_pred, self.tumor_gt[i])
            fig = view_figure(self.images[i], self.kidney_gt[i], self.tumor_gt[i], res.kidney_pred,
                              res.tumor_pred, layers=layers, mode=self.mode.value, regions=res.regions)
            self.scores.value = scores_html(scores, case=self.labels[i], threshold=t, score_threshold=s,
                                            layers=layers)
            self.instances.value = (instances_html(instance_rows(res.tumor_pred, self.tumor_gt[i], res.instances))
                                    if layers["maskrcnn"] else "")
            self.view.clear_output(wait=True)
            display(fig)
            self.last_scores = {"slice": int(i), "case": self.labels[i], "threshold": float(t),
                                "score_threshold": float(s),
                                **{k: v for k, v in scores.items() if k != "matches"}}
        return self.last_scores

    @classmethod
    def from_dataset(cls, test, probabilities, maskrcnn, **kwargs) -> "Explorer":
        """The explorer on a :class:`kts.data.Dataset` of test slices, each named by case, weighting and tumours."""
        labels = dataset_labels(test)
        return cls(test.images, test.kidney_masks, test.tumor_labels, probabilities, maskrcnn, labels=labels,
                   **kwargs)


def dataset_labels(test) -> list[str]:
    """``slice_label`` for every slice of a :class:`kts.data.Dataset` (case id, MR weighting, tumour count)."""
    index, n = test.index, len(test)
    return [slice_label(row["case_id"], row.get("weighting"),
                        len([t for t in np.unique(test.tumor_labels[i]) if t != 0]), i, n)
            for i, row in enumerate(index.to_dict("records"))]
