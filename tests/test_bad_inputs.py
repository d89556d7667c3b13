"""The bad-input matrix: every kind of bad input, fed to the public entry point that meets it.

Each kind must stop with an error that names the offending file, manifest row or parameter and
the problem, carry no patient identifier, and leave every earlier output (dataset cache,
checkpoints, executed notebooks, results, verified downloads) byte-for-byte and mtime intact,
with no temporary file left beside them. ``KINDS`` is also the README troubleshooting list:
``test_every_kind_has_a_readme_row`` checks that each kind's key phrase has a row there.

Entry points: extraction (``kts.dicom.read_series`` / ``build_dataset``), training
(``kts.train.train_cunet``, ``kts.cunet.build_cunet``), the cascade (``kts.cascade.run_cascade``,
``kts.maskrcnn``), the pipeline (``kts.pipeline.run``, ``python -m kts run``), the manifest
reader (``kts.manifest.read_manifest``) and the fetch client (``kts.fetch.fetch``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import RTStructureSetStorage

from kts import data, dicom
from kts.errors import DicomError, FetchError, ManifestError, MaskError

from dicom_factory import make_dataset, save, undecodable_syntax, write_masks, write_series
from realdata_helpers import LoopbackTCIA, PATIENT, series_zip, tiny_mr_datasets

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECRETS = ("Secret", "SECRET-ID-42", "19010203")  # the fake identifiers dicom_factory writes
N_SLICES, SHAPE, SIZE = 5, (40, 40), 32
STEP = 3.0  # mm between slices


@dataclasses.dataclass
class Case:
    """One bad input, ready to feed: ``call()`` must raise ``error`` whose text holds every ``names``
    entry and matches ``problem``, leaving the files under ``protected`` unchanged."""

    call: Callable[[], Any]
    error: type[BaseException]
    names: list[str]
    problem: str
    protected: list[Path] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Kind:
    key: str        # test id
    readme: str     # the "what went wrong" cell of its README row (the test looks for it)
    make: Callable[[Path], Case]


# ----------------------------------------------------------------------------- shared inputs


def _write_good_case(root: Path, case_id: str, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 1000, SHAPE).astype(np.uint16) for _ in range(N_SLICES)]
    positions = [(0.0, 0.0, STEP * i) for i in range(N_SLICES)]
    uids = write_series(root / case_id / "dicom", arrays, positions)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    kidney = (((yy - 18) ** 2 + (xx - 20) ** 2) <= 64).astype(np.uint8) * 255
    tumor = (((yy - 18) ** 2 + (xx - 20) ** 2) <= 4).astype(np.uint16)
    write_masks(root / case_id / "masks", uids, [kidney] * N_SLICES, [tumor] * N_SLICES)
    return uids


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory):
    """Two good cases and the dataset cache built from them (copied into each test)."""
    base = tmp_path_factory.mktemp("good")
    for i in (1, 2):
        _write_good_case(base / "src", f"CASE-0{i}", seed=i)
    data.build_dataset(base / "src", cache_path=base / "cache" / "dataset.npz", image_size=SIZE)
    return base


_GOOD: Path | None = None


def _copy_good(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(source root, cache file, the bad case's folder CASE-02) in a fresh copy (mtimes kept)."""
    assert _GOOD is not None
    shutil.copytree(_GOOD, tmp_path / "ds", copy_function=shutil.copy2)
    root = tmp_path / "ds" / "src"
    return root, tmp_path / "ds" / "cache" / "dataset.npz", root / "CASE-02"


def _uids(case: Path) -> list[str]:
    """SOPInstanceUIDs of the case's slices in file (= position) order, from the mask names."""
    import pydicom

    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in sorted((case / "dicom").glob("IM_*.dcm"))]


def _rewrite_slice(case: Path, index: int, **kwargs) -> Path:
    """Rewrite slice ``index`` (0-based) with the same UID and position but other attributes."""
    uid = _uids(case)[index]
    pixels = np.full(SHAPE, 500, np.uint16)
    ds = make_dataset(pixels, position=(0.0, 0.0, STEP * index), instance=index + 1, sop_uid=uid, **kwargs)
    return save(ds, case / "dicom" / f"IM_{index + 1:04d}.dcm")


