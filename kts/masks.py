"""Ground-truth masks in four formats, matched to slices by identity; predictions out as DICOM-SEG.

Section III.A.2 (the mask image set M paired with the MR images) and Fig. 5 (predicted kidney
and tumour masks). Every importer returns arrays aligned with the ``metas`` that
:func:`kts.dicom.read_series` returns for the image series (``[n, H, W]``, same slice order,
same display transform), and pairs mask and slice by **SOPInstanceUID or patient-space
position, never by file order**. A mask that does not fit its image raises
:class:`kts.errors.MaskError` naming the files.

* PNG per slice (``<SOPInstanceUID>_kidney.png`` / ``_tumor.png``): :func:`read_png_masks`
  (and :func:`read_png` for one file).
* NIfTI (:func:`read_nifti_mask`): NIfTI's affine maps voxel indices to RAS+ millimetres,
  DICOM's ImagePositionPatient/ImageOrientationPatient are in LPS+; kts converts with
  ``RAS = diag(-1, -1, 1) . LPS`` and, for every pixel centre of every DICOM slice, finds the
  NIfTI voxel through the inverse affine. The NIfTI must sample the same grid as the series
  (any axis order or flip, e.g. dcm2niix output); a resampled grid (off by more than
  ``tolerance`` voxels) or slices outside the volume raise :class:`MaskError`.
* DICOM-SEG (:func:`read_seg_mask`, highdicom): frames fetched per referenced SOPInstanceUID,
  segments chosen by label.
* RTSTRUCT (:func:`read_rtstruct_mask`): closed planar contours in patient coordinates
  rasterised (``skimage.draw.polygon``, pixel centres inside the polygon; several contours of
  the selected ROIs on one slice are united) onto the slice named by ContourImageSequence, or,
  when that is absent, the slice whose plane lies within ``tolerance_mm`` of the contour.
  ROIs are chosen by a regular expression on ROIName (default ``tumou?r|mass|lesion|neoplasm``;
  the CPTAC-CCRCC annotations name each lesion by site, e.g. "RIGHT KIDNEY - 1": use
  ``CPTAC_CCRCC_ROI_PATTERN``). POINT contours (seed points) are ignored.

Export (:func:`write_seg`): a BINARY DICOM-SEG with segments "Kidney" (SCT 64033007) and
"Tumour" (SCT 108369006, Neoplasm) referencing the source series, algorithm "kts CU-Net + Mask
R-CNN", written atomically, so it opens in 3D Slicer or OHIF over its series. highdicom copies
the Patient/Study modules from the source images (a SEG must, to attach to its study); kts adds
no other identifier. UIDs are derived from the source series and mask content, so the same
input gives the same UIDs.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kts.errors import MaskError

DEFAULT_ROI_PATTERN = r"tumou?r|mass|lesion|neoplasm"
CPTAC_CCRCC_ROI_PATTERN = r"kidney"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class SliceGeometry:
    """Where one stored slice lies in patient space (LPS, mm), from its DICOM header."""

    sop_instance_uid: str
    file_name: str
    position: np.ndarray      # ImagePositionPatient: centre of pixel (row 0, column 0)
    row_direction: np.ndarray  # direction of increasing column index (IOP[:3])
    col_direction: np.ndarray  # direction of increasing row index (IOP[3:])
    spacing: tuple[float, float]  # (between rows, between columns) = PixelSpacing
    rows: int
    columns: int

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.col_direction)

    def pixel_to_patient(self, r: np.ndarray, c: np.ndarray) -> np.ndarray:
        """LPS coordinates (..., 3) of pixel centres at rows ``r``, columns ``c``."""
        r = np.asarray(r, float)[..., None]
        c = np.asarray(c, float)[..., None]
        return self.position + c * self.spacing[1] * self.row_direction + r * self.spacing[0] * self.col_direction

    def patient_to_pixel(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, distance from the plane in mm) of LPS ``points`` (n, 3)."""
        d = np.asarray(points, float) - self.position
        return d @ self.col_direction / self.spacing[0], d @ self.row_direction / self.spacing[1], d @ self.normal


