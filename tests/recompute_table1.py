"""Recompute Table I's numbers from the saved test-set predictions, independently of kts.

Usage: python tests/recompute_table1.py RESULTS_DIR
Reads ``RESULTS_DIR/predictions/<partition>-seed<k>.npz`` and ``RESULTS_DIR/table1_runs.csv``
with numpy and the csv module only (no kts code), recomputes kidney IoU, pixel accuracy,
kidney Dice and tumour Dice pooled over the test pixels, and exits non-zero if any differs
from the table by more than 1e-3. Undefined values (nothing predicted and nothing to find)
are NaN, as in kts.metrics (errata E37): the table must then be NaN (empty in the CSV) too.
"""
import csv
import sys
from pathlib import Path

import numpy as np


def pooled(pred: np.ndarray, gt: np.ndarray) -> dict:
    pred, gt = pred.astype(bool), gt.astype(bool)
    tp = np.sum(pred & gt)
    fp = np.sum(pred & ~gt)
    fn = np.sum(~pred & gt)
    tn = pred.size - tp - fp - fn
    iou = tp / (tp + fp + fn) if tp + fp + fn else float("nan")
    dice = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"iou": iou, "dice": dice, "accuracy": (tp + tn) / pred.size}


def recompute(results: Path) -> list[str]:
    problems = []
    with open(results / "table1_runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return ["table1_runs.csv has no rows"]
    for row in rows:
        npz = np.load(results / "predictions" / f"{row['slug']}-seed{row['seed']}.npz")
        kidney = pooled(npz["kidney_pred"], npz["kidney_gt"])
        tumor = pooled(npz["tumor_pred"] > 0, npz["tumor_gt"] > 0)
        ours = {"iou": kidney["iou"], "accuracy": kidney["accuracy"], "kidney_dice": kidney["dice"],
                "tumor_dice": tumor["dice"]}
        for key, value in ours.items():
            table = float(row[key]) if row[key] not in ("", "nan", "NaN") else float("nan")
            if np.isnan(table) and np.isnan(value):
                continue
            if np.isnan(table) or np.isnan(value) or abs(table - value) > 1e-3:
                problems.append(f"{row['slug']} seed {row['seed']}: {key} table {row[key]} recomputed {value:.4f}")
    return problems


if __name__ == "__main__":
    found = recompute(Path(sys.argv[1]))
    print("\n".join(found) or "all Table I numbers recomputed")
    sys.exit(1 if found else 0)
