"""Notebook 06's explorer where students use it: JupyterLab on 127.0.0.1 and a real browser (issue 13, section 4).

JupyterLab serves a copy of ``notebooks/06_explore.ipynb`` (in a temporary folder, so that its
autosave never touches the checkout) with a token, on a free port; headless Chromium (Debian's
``chromium`` package, driven by Playwright for Python through ``executable_path``: browser downloads
are impossible here) opens it, runs all cells, moves the CU-Net threshold and checks that the kidney
IoU shown beside the picture and the picture itself (its ``src``) change, switches an overlay off
and checks that the picture changes again. Any page error, console error or error output fails the
test. Screenshots go to ``runs/browser/`` (git-ignored); the path is printed. JupyterLab and its
kernels are stopped whatever happens.

The copy runs in the quick profile with a shorter training (``CUNET_EPOCHS``/``MASKRCNN_STEPS``,
its own model folder), so that the test takes about two minutes on two cores. Set
``KTS_BROWSER_WORK`` to a folder to keep those models between runs (then it takes about one).
Needs: ``apt-get install chromium`` and ``pip install playwright`` (the ``test`` extra); without
them the test is skipped, saying which is missing (in CI, where ``.ci/run`` sets
``KTS_REQUIRE_BROWSER=1``, it fails instead).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from kts import config

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("KTS_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = ROOT / "runs" / "browser"
# the copy's settings: the quick profile, trained briefly (the explorer is under test, not the models)
PARAMETERS = {"PROFILE": "quick", "CUNET_EPOCHS": 4, "MASKRCNN_STEPS": 20, "THRESHOLD": 0.5}
RUN_ALL_TIMEOUT_S = 300
CHANGE_TIMEOUT_S = 30

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]


def _require_browser():
    """Skip, saying what is missing; CI (``KTS_REQUIRE_BROWSER=1``, set by .ci/run) fails instead."""
    missing = pytest.fail if os.environ.get("KTS_REQUIRE_BROWSER") else pytest.skip
    if not CHROMIUM.is_file():
        missing(f"{CHROMIUM} not found: install Debian's browser (apt-get install chromium) "
                    "or point KTS_CHROMIUM at a Chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("playwright is not installed: pip install -e '.[test]' (or pip install playwright); "
                    "no browser download is needed")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook_copy(folder: Path) -> Path:
    """notebooks/06_explore.ipynb with the parameters injected after its ``parameters`` cell, as papermill does."""
    notebook = nbformat.read(ROOT / "notebooks" / "06_explore.ipynb", as_version=4)
    at = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in PARAMETERS.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(at + 1, injected)
    path = folder / "06_explore.ipynb"
    nbformat.write(notebook, path)
    return path


def _lab_settings(folder: Path) -> None:
    """JupyterLab user settings: every cell kept in the page, no news or update prompts."""
    settings = {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
                "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}
    for name, values in settings.items():
        path = folder / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _children(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), so kernels started in their own session are found too."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to JupyterLab's process group (it shuts its kernels down), then SIGKILL to whatever is left."""
    below = _children(process.pid)
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    for pid in below:  # kernels live in their own sessions: end each by its id
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on 127.0.0.1 serving the notebook copy; yields (url, token, log path); always stopped."""
    _require_browser()
    folder, home = tmp_path / "lab", tmp_path / "jupyter"
    folder.mkdir()
    _notebook_copy(folder)
    _lab_settings(home / "settings")
    work = Path(os.environ["KTS_BROWSER_WORK"]) if os.environ.get("KTS_BROWSER_WORK") else tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", config.SOURCE_ENV)}
    env.update(config.NOISE_ENV)
    env.update({config.PROFILE_ENV: "quick", config.WORK_ENV: str(work), config.RESULTS_ENV: str(tmp_path / "results"),
                config.DATA_ENV: os.environ.get(config.DATA_ENV, str(tmp_path / "data")),
                "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
                "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
                "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")})
    port, token = _free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
               "--LabApp.expose_app_in_browser=True", "--ServerApp.shutdown_no_activity_timeout=900",
               "--MappingKernelManager.cull_idle_timeout=900", "--MappingKernelManager.cull_interval=60",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    log = SCREENSHOTS / "jupyterlab.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start (exit {process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, token, log
    finally:
        _stop(process)


# JavaScript run in the page (JupyterLab's application object, exposed by expose_app_in_browser)
NOTEBOOK_STATE = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.sessionContext) return null;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = [];
  for (const cell of panel.content.widgets) {
    if (cell.model.type !== 'code') continue;
    const outputs = cell.model.outputs.toJSON();
    cells.push({count: cell.model.executionCount,
                errors: outputs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)});
  }
  return {kernel: kernel ? kernel.status : 'none', cells: cells};
}"""


