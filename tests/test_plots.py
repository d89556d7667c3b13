"""Figures say what their colours mean (issue 13: Figure 5 had no legend)."""
import numpy as np

from kts import plots


def test_figure5_has_panel_titles_and_a_legend_for_fill_and_outline():
    images = np.full((2, 48, 48), 100.0)
    kidney = np.zeros((2, 48, 48), dtype=np.uint8)
    kidney[:, 10:30, 10:30] = 1
    tumour = np.zeros((2, 48, 48), dtype=np.int32)
    tumour[:, 14:20, 14:20] = 1
    fig = plots.figure5(images, kidney, kidney, tumour, tumor_gt=tumour, titles=["case-a", "case-b"])
    assert [ax.get_title() for ax in fig.axes[:4]] == ["Input MR image", "Ground-truth mask",
                                                      "CU-Net kidney segment", "Mask R-CNN tumour lineation"]
    # the row titles (case ids) are y-labels of the first column: they show only while its axis is on
    assert [(ax.get_ylabel(), ax.axison) for ax in fig.axes[::4]] == [("case-a", True), ("case-b", True)]
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert any("fill" in label for label in labels) and any("outline" in label for label in labels)
    without_truth = plots.figure5(images, kidney, kidney, tumour)
    assert [t.get_text() for t in without_truth.legends[0].get_texts()] == labels[:1]
