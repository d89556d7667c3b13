"""Unseen MR contrasts: does the kidney stage hold up on a weighting it was not trained on?

Section III.A names the problem ("the MR scan images are collected from different MR
scanners, the intensity of the input images varies"); the paper does not measure it. Here
one MR weighting is left out: the CU-Net trains on cases of the other weightings (split
70/10/20 by case, as ``kts.data.split``) and is scored on the test cases of the weightings
it saw and on every case of the one it did not see. The gap between the two is the answer.
A second unseen condition (issue 16) is a harder acquisition of the weightings it saw: a phantom
at ``"hard"`` difficulty (lower SNR and tissue contrast, a stronger bias field, more pose
variation) drawn with its own seed (``HARD_SEED_OFFSET + seed``), so that every case is new
anatomy to the model (the phantom's anatomy depends on the seed and case, not on the difficulty).
It is drawn from the phantom even when ``$KTS_SOURCE_ROOT`` points the study at other data.
Like the split study, a finished run leaves ``metrics.json`` behind and is not retrained.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from kts import io as kts_io
from kts.config import Profile

SEEN_SPLIT = (0.70, 0.10)  # train, validation fractions of the seen-contrast cases; the rest is their test set
# the hard-difficulty phantom's seed is this + the study's seed: never a study seed (0, 1, 2, ...) nor
# pretraining's corpus (1000) or held-out (1001) seed
HARD_SEED_OFFSET = 2000


def parse_list(text: str, default: Iterable[str]) -> list[str]:
    """``"t2, t1_pre"`` -> ``["t2", "t1_pre"]``; an empty string gives ``default`` (notebook 07's parameters)."""
    return [item.strip() for item in text.split(",") if item.strip()] or list(default)


def example_slices(dataset) -> tuple[list, list, list[str]]:
    """The first slice of each MR weighting in the dataset: images, kidney masks, weighting names."""
    first = dataset.index.reset_index(drop=True).drop_duplicates("weighting")
    rows = list(first.index)
    return [dataset.images[i] for i in rows], [dataset.kidney_masks[i] for i in rows], list(first["weighting"])


def leave_one_out_splits(index, held_out: str, seed: int = 0) -> dict[str, list[str]]:
    """Case ids: ``train``/``val``/``test_seen`` from the other weightings, ``test_unseen`` = ``held_out``'s cases."""
    if "weighting" not in index.columns:
        raise ValueError("the dataset index has no 'weighting' column; this study needs the MR weighting per case")
    weightings = sorted(set(index["weighting"]))
    if held_out not in weightings:
        raise ValueError(f"weighting {held_out!r} is not in this dataset; it has {weightings}")
    if len(weightings) < 2:
        raise ValueError(f"leaving a contrast out needs at least two weightings; this dataset has {weightings}")
    from kts import data

    by_case = index.drop_duplicates("case_id").set_index("case_id")["weighting"]
    seen = sorted(c for c, w in by_case.items() if w != held_out)
    unseen = sorted(c for c, w in by_case.items() if w == held_out)
    parts = data.split(seen, train=SEEN_SPLIT[0], val=SEEN_SPLIT[1], seed=seed)
    return {"train": parts["train"], "val": parts["val"], "test_seen": parts["test"], "test_unseen": unseen}


def run_one(dataset, held_out: str, seed: int, profile: Profile, work_dir: str | os.PathLike,
            intensity: str = "none", hard=None) -> dict:
    """Train the CU-Net without ``held_out`` and score it on seen and unseen contrasts (resumable,
    :func:`kts.runs.resumable`).

    ``intensity``: ``"none"`` is the paper's recipe; ``"random_lut"`` adds random intensity
    curves to training (``kts.synth.random_lut``), the usual remedy for unseen contrasts;
    ``"synth"`` re-synthesises training images from the phantom's tissue label maps (``kts.synth``).
    ``hard``: a phantom at hard difficulty (:func:`hard_dataset`); the model is then
    also scored on its cases of the weightings it trained on (``test_hard_*``, ``hard_gap``).
    """
    from kts.runs import resumable

    run_dir = Path(work_dir) / f"without-{held_out}{'' if intensity == 'none' else '-' + intensity}-seed{seed}"
    needs = ("s_per_epoch",) + (("test_hard_dice",) if hard is not None else ())
    return resumable(run_dir, lambda folder: _train_and_score(dataset, held_out, seed, profile, folder, intensity, hard),
                     needs=needs, settings=recipe(profile, intensity))


def recipe(profile: Profile, intensity: str) -> dict:
    """What a run's training depends on besides its data and seed: the CU-Net's size, its training recipe
    (``kts.config.TrainConfig``) and, for ``"synth"``, every range of the synthesis (``kts.synth.SynthConfig``)."""
    import dataclasses

    from kts import synth

    settings = {"cunet_base_filters": profile.cunet_base_filters,
                "cunet_batch_norm": "fused",  # kts.cunet.FusedBatchNormalization (Keras' layer before 2026-12-07)
                "training": dataclasses.asdict(profile.cunet_config(intensity=intensity))}
    if intensity == "synth":
        settings["synth"] = dataclasses.asdict(synth.DEFAULT)
    return settings


def hard_dataset(profile: Profile, seed: int = 0):
    """The profile's phantom at ``"hard"`` difficulty (size and case count as the profile's, phantom seed
    ``HARD_SEED_OFFSET + seed``: other anatomy than the study's), extracted and cached.

    Always the phantom: ``$KTS_SOURCE_ROOT`` (other data for the study itself) is not read here."""
    import dataclasses

    from kts import workflow

    hard = dataclasses.replace(profile, difficulty="hard")
    seed = HARD_SEED_OFFSET + seed
    return workflow.prepare_dataset(hard, seed=seed, source_root=workflow.write_phantom(hard, seed))[0]


def _score(model, test) -> dict:
    from kts import metrics
    from kts.train import predict_probabilities

    return metrics.score_masks(predict_probabilities(model, test.images) > 0.5, test.kidney_masks)


def _median_or_nan(values) -> float:
    """The median epoch time (issue 16's cost: seconds per epoch of each recipe); NaN if none was recorded."""
    import numpy as np

    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else float("nan")


def _train_and_score(dataset, held_out: str, seed: int, profile: Profile, run_dir: Path, intensity: str,
                     hard=None) -> dict:
    from kts import workflow

    splits = leave_one_out_splits(dataset.index, held_out, seed)
    kts_io.write_json(run_dir / "splits.json", splits)
    kidney = workflow.train_kidney_stage(dataset, splits, profile, run_dir / "cunet", seed=seed, intensity=intensity)
    trained_on = sorted(set(dataset.subset(splits["train"]).index["weighting"]))
    # scoring (and wall_s, at the end) are filled in by kts.runs.resumable; listed to keep the column order
    record = {"held_out": held_out, "intensity": intensity, "seed": seed, "profile": profile.name,
              "trained_on": trained_on, "n_train": len(splits["train"]), "n_val": len(splits["val"]),
              "epochs": len(kidney.history), "s_per_epoch": _median_or_nan(kidney.epoch_seconds), "scoring": None}
    tests = {side: dataset.subset(splits[side]) for side in ("test_seen", "test_unseen")}
    if hard is not None:
        by_case = hard.index.drop_duplicates("case_id").set_index("case_id")["weighting"]
        tests["test_hard"] = hard.subset(sorted(c for c, w in by_case.items() if w in trained_on))
    for side, test in tests.items():
        scores = _score(kidney.model, test)
        record.update({f"{side}_dice": scores["pooled_dice"], f"{side}_iou": scores["pooled_iou"],
                       f"{side}_mean_dice": scores["mean_dice"],
                       f"{side}_mean_dice_n_slices": scores["mean_dice_n_images"],
                       f"n_{side}": len(set(test.index["case_id"]))})
    record["dice_gap"] = record["test_seen_dice"] - record["test_unseen_dice"]
    if hard is not None:
        record["hard_gap"] = record["test_seen_dice"] - record["test_hard_dice"]
    return record


def run_study(dataset, profile: Profile, held_out: Iterable[str], seed: int, work_dir: str | os.PathLike,
              intensities: Iterable[str] = ("none", "random_lut", "synth"), hard=None):
    """One row per left-out weighting and training recipe: kidney Dice on seen and unseen contrasts, the gap;
    with ``hard`` (:func:`hard_dataset`) also on the seen weightings at that difficulty."""
    from kts.metrics import format_metric
    from kts.runs import run_all
    from kts.train import INTENSITY

    intensities = list(intensities)
    unknown = sorted(set(intensities) - set(INTENSITY))
    if unknown:
        raise ValueError(f"unknown intensity recipes {unknown}: choose from {list(INTENSITY)}")

    def describe(row):
        text = (f"without {row['held_out']}, intensity {row['intensity']}: kidney Dice "
                f"{format_metric(row['test_seen_dice'])} on seen contrasts, "
                f"{format_metric(row['test_unseen_dice'])} on {row['held_out']}")
        if "test_hard_dice" in row:
            text += f", {format_metric(row['test_hard_dice'])} at hard difficulty"
        return text

    return run_all(((w, i) for w in held_out for i in intensities),
                   lambda item: run_one(dataset, item[0], seed, profile, work_dir, item[1], hard), describe)


def epoch_time_ratio(table):
    """Each run's median seconds per epoch over the paper recipe's (``"none"``) for the same left-out
    weighting: issue 16's cost (goal <= 1.5 for ``"synth"``); NaN where either was not recorded."""
    paper = table[table["intensity"] == "none"].set_index("held_out")["s_per_epoch"]
    return table["s_per_epoch"] / table["held_out"].map(paper)


def to_markdown(table) -> str:
    """The study as a markdown table (pooled kidney Dice; ``gap`` = seen - unseen; undefined: "n/a"),
    with each recipe's epochs and median seconds per epoch beside the paper recipe's (issue 16's cost)."""
    from kts.metrics import format_metric

    def gap(value):
        return "n/a" if format_metric(value) == "n/a" else f"{value:+.3f}"

    def count(value):  # NaN where a run was scored without the hard condition
        return "n/a" if value != value else str(int(value))

    def seconds(value):  # NaN: trained before kts recorded epoch times
        return "n/a" if value != value else f"{value:.1f}"

    def ratio(value):
        return "n/a" if value != value else f"{value:.2f}x"

    hard = "test_hard_dice" in table.columns

    header = ("left out", "intensity augmentation", "trained on", "seen-contrast test cases", "kidney Dice, seen",
              "unseen-contrast cases", "kidney Dice, unseen", "gap")
    if hard:
        header += ("hard-difficulty cases (seen weightings)", "kidney Dice, hard", "gap, hard")
    timed = "s_per_epoch" in table.columns
    if timed:
        header += ("epochs", "s per epoch (median)", "epoch time / paper recipe's")
        table = table.assign(epoch_time_ratio=epoch_time_ratio(table))
    rows = []
    for _, row in table.iterrows():
        cells = (row["held_out"], row["intensity"], ", ".join(row["trained_on"]), str(row["n_test_seen"]),
                 format_metric(row["test_seen_dice"]), str(row["n_test_unseen"]),
                 format_metric(row["test_unseen_dice"]), gap(row["dice_gap"]))
        if hard:
            cells += (count(row["n_test_hard"]), format_metric(row["test_hard_dice"]), gap(row["hard_gap"]))
        if timed:
            cells += (count(row["epochs"]), seconds(row["s_per_epoch"]), ratio(row["epoch_time_ratio"]))
        rows.append(cells)
    return kts_io.markdown_table(rows, header)


def write_table(table, results_dir: str | os.PathLike) -> str:
    """Write ``contrasts.csv`` and ``contrasts.md`` atomically; returns the markdown."""
    results_dir = Path(results_dir)
    flat = table.assign(trained_on=[" ".join(w) for w in table["trained_on"]])
    with kts_io.atomic_path(results_dir / "contrasts.csv") as tmp:
        flat.to_csv(tmp, index=False, float_format="%.4f")
    text = to_markdown(table)
    kts_io.write_text(results_dir / "contrasts.md", "# Unseen MR contrasts, kidney stage (phantom)\n\n" + text)
    return text