def _wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_explorer_in_jupyterlab_and_chromium(lab):
    from playwright.sync_api import sync_playwright

    url, token, log = lab
    problems: list[str] = []
    started = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: problems.append(f"console error: {message.text}")
                    if message.type == "error" else None)

            def shot(name: str) -> Path:
                path = SCREENSHOTS / f"explorer_{name}.png"
                page.screenshot(path=str(path), full_page=False)
                return path

            page.goto(f"{url}/lab/tree/06_explore.ipynb?token={token}")
            _wait_for(lambda: (page.evaluate(NOTEBOOK_STATE) or {}).get("kernel") == "idle", 90,
                      "the notebook to open and its kernel to be idle")
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")

            def finished():
                state = page.evaluate(NOTEBOOK_STATE)
                errors = [e for cell in state["cells"] for e in cell["errors"]]
                if errors:
                    return {"errors": errors}
                done = all(cell["count"] is not None for cell in state["cells"]) and state["kernel"] == "idle"
                return state if done else None

            state = _wait_for(finished, RUN_ALL_TIMEOUT_S, "all cells to run", interval_s=1.0)
            ran_s = time.monotonic() - started
            shot("1_ran")
            assert "errors" not in state, f"error output: {state['errors']}"

            def text(selector):
                return page.evaluate("s => { const e = document.querySelector(s); return e ? e.textContent : null; }",
                                     selector)

            def src():
                return page.evaluate("() => { const e = document.querySelectorAll('.kts-explorer-view img');"
                                     " return e.length === 1 ? e[0].getAttribute('src') : null; }")

            iou = ".kts-explorer-scores .kts-kidney-iou"
            _wait_for(lambda: src() and text(iou), 30, "the explorer's picture and scores")
            page.locator(".kts-explorer").scroll_into_view_if_needed()
            assert (text(".kts-explorer-scores .kts-case") or "").strip(), "the case id is shown"
            before_iou, before_src = text(iou), src()
            assert re.fullmatch(r"\d\.\d{3}", before_iou), f"kidney IoU shown as {before_iou!r}"
            assert before_src.startswith("data:image/png")
            shot("2_explorer")

            readout = page.locator(".kts-explorer-threshold .widget-readout")
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type("0.15")
            page.keyboard.press("Enter")
            _wait_for(lambda: text(iou) not in (None, before_iou), CHANGE_TIMEOUT_S,
                      f"the kidney IoU to change from {before_iou} after moving the threshold to 0.15")
            _wait_for(lambda: src() not in (None, before_src), CHANGE_TIMEOUT_S,
                      "the picture to change after moving the threshold")
            moved_iou, moved_src = text(iou), src()
            shot("3_threshold_moved")

            page.locator(".kts-explorer-layer-cunet input[type=checkbox]").click()
            _wait_for(lambda: src() not in (None, moved_src, before_src), CHANGE_TIMEOUT_S,
                      "the picture to change after switching the CU-Net overlay off")
            _wait_for(lambda: text(iou) is None, CHANGE_TIMEOUT_S,
                      "the kidney scores to go when the CU-Net is switched off")
            shot("4_overlay_off")

            after = page.evaluate(NOTEBOOK_STATE)
            errors = [e for cell in after["cells"] for e in cell["errors"]]
            error_nodes = page.locator("[data-mime-type='application/vnd.jupyter.error']").count()
            assert not errors and not error_nodes, f"error output after interaction: {errors}"
        finally:
            browser.close()
    total_s = time.monotonic() - started
    print(f"\nexplorer browser test: cells ran in {ran_s:.0f} s, browser part {total_s:.0f} s in all; "
          f"kidney IoU {before_iou} -> {moved_iou}; screenshots in {SCREENSHOTS}")
    assert not problems, "\n".join(problems)
