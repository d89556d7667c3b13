"""The Table I split study: the four train/validation partitions, each over several seeds.

Table I reports IoU and accuracy for TD-70%/VD-6%, TD-75%/VD-8%, TD-65%/VD-15% and
TD-60%/VD-20% (test = the rest). For each partition and seed kts trains the whole cascade
(CU-Net, then Mask R-CNN on kidney crops), runs it on the test cases and scores it.
A finished partition-seed leaves ``metrics.json`` behind and is never retrained, so an
interrupted paper-profile run continues where it stopped (``kts.runs``: a record scored under an
older rule, ``kts.metrics.SCORING``, is scored again from its saved models, not retrained). The
paper's values appear only as the reference column.

Every figure is pooled over a run's test slices (``kts.metrics``' rule, errata E37); the table
gives its mean over seeds and the seeds' s.d., which is undefined ("n/a") with one seed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from kts import io as kts_io
from kts.config import Profile

if TYPE_CHECKING:
    import pandas as pd

PAPER_TABLE1 = {
    # partition: (IoU, accuracy) as printed in Table I of the paper - the reference column only
    "TD-70% VD-6%": (0.875, 0.912),
    "TD-75% VD-8%": (0.913, 0.941),
    "TD-65% VD-15%": (0.849, 0.877),
    "TD-60% VD-20%": (0.831, 0.819),
}
REPORTED = ("iou", "accuracy", "kidney_dice", "tumor_dice", "tumor_iou", "accuracy_in_kidney",
            "instance_precision", "instance_recall", "instance_f1", "n_predicted_instances", "mask_ap")


def run_one(dataset, partition: str, seed: int, profile: Profile, work_dir: str | os.PathLike,
            predictions_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Train and score the cascade for one partition and seed in :func:`kts.workflow.run_folder`
    of ``work_dir`` (the folder notebooks 02-04 and 06 share); resumable (:func:`kts.runs.resumable`:
    a finished run is returned, one scored under an older rule rescored)."""
    from kts import workflow
    from kts.runs import resumable

    # needs=REPORTED: a record written before a reported key was renamed (tumour_* -> tumor_*) is rescored
    return resumable(workflow.run_folder(work_dir, partition, seed),
                     lambda run_dir: _train_and_score(dataset, partition, seed, profile, run_dir,
                                                      Path(predictions_dir), progress), needs=REPORTED)


def _train_and_score(dataset, partition: str, seed: int, profile: Profile, run_dir: Path, predictions_dir: Path,
                     progress: bool) -> dict:
    from kts import cascade, data, workflow

    splits = data.split_partition(dataset.index, partition, seed=seed)
    data.save_splits(run_dir / "splits.json", {run_dir.name: splits})
    kidney = workflow.train_kidney_stage(dataset, splits, profile, run_dir / "cunet", seed=seed, progress=progress)
    tumor_model, _ = workflow.train_tumor_stage(dataset, splits, profile, run_dir / "maskrcnn", seed=seed,
                                                progress=progress, validate=False)
    test = dataset.subset(splits["test"])
    probabilities, result = workflow.run_cascade(kidney.model, tumor_model, test.images)
    everything = cascade.run_cascade(test.images, probabilities, tumor_model, score_threshold=0.0)
    scores = workflow.score_cascade(result.kidney_masks, result.tumor_labels, test.kidney_masks,
                                    test.tumor_labels, instance_predictions=result.instances,
                                    all_detections=(everything.tumor_labels, everything.instances),
                                    weightings=test.index["weighting"].tolist())
    with kts_io.atomic_path(predictions_dir / f"{run_dir.name}.npz") as tmp:
        np.savez_compressed(tmp, case_ids=np.array(test.index["case_id"], dtype=str),
                            kidney_probability=probabilities.astype(np.float16),
                            kidney_pred=result.kidney_masks.astype(np.uint8),
                            kidney_gt=test.kidney_masks.astype(np.uint8),
                            tumor_pred=result.tumor_labels.astype(np.uint16),
                            tumor_gt=test.tumor_labels.astype(np.uint16),
                            # every detection with its score, so mask AP can be recomputed from results/
                            tumor_all_detections=everything.tumor_labels.astype(np.uint16),
                            tumor_all_scores=_scores_by_label(everything),
                            score_threshold=np.float32(tumor_model.score_threshold),
                            weighting=np.array(test.index["weighting"], dtype=str))
    # wall_s and scoring are filled in by kts.runs.resumable; listed here to keep the table's column order
    return {"partition": partition, "slug": data.partition_slug(partition), "seed": seed, "profile": profile.name,
            "n_train": len(splits["train"]), "n_val": len(splits["val"]), "n_test": len(splits["test"]),
            "cunet_epochs": int(len(kidney.history)), "cunet_best_epoch": kidney.best_epoch,
            "wall_s": None, "scoring": None, **scores}


def _scores_by_label(result) -> np.ndarray:
    """float32 [N, max instances]: the score of instance label k+1 of slice i at [i, k], NaN padding."""
    width = max([len(r) for r in result.instances] + [1])
    out = np.full((len(result.instances), width), np.nan, np.float32)
    for i, records in enumerate(result.instances):
        for r in records:
            out[i, r["label"] - 1] = r["score"]
    return out


