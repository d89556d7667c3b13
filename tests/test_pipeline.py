"""One full quick-profile run of every notebook with papermill, asserting on the numbers it wrote.

The phantom it runs on is written with a fake patient name, birth date, institution and
accession number in every DICOM header; afterwards every output file is searched for them.
Runs before nbval (tests/ before notebooks/ in testpaths) and shares the session folders set by
the root conftest.py (``KTS_SOURCE_ROOT`` stays set), so nbval then re-executes the notebooks on
the models trained here.
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from kts import config, phantom, pipeline, publish, study

ROOT = Path(__file__).resolve().parent.parent
BASE = Path(os.environ["KTS_TEST_BASE"])
RESULTS = Path(os.environ["KTS_RESULTS_DIR"])
RUNS = BASE / "runs"
IDENTIFIERS = {"PatientName": "Doe^Jane", "PatientBirthDate": "19700101", "InstitutionName": "Saint Nowhere Hospital",
               "AccessionNumber": "ACC7731", "ReferringPhysicianName": "Strange^Stephen"}
TUMOR_DICE_FLOOR, TUMOR_F1_FLOOR, CASCADE_TUMOR_DICE_FLOOR = 0.3, 0.25, 0.2
SECRETS = [b"Doe^Jane", b"19700101", b"Saint Nowhere", b"ACC7731", b"Strange^Stephen"]


@pytest.fixture(scope="module")
def metrics():
    quick = config.get_profile("quick")
    source = phantom.write_dataset(Path(os.environ["KTS_DATA_DIR"]) / "phantom-with-identifiers", n_cases=quick.n_cases,
                                   seed=0, difficulty=quick.difficulty, header_overrides=IDENTIFIERS)
    os.environ[config.SOURCE_ENV] = str(source)
    return pipeline.run("quick", seed=0, results=RESULTS, runs=RUNS)


def _contents(path: Path):
    data = path.read_bytes()
    yield data
    if zipfile.is_zipfile(path):  # .npz, .keras: look inside the compressed members too
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                yield archive.read(name)


@pytest.mark.slow
def test_no_patient_identifier_reaches_any_output(metrics):
    """PS3.15 Annex E attributes written into the DICOM never appear in results, runs, checkpoints or caches."""
    scanned = 0
    for folder in (RESULTS, RUNS, Path(os.environ["KTS_WORK_DIR"]), Path(os.environ["KTS_DATA_DIR"]) / "cache"):
        for path in folder.rglob("*"):
            if path.is_file():
                scanned += 1
                for blob in _contents(path):
                    for secret in SECRETS:
                        assert secret not in blob, f"{secret!r} found in {path}"
    assert scanned > 30


@pytest.mark.slow
def test_every_notebook_ran_and_wrote_its_figures(metrics):
    names = [p.stem for p in pipeline.list_notebooks()]
    assert list(metrics["provenance"]["wall_s_per_notebook"]) == names
    assert set(metrics["notebooks"]) == set(names)
    for figure in ("fig1_kidney_no_mild_moderate_tumor", "fig3_mr_slice_and_ground_truth",
                   "fig5_cascade_segmentation_results", "fig6_cunet_accuracy_loss_per_epoch"):
        for ext in ("png", "pdf"):
            assert (RESULTS / f"{figure}.{ext}").stat().st_size > 1000
    assert json.loads((RESULTS / "metrics.json").read_text())["provenance"]["profile"] == "quick"


@pytest.mark.slow
def test_every_figure_cell_of_every_executed_notebook_holds_a_png(metrics, tmp_path):
    """What a reader of ``runs/`` (and of the published copies) sees: a figure, not ``<Figure ...>`` text;
    and the quick copies pass ``kts publish``'s checks (no path, traceback or figure without PNG)."""
    import nbformat

    names, n_figure_cells = publish.figure_functions(), 0
    for path in sorted(RUNS.glob("0*.ipynb")):
        cells = [c for c in nbformat.read(path, as_version=4).cells if publish.draws_figure(c, names)]
        n_figure_cells += len(cells)
        missing = [c.source.splitlines()[0] for c in cells if not publish.pngs(c)]
        assert not missing, f"{path.name}: figure cells without an image/png output: {missing}"
    assert n_figure_cells >= 9  # 01: 2, 02: 1, 03: 2, 04: 1, 06: 2, 07: 1 (05 shows tables)
    written = publish.publish(RUNS, tmp_path / "executed", profile="quick")
    assert len(written) == len(pipeline.list_notebooks())


@pytest.mark.slow
def test_data_and_splits_numbers(metrics):
    m = metrics["notebooks"]["01_data_extraction"]
    assert m["n_slices"] == 30 and m["n_cases"] == 30
    assert m["split_sizes"]["TD-70% VD-6%"] == {"train": 21, "val": 2, "test": 7}
    assert m["tumor_free_slices"] > 0


