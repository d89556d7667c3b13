"""Faults: a training killed mid-epoch, an interrupted pipeline, a full disk or read-only results folder.

What must hold: a killed training resumes (``resume=True``) to the result of an uninterrupted run;
its last checkpoint is always loadable; an interrupted ``kts run`` restarts at the first notebook
whose executed copy is missing or stale; a write that fails (ENOSPC, EROFS) says which file it could
not write and leaves the previous version of that file untouched, with no temporary file beside it.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
EPOCHS, SEED, KILL_AT = 4, 5, (2, 2)  # kill during the 3rd epoch (0-based 2), after its 3rd batch

TRAIN_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import keras
from kts import train
from test_train import blobs

out, kill_at = sys.argv[1], {kill_at!r}

class Kill(keras.callbacks.Callback):  # SIGKILL in the middle of an epoch, as a power cut would
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

original = train._callbacks
train._callbacks = lambda *a, **k: [Kill()] + original(*a, **k)
(x, y), (vx, vy) = blobs(12, seed=1), blobs(4, seed=2)
train.train_cunet((x, y), (vx, vy), out, model_kwargs=dict(z=2), config=train.TrainConfig(
    epochs={epochs}, batch_size=4, early_stopping_patience=5, reduce_lr_patience=1), seed={seed})
print("NOT KILLED")
"""


def _config():
    from kts import train

    return train.TrainConfig(epochs=EPOCHS, batch_size=4, early_stopping_patience=5, reduce_lr_patience=1)


