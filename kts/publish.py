"""Executed notebooks a reader can read on the forge without running anything (issue 13, section 1).

``kts run --profile paper`` leaves executed copies in ``runs/paper/``. ``kts publish`` turns them
into the copies committed under ``docs/executed/``: machine paths become placeholders (``<kts>``,
``<tmp>``, ``~``), widget outputs keep their text (the forge cannot render widget state), papermill's
timestamps and file paths are dropped so that a re-run changes only what changed. A copy with an
error output, a traceback, a figure cell without its PNG, a path left over, a forbidden string (a
patient identifier) or an outsized file is refused, naming the notebook and cell, and nothing is
written. ``docs/executed/README.md`` indexes the copies with the run's profile, seed and commit.
``kts publish --only 07`` republishes some notebooks and keeps the other copies, each with the commit
of the run that executed it, provided their code is still the notebooks' code.
"""
from __future__ import annotations

import argparse
import base64
import inspect
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterable

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
MAX_NOTEBOOK_BYTES = 6 * 1024 * 1024  # the forge's notebook viewer gives up on much larger files
MAX_PNG_WIDTH = 1600  # inline figures are drawn at kts.plots.INLINE_DPI; a wider one was saved at print dpi
# an absolute path on a Unix or macOS machine, after the known folders were replaced
LEFTOVER_PATH = re.compile(r"(?<![\w.<>~-])/(?:home|root|tmp|work|Users|private|var/folders|mnt|opt|srv)/[^\s\"']*")
TRACEBACK = "Traceback (most recent call last)"


def figure_functions() -> list[str]:
    """Every ``kts.plots`` / ``kts.explorer`` function that returns a figure, as ``module.name``."""
    from kts import explorer, plots

    return sorted(f"{module.__name__.split('.')[-1]}.{name}" for module in (plots, explorer)
                  for name, f in inspect.getmembers(module, inspect.isfunction)
                  if f.__module__ == module.__name__ and "Figure" in str(inspect.signature(f).return_annotation))


def draws_figure(cell, names: Iterable[str] | None = None) -> bool:
    """True for a code cell that calls a kts figure function or whose output is a matplotlib figure."""
    if cell.get("cell_type") != "code":
        return False
    pattern = re.compile(r"\b(%s)\(" % "|".join(re.escape(n) for n in (names or figure_functions())))
    texts = (out.get("data", {}).get("text/plain", "") for out in cell.get("outputs", []))
    return bool(pattern.search(cell.get("source", ""))) or any(t.startswith("<Figure size") for t in texts)


def pngs(cell) -> list[bytes]:
    """The decoded ``image/png`` outputs of a cell."""
    return [base64.b64decode(out["data"]["image/png"]) for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]


def png_width(png: bytes) -> int:
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return int.from_bytes(png[16:20], "big")


def machine_paths() -> list[tuple[str, str]]:
    """(path, placeholder) pairs, longest path first: the checkout, kts's folders, temp and home."""
    from kts import config

    pairs = [(str(config.project_root()), "<kts>")]
    for env in (config.DATA_ENV, config.WORK_ENV, config.RESULTS_ENV):
        if os.environ.get(env):
            pairs.append((str(Path(os.environ[env]).resolve()), f"<{env}>"))
    pairs += [(sys.prefix, "<python>"), (str(Path(tempfile.gettempdir()).resolve()), "<tmp>"),
              ("/tmp", "<tmp>"), (str(Path.home()), "~")]
    unique = {path: name for path, name in pairs if path not in ("", "/")}
    return sorted(unique.items(), key=lambda pair: -len(pair[0]))


def _scrub(text: str, paths: list[tuple[str, str]]) -> str:
    for path, placeholder in paths:
        text = text.replace(path, placeholder)
    return text


def _texts(out) -> Iterable[str]:
    if "text" in out:
        yield out["text"]
    for mime, value in out.get("data", {}).items():
        if mime.startswith("text/") or mime == "application/json":
            yield value if isinstance(value, str) else str(value)


