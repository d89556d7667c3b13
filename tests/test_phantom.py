"""Tests of the synthetic MR phantom (kts.phantom) and of Figures 1 and 3 (kts.plots)."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from kts import masks, phantom, plots
from kts.errors import KtsInputError


@pytest.fixture(scope="module")
def default_slices():
    """The default 30-case dataset in memory (Section IV: 30 slices of 360x360)."""
    return phantom.generate()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A small dataset on disk: 3 cases (one per weighting), 2 slices each."""
    root = tmp_path_factory.mktemp("ph") / "phantom"
    phantom.write_dataset(root, n_cases=3, seed=5, slices_per_case=2)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- determinism

def test_same_seed_same_arrays_and_other_seed_differs():
    a = phantom.generate_case(1, seed=7)
    b = phantom.generate_case(1, seed=7)
    c = phantom.generate_case(1, seed=8)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image)
        assert np.array_equal(x.kidney_mask, y.kidney_mask)
        assert np.array_equal(x.tumor_labels, y.tumor_labels)
        assert x.meta["sop_instance_uid"] == y.meta["sop_instance_uid"]
    assert not np.array_equal(a[0].image, c[0].image)
    assert a[0].meta["sop_instance_uid"] != c[0].meta["sop_instance_uid"]


def test_same_seed_gives_byte_identical_files(tmp_path):
    phantom.write_dataset(tmp_path / "a", n_cases=2, seed=3)
    phantom.write_dataset(tmp_path / "b", n_cases=2, seed=3)
    phantom.write_dataset(tmp_path / "c", n_cases=2, seed=4)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa == fb and len(fa) == 2 * 3 + 2
    pixels = lambda root: pydicom.dcmread(root / "KTS-PHANTOM-0001/dicom/IM_0001.dcm").PixelData  # noqa: E731
    assert pixels(tmp_path / "a") == pixels(tmp_path / "b")
    assert pixels(tmp_path / "a") != pixels(tmp_path / "c")


def test_anatomy_does_not_depend_on_weighting():
    t2 = phantom.generate_case(4, weighting="t2")[0]
    pre = phantom.generate_case(4, weighting="t1_pre")[0]
    assert np.array_equal(t2.kidney_mask, pre.kidney_mask)
    assert np.array_equal(t2.tumor_labels, pre.tumor_labels)
    assert not np.array_equal(t2.image, pre.image)
    assert t2.meta["study_instance_uid"] == pre.meta["study_instance_uid"]
    assert t2.meta["series_instance_uid"] != pre.meta["series_instance_uid"]


# --------------------------------------------------------------------------- DICOM

def test_dicom_round_trip(written):
    rows = list(csv.DictReader((written / "cases.csv").open()))
    assert len(rows) == 6
    uids = set()
    for row in rows:
        ds = pydicom.dcmread(written / row["dicom_file"])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == phantom.MR_IMAGE_STORAGE == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == "MR"
        assert (ds.Rows, ds.Columns) == (360, 360)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
        for keyword in ("PixelSpacing", "SliceThickness", "ImagePositionPatient", "InstanceNumber",
                        "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "MagneticFieldStrength",
                        "EchoTime", "RepetitionTime", "RescaleSlope", "RescaleIntercept"):
            assert keyword in ds, keyword
        assert ds.PatientID == ds.PatientName == row["case_id"]
        assert ds.PatientBirthDate == "" and "InstitutionName" not in ds
        assert ds.StudyDate == "20000101"
        assert ds.SeriesDescription == phantom.SERIES_DESCRIPTIONS[row["weighting"]]
        assert "(phantom)" in ds.SeriesDescription
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
            assert pydicom.uid.UID(uid).is_valid
        uids.add(ds.SOPInstanceUID)
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        # rescale must be applied: the stored integers are not the signal
        stored = ds.pixel_array
        assert stored.max() <= 4095
        value = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        s = phantom.generate_case(int(row["case_id"][-4:]) - 1, seed=5, slices_per_case=2)[int(row["slice_index"])]
        assert np.array_equal(value.astype(np.float32), s.image)
        assert ds.InstanceNumber == s.slice_index + 1
    assert len(uids) == 6
    slopes = {(float(r["rescale_slope"]), float(r["rescale_intercept"])) for r in rows}
    assert slopes != {(1.0, 0.0)}


def test_series_of_several_slices(written):
    case = written / "KTS-PHANTOM-0002"
    datasets = [pydicom.dcmread(p) for p in sorted((case / "dicom").glob("*.dcm"))]
    assert [d.InstanceNumber for d in datasets] == [1, 2]
    assert len({d.SeriesInstanceUID for d in datasets}) == 1
    z = [float(d.ImagePositionPatient[2]) for d in datasets]
    assert z[0] < z[1]
    slices = phantom.generate_case(1, seed=5, slices_per_case=2)
    assert not np.array_equal(slices[0].kidney_mask, slices[1].kidney_mask)
    overlap = np.logical_and(slices[0].kidney_mask, slices[1].kidney_mask).sum() / slices[0].kidney_mask.sum()
    assert overlap > 0.6  # neighbouring slices: shapes change smoothly


