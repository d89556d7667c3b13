"""Synthetic DICOM series and PNG masks for the extraction and bad-input tests (pydicom only).

Moved out of tests/test_data.py so that test_data.py and test_bad_inputs.py share one factory.
Every dataset carries fake patient identifiers (``Secret^Person``) so tests can check privacy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SERIES_UID = "1.2.826.0.1.3680043.8.498.1"


def make_dataset(pixels, *, position=(0.0, 0.0, 0.0), iop=AXIAL, instance=1, series_uid=SERIES_UID,
                 sop_uid=None, modality="MR", slope=None, intercept=None, spacing=(1.0, 1.0),
                 transfer_syntax=ExplicitVRLittleEndian, sop_class=MRImageStorage):
    """A minimal single-frame image dataset, with fake patient identifiers to check privacy."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Modality = modality
    ds.PatientName = "Secret^Person"
    ds.PatientID = "SECRET-ID-42"
    ds.PatientBirthDate = "19010203"
    ds.SeriesDescription = "t2 test"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = list(spacing)
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept if intercept is not None else 0
    if pixels is not None:
        ds.set_pixel_data(np.asarray(pixels, dtype=np.uint16), "MONOCHROME2", 16)
    return ds


def save(ds, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder, arrays, positions=None, *, iop=AXIAL, names=None, instances=None, **kwargs):
    """Write one slice per array; returns the SOPInstanceUIDs in array order."""
    positions = positions if positions is not None else [(0.0, 0.0, 3.0 * i) for i in range(len(arrays))]
    names = names or [f"IM_{i + 1:04d}.dcm" for i in range(len(arrays))]
    instances = instances or list(range(1, len(arrays) + 1))
    uids = []
    for array, pos, name, number in zip(arrays, positions, names, instances):
        ds = make_dataset(array, position=pos, iop=iop, instance=number, **kwargs)
        save(ds, Path(folder) / name)
        uids.append(ds.SOPInstanceUID)
    return uids


def write_masks(folder, uids, kidneys, tumors):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for uid, kidney, tumor in zip(uids, kidneys, tumors):
        Image.fromarray(np.asarray(kidney, dtype=np.uint8)).save(folder / f"{uid}_kidney.png")
        Image.fromarray(np.asarray(tumor, dtype=np.uint16)).save(folder / f"{uid}_tumor.png")


def blob_masks(shape, centre, radius=6, tumor_radius=2):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    kidney = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2).astype(np.uint8) * 255
    tumor = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= tumor_radius**2).astype(np.uint16)
    return kidney, tumor


def write_case(root, case_id, n_slices=2, shape=(40, 40), seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 1000, shape).astype(np.uint16) for _ in range(n_slices)]
    uids = write_series(root / case_id / "dicom", arrays)
    masks = [blob_masks(shape, (15 + i, 20)) for i in range(n_slices)]
    write_masks(root / case_id / "masks", uids, [m[0] for m in masks], [m[1] for m in masks])
    return uids


def undecodable_syntax():
    """A compressed transfer syntax no installed decoder reads (None if every one tried has a decoder)."""
    from pydicom.pixels import get_decoder
    from pydicom import uid

    for name in ("JPEGLosslessSV1", "JPEGLossless", "HTJ2KLossless", "HTJ2K", "JPEGExtended12Bit"):
        ts = getattr(uid, name, None)
        if ts is not None:
            try:
                if not get_decoder(ts).is_available:
                    return ts
            except NotImplementedError:
                return ts
    return None
