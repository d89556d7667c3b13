"""Executed notebooks for readers (issue 13, section 1): ``kts publish`` and the committed copies."""
import base64
import struct
import zlib
from pathlib import Path

import nbformat
import pytest

from kts import config, pipeline, publish

ROOT = Path(__file__).resolve().parent.parent
EXECUTED = ROOT / "docs" / "executed"


def _png(width: int = 400, height: int = 300) -> str:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\0" + b"\0" * width for _ in range(height))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def _executed(name: str, profile: str = "paper", seed: int = 0, extra_outputs=(), figure_png: bool = True):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["papermill"] = {"parameters": {"PROFILE": profile, "SEED": seed}, "duration": 61.2,
                                      "input_path": str(ROOT / "notebooks" / name),
                                      "output_path": "/tmp/x/.tmp.ipynb", "exception": None}
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    stream = nbformat.v4.new_output("stream", name="stdout", text=f"wrote {config.project_root()}/results/x.png\n")
    widget = nbformat.v4.new_output("display_data", data={publish.WIDGET_MIME: {"model_id": "abc"},
                                                          "text/plain": "interactive(children=...)"})
    figure = nbformat.v4.new_output("execute_result", data={"text/plain": "<Figure size 500x500 with 1 Axes>",
                                                            **({"image/png": _png()} if figure_png else {})},
                                    execution_count=2)
    first = nbformat.v4.new_code_cell("print('hello')", outputs=[stream, widget, *extra_outputs])
    first.metadata["papermill"] = {"start_time": "2026-12-03T06:20:10", "duration": 4.2}
    notebook.cells = [nbformat.v4.new_markdown_cell("# title"), first,
                      nbformat.v4.new_code_cell("plots.figure1(dataset)", outputs=[figure])]
    return notebook


