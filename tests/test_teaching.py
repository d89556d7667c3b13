"""The teaching layer (issue 13 section 3): exercises with folded solutions in every notebook, student
copies without them that still execute, a glossary and a lab plan, Binder and Colab entry points."""
import json
import os
from pathlib import Path

import nbformat
import pytest

from kts import pipeline, teaching

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = pipeline.list_notebooks()
GLOSSARY_SYMBOLS = ["z", "mu", "k", "s", "p", "phi", "e", "f_rate", "I_alpha", "I_beta", "I_gamma", "omega", "D",
                    "delta", "L", "M-hat"]


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_has_exercises_each_with_a_folded_solution(path):
    notebook = nbformat.read(path, as_version=4)
    questions = [c for c in notebook.cells if "exercise" in _tags(c) and c.source.startswith("**Exercise")]
    solutions = [c for c in notebook.cells if teaching.SOLUTION_TAG in _tags(c)]
    assert 2 <= len(questions) <= 4 and len(solutions) == len(questions), path.name
    assert all(c.metadata.get("jupyter", {}).get("source_hidden") for c in solutions)


def test_student_copies_drop_solutions_keep_exercises_and_refuse_to_overwrite(tmp_path):
    written = teaching.write_student_copies(tmp_path / "students")
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    for original, copy in zip(NOTEBOOKS, written):
        source, student = nbformat.read(original, as_version=4), nbformat.read(copy, as_version=4)
        assert not [c for c in student.cells if teaching.SOLUTION_TAG in _tags(c)]
        assert sum("exercise" in _tags(c) for c in student.cells) == sum("exercise" in _tags(c) for c in source.cells)
        assert [c.source for c in student.cells if c.cell_type == "code"] == \
            [c.source for c in source.cells if c.cell_type == "code"]
        assert all(not c.outputs for c in student.cells if c.cell_type == "code")
    with pytest.raises(ValueError, match="must not overwrite"):
        teaching.write_student_copies(pipeline.notebooks_dir())


def test_an_orphaned_solution_is_refused(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("intro"), nbformat.v4.new_markdown_cell("answer")]
    notebook.cells[1].metadata["tags"] = ["solution"]
    nbformat.write(notebook, folder / "01_x.ipynb")
    with pytest.raises(ValueError, match="01_x.ipynb: cell 1 is tagged 'solution'"):
        teaching.write_student_copies(tmp_path / "out", notebooks=folder)
    assert not (tmp_path / "out" / "01_x.ipynb").exists()


@pytest.mark.slow
def test_a_student_copy_executes_under_papermill(tmp_path, monkeypatch):
    """The student copy of notebook 01 runs headlessly as the original does (quick profile) and records
    its numbers: papermill raises on a failing cell, and the metrics file proves the last cell ran."""
    written = teaching.write_student_copies(tmp_path / "students")
    for key, value in {**pipeline.KERNEL_ENV, "KTS_RESULTS_DIR": str(tmp_path / "results")}.items():
        monkeypatch.setenv(key, value)
    pipeline.execute_notebook(written[0], tmp_path / "executed.ipynb", {"PROFILE": "quick"})
    recorded = json.loads((tmp_path / "results" / "metrics" / "01_data_extraction.json").read_text())
    assert recorded["n_slices"] == recorded["n_cases"] > 0


def test_glossary_lab_plan_binder_and_colab_files():
    glossary = (ROOT / "docs" / "glossary.md").read_text()
    for symbol in GLOSSARY_SYMBOLS:
        assert f"| `{symbol}` |" in glossary, symbol
    for name in ("01_data_extraction", "02_train_cunet"):
        assert "../docs/glossary.md" in (ROOT / "notebooks" / f"{name}.ipynb").read_text()
    plan = (ROOT / "docs" / "teaching.md").read_text()
    assert "KTS_PROFILE=quick" in plan and "kts students" in plan and "90 minutes" in plan
    start = (ROOT / "binder" / "start").read_text()
    assert start.startswith("#!") and "export KTS_PROFILE=quick" in start and 'exec "$@"' in start
    assert os.access(ROOT / "binder" / "start", os.X_OK)
    binder_env = (ROOT / "binder" / "environment.yml").read_text()
    assert "python=3.11" in binder_env and "python=3.11" in (ROOT / "environment.yml").read_text()
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert "pip install" in post_build and "-e ." in post_build and os.access(ROOT / "binder" / "postBuild", os.X_OK)
    readme = (ROOT / "README.md").read_text()
    assert "mybinder.org/v2/gh/" in readme and "colab.research.google.com/github/" in readme
    assert "mybinder.org/badge_logo.svg" in readme and "colab-badge.svg" in readme
    colab = plan.split("## Colab", 1)[1]
    # a checkout (the notebooks need data_manifest.csv and a results/ folder), installed editable
    assert "git clone" in colab and "pip install --quiet -e /content/kts" in colab
    # the profile is chosen after the restart that would clear it
    assert colab.index("Restart session") < colab.index('os.environ["KTS_PROFILE"] = "quick"')
