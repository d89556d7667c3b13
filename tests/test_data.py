"""Tests for kts.data: DICOM extraction, masks, preprocessing, the cached dataset, splits."""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage

from kts import data, dicom
from kts.errors import DicomError, KtsInputError, MaskError

from dicom_factory import (SERIES_UID, blob_masks, make_dataset, save, write_case,  # noqa: E402
                           write_masks, write_series)
from dicom_factory import undecodable_syntax as _undecodable_syntax  # noqa: E402


@pytest.fixture
def small_root(tmp_path):
    root = tmp_path / "src"
    for i in range(3):
        write_case(root, f"CASE-{i + 1:02d}", seed=i)
    (root / "phantom.json").write_text(json.dumps({"generator": "test"}))
    pd.DataFrame({"case_id": ["CASE-01", "CASE-02", "CASE-03"], "weighting": ["T1", "T2", "T2"]}).to_csv(
        root / "cases.csv", index=False)
    return root


def shipped_mr_files():
    names = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
             "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_padded.dcm"]
    return [get_testdata_file(n) for n in names]


def decoder_available(path) -> bool:
    from pydicom.pixels import get_decoder

    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    return (not ts.is_compressed) or get_decoder(ts).is_available


def nibabel_data(name):
    import nibabel

    return Path(nibabel.__file__).parent / "nicom" / "tests" / "data" / name


# ----------------------------------------------------------------------------- shipped real files


