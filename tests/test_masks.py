"""kts.masks: NIfTI, RTSTRUCT, DICOM-SEG and PNG ground truth matched by identity; SEG export."""
from __future__ import annotations

import datetime as dt

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from kts import masks
from kts.dicom import read_series
from kts.errors import MaskError

from realdata_helpers import PATIENT, make_uid, tiny_mr_datasets, write_series

ROWS, COLS, N = 12, 10, 4


@pytest.fixture()
def tiny_mr_series(tmp_path):
    """A 4-slice axial MR series written in reversed, non-sorted file order; returns (folder, datasets, metas)."""
    datasets = tiny_mr_datasets(N, ROWS, COLS, seed=21)
    folder = tmp_path / "series"
    names = [f"file_{name}.dcm" for name in ("d", "a", "c", "b")]
    write_series(folder, datasets, names=names)
    _, metas = read_series(folder)
    return folder, datasets, metas


def _labels(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, size=(N, ROWS, COLS)).astype(np.uint8)


def _nifti_like_dcm2niix(labels, ds0, extra_slices=0, shift_vox=0.0):
    """NIfTI with i = column, j = flipped row, k = slice, affine in RAS (as dcm2niix writes)."""
    row_dir = np.array(ds0.ImageOrientationPatient[:3], float)
    col_dir = np.array(ds0.ImageOrientationPatient[3:], float)
    normal = np.cross(row_dir, col_dir)
    dr, dc = (float(v) for v in ds0.PixelSpacing)
    t = float(ds0.SliceThickness)
    origin = np.array(ds0.ImagePositionPatient, float)
    flip = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, 0] = flip @ (dc * row_dir)
    affine[:3, 1] = flip @ (-dr * col_dir)
    affine[:3, 2] = flip @ (t * normal)
    affine[:3, 3] = flip @ (origin + (ROWS - 1) * dr * col_dir) + shift_vox * affine[:3, 0]
    data = np.transpose(labels[:, ::-1, :], (2, 1, 0))  # [k, r, c] -> [c, rows-1-r, k]
    if extra_slices:
        data = np.concatenate([data, np.zeros(data.shape[:2] + (extra_slices,), data.dtype)], axis=2)
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


def _stored_labels_by_sop(labels, datasets):
    return {str(ds.SOPInstanceUID): labels[k] for k, ds in enumerate(datasets)}


def test_nifti_maps_ras_voxels_onto_lps_slices(tiny_mr_series, tmp_path):
    folder, datasets, metas = tiny_mr_series
    labels = _labels(1)
    nib.save(_nifti_like_dcm2niix(labels, datasets[0]), tmp_path / "mask.nii.gz")
    got = masks.read_nifti_mask(tmp_path / "mask.nii.gz", folder, metas)
    truth = _stored_labels_by_sop(labels, datasets)
    assert got.shape == (N, ROWS, COLS)
    for i, meta in enumerate(metas):
        np.testing.assert_array_equal(got[i], truth[meta.sop_instance_uid])


def test_nifti_of_another_grid_or_series_is_refused(tiny_mr_series, tmp_path):
    folder, datasets, metas = tiny_mr_series
    labels = _labels(2)
    nib.save(_nifti_like_dcm2niix(labels, datasets[0], extra_slices=2), tmp_path / "longer.nii.gz")
    with pytest.raises(MaskError, match="has 6 slices.*series"):
        masks.read_nifti_mask(tmp_path / "longer.nii.gz", folder, metas)
    nib.save(_nifti_like_dcm2niix(labels, datasets[0], shift_vox=0.5), tmp_path / "shifted.nii.gz")
    with pytest.raises(MaskError, match="does not coincide"):
        masks.read_nifti_mask(tmp_path / "shifted.nii.gz", folder, metas)
    (tmp_path / "bad.nii.gz").write_bytes(b"nope")
    with pytest.raises(MaskError, match="bad.nii.gz"):
        masks.read_nifti_mask(tmp_path / "bad.nii.gz", folder, metas)


