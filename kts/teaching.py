"""Student copies of the notebooks: the exercises kept, their solutions taken out (issue 13, teaching layer).

Every notebook ends with an "Exercises" section: markdown cells tagged ``exercise`` (questions and
"try this" cells) each followed by one tagged ``solution`` (folded in JupyterLab through the
``jupyter.source_hidden`` metadata). ``kts students --dest DIR`` writes copies of the numbered
notebooks without the ``solution`` cells and without outputs, for a class; the teacher keeps the
originals. docs/teaching.md is the lab plan that goes with them.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

SOLUTION_TAG = "solution"
EXERCISE_TAG = "exercise"


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def student_notebook(notebook):
    """A copy of an nbformat notebook without its ``solution`` cells and without outputs."""
    import copy

    copied = copy.deepcopy(notebook)
    copied.cells = [cell for cell in copied.cells if SOLUTION_TAG not in _tags(cell)]
    for cell in copied.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return copied


def write_student_copies(dest: str | os.PathLike, notebooks: str | os.PathLike | None = None) -> list[Path]:
    """Write student copies of every numbered notebook into ``dest`` (atomically); return their paths.

    Raises ``ValueError`` when a notebook has a solution cell that does not follow an exercise, so a
    solution cannot end up orphaned or a copy keep a question with its answer removed by mistake.
    """
    import nbformat

    from kts import io as kts_io
    from kts import pipeline

    dest = Path(dest)
    source_folder = Path(notebooks) if notebooks is not None else pipeline.notebooks_dir()
    if dest.resolve() == source_folder.resolve():
        raise ValueError(f"{dest}: the student copies must not overwrite the notebooks themselves")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for path in pipeline.list_notebooks(source_folder):
        notebook = nbformat.read(path, as_version=4)
        for i, cell in enumerate(notebook.cells):
            if SOLUTION_TAG in _tags(cell) and (i == 0 or EXERCISE_TAG not in _tags(notebook.cells[i - 1])):
                raise ValueError(f"{path}: cell {i} is tagged '{SOLUTION_TAG}' but does not follow an "
                                 f"'{EXERCISE_TAG}' cell")
        target = dest / path.name
        with kts_io.atomic_path(target) as tmp:
            nbformat.write(student_notebook(notebook), tmp)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """``kts students --dest DIR``: student copies of the notebooks, without solutions."""
    parser = argparse.ArgumentParser(prog="kts students", description=main.__doc__)
    parser.add_argument("--dest", required=True, help="folder for the student copies (not notebooks/)")
    args = parser.parse_args(argv)
    written = write_student_copies(args.dest)
    print(f"{len(written)} student notebooks (solutions removed) in {args.dest}")
    return 0
