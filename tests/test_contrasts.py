"""Leave-one-contrast-out splits and table (kts/contrasts.py); the training runs in notebook 07."""
import pandas as pd
import pytest

from kts import contrasts, data
from kts.phantom import WEIGHTINGS, case_id_for, weighting_for


def index(n_cases=30, slices=2):
    rows = [{"case_id": case_id_for(i), "weighting": weighting_for(i), "slice_index": s}
            for i in range(n_cases) for s in range(slices)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("held_out", WEIGHTINGS)
def test_leave_one_out_splits_by_case_and_weighting(held_out):
    idx = index()
    splits = contrasts.leave_one_out_splits(idx, held_out, seed=3)
    weighting = idx.drop_duplicates("case_id").set_index("case_id")["weighting"]
    assert {weighting[c] for c in splits["test_unseen"]} == {held_out}
    assert len(splits["test_unseen"]) == 10
    seen = splits["train"] + splits["val"] + splits["test_seen"]
    assert held_out not in {weighting[c] for c in seen} and len(seen) == len(set(seen)) == 20
    assert [len(splits[k]) for k in ("train", "val", "test_seen")] == list(data.split_sizes(20, *contrasts.SEEN_SPLIT))
    assert splits == contrasts.leave_one_out_splits(idx.sample(frac=1.0, random_state=1), held_out, seed=3)
    assert splits != contrasts.leave_one_out_splits(idx, held_out, seed=4)


def test_leave_one_out_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="'t3' is not in this dataset"):
        contrasts.leave_one_out_splits(index(), "t3")
    one = index().assign(weighting="t2")
    with pytest.raises(ValueError, match="at least two weightings"):
        contrasts.leave_one_out_splits(one, "t2")
    with pytest.raises(ValueError, match="no 'weighting' column"):
        contrasts.leave_one_out_splits(index().drop(columns="weighting"), "t2")


def test_table_files(tmp_path):
    table = pd.DataFrame([{"held_out": "t2", "intensity": "random_lut", "trained_on": ["t1_post", "t1_pre"], "n_test_seen": 4,
                           "test_seen_dice": 0.9, "n_test_unseen": 10, "test_unseen_dice": 0.75, "dice_gap": 0.15}])
    text = contrasts.write_table(table, tmp_path)
    assert "| t2 | random_lut | t1_post, t1_pre | 4 | 0.900 | 10 | 0.750 | +0.150 |" in text
    assert (tmp_path / "contrasts.md").read_text().endswith(text)
    assert pd.read_csv(tmp_path / "contrasts.csv")["trained_on"][0] == "t1_post t1_pre"


def test_parameter_lists_and_unknown_recipes():
    assert contrasts.parse_list(" t2, t1_pre ,", default=["x"]) == ["t2", "t1_pre"]
    assert contrasts.parse_list("", default=("t1_pre",)) == ["t1_pre"]
    with pytest.raises(ValueError, match=r"unknown intensity recipes \['gamma'\]"):
        contrasts.run_study(None, None, ["t2"], seed=0, work_dir="unused", intensities=["none", "gamma"])


def test_example_slices_one_per_weighting():
    import numpy as np

    idx = index(n_cases=6, slices=2).set_index(pd.Index(range(100, 112)))  # a non-positional index
    images = np.arange(12)[:, None, None] * np.ones((12, 4, 4))
    ds = type("DS", (), {"index": idx, "images": images, "kidney_masks": images > 5})()
    shown, masks, names = contrasts.example_slices(ds)
    assert names == list(WEIGHTINGS) and [int(a[0, 0]) for a in shown] == [0, 2, 4]
    assert [bool(m[0, 0]) for m in masks] == [False, False, False]


def test_table_with_the_hard_difficulty_columns(tmp_path):
    table = pd.DataFrame([{"held_out": "t1_pre", "intensity": "synth", "trained_on": ["t1_post", "t2"], "n_test_seen": 4,
                           "test_seen_dice": 0.9, "n_test_unseen": 10, "test_unseen_dice": 0.8, "dice_gap": 0.1,
                           "n_test_hard": 20, "test_hard_dice": 0.6, "hard_gap": 0.3}])
    text = contrasts.write_table(table, tmp_path)
    assert "kidney Dice, hard" in text.splitlines()[0]
    assert "| t1_pre | synth | t1_post, t2 | 4 | 0.900 | 10 | 0.800 | +0.100 | 20 | 0.600 | +0.300 |" in text