def publish_notebook(notebook, name: str, paths: list[tuple[str, str]], forbidden: Iterable[str] = (),
                     figure_names: Iterable[str] | None = None):
    """A reader's copy of one executed nbformat notebook; ``ValueError`` naming ``name`` and the cell."""
    import copy

    import nbformat

    names = list(figure_names or figure_functions())
    forbidden = [s for s in forbidden if s]
    notebook = copy.deepcopy(notebook)
    papermill = notebook.metadata.get("papermill", {})
    notebook.metadata.pop("widgets", None)  # widget state: the forge refuses to render notebooks with it
    duration_s = float(papermill.get("duration") or papermill.get("duration_s") or 0.0)
    notebook.metadata["papermill"] = {"parameters": papermill.get("parameters", {}),
                                      "duration_s": round(duration_s, 1)}
    if papermill.get("exception"):
        raise ValueError(f"{name}: the executed copy records an exception; re-run it before publishing")
    for number, cell in enumerate(notebook.cells):
        where = f"{name}: cell {number}"
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.outputs:
            if out.output_type == "error":
                raise ValueError(f"{where}: error output ({out.get('ename')}: {out.get('evalue')}); fix the "
                                 "notebook and re-run it before publishing")
            if WIDGET_MIME in out.get("data", {}):
                out.data.pop(WIDGET_MIME)
                if not out.data:
                    continue
            if "text" in out:
                out.text = _scrub(out.text, paths)
            for mime in list(out.get("data", {})):
                if mime.startswith("text/") and isinstance(out.data[mime], str):
                    out.data[mime] = _scrub(out.data[mime], paths)
            for text in _texts(out):
                if TRACEBACK in text:
                    raise ValueError(f"{where}: a traceback in the output; fix the notebook before publishing")
                leftover = LEFTOVER_PATH.search(text)
                if leftover:
                    raise ValueError(f"{where}: machine path {leftover.group(0)!r} in the output")
                for secret in forbidden:
                    if secret in text:
                        raise ValueError(f"{where}: a forbidden string (identifier) in the output")
            outputs.append(out)
        cell.outputs = outputs
        if draws_figure(cell, names):
            images = pngs(cell)
            if not images:
                raise ValueError(f"{where}: draws a figure but has no image/png output")
            for png in images:
                if png_width(png) > MAX_PNG_WIDTH:
                    raise ValueError(f"{where}: a {png_width(png)}-pixel-wide PNG; figures stay at a modest dpi")
    size = len(nbformat.writes(notebook).encode())
    if size > MAX_NOTEBOOK_BYTES:
        raise ValueError(f"{name}: {size / 2**20:.1f} MiB after publishing (limit "
                         f"{MAX_NOTEBOOK_BYTES / 2**20:.0f} MiB); lower the figures' dpi or their number")
    return notebook


def summary(notebook) -> dict:
    """Figures (image/png outputs) and tables (text/html or markdown tables) a copy shows."""
    figures = sum(len(pngs(cell)) for cell in notebook.cells if cell.cell_type == "code")
    tables = sum(1 for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
                 if "text/html" in out.get("data", {}) or "|---" in out.get("data", {}).get("text/markdown", ""))
    return {"figures": figures, "tables": tables,
            "duration_s": notebook.metadata.get("papermill", {}).get("duration_s", 0.0)}