def _extraction(entry: str):
    """A DICOM/mask kind fed to ``read_series`` (+ ``read_png_masks``) or ``build_dataset`` with a cache."""

    def wrap(mutate: Callable[[Path], tuple[list[str], str]], errors=(DicomError,)) -> Callable[[Path], Case]:
        def make(tmp_path: Path) -> Case:
            root, cache, case = _copy_good(tmp_path)
            names, problem = mutate(case)
            error = errors[0] if len(errors) == 1 else errors
            if entry == "build_dataset":
                return Case(lambda: data.build_dataset(root, cache_path=cache, image_size=SIZE), error, names,
                            problem, [cache.parent])

            def read() -> None:
                _, metas = dicom.read_series(case / "dicom")
                data.read_png_masks(case / "masks", metas)

            return Case(read, error, names, problem)

        return make

    return wrap


# ----------------------------------------------------------------------------- DICOM and mask mutations


def corrupt_dicom(case):
    path = case / "dicom" / "IM_0002.dcm"
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    return ["CASE-02/dicom/IM_0002.dcm"], "not a DICOM file"


def truncated_dicom(case):
    path = case / "dicom" / "IM_0002.dcm"
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.6)])
    return ["CASE-02/dicom/IM_0002.dcm"], "truncated"


def dicom_without_pixels(case):
    save(make_dataset(None, modality="RTSTRUCT", sop_class=RTStructureSetStorage), case / "dicom" / "RS.dcm")
    return ["CASE-02/dicom/RS.dcm"], "not an image: it has no pixel data.*RT Structure Set"


def two_series(case):
    ds = make_dataset(np.ones(SHAPE, np.uint16), position=(0, 0, STEP * N_SLICES), series_uid="1.2.826.0.1.99")
    save(ds, case / "dicom" / "IM_0099.dcm")
    return ["CASE-02/dicom", "1.2.826.0.1.99", "IM_0099.dcm"], "mixes two series"


def non_mr_modality(case):
    for i in range(N_SLICES):
        _rewrite_slice(case, i, modality="CT")
    return ["CASE-02/dicom/IM_0001.dcm"], "modality 'CT', not 'MR'.*require_modality=None"