def renumber(labels: np.ndarray, min_pixels: int = 1) -> np.ndarray:
    """Instances renumbered 1..n in the order of their old labels, those under ``min_pixels`` dropped (uint16)."""
    from skimage.segmentation import relabel_sequential

    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        if labels.dtype != bool and not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"renumber takes integer instance labels; got {labels.dtype} values that are not whole")
        labels = labels.astype(np.int64)
    if min_pixels > 1:
        ids, counts = np.unique(labels, return_counts=True)
        labels = np.where(np.isin(labels, ids[(ids != 0) & (counts < min_pixels)]), 0, labels)
    return relabel_sequential(labels)[0].astype(np.uint16)


def series_geometry(series_folder: str | os.PathLike) -> dict[str, SliceGeometry]:
    """Header geometry of every slice in a DICOM series folder, keyed by SOPInstanceUID."""
    import pydicom

    folder = Path(series_folder)
    if not folder.is_dir():
        raise MaskError(folder, "is not a folder of DICOM slices")
    out: dict[str, SliceGeometry] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM: kts.dicom.read_series reports it
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
            raise MaskError(path, "has no ImagePositionPatient/ImageOrientationPatient/PixelSpacing; masks in "
                                  "patient coordinates (NIfTI, RTSTRUCT) cannot be placed on it")
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        out[str(ds.SOPInstanceUID)] = SliceGeometry(
            sop_instance_uid=str(ds.SOPInstanceUID), file_name=path.name,
            position=np.array([float(v) for v in ds.ImagePositionPatient]),
            row_direction=iop[:3], col_direction=iop[3:],
            spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            rows=int(ds.Rows), columns=int(ds.Columns))
    if not out:
        raise MaskError(folder, "holds no DICOM slices")
    return out


def _metas(series_folder: str | os.PathLike, metas: Sequence[Any] | None) -> list[Any]:
    if metas is not None:
        return list(metas)
    from kts.dicom import read_series

    return read_series(series_folder, require_modality=None)[1]


def _geometries_for(series_folder: str | os.PathLike, metas: Sequence[Any], mask_source: object) -> list[SliceGeometry]:
    geometry = series_geometry(series_folder)
    out = []
    for meta in metas:
        geo = geometry.get(meta.sop_instance_uid)
        if geo is None:
            raise MaskError(mask_source, f"slice {meta.file_name} (SOPInstanceUID {meta.sop_instance_uid}) is not "
                                         f"in {series_folder}; pass the metas of this series")
        out.append(geo)
    return out


def _display(mask: np.ndarray, meta: Any) -> np.ndarray:
    if getattr(meta, "oriented", False):
        from kts.dicom import to_display

        return to_display(mask, meta.image_orientation)
    return mask