def test_header_overrides_reach_dicom_only(tmp_path):
    root = phantom.write_dataset(tmp_path / "p", n_cases=1,
                                 header_overrides={"PatientName": "Doe^Jane", "PatientBirthDate": "19700101"})
    ds = pydicom.dcmread(root / "KTS-PHANTOM-0001/dicom/IM_0001.dcm")
    assert str(ds.PatientName) == "Doe^Jane" and ds.PatientBirthDate == "19700101"
    for name in ("cases.csv", "phantom.json"):
        text = (root / name).read_text()
        assert "Doe" not in text and "19700101" not in text
    assert json.loads((root / "phantom.json").read_text())["header_overrides"] == ["PatientBirthDate", "PatientName"]
    with pytest.raises(ValueError, match="not DICOM keywords"):
        phantom.write_dataset(tmp_path / "q", n_cases=1, header_overrides={"NotAKeyword": 1})
    with pytest.raises(ValueError, match="may not change"):
        phantom.write_dataset(tmp_path / "q", n_cases=1, header_overrides={"RescaleSlope": 3})


# --------------------------------------------------------------------------- masks and layout

def test_png_masks_round_trip(written, tmp_path):
    rows = list(csv.DictReader((written / "cases.csv").open()))
    for row in rows:
        s = phantom.generate_case(int(row["case_id"][-4:]) - 1, seed=5, slices_per_case=2)[int(row["slice_index"])]
        kidney = masks.read_png(written / row["kidney_mask_file"])
        tumor = masks.read_png(written / row["tumor_mask_file"])
        assert Path(row["kidney_mask_file"]).name == f"{row['sop_instance_uid']}_kidney.png"
        assert kidney.dtype == np.uint8 and set(np.unique(kidney)) <= {0, 255}
        assert np.array_equal(kidney, s.kidney_mask * 255)
        assert tumor.dtype == np.uint16 and np.array_equal(tumor, s.tumor_labels)
        assert int(row["n_tumors"]) == s.n_tumors
    wide = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16 % 65536
    wide = wide.astype(np.uint16)
    wide[0, 0] = 65535
    phantom.write_png(wide, tmp_path / "x.png")
    assert np.array_equal(masks.read_png(tmp_path / "x.png"), wide)


def test_layout_and_parameters_file(written):
    params = json.loads((written / "phantom.json").read_text())
    assert params["generator"] == "kts.phantom" and params["generator_version"] == phantom.GENERATOR_VERSION
    assert (params["seed"], params["difficulty"], params["n_cases"], params["slices_per_case"]) == (5, "paper", 3, 2)
    assert sorted(p.name for p in written.iterdir()) == ["KTS-PHANTOM-0001", "KTS-PHANTOM-0002", "KTS-PHANTOM-0003",
                                                         "cases.csv", "phantom.json"]
    rows = list(csv.DictReader((written / "cases.csv").open()))
    assert [r["weighting"] for r in rows] == ["t1_post", "t1_post", "t2", "t2", "t1_pre", "t1_pre"]
    for column in ("case_id", "weighting", "difficulty", "n_tumors", "tumor_areas_px", "series_instance_uid", "snr"):
        assert column in rows[0]


# --------------------------------------------------------------------------- atomic writing