# ----------------------------------------------------------------------------- RTSTRUCT
def _square_points(ds, r0, r1, c0, c1):
    """LPS contour of the pixel block rows r0..r1, columns c0..c1 (corners at half-pixel offsets)."""
    origin = np.array(ds.ImagePositionPatient, float)
    row_dir = np.array(ds.ImageOrientationPatient[:3], float)
    col_dir = np.array(ds.ImageOrientationPatient[3:], float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    corners = [(r0 - 0.5, c0 - 0.5), (r0 - 0.5, c1 + 0.5), (r1 + 0.5, c1 + 0.5), (r1 + 0.5, c0 - 0.5)]
    return [float(v) for r, c in corners for v in origin + c * dc * row_dir + r * dr * col_dir]


def _rtstruct(image_ds, target, rois, series_uid=None, with_image_refs=True, z_offset=0.0):
    """A minimal RTSTRUCT; ``rois``: list of (name, geometric type, (r0, r1, c0, c1))."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = make_uid("rt", target, len(rois))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.PatientID = PATIENT
    ds.StudyInstanceUID = image_ds[0].StudyInstanceUID
    ds.SeriesInstanceUID = make_uid("rt-series", target)
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series_uid or image_ds[0].SeriesInstanceUID
    study = Dataset()
    study.RTReferencedSeriesSequence = DicomSequence([ref_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = image_ds[0].FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    roi_items, contour_items = [], []
    for number, (name, kind, box) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ROIName = name
        roi_items.append(roi)
        contour = Dataset()
        points = _square_points(image_ds[target], *box)
        if kind == "POINT":
            points = points[:3]
        points = [v + (z_offset if i % 3 == 2 else 0.0) for i, v in enumerate(points)]
        contour.ContourGeometricType = kind
        contour.NumberOfContourPoints = len(points) // 3
        contour.ContourData = points
        if with_image_refs:
            ref = Dataset()
            ref.ReferencedSOPClassUID = image_ds[target].SOPClassUID
            ref.ReferencedSOPInstanceUID = image_ds[target].SOPInstanceUID
            contour.ContourImageSequence = DicomSequence([ref])
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = DicomSequence([contour])
        contour_items.append(item)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    return ds


def _expected_square(metas, datasets, target, box):
    r0, r1, c0, c1 = box
    sop = str(datasets[target].SOPInstanceUID)
    out = np.zeros((N, ROWS, COLS), np.uint8)
    out[[m.sop_instance_uid for m in metas].index(sop), r0:r1 + 1, c0:c1 + 1] = 1
    return out


@pytest.mark.parametrize("with_image_refs", [True, False], ids=["by-SOPInstanceUID", "by-position"])
def test_rtstruct_square_on_one_slice(tiny_mr_series, tmp_path, with_image_refs):
    folder, datasets, metas = tiny_mr_series
    box = (2, 5, 3, 6)
    rt = _rtstruct(datasets, 2, [("Body", "CLOSED_PLANAR", (0, 11, 0, 9)), ("Tumour 1", "CLOSED_PLANAR", box),
                                 ("Tumour 1 seed", "POINT", box)], with_image_refs=with_image_refs)
    rt.save_as(tmp_path / "rt.dcm", enforce_file_format=True)
    got = masks.read_rtstruct_mask(tmp_path / "rt.dcm", folder, metas)
    np.testing.assert_array_equal(got, _expected_square(metas, datasets, 2, box))
    assert masks.list_rois(tmp_path / "rt.dcm") == {1: "Body", 2: "Tumour 1", 3: "Tumour 1 seed"}


def test_rtstruct_mismatches_name_the_files(tiny_mr_series, tmp_path):
    folder, datasets, metas = tiny_mr_series
    box = (2, 5, 3, 6)
    other = _rtstruct(datasets, 1, [("Tumor", "CLOSED_PLANAR", box)], series_uid=make_uid("another series"))
    other.save_as(tmp_path / "other.dcm", enforce_file_format=True)
    with pytest.raises(MaskError, match=r"other\.dcm: contours series"):
        masks.read_rtstruct_mask(tmp_path / "other.dcm", folder, metas)
    organ = _rtstruct(datasets, 1, [("Liver", "CLOSED_PLANAR", box)])
    organ.save_as(tmp_path / "organ.dcm", enforce_file_format=True)
    with pytest.raises(MaskError, match=r"no ROI whose name matches.*'Liver'"):
        masks.read_rtstruct_mask(tmp_path / "organ.dcm", folder, metas)
    assert masks.read_rtstruct_mask(tmp_path / "organ.dcm", folder, metas, roi_pattern="liver").sum() == 16
    between = _rtstruct(datasets, 1, [("Tumor", "CLOSED_PLANAR", box)], with_image_refs=False, z_offset=1.5)
    between.save_as(tmp_path / "between.dcm", enforce_file_format=True)
    with pytest.raises(MaskError, match="mm from the nearest slice"):
        masks.read_rtstruct_mask(tmp_path / "between.dcm", folder, metas)
    datasets[0].save_as(tmp_path / "image.dcm", enforce_file_format=True)
    with pytest.raises(MaskError, match="not an RTSTRUCT"):
        masks.read_rtstruct_mask(tmp_path / "image.dcm", folder, metas)


# ----------------------------------------------------------------------------- DICOM-SEG
def _prediction(seed=3):
    rng = np.random.default_rng(seed)
    kidney = np.zeros((N, ROWS, COLS), np.uint8)
    kidney[:, 2:9, 2:8] = 1
    kidney[0] = 0  # an empty slice: highdicom omits its frames
    tumor = kidney * (rng.random((N, ROWS, COLS)) > 0.6)
    return kidney, tumor.astype(np.uint8)


def test_seg_export_import_round_trip(tiny_mr_series, tmp_path):
    folder, datasets, metas = tiny_mr_series
    kidney, tumor = _prediction()
    when = dt.datetime(2024, 1, 2, 3, 4, 5)
    path = masks.write_seg(tmp_path / "out" / "pred.seg.dcm", folder, metas, kidney, tumor, content_datetime=when)
    got = masks.read_seg_mask(path, metas, segment_labels=("Kidney", "Tumor"))
    np.testing.assert_array_equal(got["Kidney"], kidney)
    np.testing.assert_array_equal(got["Tumor"], tumor)
    seg = pydicom.dcmread(path)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.PatientID == PATIENT and seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence] == ["64033007", "108369006"]
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "kts CU-Net + Mask R-CNN"
    assert {str(r.SeriesInstanceUID) for r in seg.ReferencedSeriesSequence} == {str(datasets[0].SeriesInstanceUID)}
    assert not list((tmp_path / "out").glob(".*tmp*"))
    again = masks.write_seg(tmp_path / "again.dcm", folder, metas, kidney, tumor, content_datetime=when)
    assert again.read_bytes() == path.read_bytes()


def test_seg_against_another_series_is_refused(tiny_mr_series, tmp_path):
    folder, datasets, metas = tiny_mr_series
    kidney, tumor = _prediction()
    path = masks.write_seg(tmp_path / "pred.dcm", folder, metas, kidney, tumor)
    other_folder = tmp_path / "other"
    write_series(other_folder, tiny_mr_datasets(N, ROWS, COLS, seed=99))
    _, other_metas = read_series(other_folder)
    with pytest.raises(MaskError, match=r"pred\.dcm: references series"):
        masks.read_seg_mask(path, other_metas)
    with pytest.raises(MaskError, match="no segment labelled 'Liver'"):
        masks.read_seg_mask(path, metas, segment_labels=("Liver",))
    with pytest.raises(ValueError, match=r"\[n, H, W\]"):
        masks.write_seg(tmp_path / "bad.dcm", folder, metas, kidney[:2], tumor[:2])


# ----------------------------------------------------------------------------- PNG
def test_png_masks_are_matched_by_sop_uid(tiny_mr_series, tmp_path):
    from PIL import Image

    folder, datasets, metas = tiny_mr_series
    mask_dir = tmp_path / "masks"
    mask_dir.mkdir()
    kidney, tumor = _prediction()
    kidney[0, 5, 5] = 1  # no empty kidney slice
    by_sop = {m.sop_instance_uid: i for i, m in enumerate(metas)}
    for sop, i in by_sop.items():
        Image.fromarray(kidney[i] * 255).save(mask_dir / f"{sop}_kidney.png")
        Image.fromarray(tumor[i].astype(np.uint16)).save(mask_dir / f"{sop}_tumor.png")
    got_kidney, got_tumor = masks.read_png_masks(mask_dir, metas)
    np.testing.assert_array_equal(got_kidney, kidney)
    np.testing.assert_array_equal(got_tumor, tumor)
    (mask_dir / f"{metas[1].sop_instance_uid}_tumor.png").unlink()
    with pytest.raises(MaskError, match=f"{metas[1].sop_instance_uid}_tumor.png"):
        masks.read_png_masks(mask_dir, metas)