# ----------------------------------------------------------------------------- PNG
def read_png(path: str | os.PathLike) -> np.ndarray:
    """One greyscale PNG mask as written by the phantom (uint8 or uint16); a colour or unreadable file raises
    :class:`~kts.errors.MaskError` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise MaskError(path, f"is a {mode} image; a mask must be one greyscale channel of labels")
            array = np.asarray(img)
    except MaskError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MaskError(path, f"cannot be read as PNG ({type(exc).__name__}: {str(exc)[:200]})") from None
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array


def read_png_masks(mask_dir: str | os.PathLike, metas: Sequence[Any], *, allow_empty: bool = False,
                   tumor_outside_kidney: str = "error") -> tuple[np.ndarray, np.ndarray]:
    """Kidney masks (uint8 0/1 [n, H, W]) and tumour label maps (uint16 [n, H, W]) of a series.

    Section III.A.2 (mask image set M). Paired with the slices by SOPInstanceUID file names
    ``<SOPInstanceUID>_kidney.png`` / ``<SOPInstanceUID>_tumor.png``, never by order. The
    kidney mask (kidney with its tumours) may hold 0 and 1 or 0 and 255; the tumour map holds
    0 and instance labels 1..n. Masks are in the stored pixel grid and get the slice's
    :func:`to_display` transform. A missing mask, a size differing from the image, an
    all-zero kidney mask (unless ``allow_empty``), other kidney labels, or tumour pixels outside
    the kidney (``tumor_outside_kidney``: ``"error"``, ``"warn"`` keep them, ``"merge"`` add them
    to the kidney) raise :class:`~kts.errors.MaskError` naming the file.
    """
    import warnings

    from kts.dicom import to_display

    if tumor_outside_kidney not in ("error", "warn", "merge"):
        raise ValueError(f"tumor_outside_kidney must be 'error', 'warn' or 'merge', got {tumor_outside_kidney!r}")
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise MaskError(mask_dir, "is not a folder; the masks of a case go in <case>/masks/")
    kidneys, tumors = [], []
    for meta in metas:
        pair = []
        for kind in ("kidney", "tumor"):
            path = mask_dir / f"{meta.sop_instance_uid}_{kind}.png"
            if not path.is_file():
                raise MaskError(path, f"is missing: every slice needs a {kind} mask named "
                                      f"<SOPInstanceUID>_{kind}.png (slice {meta.file_name})")
            array = read_png(path)
            if array.shape != (meta.rows, meta.columns):
                raise MaskError(path, f"is {array.shape[0]}x{array.shape[1]} but its image {meta.file_name} is "
                                      f"{meta.rows}x{meta.columns} (rows x columns); masks must match the image")
            pair.append((path, array))
        (kidney_path, kidney), (tumor_path, tumor) = pair
        labels = np.unique(kidney)
        bad = [int(v) for v in labels if v not in (0, 1, 255)]
        if bad:
            raise MaskError(kidney_path, f"has labels {bad[:5]}; a kidney mask holds only 0 and 1 (or 0 and 255)")
        kidney = (kidney > 0).astype(np.uint8)
        if (np.issubdtype(tumor.dtype, np.signedinteger) and tumor.min() < 0) or tumor.max() > 65535:
            raise MaskError(tumor_path, "has labels outside 0..65535; a tumour map holds 0 and instances 1..n")
        tumor = tumor.astype(np.uint16)
        if not allow_empty and not kidney.any():
            raise MaskError(kidney_path, "is empty (no kidney pixel); the paper's dataset has kidney on every "
                                         "slice: drop the slice or pass allow_empty=True")
        outside = (tumor > 0) & (kidney == 0)
        if outside.any():
            message = (f"has {int(outside.sum())} tumour pixels outside the kidney mask "
                       f"{kidney_path.name}; the kidney mask must include its tumours")
            if tumor_outside_kidney == "error":
                raise MaskError(tumor_path, message + " (or pass tumor_outside_kidney='merge')")
            if tumor_outside_kidney == "warn":
                warnings.warn(f"{tumor_path}: {message}", stacklevel=2)
            else:
                kidney = np.where(outside, 1, kidney).astype(np.uint8)
        if meta.oriented:
            kidney = to_display(kidney, meta.image_orientation)
            tumor = to_display(tumor, meta.image_orientation)
        kidneys.append(kidney)
        tumors.append(tumor)
    if not kidneys:
        raise MaskError(mask_dir, "no slices given: pass the metas returned by read_series")
    return np.stack(kidneys), np.stack(tumors)


# ----------------------------------------------------------------------------- NIfTI
def read_nifti_mask(nifti_path: str | os.PathLike, series_folder: str | os.PathLike,
                    metas: Sequence[Any] | None = None, tolerance: float = 0.05) -> np.ndarray:
    """A NIfTI label volume resampled (nearest voxel, no interpolation) onto the series' slices.

    Returns ``[n, H, W]`` in the dtype of the NIfTI data (integers), aligned with ``metas``
    (default: those of :func:`kts.dicom.read_series`). See the module docstring for RAS vs LPS.
    """
    import nibabel as nib

    nifti_path = Path(nifti_path)
    try:
        image = nib.load(str(nifti_path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise MaskError(nifti_path, f"is not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MaskError(nifti_path, f"has shape {data.shape}; a label volume is 3-D")
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise MaskError(nifti_path, "holds non-integer values; a mask holds labels 0, 1, 2...")
        data = data.astype(np.int32)
    metas = _metas(series_folder, metas)
    geos = _geometries_for(series_folder, metas, nifti_path)
    inverse = np.linalg.inv(image.affine)
    out, used_planes = [], set()
    for meta, geo in zip(metas, geos):
        rr, cc = np.meshgrid(np.arange(geo.rows), np.arange(geo.columns), indexing="ij")
        ras = geo.pixel_to_patient(rr, cc) @ LPS_TO_RAS.T
        ijk = ras @ inverse[:3, :3].T + inverse[:3, 3]
        nearest = np.round(ijk)
        off = np.abs(ijk - nearest).max()
        if off > tolerance:
            raise MaskError(nifti_path, f"its voxel grid does not coincide with slice {geo.file_name} of "
                                        f"{series_folder} (off by {off:.2f} voxel); resample the mask onto the series")
        idx = nearest.astype(int)
        if (idx < 0).any() or (idx >= np.array(data.shape)).any():
            raise MaskError(nifti_path, f"does not cover slice {geo.file_name} of {series_folder}: shape {data.shape}")
        const = [a for a in range(3) if np.all(idx[..., a] == idx[0, 0, a])]
        used_planes.update((a, int(idx[0, 0, a])) for a in const)
        out.append(_display(data[idx[..., 0], idx[..., 1], idx[..., 2]], meta))
    # every plane of the NIfTI's through-plane axis must belong to a slice of the series
    axes = {a for a, _ in used_planes if sum(1 for b, _ in used_planes if b == a) == len(metas)}
    if axes and len(metas) > 1:
        axis = sorted(axes)[0]
        if data.shape[axis] != len(metas):
            raise MaskError(nifti_path, f"has {data.shape[axis]} slices along its axis {axis} but the series "
                                        f"{series_folder} has {len(metas)}; is it the mask of another series?")
    return np.stack(out)


# ----------------------------------------------------------------------------- DICOM-SEG
def read_seg_mask(seg_path: str | os.PathLike, metas: Sequence[Any],
                  segment_labels: Sequence[str] = ("Kidney", "Tumour")) -> dict[str, np.ndarray]:
    """Binary masks ``{label: uint8 [n, H, W]}`` from a DICOM-SEG, per referenced SOPInstanceUID.

    The SEG must reference the series of ``metas`` (:func:`kts.dicom.read_series`); slices it has
    no frame for are empty. Labels match SegmentLabel case-insensitively ("Tumor" finds "Tumour").
    """
    import highdicom as hd

    seg_path = Path(seg_path)
    try:
        seg = hd.seg.segread(seg_path)
    except Exception as exc:
        raise MaskError(seg_path, f"is not a readable DICOM-SEG ({type(exc).__name__}: {exc})") from None
    metas = list(metas)
    referenced = {sop for _, _, sop in seg.get_source_image_uids()}
    series = {meta.series_instance_uid for meta in metas}
    ref_series = {s for _, s, _ in seg.get_source_image_uids()}
    if not referenced & {m.sop_instance_uid for m in metas}:
        raise MaskError(seg_path, f"references series {sorted(ref_series)} but the images are series {sorted(series)}")
    unknown = referenced - {m.sop_instance_uid for m in metas}
    if unknown:
        raise MaskError(seg_path, f"references {len(unknown)} instance(s) not in the given series, "
                                  f"e.g. {sorted(unknown)[0]}")
    out = {}
    for label in segment_labels:
        wanted = _normalise_label(label)
        numbers = [d.segment_number for d in seg.SegmentSequence
                   if _normalise_label(str(d.SegmentLabel)) == wanted]
        if not numbers:
            names = [str(d.SegmentLabel) for d in seg.SegmentSequence]
            raise MaskError(seg_path, f"has no segment labelled {label!r}; it has {names}")
        masks = []
        for meta in metas:
            if meta.sop_instance_uid in referenced:
                pixels = seg.get_pixels_by_source_instance([meta.sop_instance_uid], segment_numbers=numbers,
                                                           combine_segments=True, relabel=True,
                                                           assert_missing_frames_are_empty=True)[0]
                mask = (pixels > 0).astype(np.uint8)
            else:
                mask = np.zeros((meta.rows, meta.columns), np.uint8)
            if mask.shape != (meta.rows, meta.columns):
                raise MaskError(seg_path, f"frame for {meta.file_name} is {mask.shape}, image is "
                                          f"{(meta.rows, meta.columns)}")
            masks.append(_display(mask, meta))
        out[label] = np.stack(masks)
    return out


def _normalise_label(label: str) -> str:
    return label.strip().lower().replace("tumour", "tumor")


def write_seg(path: str | os.PathLike, series_folder: str | os.PathLike, metas: Sequence[Any],
              kidney: np.ndarray, tumor: np.ndarray | None, series_number: int = 900,
              content_datetime: _dt.datetime | None = None, proposal: bool = False) -> Path:
    """Write predicted kidney and tumour masks as a BINARY DICOM-SEG over the source series (Fig. 5).

    ``kidney``/``tumor`` are ``[n, H, W]`` in the order and display orientation of ``metas``
    (as :func:`kts.dicom.read_series` and the models produce them); they are mapped back to the
    stored pixel grid of each referenced SOPInstanceUID. ``tumor=None`` writes the kidney
    segment only. ``proposal=True`` marks every label and the series description as an
    unreviewed proposal (``kts.proposals``: masks for series that have none, to be corrected in
    a viewer before any use). Written atomically.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from kts.io import atomic_path

    metas = list(metas)
    kidney = np.asarray(kidney)
    with_tumor = tumor is not None
    tumor = np.asarray(tumor) if with_tumor else np.zeros_like(kidney)
    if kidney.shape != tumor.shape or kidney.ndim != 3 or kidney.shape[0] != len(metas):
        raise ValueError(f"kidney and tumour must both be [n, H, W] with n = {len(metas)} slices; "
                         f"got {kidney.shape} and {tumor.shape}")
    folder = Path(series_folder)
    by_sop = {}
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(file)
        except Exception:
            continue
        by_sop[str(ds.SOPInstanceUID)] = ds
    sources, stored = [], []
    for i, meta in enumerate(metas):
        ds = by_sop.get(meta.sop_instance_uid)
        if ds is None:
            raise MaskError(folder, f"has no slice with SOPInstanceUID {meta.sop_instance_uid} ({meta.file_name})")
        planes = []
        for array in (kidney[i], tumor[i])[: 2 if with_tumor else 1]:
            planes.append(_undisplay(np.asarray(array) > 0, meta))
        if planes[0].shape != (int(ds.Rows), int(ds.Columns)):
            raise MaskError(folder / meta.file_name, f"mask is {planes[0].shape} but the slice is "
                                                     f"{(int(ds.Rows), int(ds.Columns))}")
        sources.append(ds)
        stored.append(np.stack(planes, axis=-1))
    pixel_array = np.stack(stored).astype(np.uint8)
    from kts import __version__ as kts_version

    algorithm = hd.AlgorithmIdentificationSequence(name="kts CU-Net + Mask R-CNN",
                                                   family=codes.cid7162.ArtificialIntelligence,
                                                   version=str(kts_version))
    marker = " (PROPOSAL, unreviewed)" if proposal else ""
    segments = [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label="Kidney" + marker,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Kidney,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label="Tumour" + marker,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm),
    ][: 2 if with_tumor else 1]
    source_series = str(sources[0].SeriesInstanceUID)
    content = hashlib.sha256(pixel_array.tobytes() + str(pixel_array.shape).encode()).hexdigest()
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=generate_uid(entropy_srcs=["kts-seg-series", source_series, str(series_number)]),
        series_number=series_number,
        sop_instance_uid=generate_uid(entropy_srcs=["kts-seg-sop", source_series, content]),
        instance_number=1, manufacturer="kts", manufacturer_model_name="kts CU-Net + Mask R-CNN",
        software_versions=str(kts_version), device_serial_number="0",
        series_description=("kts PROPOSED kidney masks - unreviewed, correct before use" if proposal
                            else "kts kidney and tumour segmentation"),
        content_label="KTS_PROPOSAL" if proposal else "KTS_SEG",
    )
    # highdicom draws DimensionOrganizationUID at random: derive it too, so equal input gives equal UIDs
    dim_uid = generate_uid(entropy_srcs=["kts-seg-dimension", source_series, content])
    for item in list(seg.get("DimensionOrganizationSequence", [])) + list(seg.get("DimensionIndexSequence", [])):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dim_uid
    if content_datetime is not None:  # fixed dates and times give byte-identical files
        date, time = content_datetime.strftime("%Y%m%d"), content_datetime.strftime("%H%M%S")
        seg.ContentDate, seg.ContentTime = date, time
        seg.SeriesDate, seg.SeriesTime = date, time
        seg.InstanceCreationDate, seg.InstanceCreationTime = date, time
        for item in seg.get("ContributingEquipmentSequence", []):
            if "ContributionDateTime" in item:
                item.ContributionDateTime = date + time
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return Path(path)


