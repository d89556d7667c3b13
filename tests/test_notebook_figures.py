"""Figures reach the notebook as images, and known-harmless noise stays out (issue 13, section 0).

kts draws ``matplotlib.figure.Figure`` objects without pyplot, so no backend shows them: a kernel
prints ``<Figure size 500x500 with 1 Axes>`` unless something registers an image formatter for the
type. ``kts.plots`` does so on import in an IPython kernel; these tests hold it to that in an
executed notebook (``kts run``'s own way), in a bare IPython shell, and inside notebook 06's
explorer widget, and check the noise filters of ``kts.config``.
"""
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import nbformat
import pytest

from kts import config, pipeline, publish

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
FIGURE_FUNCTIONS = publish.figure_functions()  # every kts.plots / kts.explorer function that returns a figure
# console and output lines that must not appear (the noise kts filters)
NOISE = re.compile(r"cuInit|Kernel is running over TCP|Input dict contained keys|oneDNN custom operations"
                   r"|cpu_feature_guard|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] ", re.M)


def _figure_texts(cell):
    for out in cell.get("outputs", []):
        text = out.get("data", {}).get("text/plain", "")
        if text.startswith("<Figure size"):
            yield out


def _draws_figure(cell) -> bool:
    return publish.draws_figure(cell, FIGURE_FUNCTIONS)


def _pngs(outputs):
    return publish.pngs({"outputs": outputs})


def test_figure_functions_are_found():
    assert {"plots.figure1", "plots.figure3", "plots.figure5", "plots.figure6",
            "explorer.view_figure", "explorer.threshold_grid"} <= set(FIGURE_FUNCTIONS)


@pytest.fixture(scope="module")
def executed_01(tmp_path_factory):
    """Notebook 01 run by ``kts run --profile quick --only 01`` (papermill, kts run's environment: the
    variables kts run sets for its kernels are removed here, so that it must set them itself)."""
    base = tmp_path_factory.mktemp("figures")
    env = {k: v for k, v in os.environ.items() if k not in pipeline.KERNEL_ENV}
    env[config.PROFILE_ENV] = "quick"
    command = [sys.executable, "-m", "kts", "run", "--profile", "quick", "--only", "01",
               "--results", str(base / "results"), "--runs", str(base / "runs"), "--work", str(base / "work"),
               "--data", os.environ.get(config.DATA_ENV, str(base / "data"))]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return nbformat.read(base / "runs" / "01_data_extraction.ipynb", as_version=4), done.stdout + done.stderr


def test_every_figure_cell_of_notebook_01_shows_one_png(executed_01):
    notebook, _ = executed_01
    figure_cells = [cell for cell in notebook.cells if _draws_figure(cell)]
    assert len(figure_cells) >= 2, "notebook 01 draws figures 1 and 3"
    for cell in figure_cells:
        pngs = _pngs(cell.outputs)
        assert len(pngs) == 1, f"cell {cell.get('id')} should show its figure once as image/png, has {len(pngs)}: " \
                               f"{[list(o.get('data', {})) for o in cell.outputs]}"
        assert 200 < publish.png_width(pngs[0]) <= 1100, "inline figures are PNGs at a modest dpi"


def test_no_figure_is_only_text(executed_01):
    notebook, _ = executed_01
    for cell in notebook.cells:
        for out in _figure_texts(cell):
            assert "image/png" in out["data"], f"cell {cell.get('id')} shows only {out['data']['text/plain']!r}"


def test_no_known_noise_in_outputs_or_console(executed_01):
    notebook, console = executed_01
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                assert not NOISE.search(out.text), f"cell {cell.get('id')} prints noise: {out.text!r}"
    assert not NOISE.search(console), console


def _explorer_notebook(path: Path) -> None:
    """Notebook 06's explorer cell, verbatim, on two small synthetic slices and a fake Mask R-CNN."""
    cells = {c.get("id"): c for c in nbformat.read(NOTEBOOKS / "06_explore.ipynb", as_version=4).cells}
    setup, explorer = cells["cell-02"], cells["cell-09"]  # its imports and the explorer
    assert "Explorer" in explorer.source, "cell-09 is no longer notebook 06's explorer: update this test"
    fake = textwrap.dedent("""\
        import types
        import numpy as np
        import pandas as pd

        class Slices:
            def __init__(self, **arrays):
                self.__dict__.update(arrays)

            def __len__(self):
                return len(self.images)

        class FakeMaskRCNN:
            config = types.SimpleNamespace(crop_size=16)
            score_threshold = 0.5

            def predict(self, crops, score_threshold=None):
                masks = np.zeros((1, 16, 16), bool)
                masks[0, 6:10, 6:10] = True
                return [{"masks": masks, "scores": np.array([0.9])} for _ in crops]

        yy, xx = np.mgrid[:64, :64]
        kidney = (yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2
        tumour = ((yy - 28) ** 2 + (xx - 36) ** 2 < 5 ** 2).astype(np.int32)
        test = Slices(images=np.stack([xx * 4.0, yy * 4.0]), kidney_masks=np.stack([kidney, kidney]),
                      tumor_labels=np.stack([tumour, tumour]),
                      index=pd.DataFrame({"case_id": ["case-a", "case-b"], "weighting": ["t2", "t1_post"]}))
        probabilities = np.stack([kidney * 0.8, kidney * 0.6])
        tumor_model = FakeMaskRCNN()
        THRESHOLD, SLICE = 0.5, 0
        """)
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(setup.source), nbformat.v4.new_code_cell(fake),
                      nbformat.v4.new_code_cell(explorer.source)]
    nbformat.write(notebook, path)


