"""The tumour-stage comparison table of notebook 03 (issue 12): written by kts, undefined values "n/a"."""
import math

import pandas as pd

from kts import workflow


def test_tumor_stage_table_prints_undefined_as_na(tmp_path):
    comparison = pd.DataFrame([
        {"model": "Mask R-CNN (scratch)", "weighting": "pooled", "crops": 14, "tumors": 10, "tumor_dice": 0.0,
         "instance_f1": 0.0, "instance_precision": math.nan, "instance_recall": 0.0, "n_predicted": 0, "mask_ap": 0.0},
        {"model": "Mask R-CNN (pretrained)", "weighting": "t2", "crops": 4, "tumors": 3, "tumor_dice": 0.8123,
         "instance_f1": 0.8, "instance_precision": 1.0, "instance_recall": 0.6667, "n_predicted": 2, "mask_ap": 0.28},
    ])
    text = workflow.write_tumor_stage_table(comparison, tmp_path)
    assert (tmp_path / "tumor_stage.md").read_text() == text
    scratch = next(line for line in text.splitlines() if "scratch" in line)
    assert "n/a" in scratch and "nan" not in text.lower()
    assert "0.812" in text
    assert len(pd.read_csv(tmp_path / "tumor_stage.csv")) == 2
