"""Figures say what their colours mean (issue 13: Figure 5 had no legend)."""
import numpy as np

from kts import plots


def test_figure5_has_panel_titles_and_a_legend_for_fill_and_outline():
    images = np.full((2, 48, 48), 100.0)
    kidney = np.zeros((2, 48, 48), dtype=np.uint8)
    kidney[:, 10:30, 10:30] = 1
    tumor = np.zeros((2, 48, 48), dtype=np.int32)
    tumor[:, 14:20, 14:20] = 1
    fig = plots.figure5(images, kidney, kidney, tumor, tumor_gt=tumor, titles=["case-a", "case-b"])
    assert [ax.get_title() for ax in fig.axes[:4]] == ["Input MR image", "Ground-truth mask",
                                                      "CU-Net kidney segment", "Mask R-CNN tumour lineation"]
    # the row titles (case ids) are y-labels of the first column: they show only while its axis is on
    assert [(ax.get_ylabel(), ax.axison) for ax in fig.axes[::4]] == [("case-a", True), ("case-b", True)]
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert any("fill" in label for label in labels) and any("outline" in label for label in labels)
    without_truth = plots.figure5(images, kidney, kidney, tumor)
    assert [t.get_text() for t in without_truth.legends[0].get_texts()] == labels[:1]


def test_table1_figure_draws_the_paper_beside_ours_with_spreads():
    import pandas as pd
    import pytest

    table = pd.DataFrame({"partition": ["TD-70% VD-6%", "TD-60% VD-20%"], "paper_iou": [0.875, 0.831],
                          "paper_accuracy": [0.912, 0.819], "iou_mean": [0.8, 0.7], "iou_sd": [0.02, 0.03],
                          "tumor_iou_mean": [0.6, 0.5], "tumor_iou_sd": [float("nan")] * 2,
                          "accuracy_mean": [0.99, 0.98], "accuracy_in_kidney_mean": [0.97, 0.96],
                          "tumor_dice_mean": [0.9, 0.8]})
    fig = plots.table1_figure(table)
    iou_axes, accuracy_axes = fig.axes
    heights = [[round(b.get_height(), 3) for b in c] for c in iou_axes.containers if hasattr(c, "patches")]
    assert heights == [[0.875, 0.831], [0.8, 0.7], [0.6, 0.5]]
    assert sum(1 for c in accuracy_axes.containers if hasattr(c, "patches")) == 4
    assert [t.get_text() for t in iou_axes.get_legend().get_texts()][0] == "paper"
    assert any(c.has_yerr for c in iou_axes.containers if hasattr(c, "has_yerr"))  # the s.d. over seeds
    with pytest.raises(ValueError, match="missing columns"):
        plots.table1_figure(table.drop(columns="paper_iou"))