def publish(runs: str | os.PathLike, dest: str | os.PathLike, profile: str = "paper",
            forbidden: Iterable[str] = (), provenance: dict | None = None,
            only: Iterable[str] | None = None) -> list[Path]:
    """Publish every numbered notebook's executed copy in ``runs`` into ``dest`` (plus a README index).

    A copy takes the commit ``kts run`` recorded in its stamp (``<notebook>.stamp.json``), else the run's
    ``provenance["git_commit"]``; it shows the current notebook's narrative where its code is current
    (:func:`sync_narrative`). ``only`` (notebook prefixes, e.g. ``["07"]``) republishes those and keeps
    every other copy already in ``dest`` as it is, with the commit of the run that executed it
    (``metadata.kts``; the index gives each notebook's commit when they differ). Every copy is checked before any is written: a
    missing notebook, one run under another profile or seed, or any refusal of
    :func:`publish_notebook` leaves ``dest`` as it was.
    """
    import nbformat

    from kts import io as kts_io
    from kts import pipeline

    runs, dest = Path(runs), Path(dest)
    paths, names, forbidden = machine_paths(), figure_functions(), list(forbidden)
    provenance = provenance or {}
    only = None if only is None else list(only)
    sources = pipeline.list_notebooks()
    unmatched = [prefix for prefix in only or () if not any(s.name.startswith(prefix) for s in sources)]
    if unmatched:
        raise ValueError(f"--only {' '.join(unmatched)}: no notebook starts with that; "
                         f"the notebooks are {', '.join(s.name for s in sources)}")
    published, rows, parameters, fresh = {}, [], None, []
    for source in sources:
        republish = only is None or any(source.name.startswith(prefix) for prefix in only)
        executed = (runs if republish else dest) / source.name
        if not executed.is_file():
            raise ValueError(f"{executed}: no executed copy; run `kts run --profile {profile}` first" if republish
                             else f"{executed}: no published copy to keep; publish every notebook (no --only)")
        try:
            notebook = nbformat.read(executed, as_version=4)
        except Exception as exc:  # nbformat raises several types for a damaged file
            raise ValueError(f"{executed}: not a readable notebook ({exc})") from None
        copy = publish_notebook(notebook, source.name, paths, forbidden, names)
        current = nbformat.read(source, as_version=4)
        sync_narrative(copy, current)
        if republish:  # the commit its run recorded beside it (kts run's stamp), else the run's
            copy.metadata["kts"] = {key: provenance[key] for key in ("git_commit", "note") if provenance.get(key)}
            ran_at = _stamp(runs / (source.stem + pipeline.STAMP_SUFFIX)).get("git_commit")
            if ran_at:
                copy.metadata["kts"]["git_commit"] = ran_at
            fresh.append(source.name)
        else:
            if code_cells(copy) != code_cells(current):
                raise ValueError(f"{executed}: out of date with {source.name} (other code); re-run it and "
                                 "include it in --only")
            if not copy.metadata.get("kts", {}).get("git_commit"):  # a copy of unknown provenance
                copy.metadata["kts"] = {"git_commit": "unknown"}
        params = dict(copy.metadata["papermill"]["parameters"])
        if params.get("PROFILE") != profile:
            raise ValueError(f"{executed}: executed with PROFILE={params.get('PROFILE')!r}, not {profile!r}")
        if parameters is not None and params.get("SEED") != parameters.get("SEED"):
            raise ValueError(f"{executed}: SEED={params.get('SEED')} where the other copies have "
                             f"{parameters.get('SEED')}")
        parameters = {**(parameters or {}), **params}
        published[source.name] = copy
        rows.append((source.name, {**summary(copy), **copy.metadata.get("kts", {})}))
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in fresh:
        with kts_io.atomic_path(dest / name) as tmp:
            nbformat.write(published[name], tmp)
        written.append(dest / name)
    for name, copy in published.items():  # kept copies gain metadata.kts once and today's narrative; else untouched
        if name not in fresh and nbformat.writes(copy) != (dest / name).read_text():
            with kts_io.atomic_path(dest / name) as tmp:
                nbformat.write(copy, tmp)
    kts_io.write_text(dest / "README.md", index_markdown(rows, profile, parameters or {}, provenance))
    return written