@pytest.mark.slow
def test_models_learn_in_the_quick_profile(metrics):
    cunet = metrics["notebooks"]["02_train_cunet"]
    assert cunet["pooled_dice"] > 0.5, cunet
    tumor = metrics["notebooks"]["03_train_maskrcnn"]
    assert tumor["init"] == "pretrained"
    # floors set from what the quick profile reaches (issue 12), with margin: a regression trips them
    assert tumor["held_out"]["dice"] >= TUMOR_DICE_FLOOR and tumor["held_out"]["f1"] >= TUMOR_F1_FLOOR, tumor
    pooled = {r["model"]: r for r in tumor["comparison"] if r["weighting"] == "pooled"}
    assert pooled["Mask R-CNN (pretrained)"]["tumor_dice"] > pooled["Mask R-CNN (scratch)"]["tumor_dice"], pooled
    assert set(r["weighting"] for r in tumor["comparison"]) == {"t1_post", "t2", "t1_pre", "pooled"}
    cascade = metrics["notebooks"]["04_figure5"]["test"]
    assert cascade["n_test_slices"] == 7
    assert cascade["tumor_dice"] >= CASCADE_TUMOR_DICE_FLOOR, cascade


@pytest.mark.slow
def test_table1_has_the_profiles_partitions_beside_the_paper(metrics):
    """The quick profile runs two of Table I's four partitions (issue 15: minutes); the paper profile all four."""
    table = pd.read_csv(RESULTS / "table1.csv")
    assert list(table["partition"]) == list(config.get_profile("quick").table1_partitions)
    assert (table["n_seeds"] == 1).all()
    for _, row in table.iterrows():
        assert (row["paper_iou"], row["paper_accuracy"]) == study.PAPER_TABLE1[row["partition"]]
        assert 0.0 <= row["iou_mean"] <= 1.0 and 0.0 <= row["accuracy_mean"] <= 1.0
    assert "paper IoU" in (RESULTS / "table1.md").read_text()


@pytest.mark.slow
def test_table1_recomputed_independently(metrics):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "recompute_table1.py"), str(RESULTS)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_rerun_skips_up_to_date_notebooks(metrics, capsys):
    again = pipeline.run("quick", seed=0, results=RESULTS, runs=RUNS)
    assert "up to date, skipped" in capsys.readouterr().out
    assert again["notebooks"]["05_table1_split_study"] == metrics["notebooks"]["05_table1_split_study"]


@pytest.mark.slow
def test_split_study_scores_the_models_of_notebooks_02_to_04(metrics):
    """05 finds 02-03's TD-70%/VD-6% models in work/study/70-6-seed0 and scores them, not retrained ones."""
    shown = metrics["notebooks"]["04_figure5"]["test"]
    row = pd.read_csv(RESULTS / "table1.csv").set_index("partition").loc["TD-70% VD-6%"]
    for key in ("iou", "accuracy", "kidney_dice", "tumor_dice", "instance_f1"):
        assert row[f"{key}_mean"] == pytest.approx(shown[key], abs=1e-4, nan_ok=True), key
    run = Path(os.environ["KTS_WORK_DIR"]) / "study" / "70-6-seed0"
    assert (run / "maskrcnn" / "history.json").is_file() and (run / "metrics.json").is_file()
    info = json.loads((run / "maskrcnn" / "history.json").read_text())
    assert any("val_f1" in step for step in info["history"])  # trained by notebook 03 (it validates), not the study
    # issue 12: every tumour size gets several positive RPN anchors (quick profile: median 9, 3.75% with none)
    positives = info.get("anchor_positives")
    assert positives, f"{run}: history.json without anchor_positives (written by an older kts? delete KTS_TEST_BASE)"
    assert positives["n_instances"] > 10 and positives["median"] >= 3 and positives["share_with_none"] <= 0.15, positives


@pytest.mark.slow
def test_unseen_contrast_numbers(metrics):
    runs = metrics["notebooks"]["07_unseen_contrasts"]["runs"]
    assert [(r["held_out"], r["intensity"]) for r in runs] == [
        (w, i) for w in config.get_profile("quick").contrasts_left_out for i in ("none", "random_lut", "synth")]
    for r in runs:
        assert r["held_out"] not in r["trained_on"] and r["n_test_unseen"] == 10
        assert 0.0 <= r["test_unseen_dice"] <= 1.0 and r["dice_gap"] == pytest.approx(
            r["test_seen_dice"] - r["test_unseen_dice"])
        assert r["n_test_hard"] == 20 and 0.0 <= r["test_hard_dice"] <= 1.0  # the seen weightings' cases, hard
        assert r["hard_gap"] == pytest.approx(r["test_seen_dice"] - r["test_hard_dice"])
        assert r["epochs"] >= 1 and r["s_per_epoch"] > 0  # issue 16: each recipe's time per epoch
    text = (RESULTS / "contrasts.md").read_text()
    assert "kidney Dice, unseen" in text and "kidney Dice, hard" in text
    assert (RESULTS / "contrasts_hard_difficulty.png").exists()