def _data():
    from test_train import blobs

    return blobs(12, seed=1), blobs(4, seed=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from kts import train

    (x, y), (vx, vy) = _data()
    out = tmp_path_factory.mktemp("full")
    return train.train_cunet((x, y), (vx, vy), out, model_kwargs=dict(z=2), config=_config(), seed=SEED)


def _assert_same_result(resumed, full):
    assert len(resumed.history) == len(full.history) == EPOCHS
    np.testing.assert_array_equal(resumed.history["loss"].to_numpy(), full.history["loss"].to_numpy())
    np.testing.assert_array_equal(resumed.history["val_loss"].to_numpy(), full.history["val_loss"].to_numpy())
    assert resumed.best_epoch == full.best_epoch
    for a, b in zip(full.model.get_weights(), resumed.model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    import keras

    from kts import train

    out = tmp_path / "killed"
    script = TRAIN_SCRIPT.format(tests=str(TESTS), kill_at=KILL_AT, epochs=EPOCHS, seed=SEED)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-3000:]  # killed by SIGKILL
    state = json.loads((out / train.STATE_FILE).read_text())
    assert state["epoch"] == KILL_AT[0]  # the last finished epoch; the killed one left nothing
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    keras.saving.load_model(out / train.LAST_FILE, safe_mode=True)  # the last checkpoint is never corrupt
    (x, y), (vx, vy) = _data()
    resumed = train.train_cunet((x, y), (vx, vy), out, model_kwargs=dict(z=2), config=_config(), seed=SEED,
                                resume=True)
    _assert_same_result(resumed, uninterrupted)


@pytest.mark.slow
def test_training_interrupted_between_checkpoint_files_resumes_exactly(tmp_path, uninterrupted, monkeypatch):
    """The narrow window in ``CheckpointCallback.on_epoch_end``: last.keras written, state.json not yet."""
    from kts import io as kts_io
    from kts import train

    real_write_json = kts_io.write_json

    def interrupted(path, obj):
        if Path(path).name == train.STATE_FILE and obj["epoch"] == 2:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) just after last.keras of epoch 2 was written
        return real_write_json(path, obj)

    (x, y), (vx, vy) = _data()
    out = tmp_path / "window"
    monkeypatch.setattr(kts_io, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train_cunet((x, y), (vx, vy), out, model_kwargs=dict(z=2), config=_config(), seed=SEED)
    monkeypatch.setattr(kts_io, "write_json", real_write_json)
    resumed = train.train_cunet((x, y), (vx, vy), out, model_kwargs=dict(z=2), config=_config(), seed=SEED,
                                resume=True)
    _assert_same_result(resumed, uninterrupted)


# ----------------------------------------------------------------------------- the pipeline


def _notebook(path: Path, code: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("PROFILE = 'quick'\nSEED = 0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def _writer(name: str) -> str:
    return textwrap.dedent(f"""
        import os, pathlib
        flag = pathlib.Path(os.environ["KTS_RESULTS_DIR"]) / "fail_{name}"
        if flag.exists():
            raise RuntimeError("{name} interrupted")
        log = pathlib.Path(os.environ["KTS_RESULTS_DIR"]) / "ran.txt"
        log.write_text((log.read_text() if log.exists() else "") + "{name}\\n")
    """)


@pytest.mark.slow
def test_interrupted_pipeline_restarts_at_the_first_missing_or_stale_notebook(tmp_path, monkeypatch):
    from kts import pipeline

    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    for name in ("01_a", "02_b", "03_c"):
        _notebook(nbs / f"{name}.ipynb", _writer(name))
    monkeypatch.setattr(pipeline, "notebooks_dir", lambda: nbs)
    folders = {k: tmp_path / k for k in ("results", "runs", "work", "data")}
    ran = folders["results"] / "ran.txt"

    def run():
        ran.unlink(missing_ok=True)
        pipeline.run("quick", seed=0, **folders)
        return ran.read_text().split() if ran.exists() else []

    folders["results"].mkdir()
    (folders["results"] / "fail_02_b").write_text("")
    with pytest.raises(pipeline.NotebookFailed, match="02_b.ipynb: cell .* RuntimeError: 02_b interrupted"):
        run()
    assert not (folders["runs"] / "02_b.ipynb").exists()  # no half-written executed copy
    assert not list(folders["runs"].glob(".*tmp*"))
    (folders["results"] / "fail_02_b").unlink()
    assert run() == ["02_b", "03_c"]  # 01 is up to date
    assert run() == []  # everything up to date
    _notebook(nbs / "02_b.ipynb", _writer("02_b") + "\n# edited\n")
    assert run() == ["02_b", "03_c"]  # an edited notebook and everything after it
    (folders["runs"] / "03_c.ipynb").unlink()
    assert run() == ["03_c"]  # a missing executed copy


def test_cli_parameters_are_read_like_papermill_values():
    import argparse

    from kts import pipeline

    assert pipeline.parse_parameter("SEEDS=1") == ("SEEDS", 1)
    assert pipeline.parse_parameter("DELTA=0.05") == ("DELTA", 0.05)
    assert pipeline.parse_parameter("RESUME=False") == ("RESUME", False)
    assert pipeline.parse_parameter("PARTITION=TD-60% VD-20%") == ("PARTITION", "TD-60% VD-20%")
    for bad in ("SEEDS", "=1", "2X=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
            pipeline.parse_parameter(bad)


def test_note_is_stored_in_the_provenance(tmp_path):
    from kts import pipeline

    with pytest.raises(ValueError, match="no metrics.json to annotate"):
        pipeline.annotate(tmp_path, "x")
    (tmp_path / "metrics.json").write_text(json.dumps({"provenance": {"profile": "paper"}, "notebooks": {}}))
    pipeline.annotate(tmp_path, "resumed from earlier checkpoints")
    assert json.loads((tmp_path / "metrics.json").read_text())["provenance"] == {
        "profile": "paper", "note": "resumed from earlier checkpoints"}
    assert "*This run: resumed from earlier checkpoints.*" in pipeline.results_section(tmp_path)
    pipeline.annotate(tmp_path, "")
    assert "note" not in json.loads((tmp_path / "metrics.json").read_text())["provenance"]


# ----------------------------------------------------------------------------- full disk, read-only folder


def _state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_disk_full_while_writing_the_dataset_cache(tmp_path, monkeypatch):
    from kts import data

    from dicom_factory import write_case

    root = tmp_path / "src"
    write_case(root, "CASE-01")
    cache = tmp_path / "cache" / "dataset.npz"
    data.build_dataset(root, cache_path=cache, image_size=32)
    before = _state(cache), _state(data._index_csv_path(cache))

    def full_disk(file, **arrays):  # half a file, then the disk is full
        Path(file).write_bytes(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    with pytest.raises(OSError) as info:
        data.build_dataset(root, cache_path=cache, image_size=32, force=True)
    assert info.value.errno == errno.ENOSPC
    assert str(cache) in str(info.value) and "No space left on device" in str(info.value)
    assert (_state(cache), _state(data._index_csv_path(cache))) == before
    assert sorted(p.name for p in cache.parent.iterdir()) == ["dataset.npz", "dataset_index.csv"]


@pytest.mark.parametrize("code, strerror", [(errno.EROFS, "Read-only file system"),
                                            (errno.ENOSPC, "No space left on device")])
def test_read_only_or_full_results_folder(tmp_path, monkeypatch, code, strerror):
    """As root, chmod does not stop writes: the failure is simulated where the OS would report it."""
    from kts import io as kts_io
    from kts import pipeline

    results = tmp_path / "results"
    target = kts_io.write_json(results / "metrics.json", {"previous": True})
    before = _state(target)

    def refuse(*args, **kwargs):
        raise OSError(code, strerror)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # EROFS/ENOSPC when creating the temporary file
    with pytest.raises(OSError, match=f"{results}/metrics/02_train_cunet.json: cannot write here \\({strerror}\\)"):
        pipeline.record_metrics("02_train_cunet", {"x": 1}, results=results)
    with pytest.raises(OSError, match=f"{target}: cannot write here"):
        kts_io.write_json(target, {"new": True})
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", refuse)  # ... or when renaming it into place
    with pytest.raises(OSError, match=f"{target}: cannot write \\({strerror}\\); the previous version"):
        kts_io.write_json(target, {"new": True})
    monkeypatch.undo()
    assert _state(target) == before
    assert sorted(p.relative_to(results).as_posix() for p in results.rglob("*")) == ["metrics", "metrics.json"]