@pytest.fixture
def runs(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    for source in pipeline.list_notebooks():
        nbformat.write(_executed(source.name), folder / source.name)
    return folder


def test_publish_scrubs_paths_widgets_and_timestamps_and_indexes(runs, tmp_path):
    written = publish.publish(runs, tmp_path / "docs", provenance={"git_commit": "abc1234", "cpu_count": 2})
    assert [p.name for p in written] == [p.name for p in pipeline.list_notebooks()]
    text = written[0].read_text()
    assert str(config.project_root()) not in text and "/tmp/x" not in text
    assert "wrote <kts>/results/x.png" in text
    copy = nbformat.read(written[0], as_version=4)
    assert "widgets" not in copy.metadata
    assert copy.metadata["papermill"] == {"parameters": {"PROFILE": "paper", "SEED": 0}, "duration_s": 61.2}
    assert all("papermill" not in cell.metadata for cell in copy.cells)
    assert [list(o.data) for o in copy.cells[1].outputs if "data" in o] == [["text/plain"]]
    again = publish.publish_notebook(copy, written[0].name, publish.machine_paths())
    assert nbformat.writes(again) == nbformat.writes(copy), "publishing a published copy changes nothing"
    index = (tmp_path / "docs" / "README.md").read_text()
    assert "commit `abc1234`" in index and f"[{written[0].name}]({written[0].name}) | 1 | 0 | 1.0 min" in index


@pytest.mark.parametrize("problem, extra, message", [
    ("error", nbformat.v4.new_output("error", ename="KeyError", evalue="'x'", traceback=[]),
     "error output \\(KeyError"),
    ("traceback", nbformat.v4.new_output("stream", name="stderr", text="Traceback (most recent call last):\n"),
     "traceback"),
    ("path", nbformat.v4.new_output("stream", name="stdout", text="saved /Users/alice/kts/x.png\n"),
     "machine path '/Users/alice/kts/x.png'"),
    ("identifier", nbformat.v4.new_output("stream", name="stdout", text="case Doe^Jane\n"), "forbidden string"),
])
def test_publish_refuses_a_bad_copy_and_writes_nothing(runs, tmp_path, problem, extra, message):
    name = pipeline.list_notebooks()[2].name
    nbformat.write(_executed(name, extra_outputs=[extra]), runs / name)
    with pytest.raises(ValueError, match=f"{name}: cell 1: .*{message}"):
        publish.publish(runs, tmp_path / "docs", forbidden=["Doe^Jane"])
    assert not (tmp_path / "docs").exists()


def test_publish_refuses_a_figure_without_png_another_profile_and_a_missing_copy(runs, tmp_path):
    names = [p.name for p in pipeline.list_notebooks()]
    nbformat.write(_executed(names[3], figure_png=False), runs / names[3])
    with pytest.raises(ValueError, match=f"{names[3]}: cell 2: draws a figure but has no image/png"):
        publish.publish(runs, tmp_path / "docs")
    nbformat.write(_executed(names[3], profile="quick"), runs / names[3])
    with pytest.raises(ValueError, match=f"{names[3]}: executed with PROFILE='quick', not 'paper'"):
        publish.publish(runs, tmp_path / "docs")
    (runs / names[3]).unlink()
    with pytest.raises(ValueError, match=f"{names[3]}: no executed copy"):
        publish.publish(runs, tmp_path / "docs")
    assert not (tmp_path / "docs").exists()


@pytest.mark.skipif(not EXECUTED.is_dir(), reason="no docs/executed/ committed")
def test_the_committed_executed_notebooks_show_every_figure_and_table():
    """What a reader sees on the forge: every numbered notebook, executed under the paper profile,
    every figure cell with its PNG, no machine path, no traceback, sizes a browser opens."""
    names = publish.figure_functions()
    sources = pipeline.list_notebooks()
    assert sorted(p.name for p in EXECUTED.glob("*.ipynb")) == [p.name for p in sources]
    index = (EXECUTED / "README.md").read_text()
    for source in sources:
        path = EXECUTED / source.name
        copy = nbformat.read(path, as_version=4)
        assert copy.metadata["papermill"]["parameters"]["PROFILE"] == "paper", path
        # publishing it again changes nothing: it holds nothing publish would scrub or refuse
        again = publish.publish_notebook(copy, path.name, publish.machine_paths())
        assert nbformat.writes(again) == nbformat.writes(copy), path
        # the same code as the notebook itself (papermill's injected parameters cell aside)
        original = [c.source for c in nbformat.read(source, as_version=4).cells if c.cell_type == "code"]
        shown = [c.source for c in copy.cells
                 if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
        assert shown == original, f"{path}: out of date with {source}; re-run and `kts publish`"
        figure_cells = [c for c in copy.cells if publish.draws_figure(c, names)]
        assert all(publish.pngs(c) for c in figure_cells), path
        assert f"[{source.name}]({source.name})" in index
    assert "kts publish" in index


def test_publish_only_some_keeps_the_other_copies_with_their_runs_commit(runs, tmp_path, monkeypatch):
    """``kts publish --only 07``: one notebook re-executed, the others stay as the earlier run left them,
    as long as their code is still the notebooks' code."""
    names = [p.name for p in pipeline.list_notebooks()]
    sources = tmp_path / "notebooks"  # stand-ins for notebooks/ whose code is the executed copies' code
    sources.mkdir()
    for name in names:
        nbformat.write(_executed(name), sources / name)
    monkeypatch.setattr(pipeline, "list_notebooks", lambda folder=None: [sources / n for n in names])
    dest = tmp_path / "docs"
    publish.publish(runs, dest, provenance={"git_commit": "a" * 40, "cpu_count": 2, "note": "the first run"})
    before = {n: (dest / n).read_text() for n in names}
    (runs / names[0]).unlink()  # not needed: only the last notebook is republished
    written = publish.publish(runs, dest, provenance={"git_commit": "b" * 40, "cpu_count": 2, "note": "the second"},
                              only=[names[-1][:2]])
    assert written == [dest / names[-1]]
    assert all((dest / n).read_text() == before[n] for n in names[:-1])
    assert nbformat.read(dest / names[-1], as_version=4).metadata["kts"]["git_commit"] == "b" * 40
    index = (dest / "README.md").read_text()
    assert "the commit of each notebook's run" in index and "Run `aaaaaaaaaa`: the first run." in index
    assert f"| [{names[0]}]({names[0]}) | 1 | 0 | 1.0 min | `aaaaaaaaaa` |" in index
    assert f"| [{names[-1]}]({names[-1]}) | 1 | 0 | 1.0 min | `bbbbbbbbbb` |" in index
    with pytest.raises(ValueError, match="no published copy to keep"):
        publish.publish(runs, tmp_path / "elsewhere", only=[names[-1][:2]])
    with pytest.raises(ValueError, match="--only 99: no notebook starts with that"):
        publish.publish(runs, dest, only=["99"])
    changed = nbformat.read(sources / names[1], as_version=4)
    changed.cells[1].source = "print('changed')"
    nbformat.write(changed, sources / names[1])
    with pytest.raises(ValueError, match=f"{names[1]}: out of date with {names[1]}"):
        publish.publish(runs, dest, only=[names[-1][:2]])


def test_copies_show_the_current_narrative_where_their_code_is_current(runs, tmp_path, monkeypatch):
    """A sentence mended in a notebook's markdown reaches its published copy without a re-run (kept
    copies too); a copy whose code differs keeps the narrative it ran with."""
    names = [p.name for p in pipeline.list_notebooks()]
    sources = tmp_path / "notebooks"
    sources.mkdir()
    for name in names:
        current = _executed(name)
        current.cells[0].source = "# the mended title"
        nbformat.write(current, sources / name)
    other = nbformat.read(sources / names[1], as_version=4)
    other.cells[1].source = "print('other code')"
    nbformat.write(other, sources / names[1])
    monkeypatch.setattr(pipeline, "list_notebooks", lambda folder=None: [sources / n for n in names])
    dest = tmp_path / "docs"
    publish.publish(runs, dest, provenance={"git_commit": "a" * 40, "cpu_count": 2})
    copy = nbformat.read(dest / names[0], as_version=4)
    assert copy.cells[0].source == "# the mended title" and copy.cells[2].outputs  # outputs kept
    assert nbformat.read(dest / names[1], as_version=4).cells[0].source == "# title"
    nbformat.write(_executed(names[0]), dest / names[0])  # a kept copy (publish --only another) gains it too
    other.cells[1].source = "print('hello')"  # (kept copies must have the current code)
    nbformat.write(other, sources / names[1])
    publish.publish(runs, dest, provenance={"git_commit": "b" * 40, "cpu_count": 2}, only=[names[-1][:2]])
    assert nbformat.read(dest / names[0], as_version=4).cells[0].source == "# the mended title"


def test_a_copy_takes_the_commit_its_run_recorded_beside_it(runs, tmp_path):
    """A notebook run on its own (kts run --only, at another commit) keeps the commit in its stamp."""
    name = pipeline.list_notebooks()[-1]
    (runs / (name.stem + pipeline.STAMP_SUFFIX)).write_text('{"stamp": "x", "git_commit": "%s"}' % ("c" * 40))
    publish.publish(runs, tmp_path / "docs", provenance={"git_commit": "b" * 40, "cpu_count": 2})
    assert nbformat.read(tmp_path / "docs" / name.name, as_version=4).metadata["kts"]["git_commit"] == "c" * 40
    assert nbformat.read(tmp_path / "docs" / pipeline.list_notebooks()[0].name,
                         as_version=4).metadata["kts"]["git_commit"] == "b" * 40


def test_an_index_of_one_run_names_its_commit_once():
    rows = [("01.ipynb", {"figures": 1, "tables": 0, "duration_s": 60.0, "git_commit": "c" * 40})]
    text = publish.index_markdown(rows, "paper", {"SEED": 0}, {"cpu_count": 2, "note": "n"})
    assert f"commit `{'c' * 40}`" in text and "This run: n." in text and "| commit |" not in text