@pytest.mark.parametrize("backend", ["Agg", None], ids=["kts-run-Agg", "jupyterlab-inline"])
def test_explorer_figure_shows_inside_its_output_widget(tmp_path, monkeypatch, backend):
    """The explorer shows its picture with ``display(fig)`` in an Output widget: the PNG must be there, once,
    under ``kts run``'s Agg and under the inline backend a JupyterLab kernel starts with (there ipywidgets
    loads matplotlib_inline, which installs its own figure formatter)."""
    for key, value in pipeline.KERNEL_ENV.items():
        monkeypatch.setenv(key, value)
    if backend is None:
        monkeypatch.delenv("MPLBACKEND")
    else:
        monkeypatch.setenv("MPLBACKEND", backend)
    source, executed = tmp_path / "explorer.ipynb", tmp_path / "explorer-run.ipynb"
    _explorer_notebook(source)
    pipeline.execute_notebook(source, executed)
    notebook = nbformat.read(executed, as_version=4)
    state = notebook.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    captured = [out for model in state.values() if model["model_name"] == "OutputModel"
                for out in model["state"].get("outputs", [])]
    assert len(_pngs(captured)) == 1, captured
    assert not any(out.get("data", {}).get("text/plain", "").startswith("<Figure size")
                   and "image/png" not in out["data"] for out in captured)


def test_importing_kts_plots_in_an_ipython_shell_registers_png_and_quiets_noise(tmp_path):
    """A fresh IPython shell (no pyplot, no backend chosen), then ``import kts.plots``: a Figure formats as
    PNG, and the tf_keras dict warning is hidden while other warnings show."""
    script = textwrap.dedent("""\
        import sys
        from traitlets.config import Config
        from IPython.core.interactiveshell import InteractiveShell
        cfg = Config()
        cfg.HistoryManager.enabled = False
        shell = InteractiveShell.instance(config=cfg)
        from matplotlib.figure import Figure
        assert "image/png" not in shell.display_formatter.format(Figure())[0]
        import kts.plots
        fig = Figure(figsize=(4, 3))
        fig.subplots().plot([0, 1], [1, 0])
        data, _ = shell.display_formatter.format(fig)
        assert "matplotlib.pyplot" not in sys.modules, "kts must not pull in pyplot"
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("Input dict contained keys ['image_info'] which did not match any model input. "
                          "They will be ignored by the model.")
            warnings.warn("a real warning")
        assert [str(w.message) for w in caught] == ["a real warning"], caught
        import base64
        png = base64.b64decode(data["image/png"])
        print(sorted(data), int.from_bytes(png[16:20], "big"))
        """)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    kinds, width = done.stdout.split("]")
    assert "'image/png'" in kinds and "'text/plain'" in kinds
    assert 300 <= int(width) <= 420, "4 inches at 100 dpi, trimmed to the drawing (bbox_inches='tight')"


def test_noise_filter_hides_the_tf_keras_dict_warning_and_keeps_real_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config.quiet_known_noise()
        warnings.warn("Input dict contained keys ['image_info'] which did not match any model input. "
                      "They will be ignored by the model.", UserWarning)
        warnings.warn("the threshold is outside the validated range", UserWarning)
        warnings.warn("Input dict contained keys: a deprecation with the same words", DeprecationWarning)
    messages = [str(w.message) for w in caught]
    assert messages == ["the threshold is outside the validated range",
                        "Input dict contained keys: a deprecation with the same words"]


def test_quiet_known_noise_sets_the_tf_log_level_but_keeps_a_user_choice(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    with warnings.catch_warnings():
        config.quiet_known_noise()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    with warnings.catch_warnings():
        config.quiet_known_noise()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_stderr_filter_drops_cuinit_and_keeps_other_lines():
    """C++ libraries write to file descriptor 2 directly; the filter drops known lines and passes the rest on."""
    script = textwrap.dedent("""\
        import os
        from kts import config
        with config.filtered_stderr():
            os.write(2, b"2026-01-01 00:00:00.000001: E external/local_xla/xla/stream_executor/cuda/"
                        b"cuda_platform.cc:51] failed call to cuInit: INTERNAL: CUDA error: UNKNOWN ERROR (303)\\n")
            os.write(2, b"2026-12-02 12:56:53.983928: E tensorflow/core/framework/node_def_util.cc:680] NodeDef "
                        b"mentions attribute use_unbounded_threadpool which is not in the op definition\\n")
            os.write(2, b"2026-12-02 12:55:54.538766: E tensorflow/core/util/util.cc:131] oneDNN supports DT_INT32 "
                        b"only on platforms with AVX-512. Falling back to the default Eigen-based implementation\\n")
            os.write(2, b"W0000 00:00:1796298664.520671   12535 op_level_cost_estimator.cc:699] Error in "
                        b"PredictCost() for the op: op: \\"CropAndResize\\" attr { key: \\"T\\" }\\n")
            os.write(2, b"a real error from C++\\n")
        os.write(2, b"after\\n")
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "a real error from C++\nafter\n"