def _undisplay(mask: np.ndarray, meta: Any) -> np.ndarray:
    """Invert :func:`kts.dicom.to_display` for one slice (back to the stored pixel grid)."""
    if not getattr(meta, "oriented", False):
        return mask
    from kts.dicom import display_axes

    transpose, flip_v, flip_h = display_axes(meta.image_orientation)
    out = mask
    if flip_h:
        out = out[:, ::-1]
    if flip_v:
        out = out[::-1, :]
    if transpose:
        out = out.T
    return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------- RTSTRUCT
def list_rois(rtstruct_path: str | os.PathLike) -> dict[int, str]:
    """``{ROINumber: ROIName}`` of an RTSTRUCT."""
    ds = _read_rtstruct(Path(rtstruct_path))
    return {int(item.ROINumber): str(item.get("ROIName", "")) for item in ds.get("StructureSetROISequence", [])}


def _read_rtstruct(path: Path) -> Any:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise MaskError(path, f"is not readable DICOM ({type(exc).__name__})") from None
    if str(ds.get("Modality", "")) != "RTSTRUCT":
        raise MaskError(path, f"is a {ds.get('Modality', 'non-DICOM')} object, not an RTSTRUCT")
    return ds


def read_rtstruct_mask(rtstruct_path: str | os.PathLike, series_folder: str | os.PathLike,
                       metas: Sequence[Any] | None = None, roi_pattern: str = DEFAULT_ROI_PATTERN,
                       tolerance_mm: float = 1.0) -> np.ndarray:
    """Union of the ROIs whose name matches ``roi_pattern``, rasterised: uint8 0/1 ``[n, H, W]``.

    Aligned with ``metas`` (default: :func:`kts.dicom.read_series` of ``series_folder``).
    """
    from skimage.draw import polygon

    path = Path(rtstruct_path)
    ds = _read_rtstruct(path)
    metas = _metas(series_folder, metas)
    geos = _geometries_for(series_folder, metas, path)
    series_uids = {m.series_instance_uid for m in metas}
    referenced = _referenced_series(ds)
    if referenced and not referenced & series_uids:
        raise MaskError(path, f"contours series {sorted(referenced)}, not the series in {series_folder} "
                              f"({sorted(series_uids)})")
    rois = {n: name for n, name in list_rois(path).items() if re.search(roi_pattern, name, re.IGNORECASE)}
    if not rois:
        raise MaskError(path, f"has no ROI whose name matches /{roi_pattern}/; ROIs: {list(list_rois(path).values())}")
    index_of = {g.sop_instance_uid: i for i, g in enumerate(geos)}
    stored = [np.zeros((g.rows, g.columns), np.uint8) for g in geos]
    drawn = 0
    for roi in ds.get("ROIContourSequence", []):
        if int(roi.ReferencedROINumber) not in rois:
            continue
        for contour in roi.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "")).upper() != "CLOSED_PLANAR":
                continue
            points = np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)
            target = None
            images = contour.get("ContourImageSequence", [])
            if images:
                sop = str(images[0].ReferencedSOPInstanceUID)
                if sop not in index_of:
                    raise MaskError(path, f"contour of ROI {rois[int(roi.ReferencedROINumber)]!r} is on instance "
                                          f"{sop}, which is not a slice in {series_folder}")
                target = index_of[sop]
            else:
                distances = [np.abs(g.patient_to_pixel(points)[2]).max() for g in geos]
                best = int(np.argmin(distances))
                if distances[best] > tolerance_mm:
                    raise MaskError(path, f"a contour of ROI {rois[int(roi.ReferencedROINumber)]!r} lies "
                                          f"{distances[best]:.2f} mm from the nearest slice ({geos[best].file_name}); "
                                          f"tolerance {tolerance_mm} mm")
                target = best
            geo = geos[target]
            r, c, dist = geo.patient_to_pixel(points)
            if np.abs(dist).max() > tolerance_mm:
                raise MaskError(path, f"a contour lies {np.abs(dist).max():.2f} mm off the plane of "
                                      f"{geo.file_name}, the slice it references")
            rr, cc = polygon(r, c, shape=(geo.rows, geo.columns))
            stored[target][rr, cc] = 1
            drawn += 1
    if not drawn:
        raise MaskError(path, f"ROIs {list(rois.values())} have no closed planar contour")
    return np.stack([_display(m, meta) for m, meta in zip(stored, metas)])


def _referenced_series(ds: Any) -> set[str]:
    out = set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                out.add(str(series.SeriesInstanceUID))
    return out