def _stamp(path: Path) -> dict:
    """``kts run``'s stamp beside an executed notebook (empty if there is none or it is unreadable)."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def sync_narrative(copy, current) -> None:
    """Give an executed copy the current notebook's markdown cells where its code is the current code:
    mending a sentence of the narrative needs no re-run. Where the code or the layout of the cells
    differs, the copy is left as it is (it shows the narrative it ran with)."""
    ran = [cell for cell in copy.cells if "injected-parameters" not in cell.metadata.get("tags", [])]
    if [c.cell_type for c in ran] != [c.cell_type for c in current.cells] or code_cells(copy) != code_cells(current):
        return
    for cell, now in zip(ran, current.cells):
        if cell.cell_type == "markdown":
            cell.source = now.source


def code_cells(notebook) -> list[str]:
    """The code a notebook runs: its code cells' sources, papermill's injected parameters cell aside."""
    return [cell.source for cell in notebook.cells
            if cell.cell_type == "code" and "injected-parameters" not in cell.metadata.get("tags", [])]


def index_markdown(rows: list[tuple[str, dict]], profile: str, parameters: dict, provenance: dict) -> str:
    total = sum(r["duration_s"] for _, r in rows)
    # a row without its own commit (an index rendered on its own) takes the run's
    commits = {r.get("git_commit") or provenance.get("git_commit") or "unknown" for _, r in rows}
    one_run = len(commits) == 1
    where = f"commit `{next(iter(commits))}`" if one_run else "the commit of each notebook's run in the table"
    passed = ", ".join(f"`{k}={v}`" for k, v in sorted(parameters.items()) if k not in ("PROFILE", "SEED"))
    notes: list[tuple[str, dict]] = []  # each run's note once, with a row of that run
    for _, row in rows:
        note = row.get("note") or (provenance.get("note") if one_run else None)
        if note and note not in (n for n, _ in notes):
            notes.append((note, row))
    lines = ["# Executed notebooks",
             "",
             f"Every notebook as `kts run --profile {profile}` executed it (seed {parameters.get('SEED', 0)}, "
             f"{where}, {total / 60:.0f} min of notebook time on "
             f"{provenance.get('cpu_count', '?')} CPU cores), published by `kts publish`: open one to see its "
             "figures, tables and numbers without running anything. The numbered notebooks in "
             "`notebooks/` are the same, without outputs; run those.",
             "",
             *([f"Parameters beyond the profile's: {passed} (see each notebook's parameters cell).", ""]
               if passed else []),
             *[f"This run: {note}." if one_run else f"Run `{_short(row)}`: {note}." for note, row in notes],
             *([""] if notes else []),
             "| notebook | figures | tables | run time |" + ("" if one_run else " commit |"),
             "|---|---:|---:|---:|" + ("" if one_run else "---|")]
    for name, row in rows:
        lines.append(f"| [{name}]({name}) | {row['figures']} | {row['tables']} | {row['duration_s'] / 60:.1f} min |"
                     + ("" if one_run else f" `{_short(row)}` |"))
    return "\n".join(lines) + "\n"


def _short(row: dict) -> str:
    return str(row.get("git_commit") or "unknown")[:10]


def main(argv: list[str] | None = None) -> int:
    """``kts publish``: executed notebooks of a ``kts run`` made readable on the forge (docs/executed/)."""
    import json

    from kts import config

    parser = argparse.ArgumentParser(prog="kts publish", description=main.__doc__)
    parser.add_argument("--profile", default="paper", help="the profile the run used (default paper)")
    parser.add_argument("--runs", default=None, help="executed notebooks (default runs/<profile>)")
    parser.add_argument("--dest", default=None, help="where the copies go (default docs/executed)")
    parser.add_argument("--results", default=None, help="the run's results folder, for its provenance")
    parser.add_argument("--forbid", action="append", default=[], help="a string no output may contain "
                        "(a patient identifier of real data); repeatable")
    parser.add_argument("--only", nargs="+", default=None, help="notebook prefixes to republish (e.g. 07); "
                        "the other published copies are kept with their run's commit")
    args = parser.parse_args(argv)
    root = config.project_root()
    runs = Path(args.runs) if args.runs else root / "runs" / args.profile
    dest = Path(args.dest) if args.dest else root / "docs" / "executed"
    metrics = Path(args.results or config.results_dir(args.profile)) / "metrics.json"
    provenance = json.loads(metrics.read_text()).get("provenance", {}) if metrics.is_file() else {}
    written = publish(runs, dest, args.profile, args.forbid, provenance, only=args.only)
    print(f"{len(written)} executed notebooks published in {dest} (index: {dest / 'README.md'})")
    return 0
