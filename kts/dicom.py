"""Reading one DICOM MR series into arrays, and the display orientation of its slices.

Section III.A.2 (the MR slices). :func:`read_series` accepts one single-frame MR series per
folder, written by anyone: our phantom, a scanner, a PACS export. It refuses, with a
:class:`~kts.errors.DicomError` naming the file, every input that would silently give wrong
pixels: non-image objects (RTSTRUCT, SEG), corrupt or truncated files, two series in one
folder, a compressed transfer syntax without an installed decoder, a modality other than MR
(by default), missing slices, non-finite values after rescaling. Metadata returned
(:class:`SliceMeta`) carries no patient identifier.

Display convention (:func:`to_display`): every slice, and its masks, is flipped/transposed
so that the patient's right is on the image's left and anterior is at the top (radiological
axial display). For coronal and sagittal slices the horizontal axis is the patient's
left-right (coronal) or anterior-posterior (sagittal, anterior on the left) axis and superior
is at the top. The axes are chosen from the dominant direction cosines of
ImageOrientationPatient, so oblique slices get the display of the plane they are closest to.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kts.errors import DicomError

_SKIP_NAMES = {"DICOMDIR", "Thumbs.db"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


# ----------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class SliceMeta:
    """Provenance of one slice; no patient identifier (section III.A.2).

    ``rows`` and ``columns`` are the stored size (as in the file, and as the PNG masks
    are); ``pixel_spacing`` is (row spacing, column spacing) in mm of the displayed image;
    ``slice_position`` is the position in mm along the slice normal (NaN when the file has
    no ImagePositionPatient); ``oriented`` says whether :func:`to_display` was applied.
    """

    case_id: str
    series_instance_uid: str
    sop_instance_uid: str
    slice_index: int
    file_name: str
    modality: str
    series_description: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    slice_position: float
    image_orientation: tuple[float, ...]
    instance_number: int | None
    transfer_syntax_uid: str
    pixel_sha256: str
    oriented: bool

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON/CSV)."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- orientation

_AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _check_iop(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray([float(v) for v in iop], dtype=float)
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        raise ValueError(f"ImageOrientationPatient must be 6 finite numbers, got {list(iop)!r}")
    row_dir, col_dir = values[:3], values[3:]
    if np.linalg.norm(np.cross(row_dir, col_dir)) < 0.5:
        raise ValueError(f"ImageOrientationPatient {list(iop)!r} is not two orthogonal unit vectors")
    return row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)


def display_axes(iop: Sequence[float]) -> tuple[bool, bool, bool]:
    """(transpose, flip_rows, flip_columns) that :func:`to_display` applies for ``iop``.

    ``iop[:3]`` is the patient direction (LPS) of increasing column index, ``iop[3:]``
    that of increasing row index. The two in-plane patient axes are the pair (one per
    image axis) with the largest direction cosines. The lower-numbered patient axis
    (x before y before z) becomes horizontal, pointing to the patient's left (+x) or
    posterior (+y); the other becomes vertical, pointing posterior (+y, axial) or
    inferior (-z, coronal and sagittal).
    """
    row_dir, col_dir = _check_iop(iop)
    best = max(itertools.permutations(range(3), 2), key=lambda ab: abs(row_dir[ab[0]]) + abs(col_dir[ab[1]]))
    col_axis, row_axis = best  # patient axis followed by the column index / the row index
    transpose = col_axis > row_axis
    if transpose:
        row_dir, col_dir = col_dir, row_dir
        col_axis, row_axis = row_axis, col_axis
    flip_columns = row_dir[col_axis] < 0
    down_sign = 1.0 if row_axis == 1 else -1.0
    flip_rows = np.sign(col_dir[row_axis]) != down_sign
    return bool(transpose), bool(flip_rows), bool(flip_columns)


def to_display(array: np.ndarray, iop: Sequence[float]) -> np.ndarray:
    """Bring ``array`` ([..., rows, columns] as stored) to the display convention.

    Patient's right on the image's left, anterior at the top (axial); see
    :func:`display_axes`. Use the same call for an image and its masks so they stay
    aligned. ``iop`` is the slice's ImageOrientationPatient. Returns a contiguous copy.
    """
    array = np.asarray(array)
    if array.ndim < 2:
        raise ValueError(f"to_display needs an array with at least 2 dimensions, got shape {array.shape}")
    transpose, flip_rows, flip_columns = display_axes(iop)
    out = array
    if transpose:
        out = np.swapaxes(out, -1, -2)
    if flip_rows:
        out = out[..., ::-1, :]
    if flip_columns:
        out = out[..., :, ::-1]
    return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------- DICOM reading


def _pixel_sha256(array: np.ndarray) -> str:
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def _series_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DicomError(folder, "is not a folder; give the folder that holds one DICOM series")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name not in _SKIP_NAMES)
    if not files:
        raise DicomError(folder, "holds no files; put the .dcm files of one MR series here")
    return files


def _decode(path: Path, ds: Any) -> np.ndarray:
    """Decoded stored pixel values of one file; DicomError naming the file otherwise."""
    import pydicom
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts = UID(str(ts)) if ts else None
    if ts is not None and not ts.is_transfer_syntax:
        raise DicomError(path, f"has the unknown transfer syntax {ts}; no decoder reads it: re-export the series "
                               "uncompressed (Explicit VR Little Endian)")
    if ts is not None and ts.is_compressed:
        try:
            available = get_decoder(ts).is_available
        except (NotImplementedError, ValueError):
            available = False
        if not available:
            raise DicomError(path, f"pixel data use the compressed transfer syntax {ts} ({ts.name}) and no "
                                   "installed decoder reads it; install one (pip install pylibjpeg "
                                   "pylibjpeg-libjpeg pylibjpeg-openjpeg, or python-gdcm) or decompress "
                                   "the series first (e.g. gdcmconv --raw / dcmdjpeg)")
    try:
        return ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        name = f"{ts} ({ts.name})" if ts is not None else "unknown"
        raise DicomError(path, f"cannot decode pixel data with transfer syntax {name}: no working decoder "
                               f"({type(exc).__name__}); install pylibjpeg or python-gdcm, or decompress "
                               "the series first") from None
    except pydicom.errors.InvalidDicomError as exc:
        raise DicomError(path, f"corrupt DICOM pixel data ({exc}); re-export the file") from None
    except Exception as exc:  # truncated/corrupt pixel data: ValueError, EOFError, struct.error ...
        raise DicomError(path, f"pixel data are truncated or corrupt ({type(exc).__name__}: "
                               f"{str(exc)[:200]}); re-export or re-download the file") from None


def _read_one(path: Path, require_modality: str | None) -> tuple[Any, np.ndarray]:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        raise DicomError(path, "is not a DICOM file (no 'DICM' preamble and no valid header); "
                               "remove it from the series folder") from None
    except Exception as exc:  # truncated header: EOFError, struct.error, OSError ...
        raise DicomError(path, f"cannot be read as DICOM, the file looks truncated or corrupt "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        if sop is None and "Modality" not in ds:
            raise DicomError(path, "has no pixel data, no SOP class and no modality: the file looks truncated "
                                   "or incomplete; re-export or re-download it")
        kind = f"{sop.name}" if sop is not None and hasattr(sop, "name") else "unknown SOP class"
        raise DicomError(path, f"is not an image: it has no pixel data ({kind}, modality "
                               f"{ds.get('Modality', '?')}); keep only MR image files in the series folder")
    modality = str(ds.get("Modality", ""))
    if require_modality is not None and modality != require_modality:
        raise DicomError(path, f"has modality {modality or '(none)'!r}, not {require_modality!r}: the paper's "
                               f"models were trained on MR only; pass require_modality=None to read it anyway")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomError(path, f"is a multi-frame image ({ds.NumberOfFrames} frames); export the series as "
                               "single-frame files (one slice per file)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DicomError(path, "is a colour image (SamplesPerPixel > 1); kts reads greyscale MR only")
    return ds, _decode(path, ds)


def read_series(folder: str | os.PathLike, *, case_id: str | None = None, require_modality: str | None = "MR",
                allow_gaps: bool = False, orient: bool = True) -> tuple[np.ndarray, list[SliceMeta]]:
    """Read one DICOM series: (float32 volume [n, H, W], per-slice :class:`SliceMeta`).

    Section III.A.2 (the MR images). Slices are sorted by position along the slice normal
    (ImagePositionPatient . (row x column direction)), InstanceNumber breaking ties;
    RescaleSlope/Intercept are applied; with ``orient`` each slice goes through
    :func:`to_display`. ``case_id`` defaults to the folder's name (the case folder's name for
    ``<case_id>/dicom``). ``require_modality`` refuses other modalities (``None`` accepts any).
    ``allow_gaps=False`` refuses a series with a missing slice (a step between neighbours
    larger than 1.5x the median step) or two slices at one position. Every problem raises
    :class:`~kts.errors.DicomError` naming the file; no patient identifier is returned.
    """
    from pydicom.pixels import apply_modality_lut

    folder = Path(folder)
    files = _series_files(folder)
    if case_id is None:  # <case_id>/dicom/ in the on-disk layout, else the folder's own name
        case_id = folder.resolve().parent.name if folder.name.lower() == "dicom" else folder.name
    case_id = str(case_id)
    records = []
    series: dict[str, Path] = {}
    for path in files:
        ds, stored = _read_one(path, require_modality)
        uid = str(ds.get("SeriesInstanceUID", ""))
        series.setdefault(uid, path)
        if len(series) > 1:
            (uid_a, file_a), (uid_b, file_b) = list(series.items())[:2]
            raise DicomError(folder, f"mixes two series: SeriesInstanceUID {uid_a or '(none)'} (e.g. {file_a.name}) "
                                     f"and {uid_b or '(none)'} (e.g. {file_b.name}); put each series in its own folder")
        records.append((path, ds, stored))

    first_path, first_ds, first_stored = records[0]
    shape = first_stored.shape
    iop_ref = None
    missing_iop = [p.name for p, ds, _ in records if "ImageOrientationPatient" not in ds]
    missing_ipp = [p.name for p, ds, _ in records if "ImagePositionPatient" not in ds]
    if missing_iop:
        warnings.warn(f"{folder}: {missing_iop[0]} (and {len(missing_iop) - 1} more) has no "
                      "ImageOrientationPatient; assuming an axial slice shown as stored", stacklevel=2)
    if missing_ipp and len(records) > 1:
        warnings.warn(f"{folder}: {missing_ipp[0]} (and {len(missing_ipp) - 1} more) has no "
                      "ImagePositionPatient; sorting by InstanceNumber, no check for missing slices", stacklevel=2)

    entries = []
    for path, ds, stored in records:
        if stored.shape != shape:
            raise DicomError(path, f"has {stored.shape[0]}x{stored.shape[1]} pixels but {first_path.name} has "
                                   f"{shape[0]}x{shape[1]}; a series must have one image size")
        iop = tuple(float(v) for v in ds.ImageOrientationPatient) if not missing_iop else _AXIAL_IOP
        try:
            row_dir, col_dir = _check_iop(iop)
        except ValueError as exc:
            raise DicomError(path, f"{exc}; fix the ImageOrientationPatient tag") from None
        if iop_ref is None:
            iop_ref = (iop, path)
        elif np.max(np.abs(np.subtract(iop, iop_ref[0]))) > 1e-3:
            raise DicomError(path, f"is not parallel to {iop_ref[1].name} (ImageOrientationPatient differs); "
                                   "a series must be a stack of parallel slices")
        if missing_ipp:
            position = math.nan
        else:
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=float)
            normal = np.cross(row_dir, col_dir)
            position = float(ipp @ (normal / np.linalg.norm(normal)))
        number = ds.get("InstanceNumber")
        number = int(number) if number not in (None, "") else None
        entries.append((position, number, path, ds, stored, iop))

    def sort_key(e: tuple) -> tuple:
        position, number = e[0], e[1]
        pos_key = 0.0 if math.isnan(position) else round(position, 4)
        return (pos_key, number if number is not None else 0, e[2].name)

    entries.sort(key=sort_key)
    if not missing_ipp and len(entries) > 1:
        _check_positions(entries, allow_gaps)

    volume = []
    metas = []
    for index, (position, number, path, ds, stored, iop) in enumerate(entries):
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            values = values.astype(np.float32)
        if not np.all(np.isfinite(values)):
            raise DicomError(path, "has NaN or infinite values after RescaleSlope/RescaleIntercept; "
                                   "check those two tags")
        spacing = ds.get("PixelSpacing")
        spacing = (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else None
        if orient:
            transpose = display_axes(iop)[0]
            values = to_display(values, iop)
            if transpose and spacing is not None:
                spacing = (spacing[1], spacing[0])
        volume.append(values)
        ts = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
        metas.append(SliceMeta(
            case_id=case_id,
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            slice_index=index,
            file_name=path.name,
            modality=str(ds.get("Modality", "")),
            series_description=str(ds.get("SeriesDescription", "")),
            rows=int(stored.shape[0]),
            columns=int(stored.shape[1]),
            pixel_spacing=spacing,
            slice_position=position,
            image_orientation=tuple(iop),
            instance_number=number,
            transfer_syntax_uid=str(ts),
            pixel_sha256=_pixel_sha256(stored),
            oriented=bool(orient),
        ))
    return np.stack(volume).astype(np.float32, copy=False), metas


def _check_positions(entries: list[tuple], allow_gaps: bool) -> None:
    positions = np.asarray([e[0] for e in entries], dtype=float)
    steps = np.diff(positions)
    if allow_gaps:
        return
    for i, step in enumerate(steps):
        if step < 1e-3:
            raise DicomError(entries[i + 1][2], f"is at the same position ({positions[i]:.3f} mm along the slice "
                                                f"normal) as {entries[i][2].name}: several acquisitions in one "
                                                "series? Keep one, or pass allow_gaps=True")
    median = float(np.median(steps))
    for i, step in enumerate(steps):
        if step > 1.5 * median:
            raise DicomError(entries[i][2].parent, f"slices are missing between {entries[i][2].name} and "
                                                   f"{entries[i + 1][2].name}: they are {step:.3g} mm apart, the "
                                                   f"median spacing is {median:.3g} mm; add the missing files or "
                                                   "pass allow_gaps=True")