def test_a_parameter_no_notebook_declares_is_refused_before_anything_runs(tmp_path):
    """``kts run -p SEEDZ=1`` (a typo) stops at once; each notebook receives only what it declares.
    The refused run leaves the caller's environment as it found it (it once left KTS_WORK_DIR pointing
    at this test's folder, so every later notebook run in the session trained its models afresh)."""
    before = {k: os.environ.get(k) for k in (config.WORK_ENV, config.RESULTS_ENV, config.DATA_ENV, config.PROFILE_ENV)}
    with pytest.raises(ValueError, match="SEEDZ are declared by none of 01_data_extraction.ipynb"):
        pipeline.run("quick", results=tmp_path / "r", runs=tmp_path / "runs", work=tmp_path / "w",
                     data=tmp_path / "d", parameters={"SEEDZ": 1})
    assert not list((tmp_path / "runs").iterdir())
    assert {k: os.environ.get(k) for k in before} == before


def test_a_partial_run_keeps_the_other_notebooks_wall_times(tmp_path):
    """``kts run --only 02`` rewrites metrics.json: notebook 01's wall time from the earlier run stays
    (republishing one notebook once left README saying the whole paper run took 07's minutes)."""
    import nbformat

    folder = tmp_path / "notebooks"
    folder.mkdir()
    for name in ("01_first", "02_second"):
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("PROFILE = 'quick'\nSEED = 0",
                                                                            metadata={"tags": ["parameters"]})])
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(notebook, folder / f"{name}.ipynb")
    results = tmp_path / "r"
    results.mkdir()
    (results / "metrics.json").write_text(json.dumps(
        {"provenance": {"profile": "quick", "seed": 0,
                        "wall_s_per_notebook": {"01_first": 12.5, "02_second": 99.0, "08_removed": 7.0},
                        "peak_rss_mib_per_notebook": {"01_first": 1500.0, "02_second": 1.0}}}))
    metrics = pipeline.run("quick", results=results, runs=tmp_path / "runs", work=tmp_path / "w", data=tmp_path / "d",
                           only=["02"], notebooks=folder)
    walls = metrics["provenance"]["wall_s_per_notebook"]
    assert list(walls) == ["01_first", "02_second"] and walls["01_first"] == 12.5 and walls["02_second"] < 99.0
    assert metrics["provenance"]["wall_s_total"] == pytest.approx(12.5 + walls["02_second"], abs=0.11)
    peaks = metrics["provenance"]["peak_rss_mib_per_notebook"]  # 02's kernel measured now, 01's kept
    assert list(peaks) == ["01_first", "02_second"] and peaks["01_first"] == 1500.0 and peaks["02_second"] > 20
    stamp = json.loads((tmp_path / "runs" / ("02_second" + pipeline.STAMP_SUFFIX)).read_text())
    assert stamp["git_commit"] == metrics["provenance"]["git_commit"]  # kts publish gives it to the copy


def test_peak_memory_sees_the_largest_child_process():
    """What ``kts run`` records per notebook (its kernel's peak RSS, issue 15's memory goal)."""
    import subprocess
    import sys

    code = "import time; x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(1.5)"
    with pipeline.PeakMemory(interval=0.1) as memory:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert 300 <= memory.peak_mib < 1000
    assert pipeline.descendant_memory(os.getpid())[os.getpid()][1] > 0


def _one_cell_notebooks(folder, code: str):
    import nbformat

    folder.mkdir()
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("PROFILE = 'quick'\nSEED = 0", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(code)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, folder / "01_only.ipynb")
    return folder


def test_a_hung_cell_runs_its_notebook_again_then_fails_the_run(tmp_path, capsys):
    """A kernel message lost once left a paper run waiting for ever in notebook 06 (stop 28): a cell with no
    reply within the profile's cell_timeout_s now reruns its notebook once, and a second hang fails the run."""
    marker = tmp_path / "first-attempt-done"
    once = _one_cell_notebooks(tmp_path / "once", f"import pathlib, time\nmarker = pathlib.Path({str(marker)!r})\n"
                                                  "first = not marker.exists()\nmarker.touch()\n"
                                                  "time.sleep(60 if first else 0)")
    folders = dict(runs=tmp_path / "runs", work=tmp_path / "w", data=tmp_path / "d")
    pipeline.run("quick", results=tmp_path / "r", notebooks=once, cell_timeout=4, **folders)
    assert "running the notebook again in a fresh kernel" in capsys.readouterr().out
    assert (tmp_path / "runs" / "01_only.ipynb").is_file()

    always = _one_cell_notebooks(tmp_path / "always", "import time\ntime.sleep(60)")
    with pytest.raises(pipeline.NotebookFailed, match=r"01_only.ipynb: a cell went 4 s without a reply .* 2 times"):
        pipeline.run("quick", results=tmp_path / "r2", notebooks=always, cell_timeout=4, force=True, **folders)
    assert not list((tmp_path / "runs").glob("*.tmp*"))  # nothing half-written left behind


def test_profiles_give_every_cell_more_time_than_their_longest_takes():
    """The hang guard must never cut a working cell: quick cells take minutes, paper cells up to hours."""
    assert config.get_profile("quick").cell_timeout_s >= 20 * 60
    assert config.get_profile("paper").cell_timeout_s >= 8 * 3600