def test_existing_dataset_is_reused_and_mismatch_refused(written, tmp_path):
    before = (written / "phantom.json").stat().st_mtime_ns
    assert phantom.write_dataset(written, n_cases=3, seed=5, slices_per_case=2) == written
    assert (written / "phantom.json").stat().st_mtime_ns == before
    with pytest.raises(KtsInputError, match="different parameters.*seed"):
        phantom.write_dataset(written, n_cases=3, seed=6, slices_per_case=2)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("x")
    with pytest.raises(KtsInputError, match="not a kts phantom"):
        phantom.write_dataset(other, n_cases=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (phantom.write_dataset(empty, n_cases=1) / "phantom.json").is_file()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = phantom._write_case

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(phantom, "_write_case", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        phantom.write_dataset(tmp_path / "p", n_cases=3)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(phantom, "_write_case", real)
    phantom.write_dataset(tmp_path / "p", n_cases=1)
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


# --------------------------------------------------------------------------- anatomy

def test_shapes_types_and_ranges(default_slices):
    assert len(default_slices) == 30
    for s in default_slices:
        assert s.image.shape == s.kidney_mask.shape == s.tumor_labels.shape == (360, 360)
        assert s.image.dtype == np.float32 and s.image.min() >= 0
        assert s.kidney_mask.dtype == np.uint8 and set(np.unique(s.kidney_mask)) <= {0, 1}
        assert s.tumor_labels.dtype == np.uint16
    assert phantom.generate_case(0, size=128)[0].image.shape == (128, 128)


def test_kidneys_inside_body_two_components(default_slices):
    two = 0
    for s in default_slices:
        body = s.meta["tissue_labels"] > 0
        assert s.kidney_mask.sum() > 1000
        assert np.all(body[s.kidney_mask > 0])
        two += ndimage.label(s.kidney_mask)[1] == 2
        # patient's right kidney (image left) next to the liver, left kidney on the image right
        cols = np.nonzero(s.kidney_mask)[1]
        assert cols.min() < 180 < cols.max()
    assert two >= 25


def test_tumor_instances(default_slices):
    n_touching = 0
    for s in default_slices:
        labels = s.tumor_labels
        n = s.n_tumors
        assert sorted(set(np.unique(labels)) - {0}) == list(range(1, n + 1))
        assert np.all(s.kidney_mask[labels > 0] == 1)                   # tumours inside kidney-with-tumours
        parenchyma = (s.kidney_mask > 0) & (labels == 0)
        for k in range(1, n + 1):
            inst = labels == k
            assert ndimage.label(inst)[1] == 1                           # one piece per instance
            assert np.any(parenchyma & ndimage.binary_dilation(inst))  # touches the kidney
            others = set(np.unique(labels[ndimage.binary_dilation(inst)])) - {0, k}
            n_touching += bool(others)
    counts = [s.n_tumors for s in default_slices]
    assert counts.count(0) >= 1                 # some slices tumour-free (Fig. 1a)
    assert max(counts) >= 3
    assert n_touching >= 1                      # touching tumours keep distinct labels
    assert any(t["exophytic"] for s in default_slices for t in s.meta["tumors"])


def test_weightings_present_and_contrast_order(default_slices):
    assert {s.weighting for s in default_slices} == set(phantom.WEIGHTINGS)
    ratio = {w: [] for w in phantom.WEIGHTINGS}
    for s in default_slices:
        parenchyma = (s.kidney_mask > 0) & (s.tumor_labels == 0) & (s.meta["tissue_labels"] != phantom.SINUS_FAT)
        liver = s.meta["tissue_labels"] == phantom.LIVER
        ratio[s.weighting].append(s.image[parenchyma].mean() / s.image[liver].mean())
    assert np.median(ratio["t2"]) > 1.2       # T2: kidney brighter than liver
    assert np.median(ratio["t1_pre"]) < 0.9   # T1 pre: kidney darker than liver
    assert np.median(ratio["t1_post"]) > 1.0  # T1 post: enhancing kidney


def test_weightings_parameter():
    slices = phantom.generate(n_cases=4, weightings=["t2"])
    assert {s.weighting for s in slices} == {"t2"}
    assert {s.meta["series_description"] for s in slices} == {"AX T2 SSFSE (phantom)"}
    assert [s.weighting for s in phantom.generate(n_cases=4, weightings=("t1_pre", "t2"))] == \
        ["t1_pre", "t2", "t1_pre", "t2"]


def _snr(s: phantom.PhantomSlice) -> float:
    tissue = s.meta["tissue_labels"]
    air = ndimage.binary_erosion(tissue == 0, iterations=8)
    return float(s.image[tissue > 0].mean() - s.image[air].mean()) / float(s.image[air].std())


def test_difficulty_changes_noise():
    snr = {d: np.mean([_snr(phantom.generate_case(i, difficulty=d)[0]) for i in range(3)])
           for d in phantom.DIFFICULTIES}
    assert snr["easy"] > snr["paper"] > snr["hard"]


@pytest.mark.parametrize("kwargs", [dict(difficulty="medium"), dict(difficulty=None), dict(weighting="flair"),
                                    dict(slices_per_case=0), dict(case_index=-1), dict(seed=-3), dict(size=8)])
def test_bad_arguments_raise_value_error(kwargs):
    args = dict(case_index=0) | kwargs
    with pytest.raises(ValueError):
        phantom.generate_case(**args)


def test_bad_dataset_arguments(tmp_path):
    with pytest.raises(ValueError, match="difficulty"):
        phantom.generate(n_cases=1, difficulty="Paper")
    with pytest.raises(ValueError, match="weighting"):
        phantom.generate(n_cases=1, weightings=["t1"])
    with pytest.raises(ValueError, match="empty"):
        phantom.write_dataset(tmp_path / "x", n_cases=1, weightings=[])
    with pytest.raises(ValueError, match="n_cases"):
        phantom.write_dataset(tmp_path / "x", n_cases=0)
    with pytest.raises(ValueError, match="difficulty"):
        phantom.default_root(difficulty="insane")
    assert not (tmp_path / "x").exists()


def test_default_root_follows_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KTS_DATA_DIR", str(tmp_path))
    assert phantom.default_root() == tmp_path / "phantom-paper-seed0"
    assert phantom.default_root(seed=2, difficulty="hard", n_cases=10, slices_per_case=3) == \
        tmp_path / "phantom-hard-seed2-n10-s3"
    assert phantom.default_root(seed=1, data_dir=tmp_path / "other") == tmp_path / "other" / "phantom-paper-seed1"


def test_prepare_dataset_writes_the_phantom_at_default_root(tmp_path):
    """The pipeline's phantom folder is the one ``default_root`` names: one rule for the name."""
    from dataclasses import replace

    from kts import config, workflow

    profile = replace(config.get_profile("quick"), n_cases=3)
    _, root = workflow.prepare_dataset(profile, seed=4, data_dir=tmp_path)
    assert root == phantom.default_root(4, profile.difficulty, 3, profile.slices_per_case, data_dir=tmp_path)
    assert (root / "phantom.json").is_file()


# --------------------------------------------------------------------------- Figures 1 and 3

def test_figure1_picks_none_mild_moderate(default_slices, tmp_path):
    picks = plots.pick_figure1_slices(default_slices)
    burdens = {k: default_slices[i].tumor_burden for k, i in picks.items()}
    assert burdens["none"] == 0 < burdens["mild"] < burdens["moderate"]
    fig = plots.figure1(default_slices)
    assert len(fig.axes) == 3
    assert len(fig.axes[1].collections) >= 1  # red outlines drawn
    a = plots.save_figure(fig, tmp_path / "fig1")
    b = plots.save_figure(plots.figure1(default_slices), tmp_path / "again")
    assert [p.name for p in a] == ["fig1.png", "fig1.pdf"]
    for x, y in zip(a, b):
        assert hashlib.sha256(x.read_bytes()).digest() == hashlib.sha256(y.read_bytes()).digest()
    assert b"CreationDate" not in a[1].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.pdf", "again.png", "fig1.pdf", "fig1.png"]
    tuples = [(s.image, s.kidney_mask, s.tumor_labels) for s in default_slices]
    assert plots.pick_figure1_slices(tuples) == picks
    with pytest.raises(ValueError, match="tumour-free"):
        plots.figure1([s for s in default_slices if s.n_tumors > 0])


def test_figure3(default_slices):
    s = default_slices[1]
    fig = plots.figure3(s.image, s.kidney_mask, tumor_labels=s.tumor_labels)
    assert len(fig.axes) == 2
    assert "360 x 360" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="same shape"):
        plots.figure3(s.image, s.kidney_mask[:10])


@pytest.mark.parametrize("weighting,sign", [("t1_post", -1), ("t2", +1), ("t1_pre", -1)])
def test_paper_difficulty_tumors_are_delineable(weighting, sign):
    """Issue 12: at "paper" difficulty every weighting shows its tumours to a reader (errata E36).

    ccRCC: T2 hyperintense, T1 pre-contrast iso/hypointense with opposed-phase signal drop,
    heterogeneous enhancement below the nephrographic parenchyma after contrast.
    """
    rows = []
    for i in range(45):
        for s in phantom.generate_case(i, seed=321, difficulty="paper", weighting=weighting):
            rows.extend(phantom.tumor_contrast(s))
    cnr = np.array([r["cnr"] for r in rows])
    assert len(cnr) >= 25
    assert np.sign(np.median(cnr)) == sign
    assert np.median(np.abs(cnr)) >= 1.5
    assert np.mean(np.abs(cnr) < 1.0) <= 0.15


def test_tumor_contrast_of_an_invisible_tumor_is_zero():
    s = phantom.generate_case(1, seed=0, difficulty="paper")[0]
    labels = np.zeros_like(s.tumor_labels)
    labels[150:170, 150:170] = 1
    tissue = s.meta["tissue_labels"].copy()
    tissue[140:180, 140:180] = phantom.CORTEX
    flat = phantom.PhantomSlice(image=np.full_like(s.image, 100.0) + np.random.default_rng(0).normal(0, 1, s.image.shape).astype(np.float32),
                                kidney_mask=np.ones_like(s.kidney_mask), tumor_labels=labels, case_id="x",
                                slice_index=0, weighting="t2", difficulty="paper", meta={"tissue_labels": tissue})
    (row,) = phantom.tumor_contrast(flat)
    assert abs(row["cnr"]) < 0.2
