"""Tiny synthetic MR series for the manifest/fetch/masks tests (pydicom only, no phantom needed)."""
from __future__ import annotations

import io
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qs, urlparse

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

PATIENT = "KTS-PHANTOM-0001"


def make_uid(*parts: object) -> str:
    """A deterministic 2.25 UID from ``parts``."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def tiny_mr_datasets(n_slices: int = 4, rows: int = 12, cols: int = 10, series_uid: str | None = None,
                     spacing: tuple[float, float] = (1.5, 2.0), thickness: float = 3.0,
                     origin: Sequence[float] = (-10.0, -20.0, 5.0),
                     orientation: Sequence[float] = (1, 0, 0, 0, 1, 0), seed: int = 0) -> list[Dataset]:
    """``n_slices`` single-frame MR datasets of one series, slice k at origin + k*thickness*normal."""
    series_uid = series_uid or make_uid("series", seed, n_slices, rows, cols)
    study_uid = make_uid("study", series_uid)
    frame_uid = make_uid("frame", series_uid)
    row_dir = np.array(orientation[:3], float)
    col_dir = np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        sop = make_uid("sop", series_uid, k)
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = PATIENT
        ds.PatientID = PATIENT
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = "20000101"
        ds.StudyTime = "000000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Modality = "MR"
        ds.Manufacturer = "kts test"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = "tiny axial T1 post"
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        pos = np.array(origin, float) + k * thickness * normal
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = float(thickness)
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 1000, size=(rows, cols), dtype=np.uint16).tobytes()
        out.append(ds)
    return out


def write_series(folder: Path, datasets: Sequence[Dataset], names: Sequence[str] | None = None) -> list[Path]:
    """Write datasets as ``IM_0001.dcm``... (or ``names``); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / (names[i] if names else f"IM_{i + 1:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def series_zip(datasets: Sequence[Dataset], extra: dict[str, bytes] | None = None) -> bytes:
    """The zip bytes a TCIA getImage call returns for these datasets (flat ``1-NN.dcm`` names)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i, ds in enumerate(datasets):
            raw = io.BytesIO()
            ds.save_as(raw, enforce_file_format=True)
            archive.writestr(f"1-{i + 1:02d}.dcm", raw.getvalue())
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def read_back(paths: Sequence[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in paths]


class LoopbackTCIA:
    """A TCIA NBIA getImage server on 127.0.0.1 (moved from test_fetch.py).

    Per-series queues of responses: ("ok", body) | ("status", code) | ("drop", body) | ("slow", s, body)."""

    def __init__(self) -> None:
        self.routes: dict[str, list[tuple]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server API
                url = urlparse(self.path)
                uid = parse_qs(url.query).get("SeriesInstanceUID", [""])[0]
                server.requests.append(uid)
                queue = server.routes.get(uid)
                if url.path != "/nbia/getImage" or not queue:
                    self.send_error(404)
                    return
                action = queue.pop(0) if len(queue) > 1 else queue[0]
                kind = action[0]
                if kind == "status":
                    self.send_error(action[1])
                    return
                if kind == "slow":
                    time.sleep(action[1])
                    body = action[2]
                else:
                    body = action[1]
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body[: len(body) // 2] if kind == "drop" else body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if kind == "drop":
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/nbia"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
