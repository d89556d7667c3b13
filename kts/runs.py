"""A resumable run and a set of them: the skeleton the split study (Table I) and the unseen-contrast
study (notebook 07) share.

A run lives in one folder. When it finishes it writes ``metrics.json`` there (its record); a
later call finds that record and returns it without training again, so an interrupted study
continues where it stopped. A record scored under an older rule (``kts.metrics.SCORING``) is
not reused: the run's body is called again, reloads the finished models it finds in the folder
(the trainers resume) and scores them afresh; the record keeps the training's wall time.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from kts import io as kts_io

RECORD_FILE = "metrics.json"


def resumable(run_dir: str | os.PathLike, body: Callable[[Path], dict[str, Any]],
              needs: Iterable[str] = (), settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``body(run_dir)`` -> the run's record, unless a record scored under the current rule exists.

    A record lacking one of the keys in ``needs`` (a score asked for after the run finished) is
    rescored like one of an older rule. The record gets ``wall_s`` (the body's time, or the earlier
    training's when rescored) and ``scoring``; keys the body already holds keep their place, so
    tables keep their column order. ``settings`` (what the training depends on, JSON-able: its
    recipe) are kept in the folder's ``settings.json``; a folder whose run had other settings,
    finished or not, is refused (``ValueError`` naming it and what differs), never silently reused.
    """
    from kts.metrics import SCORING

    run_dir = Path(run_dir)
    if settings is not None:
        _check_settings(run_dir, settings)
    done = run_dir / RECORD_FILE
    previous = json.loads(done.read_text()) if done.exists() else None
    if previous is not None and previous.get("scoring") == SCORING and all(key in previous for key in needs):
        return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    record = body(run_dir)
    record["scoring"] = SCORING
    record["wall_s"] = round(time.perf_counter() - started, 1)
    if previous is not None and "wall_s" in previous:  # rescored: keep the training's wall time
        record["wall_s"] = previous["wall_s"]
    kts_io.write_json(done, record)
    return record


SETTINGS_FILE = "settings.json"


def _check_settings(run_dir: Path, settings: dict[str, Any]) -> None:
    """Write ``settings.json`` into a new run folder; refuse a used folder whose settings differ."""
    settings = json.loads(json.dumps(settings))  # as read back: tuples become lists
    path = run_dir / SETTINGS_FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise ValueError(f"{path}: not readable JSON; delete the folder {run_dir} to run afresh") from None
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        saved = {}  # a run from before kts kept its settings
    else:
        kts_io.write_json(path, settings)
        return
    differ = kts_io.differences(saved, settings)
    if differ:
        raise ValueError(f"{run_dir}: this run was made with other settings ({'; '.join(differ)}); delete the "
                         "folder to run afresh with these, or give the study another work folder")


def run_all(items: Iterable[Any], run: Callable[[Any], dict[str, Any]],
            describe: Callable[[dict[str, Any]], str]) -> "pd.DataFrame":  # noqa: F821
    """``run(item)`` for each item in turn, memory released after each; one table row per record.

    Prints ``[i/n] describe(record) (seconds)`` as each finishes (the study's progress)."""
    import pandas as pd

    items = list(items)
    rows = []
    for i, item in enumerate(items, start=1):
        t0 = time.perf_counter()
        row = run(item)
        release_memory()
        print(f"[{i}/{len(items)}] {describe(row)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows.append(row)
    return pd.DataFrame(rows)


def in_child_process(function: Callable[..., Any], *args, **kwargs) -> Any:
    """``function(*args, **kwargs)`` in a fresh Python process that exits when it returns (issue 15's memory).

    What a training leaves behind in a process (TensorFlow's traced graphs, glibc's arenas: see
    :func:`release_memory`) leaves with the child, so a notebook that trains several models one after
    another holds one training at a time. ``function`` must be importable (a module's, not a notebook's) and its
    arguments and result picklable; an exception in the child is raised here. The child starts by
    ``spawn`` (no fork of a process that runs TensorFlow's threads) and inherits the environment,
    so the thread settings and folders ``kts run`` gives the kernel hold in it too.

    The trade: the caller keeps its own memory while the child holds a second TensorFlow runtime, so the
    two together take more than one process would (notebook 03's comparison models, quick profile: largest
    process 1.97 -> 1.65 GiB, process tree 2.09 -> 3.32 GiB). A Binder limits the tree, so the notebooks
    train in one process; this is for scripts where one process's peak is what counts.
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(function, args, kwargs)


def release_memory() -> None:
    """Drop the finished run's models, then hand the freed heap back to the operating system.

    TensorFlow frees through glibc's ``malloc``, which keeps freed pages in its arenas. Measured over
    four quick-profile Mask R-CNN fine-tunings in one process (issue 15): the process grew about 430 MB
    a run without ``malloc_trim``, about 220 MB with it; what remains is TensorFlow keeping each run's
    traced training graphs alive, which no session clearing frees."""
    import gc

    import keras

    from kts import maskrcnn

    keras.backend.clear_session()
    maskrcnn.clear_session()
    gc.collect()
    trim_heap()


def trim_heap() -> bool:
    """``malloc_trim(0)`` where the C library is glibc (Linux); elsewhere nothing. True if it ran."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is None:
        return False
    trim(0)
    return True