def test_each_recipe_reports_its_epoch_time_beside_the_paper_recipes(tmp_path):
    base = {"held_out": "t1_pre", "trained_on": ["t1_post", "t2"], "n_test_seen": 4, "test_seen_dice": 0.9,
            "n_test_unseen": 10, "test_unseen_dice": 0.8, "dice_gap": 0.1}
    table = pd.DataFrame([{**base, "intensity": "none", "epochs": 40, "s_per_epoch": 10.0},
                          {**base, "intensity": "synth", "epochs": 60, "s_per_epoch": 13.0},
                          {**base, "intensity": "random_lut", "epochs": 30, "s_per_epoch": float("nan")}])
    lines = contrasts.to_markdown(table).splitlines()
    assert "s per epoch (median)" in lines[0]
    assert lines[2].endswith("| 40 | 10.0 | 1.00x |") and lines[3].endswith("| 60 | 13.0 | 1.30x |")
    assert lines[4].endswith("| 30 | n/a | n/a |")  # trained before kts recorded epoch times


def test_the_median_epoch_time_skips_epochs_without_one():
    assert contrasts._median_or_nan([None, 3.0, 5.0]) == 4.0
    assert contrasts._median_or_nan([None]) != contrasts._median_or_nan([None])  # NaN: nothing recorded


def test_a_run_scored_without_the_hard_condition_reads_na_beside_one_with_it(tmp_path):
    rows = [{"held_out": "t1_pre", "intensity": "none", "trained_on": ["t1_post", "t2"], "n_test_seen": 4,
             "test_seen_dice": 0.9, "n_test_unseen": 10, "test_unseen_dice": 0.8, "dice_gap": 0.1},
            {"held_out": "t1_pre", "intensity": "synth", "trained_on": ["t1_post", "t2"], "n_test_seen": 4,
             "test_seen_dice": 0.9, "n_test_unseen": 10, "test_unseen_dice": 0.8, "dice_gap": 0.1,
             "n_test_hard": 20, "test_hard_dice": 0.6, "hard_gap": 0.3}]
    text = contrasts.write_table(pd.DataFrame(rows), tmp_path)
    assert "| +0.100 | n/a | n/a | n/a |" in text and "| +0.100 | 20 | 0.600 | +0.300 |" in text


def test_the_hard_condition_is_other_anatomy_drawn_from_the_phantom(monkeypatch, tmp_path):
    """Even with $KTS_SOURCE_ROOT pointing the study at other data (the pipeline test's phantom with
    identifiers, or a user's series), the hard condition is the phantom at hard difficulty, own seed."""
    from kts import config, pretrain, workflow

    assert contrasts.HARD_SEED_OFFSET not in (pretrain.CORPUS_SEED, pretrain.HELD_OUT_SEED)
    assert contrasts.HARD_SEED_OFFSET > 100  # above any study seed a user would pass
    monkeypatch.setenv(config.SOURCE_ENV, "/somewhere/real-series")
    calls = []
    monkeypatch.setattr(workflow, "write_phantom", lambda profile, seed: calls.append((profile.difficulty, seed)) or tmp_path)
    monkeypatch.setattr(workflow, "prepare_dataset", lambda profile, seed, source_root: (("dataset", source_root), None))
    assert contrasts.hard_dataset(config.get_profile("quick"), seed=1) == ("dataset", tmp_path)
    assert calls == [("hard", contrasts.HARD_SEED_OFFSET + 1)]


def test_a_runs_recipe_names_what_its_training_depends_on():
    """The settings kept beside each run (kts.runs.resumable): a changed synth range is a new recipe."""
    import dataclasses

    from kts import config, synth

    profile = config.get_profile("quick")
    paper_recipe = contrasts.recipe(profile, "none")
    assert paper_recipe["training"]["intensity"] == "none" and "synth" not in paper_recipe
    assert paper_recipe["cunet_base_filters"] == profile.cunet_base_filters
    assert contrasts.recipe(profile, "synth")["synth"] == dataclasses.asdict(synth.DEFAULT)
    assert contrasts.recipe(profile, "synth")["training"]["intensity"] == "synth"
