"""kts.runs: the resumable-run skeleton shared by the split study and the unseen-contrast study."""
import json

import pytest

from kts import metrics, runs


def test_a_finished_run_is_returned_not_run_again(tmp_path):
    calls = []

    def body(folder):
        calls.append(folder)
        (folder / "model.txt").write_text("trained")
        return {"partition": "a", "wall_s": None, "scoring": None, "dice": 0.9}

    first = runs.resumable(tmp_path / "a", body)
    assert list(first) == ["partition", "wall_s", "scoring", "dice"]  # the body's column order is kept
    assert first["scoring"] == metrics.SCORING and first["wall_s"] >= 0
    assert json.loads((tmp_path / "a" / runs.RECORD_FILE).read_text()) == first
    assert runs.resumable(tmp_path / "a", body) == first and len(calls) == 1


def test_a_record_under_an_older_scoring_rule_is_rescored_keeping_the_training_time(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / runs.RECORD_FILE).write_text(json.dumps({"dice": 0.5, "wall_s": 321.0, "scoring": "E0"}))
    again = runs.resumable(tmp_path / "a", lambda folder: {"dice": 0.7})
    assert again == {"dice": 0.7, "scoring": metrics.SCORING, "wall_s": 321.0}


def test_a_record_lacking_a_needed_score_is_rescored(tmp_path):
    """Notebook 07 asks for the hard-difficulty score of runs that finished without it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / runs.RECORD_FILE).write_text(json.dumps({"dice": 0.5, "wall_s": 321.0,
                                                               "scoring": metrics.SCORING}))
    assert runs.resumable(tmp_path / "a", lambda folder: {"dice": 0.7})["dice"] == 0.5
    again = runs.resumable(tmp_path / "a", lambda folder: {"dice": 0.7, "hard_dice": 0.6}, needs=("hard_dice",))
    assert again == {"dice": 0.7, "hard_dice": 0.6, "scoring": metrics.SCORING, "wall_s": 321.0}


def test_a_run_made_with_other_settings_is_refused_not_reused(tmp_path):
    """Notebook 07 after a change of the synth recipe: the old run's record must not stand for the new recipe."""
    calls = []

    def body(folder):
        calls.append(folder)
        return {"dice": 0.7}

    recipe = {"training": {"epochs": 100, "scale": (0.75, 1.3)}, "synth": {"p_synthetic": 0.8}}
    first = runs.resumable(tmp_path / "a", body, settings=recipe)
    assert json.loads((tmp_path / "a" / runs.SETTINGS_FILE).read_text())["training"]["scale"] == [0.75, 1.3]
    assert runs.resumable(tmp_path / "a", body, settings=recipe) == first and len(calls) == 1  # tuples as lists
    other = {**recipe, "synth": {"p_synthetic": 0.5}}
    with pytest.raises(ValueError, match=r"a: this run was made with other settings \(synth.p_synthetic: 0.8 "
                                         r"there, 0.5 now\); delete the folder"):
        runs.resumable(tmp_path / "a", body, settings=other)
    (tmp_path / "b").mkdir()  # a run from before kts kept its settings
    (tmp_path / "b" / runs.RECORD_FILE).write_text(json.dumps({"dice": 0.5, "scoring": metrics.SCORING}))
    with pytest.raises(ValueError, match="training: '\\(none\\)' there"):
        runs.resumable(tmp_path / "b", body, settings=recipe)
    assert len(calls) == 1


def test_a_failed_run_leaves_no_record(tmp_path):
    def body(folder):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        runs.resumable(tmp_path / "a", body)
    assert not (tmp_path / "a" / runs.RECORD_FILE).exists()


def test_run_all_makes_one_row_per_item_and_reports_progress(capsys):
    table = runs.run_all([1, 2], lambda item: {"item": item, "square": item * item},
                         lambda row: f"item {row['item']}")
    assert table["square"].tolist() == [1, 4]
    out = capsys.readouterr().out
    assert "[1/2] item 1 (" in out and "[2/2] item 2 (" in out


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_release_memory_hands_freed_heap_back_to_the_system():
    """Freed memory held in glibc's arenas (as TensorFlow leaves it) goes back to the OS (issue 15)."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc_trim: Linux only")
    blocks = [bytes(4000) for _ in range(60_000)]  # ~240 MB through malloc (above pymalloc's 512 bytes)
    kept = blocks[::64]  # a few live blocks pin the heap's top, as live tensors do
    del blocks
    before = _rss_mb()
    assert runs.trim_heap() is True
    assert _rss_mb() < before - 150, (before, _rss_mb())
    del kept


def test_differences_name_each_nested_setting_that_changed():
    from kts import io as kts_io

    assert kts_io.differences({"a": 1, "b": {"c": [1, 2]}}, {"a": 1, "b": {"c": [1, 2]}}) == []
    assert kts_io.differences({"a": 1, "b": {"c": 2}}, {"a": 3, "b": {"c": 2, "d": 4}}) == [
        "a: 1 there, 3 now", "b.d: '(none)' there, 4 now"]


def test_a_child_process_runs_the_function_and_hands_back_its_result_or_its_error():
    """kts.runs.in_child_process (notebook 03's extra trainings, issue 15): another process, the same result."""
    import os

    from kts.runs import in_child_process

    assert in_child_process(os.getpid) != os.getpid()
    assert in_child_process(divmod, 17, 5) == (3, 2)
    with pytest.raises(ValueError, match="invalid literal"):
        in_child_process(int, "not a number")