def run_study(dataset, profile: Profile, seeds: Iterable[int], work_dir: str | os.PathLike,
              results_dir: str | os.PathLike, partitions: Iterable[str] | None = None, progress: bool = True):
    """Every partition (default: the profile's ``table1_partitions``) x seed (resumable; runs in
    :func:`kts.workflow.run_folder` of ``work_dir``); returns the per-run table (one row per partition-seed)."""
    from kts.metrics import format_metric
    from kts.runs import run_all

    partitions = list(partitions or profile.table1_partitions)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    predictions = Path(results_dir) / "predictions"
    return run_all(((p, s) for p in partitions for s in seeds),
                   lambda item: run_one(dataset, item[0], item[1], profile, work_dir, predictions, progress),
                   lambda row: (f"{row['partition']} seed {row['seed']}: IoU {format_metric(row['iou'])}, "
                                f"accuracy {format_metric(row['accuracy'])}, tumour Dice "
                                f"{format_metric(row['tumor_dice'])}, instance F1 {format_metric(row['instance_f1'])}"))


def table1_from_runs(runs) -> "pd.DataFrame":
    """Table I: per partition, mean and sd over seeds of each metric, the seed count, the paper's values.

    The s.d. (ddof 1) is NaN with one seed: a single run has no spread (it used to read 0).
    A metric undefined in one seed's run (NaN) makes its mean NaN too.
    """
    import pandas as pd

    out = []
    for partition, group in runs.groupby("partition", sort=False):
        row = {"partition": partition, "n_seeds": int(len(group))}
        paper_iou, paper_acc = PAPER_TABLE1.get(partition, (np.nan, np.nan))
        row["paper_iou"], row["paper_accuracy"] = paper_iou, paper_acc
        for key in REPORTED:
            values = group[key].astype(float).to_numpy() if key in group else np.array([np.nan])
            row[f"{key}_mean"] = float(np.mean(values))
            row[f"{key}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        row["n_test_slices"] = int(group["n_test_slices"].iloc[0])
        out.append(row)
    return pd.DataFrame(out)


def to_markdown(table) -> str:
    """Table I as markdown: the paper's IoU and accuracy beside ours (mean ± sd over seeds).

    Undefined values print "n/a": the s.d. of a single seed ("0.867 ± n/a"), a metric
    undefined on the test slices ("n/a").
    """
    from kts.metrics import format_metric, format_spread

    def cell(row, key):
        return format_spread(row[key + "_mean"], row[key + "_sd"])

    header = ("Data partition", "paper IoU", "our IoU (kidney stage)", "our IoU (tumour)", "paper accuracy",
              "our accuracy (pixel, whole slice)", "our accuracy (inside the kidney)", "kidney Dice", "tumour Dice",
              "instance F1", "mask AP", "seeds", "test slices")
    rows = [(row["partition"], format_metric(row["paper_iou"]), cell(row, "iou"), cell(row, "tumor_iou"),
             format_metric(row["paper_accuracy"]), cell(row, "accuracy"), cell(row, "accuracy_in_kidney"),
             cell(row, "kidney_dice"), cell(row, "tumor_dice"), cell(row, "instance_f1"), cell(row, "mask_ap"),
             str(row["n_seeds"]), str(row["n_test_slices"])) for _, row in table.iterrows()]
    return kts_io.markdown_table(rows, header)


def table1_note(table) -> str:
    """The sentences above Table I: what each column counts and why rows are not directly comparable."""
    sizes = table["n_test_slices"].astype(int)
    size_text = (f"{sizes.min()}-{sizes.max()} slices, different in each row" if sizes.min() != sizes.max()
                 else f"{sizes.min()} slices in each row, different cases")
    seeds = table["n_seeds"].astype(int)
    spread = ("with one seed per partition every spread reads n/a: a single run has none"
              if seeds.max() == 1 else f"spreads over {seeds.min()}-{seeds.max()} seeds")
    return ("Phantom data, not the paper's TCGA-KIRC slices. The paper's two columns stand beside ours; what the "
            "paper's IoU and accuracy most plausibly count is in docs/errata.md (E9). Our IoU: the kidney stage's "
            "foreground IoU (CU-Net) and, beside it, the tumour IoU of the whole cascade; our accuracy: pixel accuracy "
            "over whole slices (background dominates it) and inside the kidney (true kidney and every true or "
            "predicted tumour pixel). Every figure is pooled over a run's test slices (instances for F1); undefined "
            f"values read n/a (E37). Cells: mean ± s.d. over seeds; {spread}. The test sets hold {size_text}, so "
            "rows are not directly comparable "
            f"(one slice is 1/{sizes.max()} to 1/{sizes.min()} of a test set).\n\n")


def write_table1(runs, results_dir: str | os.PathLike) -> "pd.DataFrame":
    """Write ``table1.csv``, ``table1.md`` and ``table1_runs.csv`` (per seed) atomically."""
    results_dir = Path(results_dir)
    table = table1_from_runs(runs)
    with kts_io.atomic_path(results_dir / "table1.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.4f")
    with kts_io.atomic_path(results_dir / "table1_runs.csv") as tmp:
        runs.to_csv(tmp, index=False, float_format="%.4f")
    note = table1_note(table)
    kts_io.write_text(results_dir / "table1.md", "# Table I, regenerated\n\n" + note + to_markdown(table))
    return table