def compressed_without_decoder(case):
    ts = undecodable_syntax()
    if ts is None:
        pytest.skip("every compressed transfer syntax tried has a decoder installed here")
    path = _rewrite_slice(case, 1)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate([b"\xff\xd8" + b"junk" * 20 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    save(ds, path)
    return ["CASE-02/dicom/IM_0002.dcm", str(ts)], "no installed decoder"


def missing_slice(case):
    (case / "dicom" / "IM_0004.dcm").unlink()
    return ["CASE-02/dicom", "IM_0003.dcm", "IM_0005.dcm"], "slices are missing between.*allow_gaps=True"


def non_finite_after_rescale(case):
    _rewrite_slice(case, 1, slope="1e300", intercept=0)
    return ["CASE-02/dicom/IM_0002.dcm"], "NaN or infinite values after RescaleSlope"


def _kidney_png(case: Path, index: int = 1) -> Path:
    return case / "masks" / f"{_uids(case)[index]}_kidney.png"


def mask_size_mismatch(case):
    path = _kidney_png(case)
    Image.fromarray(np.full((30, 40), 255, np.uint8)).save(path)
    return [f"CASE-02/masks/{path.name}", "IM_0002.dcm"], "is 30x40 but its image IM_0002.dcm is 40x40"


def empty_mask(case):
    path = _kidney_png(case)
    Image.fromarray(np.zeros(SHAPE, np.uint8)).save(path)
    return [f"CASE-02/masks/{path.name}"], "is empty \\(no kidney pixel\\).*allow_empty=True"


def mask_bad_labels(case):
    path = _kidney_png(case)
    Image.fromarray(np.full(SHAPE, 2, np.uint8)).save(path)
    return [f"CASE-02/masks/{path.name}"], "has labels \\[2\\].*only 0 and 1"


def missing_mask(case):
    uid = _uids(case)[1]
    (case / "masks" / f"{uid}_tumor.png").unlink()
    return [f"CASE-02/masks/{uid}_tumor.png", "IM_0002.dcm"], "is missing"


# ----------------------------------------------------------------------------- manifest, fetch


def _manifest(tmp_path: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    df = pd.read_csv(ROOT / "data_manifest.csv", dtype=str, keep_default_na=False).head(3)
    path = tmp_path / "my_manifest.csv"
    edit(df).to_csv(path, index=False)
    return path


def _read_manifest_case(path: Path, names: list[str], problem: str) -> Case:
    from kts import manifest

    return Case(lambda: manifest.read_manifest(path), ManifestError, names, problem, [path])


def manifest_missing_column(tmp_path):
    path = _manifest(tmp_path, lambda df: df.drop(columns=["doi"]))
    return _read_manifest_case(path, ["my_manifest.csv"], r"missing column\(s\) \['doi'\]")


def manifest_duplicate_uid(tmp_path):
    def dup(df):
        df.loc[1, "series_instance_uid"] = df.loc[0, "series_instance_uid"]
        return df

    path = _manifest(tmp_path, dup)
    return _read_manifest_case(path, ["my_manifest.csv", "row 3, column series_instance_uid"],
                               r"duplicate SeriesInstanceUID \(also on row 2\)")


def manifest_malformed_uid(tmp_path):
    def bad(df):
        df.loc[0, "series_instance_uid"] = "1.2.03.x"
        return df

    path = _manifest(tmp_path, bad)
    return _read_manifest_case(path, ["my_manifest.csv", "row 2, column series_instance_uid"],
                               "malformed DICOM UID '1.2.03.x'")


def _fetch_case(tmp_path: Path, row_edit: dict, names_extra: list[str], problem: str, request) -> Case:
    from kts import fetch

    server = LoopbackTCIA().__enter__()
    request.addfinalizer(lambda: server.__exit__(None, None, None))
    dest = tmp_path / "dest"
    good = tiny_mr_datasets(2, seed=11)
    good_row = {"source": "tcga-kirc", "patient_id": PATIENT, "series_instance_uid": str(good[0].SeriesInstanceUID),
                "n_instances": 2}
    server.routes[good_row["series_instance_uid"]] = [("ok", series_zip(good))]
    fetch.fetch([good_row], dest, base_url=server.base, timeout=2.0, retries=0, progress=False)  # an earlier download
    bad = tiny_mr_datasets(3, seed=12)
    uid = str(bad[0].SeriesInstanceUID)
    server.routes[uid] = [("ok", series_zip(bad))]
    row = {"source": "tcga-kirc", "patient_id": PATIENT, "series_instance_uid": uid, "n_instances": 3, **row_edit}

    def call():
        try:
            fetch.fetch([row], dest, base_url=server.base, timeout=2.0, retries=0, progress=False)
        finally:  # nothing of the bad series may be left: no partial folder, no unverified target
            assert not list((dest / PATIENT).glob(".kts-partial-*")), "partial download left behind"
            assert not (dest / PATIENT / uid).exists(), "unverified series folder left behind"

    return Case(call, FetchError, [uid, "getImage?SeriesInstanceUID="] + names_extra, problem, [dest])


def fetch_checksum_mismatch(tmp_path, request):
    return _fetch_case(tmp_path, {"sha256": "0" * 64}, [], "checksum [0-9a-f]{64} differs from the manifest's 0{64}",
                       request)


def fetch_count_mismatch(tmp_path, request):
    return _fetch_case(tmp_path, {"n_instances": 5}, [], "got 3 files but the manifest says 5 instances", request)


# ----------------------------------------------------------------------------- pipeline and notebooks


def _previous_run(tmp_path: Path) -> dict[str, Path]:
    folders = {k: tmp_path / k for k in ("results", "runs", "work", "data")}
    for folder in folders.values():
        folder.mkdir()
    (folders["runs"] / "02_train_cunet.ipynb").write_text('{"previous": "run"}\n')
    (folders["runs"] / "02_train_cunet.stamp.json").write_text('{"stamp": "old"}\n')
    (folders["results"] / "metrics.json").write_text('{"previous": "results"}\n')
    (folders["work"] / "last.keras").write_bytes(b"previous checkpoint")
    return folders


def notebook_parameter_type(tmp_path):
    from kts import pipeline

    f = _previous_run(tmp_path)
    return Case(lambda: pipeline.run("quick", seed=0, only=["02"], parameters={"SEED": "1"}, **f),
                pipeline.NotebookFailed, ["02_train_cunet.ipynb", "parameter SEED"],
                "parameter SEED must be int; got str '1'", list(f.values()))


def unknown_profile(tmp_path):
    from kts import pipeline

    f = _previous_run(tmp_path)
    return Case(lambda: pipeline.run("fast", **f), ValueError, ["'fast'"],
                r"unknown profile 'fast': choose one of \['paper', 'quick'\]", list(f.values()))


# ----------------------------------------------------------------------------- models and cascade


def _previous_checkpoints(tmp_path: Path) -> Path:
    out = tmp_path / "cunet"
    out.mkdir()
    for name in ("best.keras", "last.keras", "history.csv", "state.json"):
        (out / name).write_bytes(f"previous {name}".encode())
    return out


def _images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n, size, size)).astype(np.float32)
    return x, (x > 128).astype(np.uint8)


def cunet_input_size(tmp_path):
    from kts.cunet import build_cunet

    return Case(lambda: build_cunet(input_shape=(100, 100, 1), z=2), ValueError, ["100x100", "input_shape"],
                r"must be divisible by 16x16.*112x112")


def train_image_size(tmp_path):
    from kts import train

    out = _previous_checkpoints(tmp_path)
    x, y = _images(4, 100)
    return Case(lambda: train.train_cunet((x, y), (x[:2], y[:2]), out, model_kwargs=dict(z=2),
                                          config=train.TrainConfig(epochs=1)),
                ValueError, ["100x100", "input_shape"], "must be divisible by 16x16", [out])


def resume_other_size(tmp_path):
    from kts import io as kts_io
    from kts import train
    from kts.cunet import build_cunet

    out = tmp_path / "cunet"
    out.mkdir()
    model = build_cunet(input_shape=(32, 32, 1), z=2)
    train.compile_cunet(model, 1e-3)
    for name in (train.LAST_FILE, train.BEST_FILE):
        model.save(out / name)
    kts_io.write_json(out / train.STATE_FILE, {"epoch": 1, "history": [], "best_value": 1.0, "best_epoch": 1,
                                              "stopped": False})
    x, y = _images(4, 48)
    return Case(lambda: train.train_cunet((x, y), (x[:2], y[:2]), out, model_kwargs=dict(z=2),
                                          config=train.TrainConfig(epochs=2), resume=True),
                ValueError, [f"{out}/last.keras"], "trained on 32x32 images and these are 48x48", [out])


def training_images_not_finite(tmp_path):
    from kts import train

    out = _previous_checkpoints(tmp_path)
    x, y = _images(4, 32)
    bad = x.copy()
    bad[1, 3, 3] = np.nan
    return Case(lambda: train.train_cunet((x, y), (bad[:2], y[:2]), out, model_kwargs=dict(z=2)),
                ValueError, ["validation images"], "contain NaN or Inf values", [out])


def maskrcnn_crop_size(tmp_path):
    from kts.config import get_profile
    from kts.maskrcnn import TumorMaskRCNN

    model = TumorMaskRCNN(get_profile("quick").maskrcnn)  # lazily built: the input check runs first
    crops = np.zeros((2, 50, 50), np.float32)
    return Case(lambda: model.fit(crops, np.zeros((2, 50, 50), np.uint16), steps=1), ValueError,
                ["images", "crop_size"], "must be 64x64 \\(the config's crop_size\\); got 50x50")


def maskrcnn_config_size(tmp_path):
    from kts.maskrcnn import MaskRCNNConfig

    return Case(lambda: MaskRCNNConfig(crop_size=100), ValueError, ["crop_size"],
                r"positive multiple of 2\*\*max_level = 32; got 100")


def cascade_probability_shape(tmp_path):
    from kts import cascade

    class Stub:  # run_cascade checks its inputs before it calls the model
        config = type("C", (), {"crop_size": 64})()

        def predict(self, crops, score_threshold=0.5):
            raise AssertionError("predict must not be reached")

    images = np.zeros((2, 64, 64), np.float32)
    return Case(lambda: cascade.run_cascade(images, np.zeros((2, 32, 32), np.float32), Stub()), ValueError,
                ["kidney probabilities/masks"], r"have shape \(2, 32, 32\); the images have \(2, 64, 64\)")


# ----------------------------------------------------------------------------- the matrix

_B, _R = _extraction("build_dataset"), _extraction("read_series")
KINDS: list[Kind] = [
    Kind("corrupt-dicom", "a corrupt DICOM file", _B(corrupt_dicom)),
    Kind("truncated-dicom", "a truncated DICOM file", _B(truncated_dicom)),
    Kind("no-pixel-data", "a DICOM file without pixel data (RTSTRUCT, SEG...)", _B(dicom_without_pixels)),
    Kind("two-series", "two series in one folder", _R(two_series)),
    Kind("non-mr", "a modality other than MR", _B(non_mr_modality)),
    Kind("compressed-no-decoder", "compressed pixel data without a decoder", _R(compressed_without_decoder)),
    Kind("missing-slices", "missing slices (a gap in positions)", _B(missing_slice)),
    Kind("nan-after-rescale", "NaN or Inf pixels after rescaling", _B(non_finite_after_rescale)),
    Kind("mask-size", "a mask whose size differs from its image", _B(mask_size_mismatch, (MaskError,))),
    Kind("empty-mask", "an empty kidney mask", _R(empty_mask, (MaskError,))),
    Kind("mask-labels", "mask labels outside the expected set", _B(mask_bad_labels, (MaskError,))),
    Kind("missing-mask", "a slice without its mask", _B(missing_mask, (MaskError,))),
    Kind("manifest-column", "a manifest with a missing column", manifest_missing_column),
    Kind("manifest-duplicate", "a manifest with a duplicated UID", manifest_duplicate_uid),
    Kind("manifest-uid", "a manifest with a malformed UID", manifest_malformed_uid),
    Kind("fetch-checksum", "a checksum mismatch after download", fetch_checksum_mismatch),
    Kind("fetch-count", "an instance-count mismatch after download", fetch_count_mismatch),
    Kind("notebook-parameter", "a notebook parameter of the wrong type", notebook_parameter_type),
    Kind("unknown-profile", "an unknown profile name", unknown_profile),
    Kind("cunet-size", "an image size the CU-Net cannot take", cunet_input_size),
    Kind("train-size", "training images of a size the CU-Net cannot take", train_image_size),
    Kind("resume-size", "resuming on checkpoints of another image size", resume_other_size),
    Kind("train-nan", "NaN or Inf in training or validation images", training_images_not_finite),
    Kind("maskrcnn-crops", "Mask R-CNN crops of the wrong size", maskrcnn_crop_size),
    Kind("maskrcnn-config", "a Mask R-CNN crop size that is not a multiple of 32", maskrcnn_config_size),
    Kind("cascade-shape", "kidney probabilities of another size than the images", cascade_probability_shape),
]
SLOW = {"notebook-parameter"}  # starts a Jupyter kernel (about 10 s alone, more on a busy machine)


def _snapshot(paths: list[Path]) -> dict[str, tuple[int, int, str]]:
    out = {}
    for top in paths:
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.mark.parametrize("kind", [pytest.param(k, id=k.key, marks=[pytest.mark.slow] if k.key in SLOW else [])
                                  for k in KINDS])
def test_bad_input_names_the_culprit_and_leaves_outputs_intact(kind, tmp_path, good_dataset, request):
    global _GOOD
    _GOOD = good_dataset
    case = kind.make(tmp_path, request) if kind.make.__code__.co_argcount == 2 else kind.make(tmp_path)
    before = _snapshot(case.protected)
    with pytest.raises(case.error) as info:
        case.call()
    message = str(info.value)
    for name in case.names:
        assert name in message, f"{name!r} not named in: {message}"
    assert re.search(case.problem, message), f"problem /{case.problem}/ not in: {message}"
    for secret in SECRETS:
        assert secret not in message
    after = _snapshot(case.protected)
    assert after == before, "an earlier output was changed or a file was left behind"


def test_the_matrix_covers_at_least_15_kinds():
    assert len({k.key for k in KINDS}) == len(KINDS) >= 15


def test_every_kind_has_a_readme_row():
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- troubleshooting:start -->")[1].split("<!-- troubleshooting:end -->")[0]
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| what went")]
    for kind in KINDS:
        assert any(line.startswith(f"| {kind.readme} |") for line in rows), f"README has no row for {kind.readme!r}"


def test_unknown_profile_on_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kts", "run", "--profile", "fast", "--results", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 2
    assert "--profile: invalid choice: 'fast'" in out.stderr and "'quick'" in out.stderr
    assert not (tmp_path / "r").exists()


def test_extraction_kinds_through_the_notebooks_entry_point(tmp_path, good_dataset, monkeypatch):
    """``workflow.prepare_dataset`` (what notebook 01 calls with $KTS_SOURCE_ROOT) reports the same file."""
    import dataclasses as dc

    from kts import config, workflow

    global _GOOD
    _GOOD = good_dataset
    root, _, case = _copy_good(tmp_path)
    corrupt_dicom(case)
    monkeypatch.setenv(config.SOURCE_ENV, str(root))
    profile = dc.replace(config.get_profile("quick"), image_size=SIZE)
    with pytest.raises(DicomError, match=r"CASE-02/dicom/IM_0002\.dcm: is not a DICOM file"):
        workflow.prepare_dataset(profile, data_dir=tmp_path / "data")
    assert not list((tmp_path / "data").rglob("*.npz"))