@pytest.mark.parametrize("path", shipped_mr_files(), ids=lambda p: Path(p).name)
def test_reads_pydicom_shipped_mr_in_every_transfer_syntax(tmp_path, path):
    if not decoder_available(path):
        pytest.skip(f"no decoder installed for {Path(path).name}")
    reference, _ = dicom.read_series(_alone(tmp_path / "ref", get_testdata_file("MR_small.dcm")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MR_small_padded: pydicom warns about the padding
        volume, metas = dicom.read_series(_alone(tmp_path / "x", path), case_id="ship")
    assert volume.shape == (1, 64, 64) and volume.dtype == np.float32
    np.testing.assert_array_equal(volume, reference)
    meta = metas[0]
    assert meta.case_id == "ship" and meta.modality == "MR" and meta.rows == 64 and meta.columns == 64
    assert meta.pixel_spacing == (0.3125, 0.3125)
    stored = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    assert meta.pixel_sha256 == hashlib.sha256(stored.astype("<i2").tobytes()).hexdigest()


def _alone(folder, path):
    folder.mkdir(parents=True)
    shutil.copy(path, folder / Path(path).name)
    return folder


def test_shipped_metadata_carries_no_patient_identifier(tmp_path):
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    _, metas = dicom.read_series(_alone(tmp_path / "s", path))
    text = repr(metas) + json.dumps([m.as_dict() for m in metas])
    for secret in (str(ds.PatientName), str(ds.PatientID), str(ds.InstitutionName)):
        assert secret not in text
    assert metas[0].file_name == "MR_small.dcm"


def test_reads_nibabel_two_slice_series_sorted_by_position(tmp_path):
    folder = tmp_path / "nib"
    folder.mkdir()
    shutil.copy(nibabel_data("1.dcm"), folder / "a.dcm")  # second slice gets the first file name
    shutil.copy(nibabel_data("0.dcm"), folder / "b.dcm")
    volume, metas = dicom.read_series(folder)
    assert volume.shape == (2, 256, 256)
    assert [m.file_name for m in metas] == ["b.dcm", "a.dcm"]
    assert [m.instance_number for m in metas] == [1, 2]
    assert metas[0].slice_position < metas[1].slice_position
    assert np.isclose(metas[1].slice_position - metas[0].slice_position, 3.0, atol=0.01)
    np.testing.assert_array_equal(volume[0], pydicom.dcmread(nibabel_data("0.dcm")).pixel_array)


def test_rescale_applied_on_shipped_decimal_rescale(tmp_path):
    path = nibabel_data("decimal_rescale.dcm")
    ds = pydicom.dcmread(path)
    volume, _ = dicom.read_series(_alone(tmp_path / "r", path))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(volume[0], expected)
    assert volume.min() < 0  # intercept -4096 applied


def test_shipped_non_image_truncated_and_ct_are_refused(tmp_path):
    no_pixels = _alone(tmp_path / "csa", nibabel_data("csa_slice_norm.dcm"))
    with pytest.raises(DicomError, match="csa_slice_norm.dcm.*no pixel data"):
        dicom.read_series(no_pixels)
    truncated = _alone(tmp_path / "trunc", get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(DicomError, match="MR_truncated.dcm.*truncated or corrupt"):
        dicom.read_series(truncated)
    ct = _alone(tmp_path / "ct", get_testdata_file("CT_small.dcm"))
    with pytest.raises(DicomError, match="CT_small.dcm.*modality 'CT'.*require_modality=None"):
        dicom.read_series(ct)
    volume, metas = dicom.read_series(ct, require_modality=None)
    assert metas[0].modality == "CT" and volume.shape == (1, 128, 128)


# ----------------------------------------------------------------------------- synthetic series


def test_sorts_by_position_not_file_order_nor_instance_number(tmp_path):
    arrays = [np.full((8, 8), 10 * (i + 1)) for i in range(4)]  # value tells the true position order
    positions = [(0, 0, 3.0 * i) for i in range(4)]
    # file names put slice 2 first; InstanceNumbers disagree with positions too
    write_series(tmp_path / "s", arrays, positions, names=["d.dcm", "a.dcm", "c.dcm", "b.dcm"],
                 instances=[4, 1, 3, 2])
    volume, metas = dicom.read_series(tmp_path / "s")
    assert volume[:, 0, 0].tolist() == [10, 20, 30, 40]
    assert [m.file_name for m in metas] == ["d.dcm", "a.dcm", "c.dcm", "b.dcm"]
    assert [m.slice_index for m in metas] == [0, 1, 2, 3]


def test_sorts_along_the_slice_normal_for_sagittal_slices(tmp_path):
    iop = [0, 1, 0, 0, 0, -1]  # sagittal: normal = row x column direction = -x
    arrays = [np.full((6, 6), v) for v in (3, 1, 2)]
    write_series(tmp_path / "s", arrays, [(6, 0, 0), (0, 0, 0), (3, 0, 0)], iop=iop)
    volume, metas = dicom.read_series(tmp_path / "s")
    assert volume[:, 0, 0].tolist() == [3, 2, 1]  # ascending along -x: x = 6, 3, 0
    assert [m.slice_position for m in metas] == [-6.0, -3.0, 0.0]


def test_instance_number_breaks_ties_when_gaps_allowed(tmp_path):
    arrays = [np.full((6, 6), v) for v in (2, 1)]
    write_series(tmp_path / "s", arrays, [(0, 0, 0), (0, 0, 0)], names=["a.dcm", "b.dcm"], instances=[2, 1])
    with pytest.raises(DicomError, match="same position"):
        dicom.read_series(tmp_path / "s")
    volume, metas = dicom.read_series(tmp_path / "s", allow_gaps=True)
    assert volume[:, 0, 0].tolist() == [1, 2]


def test_rescale_slope_intercept_applied(tmp_path):
    pixels = np.arange(16).reshape(4, 4)
    write_series(tmp_path / "s", [pixels], slope=0.5, intercept=-10)
    volume, _ = dicom.read_series(tmp_path / "s")
    np.testing.assert_allclose(volume[0], pixels * 0.5 - 10)


def test_inf_after_rescale_is_refused(tmp_path):
    write_series(tmp_path / "s", [np.full((4, 4), 1000)], slope="1e300", intercept=0)
    with pytest.raises(DicomError, match="IM_0001.dcm.*NaN or infinite"):
        dicom.read_series(tmp_path / "s")


def test_metadata_has_no_patient_identifiers(tmp_path):
    write_series(tmp_path / "KTS-0001", [np.ones((4, 4))] * 2)
    _, metas = dicom.read_series(tmp_path / "KTS-0001")
    text = json.dumps([m.as_dict() for m in metas])
    assert "Secret" not in text and "SECRET-ID-42" not in text and "19010203" not in text
    assert metas[0].case_id == "KTS-0001" and metas[0].series_description == "t2 test"
    assert metas[0].series_instance_uid == SERIES_UID


# ----------------------------------------------------------------------------- orientation

ANATOMY = np.arange(5 * 7).reshape(5, 7)  # asymmetric, 5 rows x 7 columns as displayed


@pytest.mark.parametrize("iop, stored", [
    ([1, 0, 0, 0, 1, 0], ANATOMY),
    ([-1, 0, 0, 0, 1, 0], ANATOMY[:, ::-1]),
    ([1, 0, 0, 0, -1, 0], ANATOMY[::-1, :]),
    ([-1, 0, 0, 0, -1, 0], ANATOMY[::-1, ::-1]),
    ([0, 1, 0, 1, 0, 0], ANATOMY.T),
    ([0, -1, 0, -1, 0, 0], ANATOMY.T[::-1, ::-1]),
], ids=["standard", "flip-lr", "flip-ud", "rot180", "transposed", "transposed-rot180"])
def test_orientation_flips_image_and_masks_alike(tmp_path, iop, stored):
    uids = write_series(tmp_path / "s" / "dicom", [stored + 1], iop=iop, spacing=(0.5, 0.8))
    volume, metas = dicom.read_series(tmp_path / "s" / "dicom")
    np.testing.assert_array_equal(volume[0], ANATOMY + 1)
    # the same anatomy drawn as masks in the stored grid comes back aligned with the image
    kidney_stored = (stored >= 10).astype(np.uint8)
    tumor_stored = np.where(stored >= 30, stored - 29, 0).astype(np.uint16)
    write_masks(tmp_path / "s" / "masks", uids, [kidney_stored], [tumor_stored])
    kidney, tumor = data.read_png_masks(tmp_path / "s" / "masks", metas)
    np.testing.assert_array_equal(kidney[0], (ANATOMY >= 10).astype(np.uint8))
    np.testing.assert_array_equal(tumor[0], np.where(ANATOMY >= 30, ANATOMY - 29, 0))
    transposed = iop[0] == 0
    assert metas[0].pixel_spacing == ((0.8, 0.5) if transposed else (0.5, 0.8))


def test_orient_false_keeps_stored_grid(tmp_path):
    write_series(tmp_path / "s", [ANATOMY[:, ::-1]], iop=[-1, 0, 0, 0, 1, 0])
    volume, metas = dicom.read_series(tmp_path / "s", orient=False)
    np.testing.assert_array_equal(volume[0], ANATOMY[:, ::-1])
    assert not metas[0].oriented


@pytest.mark.parametrize("iop, expected", [
    ([1, 0, 0, 0, 1, 0], (False, False, False)),       # axial, radiological already
    ([1, 0, 0, 0, 0, -1], (False, False, False)),      # coronal: R on the left, superior on top
    ([1, 0, 0, 0, 0, 1], (False, True, False)),        # coronal, upside down
    ([0, 1, 0, 0, 0, -1], (False, False, False)),      # sagittal: anterior on the left, superior on top
    ([0, 0, -1, 0, 1, 0], (True, False, False)),       # sagittal stored with columns along -z
    ([0.98, 0.2, 0, -0.2, 0.98, 0], (False, False, False)),  # slightly oblique axial
    ([-0.656, 0.755, 0, 0, 0, -1], (False, False, False)),   # nibabel's sagittal-oblique file
])
def test_display_axes_for_other_planes(iop, expected):
    assert dicom.display_axes(iop) == expected


def test_to_display_on_stacks_and_bad_iop():
    stack = np.stack([ANATOMY, ANATOMY + 1])
    out = dicom.to_display(stack, [-1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(out, stack[:, :, ::-1])
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        dicom.to_display(ANATOMY, [0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        dicom.to_display(ANATOMY, [1, 0, 0])


# ----------------------------------------------------------------------------- DICOM error paths


def test_corrupt_bytes_refused_naming_file(tmp_path):
    write_series(tmp_path / "s", [np.ones((4, 4))])
    (tmp_path / "s" / "junk.dcm").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(DicomError, match=r"junk\.dcm.*not a DICOM file"):
        dicom.read_series(tmp_path / "s")


@pytest.mark.parametrize("keep", [0.5, 0.95], ids=["cut-in-header-or-pixels", "cut-in-pixels"])
def test_truncated_file_refused_naming_file(tmp_path, keep):
    write_series(tmp_path / "s", [np.arange(64 * 64).reshape(64, 64) % 4000])
    path = tmp_path / "s" / "IM_0001.dcm"
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(DicomError, match="IM_0001.dcm"):
        dicom.read_series(tmp_path / "s")


def test_header_only_truncation_refused(tmp_path):
    path = save(make_dataset(np.ones((4, 4))), tmp_path / "s" / "x.dcm")
    path.write_bytes(path.read_bytes()[:180])
    with pytest.raises(DicomError, match=r"x\.dcm.*(truncated|not a DICOM)"):
        dicom.read_series(tmp_path / "s")


def test_rtstruct_like_object_without_pixels_refused(tmp_path):
    write_series(tmp_path / "s", [np.ones((4, 4))])
    rt = make_dataset(None, modality="RTSTRUCT", sop_class=RTStructureSetStorage)
    save(rt, tmp_path / "s" / "RS.dcm")
    with pytest.raises(DicomError, match=r"RS\.dcm.*not an image.*RT Structure Set Storage"):
        dicom.read_series(tmp_path / "s")


def test_two_series_in_one_folder_refused_naming_both(tmp_path):
    write_series(tmp_path / "s", [np.ones((4, 4))], names=["a.dcm"], series_uid="1.2.3.4")
    write_series(tmp_path / "s", [np.ones((4, 4))], names=["b.dcm"], series_uid="1.2.3.5",
                 positions=[(0, 0, 3)])
    with pytest.raises(DicomError) as info:
        dicom.read_series(tmp_path / "s")
    message = str(info.value)
    assert "1.2.3.4" in message and "1.2.3.5" in message and "a.dcm" in message and "b.dcm" in message


def test_ct_modality_refused_by_default(tmp_path):
    write_series(tmp_path / "s", [np.ones((4, 4))], modality="CT")
    with pytest.raises(DicomError, match="IM_0001.dcm.*'CT'"):
        dicom.read_series(tmp_path / "s")
    volume, _ = dicom.read_series(tmp_path / "s", require_modality=None)
    assert volume.shape == (1, 4, 4)


def test_compressed_syntax_without_decoder_refused(tmp_path):
    ts = _undecodable_syntax()
    if ts is None:
        pytest.skip("every compressed syntax tried has an installed decoder here")
    ds = make_dataset(np.ones((8, 8)))
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate([b"\xff\xd8" + b"junk" * 20 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    save(ds, tmp_path / "s" / "comp.dcm")
    with pytest.raises(DicomError, match=rf"comp\.dcm.*{ts}.*decoder"):
        dicom.read_series(tmp_path / "s")


def test_unknown_transfer_syntax_refused(tmp_path):
    path = save(make_dataset(np.ones((8, 8))), tmp_path / "s" / "odd.dcm")
    raw = path.read_bytes()
    # an unknown UID of the same length (19 bytes with padding), so the header stays valid
    unknown = b"1.2.826.0.1.3680.9\0"
    assert len(unknown) == len(ExplicitVRLittleEndian)
    path.write_bytes(raw.replace(ExplicitVRLittleEndian.encode(), unknown, 1))
    with pytest.raises(DicomError, match=r"odd\.dcm.*unknown transfer syntax 1\.2\.826\.0\.1\.3680\.9"):
        dicom.read_series(tmp_path / "s")


def test_missing_slice_refused_naming_neighbours(tmp_path):
    arrays = [np.ones((4, 4))] * 4
    write_series(tmp_path / "s", arrays, [(0, 0, 0), (0, 0, 3), (0, 0, 6), (0, 0, 12)])
    with pytest.raises(DicomError, match=r"between IM_0003\.dcm and IM_0004\.dcm"):
        dicom.read_series(tmp_path / "s")
    volume, _ = dicom.read_series(tmp_path / "s", allow_gaps=True)
    assert volume.shape[0] == 4


def test_non_parallel_and_mixed_size_slices_refused(tmp_path):
    write_series(tmp_path / "a", [np.ones((4, 4))], names=["a.dcm"])
    write_series(tmp_path / "a", [np.ones((4, 4))], names=["b.dcm"], iop=[1, 0, 0, 0, 0, -1], positions=[(0, 0, 3)])
    with pytest.raises(DicomError, match="not parallel"):
        dicom.read_series(tmp_path / "a")
    write_series(tmp_path / "b", [np.ones((4, 4))], names=["a.dcm"])
    write_series(tmp_path / "b", [np.ones((4, 6))], names=["b.dcm"], positions=[(0, 0, 3)])
    with pytest.raises(DicomError, match="one image size"):
        dicom.read_series(tmp_path / "b")


def test_empty_or_missing_folder_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="holds no files"):
        dicom.read_series(tmp_path / "empty")
    with pytest.raises(DicomError, match="not a folder"):
        dicom.read_series(tmp_path / "nope")


# ----------------------------------------------------------------------------- mask error paths


@pytest.fixture
def one_case(tmp_path):
    shape = (20, 24)
    uids = write_series(tmp_path / "c" / "dicom", [np.ones(shape)] * 2)
    _, metas = dicom.read_series(tmp_path / "c" / "dicom")
    return tmp_path / "c" / "masks", uids, metas, shape


def test_masks_paired_by_sop_uid_and_binarised(one_case):
    mask_dir, uids, metas, shape = one_case
    kidneys = [blob_masks(shape, (8, 8))[0], blob_masks(shape, (10, 14))[0]]
    tumors = [np.zeros(shape), blob_masks(shape, (10, 14))[1] * 3]
    write_masks(mask_dir, uids, kidneys, tumors)
    kidney, tumor = data.read_png_masks(mask_dir, metas[::-1])  # order follows metas, not files
    assert kidney.dtype == np.uint8 and tumor.dtype == np.uint16 and kidney.shape == (2, *shape)
    np.testing.assert_array_equal(kidney[0], kidneys[1] // 255)
    assert set(np.unique(tumor[0])) == {0, 3} and not tumor[1].any()


def test_missing_mask_refused(one_case):
    mask_dir, uids, metas, shape = one_case
    write_masks(mask_dir, uids[:1], [blob_masks(shape, (8, 8))[0]], [np.zeros(shape)])
    with pytest.raises(MaskError, match=rf"{uids[1]}_kidney\.png.*missing"):
        data.read_png_masks(mask_dir, metas)


def test_mask_size_mismatch_refused(one_case):
    mask_dir, uids, metas, shape = one_case
    write_masks(mask_dir, uids, [blob_masks(shape, (8, 8))[0]] * 2, [np.zeros(shape)] * 2)
    Image.fromarray(np.zeros((shape[1], shape[0]), np.uint16)).save(mask_dir / f"{uids[1]}_tumor.png")
    with pytest.raises(MaskError, match=rf"{uids[1]}_tumor\.png.*is 24x20.*20x24"):
        data.read_png_masks(mask_dir, metas)


def test_empty_kidney_mask_refused_unless_allowed(one_case):
    mask_dir, uids, metas, shape = one_case
    write_masks(mask_dir, uids, [blob_masks(shape, (8, 8))[0], np.zeros(shape)], [np.zeros(shape)] * 2)
    with pytest.raises(MaskError, match=rf"{uids[1]}_kidney\.png.*empty.*allow_empty"):
        data.read_png_masks(mask_dir, metas)
    kidney, _ = data.read_png_masks(mask_dir, metas, allow_empty=True)
    assert not kidney[1].any()


def test_bad_kidney_labels_refused(one_case):
    mask_dir, uids, metas, shape = one_case
    bad = blob_masks(shape, (8, 8))[0] // 255 * 2
    write_masks(mask_dir, uids, [bad, bad], [np.zeros(shape)] * 2)
    with pytest.raises(MaskError, match=rf"{uids[0]}_kidney\.png.*labels \[2\]"):
        data.read_png_masks(mask_dir, metas)


def test_rgb_mask_refused(one_case):
    mask_dir, uids, metas, shape = one_case
    write_masks(mask_dir, uids, [blob_masks(shape, (8, 8))[0]] * 2, [np.zeros(shape)] * 2)
    Image.new("RGB", (shape[1], shape[0])).save(mask_dir / f"{uids[0]}_kidney.png")
    with pytest.raises(MaskError, match="RGB"):
        data.read_png_masks(mask_dir, metas)


def test_tumor_outside_kidney_policy(one_case):
    mask_dir, uids, metas, shape = one_case
    kidney = blob_masks(shape, (8, 8))[0]
    tumor = blob_masks(shape, (15, 18))[1]  # elsewhere
    write_masks(mask_dir, uids, [kidney] * 2, [tumor] * 2)
    with pytest.raises(MaskError, match=r"_tumor\.png.*outside the kidney"):
        data.read_png_masks(mask_dir, metas)
    with pytest.warns(UserWarning, match="outside the kidney"):
        k, _ = data.read_png_masks(mask_dir, metas, tumor_outside_kidney="warn")
    assert not k[0][tumor > 0].any()
    k, _ = data.read_png_masks(mask_dir, metas, tumor_outside_kidney="merge")
    assert k[0][tumor > 0].all()
    with pytest.raises(ValueError, match="tumor_outside_kidney"):
        data.read_png_masks(mask_dir, metas, tumor_outside_kidney="ignore")


# ----------------------------------------------------------------------------- preprocessing


def test_normalise_range_percentiles_and_constant():
    rng = np.random.default_rng(0)
    image = rng.normal(500, 50, (64, 64))
    image[0, 0] = 1e6  # one outlier does not squash the rest
    out = data.normalise(image)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 255
    assert 100 < np.median(out) < 155
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = data.normalise(np.full((8, 8), 7.0))
    assert flat.dtype == np.float32 and not flat.any()
    with pytest.raises(ValueError, match="percentiles"):
        data.normalise(image, low=99, high=1)


def test_resize_image_area_interpolation():
    image = data.normalise(np.random.default_rng(1).random((360, 360)))
    out = data.resize_image(image)
    assert out.shape == (320, 320) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert abs(float(out.mean()) - float(image.mean())) < 0.5  # area averaging keeps the mean
    checker = np.indices((40, 40)).sum(0) % 2 * 255.0
    assert np.allclose(data.resize_image(checker, 20), 127.5)  # no aliasing: 2x2 blocks averaged
    assert data.resize_image(image, (100, 80)).shape == (100, 80)
    with pytest.raises(ValueError, match="size"):
        data.resize_image(image, 0)


def test_resize_mask_keeps_labels_exactly():
    labels = np.zeros((360, 360), np.uint16)
    labels[100:140, 100:140] = 1
    labels[200:230, 50:90] = 2
    labels[300:310, 300:320] = 7
    out = data.resize_mask(labels)
    assert out.shape == (320, 320) and out.dtype == np.uint16
    assert set(np.unique(out)) == {0, 1, 2, 7}
    kidney = (labels > 0).astype(np.uint8)
    assert set(np.unique(data.resize_mask(kidney, 128))) == {0, 1}
    np.testing.assert_array_equal(data.resize_mask(kidney, 128) > 0, data.resize_mask(labels, 128) > 0)
    with pytest.raises(ValueError, match="size"):
        data.resize_mask(labels, (1, 2, 3))


# ----------------------------------------------------------------------------- dataset and cache


def test_build_dataset_shapes_index_and_provenance(small_root):
    ds = data.build_dataset(small_root, image_size=32)
    assert ds.images.shape == (6, 32, 32) and ds.images.dtype == np.float32
    assert ds.kidney_masks.dtype == np.uint8 and set(np.unique(ds.kidney_masks)) == {0, 1}
    assert ds.tumor_labels.dtype == np.uint16 and ds.images.min() >= 0 and ds.images.max() <= 255
    index = ds.index
    assert list(index.columns) == data._INDEX_COLUMNS and len(index) == 6
    assert (index["source"] == "phantom").all()
    assert index.set_index("case_id")["weighting"].to_dict() == {"CASE-01": "T1", "CASE-02": "T2", "CASE-03": "T2"}
    assert (index["n_tumors"] == 1).all()
    assert index["file"].iloc[0] == "CASE-01/dicom/IM_0001.dcm"
    assert index["image_sha256"].iloc[0] == hashlib.sha256(ds.images[0].tobytes()).hexdigest()
    assert ds.case_ids == ["CASE-01", "CASE-02", "CASE-03"] and not ds.cached
    sub = ds.subset(["CASE-03", "CASE-01"])
    assert len(sub) == 4 and sub.case_ids == ["CASE-01", "CASE-03"]
    np.testing.assert_array_equal(sub.images[2:], ds.images[4:])
    with pytest.raises(ValueError, match="CASE-99"):
        ds.subset(["CASE-99"])


def test_build_dataset_user_source_without_phantom_json(small_root):
    (small_root / "phantom.json").unlink()
    (small_root / "cases.csv").unlink()
    ds = data.build_dataset(small_root, image_size=16)
    assert (ds.index["source"] == "user").all() and (ds.index["weighting"] == "unknown").all()


def test_build_dataset_warns_about_folders_without_dicom(small_root):
    (small_root / "notes").mkdir()
    with pytest.warns(UserWarning, match="notes"):
        data.build_dataset(small_root, image_size=16)


def test_build_dataset_missing_masks_folder_refused(small_root):
    shutil.rmtree(small_root / "CASE-02" / "masks")
    with pytest.raises(MaskError, match="CASE-02/masks"):
        data.build_dataset(small_root, image_size=16)


def test_build_dataset_empty_root_refused(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(KtsInputError, match="no case folder"):
        data.build_dataset(tmp_path / "nothing")


def test_cache_built_once_reused_and_rebuilt_on_change(small_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "ds.npz"
    first = data.build_dataset(small_root, cache, image_size=32)
    assert cache.is_file() and (tmp_path / "cache" / "ds_index.csv").is_file() and not first.cached
    real_read = data.read_series

    def must_not_read(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(data, "read_series", must_not_read)
    second = data.build_dataset(small_root, cache, image_size=32)
    assert second.cached
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.tumor_labels, first.tumor_labels)
    pd.testing.assert_frame_equal(second.index, first.index)
    monkeypatch.setattr(data, "read_series", real_read)
    # another image size is another dataset
    assert not data.build_dataset(small_root, cache, image_size=16).cached
    assert data.build_dataset(small_root, cache, image_size=16).cached
    # change one input file: rebuilt
    mask = next((small_root / "CASE-02" / "masks").glob("*_kidney.png"))
    array = np.asarray(Image.open(mask)).copy()
    array[0, 0] = 255
    Image.fromarray(array).save(mask)
    rebuilt = data.build_dataset(small_root, cache, image_size=16)
    assert not rebuilt.cached and rebuilt.fingerprint != first.fingerprint
    assert not data.build_dataset(small_root, cache, image_size=16, force=True).cached


def test_cache_write_is_atomic(small_root, tmp_path, monkeypatch):
    cache = tmp_path / "ds.npz"
    first = data.build_dataset(small_root, cache, image_size=16)
    before = cache.read_bytes()

    def crash(path, **arrays):
        Path(path).write_bytes(b"half written")
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(KeyboardInterrupt):
        data.build_dataset(small_root, cache, image_size=16, force=True)
    assert cache.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    monkeypatch.undo()
    again = data.build_dataset(small_root, cache, image_size=16)
    assert again.cached and again.fingerprint == first.fingerprint


def test_extraction_of_30_slices_is_fast(tmp_path):
    import time

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 4000, (360, 360)) for _ in range(30)]
    write_series(tmp_path / "s", arrays)
    start = time.perf_counter()
    volume, _ = dicom.read_series(tmp_path / "s")
    assert volume.shape == (30, 360, 360)
    assert time.perf_counter() - start < 5.0  # about 0.3 s here; generous for a shared CPU


# ----------------------------------------------------------------------------- splits

CASES30 = [f"KTS-PHANTOM-{i:04d}" for i in range(1, 31)]


@pytest.mark.parametrize("name, sizes", [
    ("TD-70% VD-6%", (21, 2, 7)), ("TD-75% VD-8%", (23, 2, 5)),
    ("TD-65% VD-15%", (20, 5, 5)), ("TD-60% VD-20%", (18, 6, 6)),
])
def test_split_sizes_of_table_1_on_30_cases(name, sizes):
    train, val = data.PARTITIONS[name]
    assert data.split_sizes(30, train, val) == sizes
    parts = data.split(CASES30, train, val, seed=0)
    assert tuple(len(parts[k]) for k in ("train", "val", "test")) == sizes
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == CASES30


def test_split_by_case_with_several_slices_per_case():
    index = pd.DataFrame({"case_id": [c for c in CASES30 for _ in range(3)], "slice_index": [0, 1, 2] * 30})
    parts = data.split(index, 0.70, 0.06, seed=3)
    train, val, test = (set(parts[k]) for k in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 30


def test_split_reproducible_order_independent_and_seed_dependent():
    a = data.split(CASES30, seed=5)
    assert a == data.split(list(reversed(CASES30)), seed=5)
    assert a != data.split(CASES30, seed=6)


@pytest.mark.parametrize("train, val", [(-0.1, 0.2), (0.9, 0.1), (0.95, 0.2), (0.7, 0.0), (float("nan"), 0.1)])
def test_bad_fractions_refused(train, val):
    with pytest.raises(ValueError):
        data.split(CASES30, train, val)


def test_too_few_cases_refused():
    with pytest.raises(ValueError, match="test set would be empty"):
        data.split(["a", "b"], 0.7, 0.06)
    with pytest.raises(ValueError):
        data.split_sizes(3, 0.7, 0.06)  # 2 train + 1 val leaves no test


def test_partition_names_and_slugs():
    assert data.partition_fractions("70-6") == data.partition_fractions("TD-70% VD-6%") == (0.70, 0.06)
    assert data.partition_slug("TD-65% VD-15%") == "65-15"
    with pytest.raises(ValueError, match="unknown partition"):
        data.partition_fractions("80-10")


def test_save_load_splits_round_trip(tmp_path):
    splits = {data.partition_slug(k) + "/seed0": data.split_partition(CASES30, k, seed=0) for k in data.PARTITIONS}
    path = data.save_splits(tmp_path / "splits.json", splits)
    loaded = data.load_splits(path)
    assert loaded == splits
    record = loaded["70-6/seed0"]
    assert record["partition"] == "TD-70% VD-6%" and record["seed"] == 0 and record["val_fraction"] == 0.06
    raw = json.loads(path.read_text())
    assert isinstance(raw, list) and {"train", "val", "test", "name"} <= set(raw[0])
    with pytest.raises(ValueError, match="two sides"):
        data.save_splits(tmp_path / "bad.json", {"x": {"train": ["a"], "val": ["a"], "test": ["b"]}})
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(KtsInputError, match="broken.json"):
        data.load_splits(tmp_path / "broken.json")


# ----------------------------------------------------------------------------- against kts.phantom

SECRETS = {"PatientName": "Secret^Patient", "PatientBirthDate": "19010203", "InstitutionName": "Secret Hospital",
           "AccessionNumber": "ACC-SECRET-9"}


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    phantom = pytest.importorskip("kts.phantom")
    root = tmp_path_factory.mktemp("phantom") / "ph"
    phantom.write_dataset(root, n_cases=4, seed=0, slices_per_case=3, header_overrides=SECRETS)
    return root


def test_phantom_series_read_back_exactly(phantom_root):
    from kts import phantom

    for case_index in (0, 3):
        truth = phantom.generate_case(case_index, seed=0, slices_per_case=3,
                                      weighting=phantom.weighting_for(case_index))
        case = phantom_root / phantom.case_id_for(case_index)
        volume, metas = dicom.read_series(case / "dicom")
        kidney, tumor = data.read_png_masks(case / "masks", metas)
        assert [m.case_id for m in metas] == [truth[0].case_id] * 3
        for i, s in enumerate(truth):
            np.testing.assert_allclose(volume[i], s.image, rtol=0, atol=1e-3)
            np.testing.assert_array_equal(kidney[i], s.kidney_mask)
            np.testing.assert_array_equal(tumor[i], s.tumor_labels)
        assert [m.slice_position for m in metas] == sorted(m.slice_position for m in metas)


def test_phantom_dataset_index_splits_and_privacy(phantom_root, tmp_path):
    cache = tmp_path / "phantom.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # at 64 px a tiny tumour may vanish: warned, counted
        ds = data.build_dataset(phantom_root, cache, image_size=64)
    assert ds.images.shape == (12, 64, 64) and (ds.index["source"] == "phantom").all()
    cases = pd.read_csv(phantom_root / "cases.csv", dtype={"sop_instance_uid": str})
    merged = ds.index.merge(cases, on="sop_instance_uid", suffixes=("", "_csv"))
    assert len(merged) == 12
    assert (merged["weighting"] == merged["weighting_csv"]).all()
    assert (merged["n_tumors"] <= merged["n_tumors_csv"]).all()  # 64 px may swallow a tiny tumour
    parts = data.split(ds.index, 0.5, 0.25, seed=0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [2, 1, 1]
    assert set(ds.subset(parts["train"]).index["case_id"]).isdisjoint(ds.subset(parts["test"]).index["case_id"])
    blobs = cache.read_bytes() + (tmp_path / "phantom_index.csv").read_bytes()
    for secret in SECRETS.values():
        assert secret.encode() not in blobs
