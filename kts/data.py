"""Preprocessing, the cached dataset and the Table I splits.

Section III.A.2 (dataset model: grey images with pixel values 0..255 and kidney masks),
section IV (360x360 images resized to 320x320) and section III.A.3 / Table I (train,
validation and test partitions). The DICOM series are read by :mod:`kts.dicom` (which also
fixes the display orientation), the masks by :mod:`kts.masks`.

On-disk layout read by :func:`build_dataset` (README, "Real data")::

    <root>/phantom.json (optional)  cases.csv (optional)
    <root>/<case_id>/dicom/*.dcm
    <root>/<case_id>/masks/<SOPInstanceUID>_kidney.png  (0 / 1 or 255, 8-bit)
    <root>/<case_id>/masks/<SOPInstanceUID>_tumor.png   (0, instances 1..n, 16-bit)

PNG masks are stored in the pixel grid of their DICOM slice as stored in the file (Rows x
Columns, before the display transform); :func:`kts.masks.read_png_masks` applies the same
:func:`kts.dicom.to_display` transform to them as :func:`kts.dicom.read_series` applies to the image.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from kts.errors import DicomError, KtsInputError
from kts.io import atomic_path, write_json, write_text, sha256_file
from kts.dicom import read_series
from kts.masks import read_png_masks  # the PNG mask format lives with every other mask format

#: Bump when extraction or preprocessing changes the stored arrays: invalidates caches.
EXTRACTION_VERSION = "1"

#: The image size of section IV (360x360 slices resized to 320x320).
DEFAULT_IMAGE_SIZE = 320

#: Robust intensity window of :func:`normalise` (percentiles of each slice).
DEFAULT_PERCENTILES = (0.5, 99.5)

#: Table I partitions: training fraction, validation fraction; test is the remainder.
PARTITIONS: dict[str, tuple[float, float]] = {
    "TD-70% VD-6%": (0.70, 0.06),
    "TD-75% VD-8%": (0.75, 0.08),
    "TD-65% VD-15%": (0.65, 0.15),
    "TD-60% VD-20%": (0.60, 0.20),
}

#: Short names for file names, e.g. ``splits_70-6.json``.
PARTITION_SLUGS: dict[str, str] = {
    "70-6": "TD-70% VD-6%",
    "75-8": "TD-75% VD-8%",
    "65-15": "TD-65% VD-15%",
    "60-20": "TD-60% VD-20%",
}

_INDEX_COLUMNS = [
    "source", "case_id", "series_instance_uid", "sop_instance_uid", "slice_index", "file",
    "weighting", "n_tumors", "rows", "columns", "source_sha256", "image_sha256",
]


# ----------------------------------------------------------------------------- preprocessing


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        pair = (int(size), int(size))
    else:
        try:
            pair = tuple(int(s) for s in size)  # type: ignore[union-attr]
        except TypeError:
            raise ValueError(f"size must be an int or (height, width), got {size!r}") from None
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


def normalise(image: np.ndarray, low: float = DEFAULT_PERCENTILES[0], high: float = DEFAULT_PERCENTILES[1]) -> np.ndarray:
    """Map intensities to 0..255 (float32) by robust percentile clipping.

    Section III.A.2 (pixel values 0 <= i(P) <= 255) and the scanner-dependent intensity
    of section III.A: values at or below the ``low`` percentile become 0, at or above the
    ``high`` percentile 255, linear between. Computed over the whole array given (one
    slice in :func:`build_dataset`). A constant image becomes all zeros.
    """
    if not (0.0 <= low < high <= 100.0):
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
    image = np.asarray(image, dtype=np.float64)
    if not np.all(np.isfinite(image)):
        raise ValueError("normalise: the image holds NaN or infinite values")
    lo, hi = np.percentile(image, [low, high])
    if not hi > lo:
        return np.zeros(image.shape, dtype=np.float32)
    out = (np.clip(image, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.clip(out, 0.0, 255.0).astype(np.float32)


def resize_image(image: np.ndarray, size: int | Sequence[int] = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Resize a 2-D image with area interpolation (mean of the covered pixels), float32.

    Section IV (360x360 -> 320x320). Uses ``skimage.transform.resize_local_mean``; the
    output stays within the input's range.
    """
    from skimage.transform import resize_local_mean

    shape = _size_pair(size)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"resize_image takes one 2-D slice, got shape {image.shape}")
    if image.shape == shape:
        return image.copy()
    out = resize_local_mean(image, shape, preserve_range=True)
    return np.clip(out, image.min(), image.max()).astype(np.float32)


def resize_mask(mask: np.ndarray, size: int | Sequence[int] = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Resize a 2-D label mask by nearest neighbour, keeping label values and dtype exactly.

    Section IV (masks follow their images to 320x320); the cascade's label crops use it too.
    Each output pixel takes the input pixel under its centre (the same as
    ``skimage.transform.resize(order=0)`` except where a centre falls exactly on a pixel
    border, which never happens for 360 -> 320 or 360 -> 128).
    """
    shape = _size_pair(size)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"resize_mask takes one 2-D mask, got shape {mask.shape}")
    if mask.shape == shape:
        return mask.copy()
    h, w = mask.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int), w - 1)
    return mask[rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------- dataset


@dataclasses.dataclass
class Dataset:
    """The preprocessed slices of section IV with their provenance.

    ``images`` float32 [N, S, S] in 0..255, ``kidney_masks`` uint8 0/1, ``tumor_labels``
    uint16 (0 background, instances 1..n), ``index`` one row per slice (columns
    ``_INDEX_COLUMNS``). ``cached`` says whether this came from the cache file; ``source_root``
    is the folder it was read from (``kts.phantom.tissue_label_maps`` finds the phantom there).
    """

    images: np.ndarray
    kidney_masks: np.ndarray
    tumor_labels: np.ndarray
    index: pd.DataFrame
    fingerprint: str = ""
    cached: bool = False
    source_root: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def case_ids(self) -> list[str]:
        """Case ids in order of first appearance."""
        return list(dict.fromkeys(self.index["case_id"].tolist()))

    def subset(self, case_ids: Iterable[str]) -> "Dataset":
        """The slices of the given cases (in dataset order); unknown case ids raise ValueError."""
        wanted = [str(c) for c in ([case_ids] if isinstance(case_ids, str) else case_ids)]
        unknown = sorted(set(wanted) - set(self.index["case_id"]))
        if unknown:
            raise ValueError(f"case ids not in this dataset: {unknown[:5]}; choose from {self.case_ids[:5]}...")
        rows = np.flatnonzero(self.index["case_id"].isin(wanted).to_numpy())
        return Dataset(self.images[rows], self.kidney_masks[rows], self.tumor_labels[rows],
                       self.index.iloc[rows].reset_index(drop=True), self.fingerprint, self.cached, self.source_root)


def _case_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise KtsInputError(root, "is not a folder; give the dataset root (the folder holding one folder per case)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    cases = [p for p in folders if (p / "dicom").is_dir()]
    skipped = [p.name for p in folders if p not in cases]
    if skipped and cases:
        warnings.warn(f"{root}: skipping folders without a dicom/ subfolder: {skipped[:5]}", stacklevel=3)
    if not cases:
        raise DicomError(root, "holds no case folder (<case_id>/dicom/ and <case_id>/masks/); "
                               "write a phantom with kts.phantom.write_dataset or fetch the data first")
    return cases


def _fingerprint(root: Path, cases: list[Path], params: dict[str, Any]) -> str:
    files = []
    for extra in ("phantom.json", "cases.csv"):
        if (root / extra).is_file():
            files.append(root / extra)
    for case in cases:
        for sub in ("dicom", "masks"):
            folder = case / sub
            if folder.is_dir():
                files.extend(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    entries = sorted((p.relative_to(root).as_posix(), sha256_file(p)) for p in files)
    payload = json.dumps({"version": EXTRACTION_VERSION, "params": params, "files": entries}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _read_weightings(root: Path) -> dict[str, str]:
    path = root / "cases.csv"
    if not path.is_file():
        return {}
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise KtsInputError(path, f"cannot be read as CSV ({type(exc).__name__}: {str(exc)[:200]})") from None
    if "case_id" not in table.columns:
        raise KtsInputError(path, "has no case_id column; cases.csv needs case_id (and optionally weighting)")
    if "weighting" not in table.columns:
        return {}
    return dict(zip(table["case_id"], table["weighting"]))


def _index_from_csv(text: str) -> pd.DataFrame:
    dtypes = {c: str for c in _INDEX_COLUMNS}
    dtypes.update(slice_index="int64", n_tumors="int64", rows="int64", columns="int64")
    return pd.read_csv(io.StringIO(text), dtype=dtypes, keep_default_na=False)[_INDEX_COLUMNS]


def _index_csv_path(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.stem + "_index.csv")


def _load_cache(cache_path: Path, fingerprint: str) -> Dataset | None:
    try:
        with np.load(cache_path, allow_pickle=False) as npz:
            if str(npz["fingerprint"]) != fingerprint:
                return None
            index = _index_from_csv(str(npz["index_csv"]))
            data = Dataset(npz["images"], npz["kidney_masks"], npz["tumor_labels"], index, fingerprint, cached=True)
    except Exception:  # unreadable or foreign file: rebuild it
        return None
    csv_path = _index_csv_path(cache_path)
    if not csv_path.is_file():
        write_text(csv_path, data.index.to_csv(index=False, lineterminator="\n"))
    return data


def build_dataset(source_root: str | os.PathLike, cache_path: str | os.PathLike | None = None,
                  image_size: int = DEFAULT_IMAGE_SIZE, force: bool = False, *, require_modality: str | None = "MR",
                  allow_gaps: bool = False, allow_empty: bool = False, tumor_outside_kidney: str = "error",
                  percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> Dataset:
    """Read every case under ``source_root`` into a :class:`Dataset` (sections III.A.2 and IV).

    Each case folder (``<case_id>/dicom`` + ``<case_id>/masks``) is read with
    :func:`read_series` and :func:`read_png_masks`; each slice is normalised to 0..255
    (:func:`normalise`) and resized to ``image_size`` (:func:`resize_image`,
    :func:`resize_mask`). With ``cache_path`` (an ``.npz``) the result is stored
    atomically, with the index beside it as ``<stem>_index.csv``, and reused while the
    inputs (sha256 of every file), the parameters and :data:`EXTRACTION_VERSION` are
    unchanged; ``force`` rebuilds anyway.
    """
    size = _size_pair(image_size)
    if size[0] != size[1]:
        raise ValueError(f"image_size must be one int (square images), got {image_size!r}")
    root = Path(source_root)
    cases = _case_folders(root)
    low, high = (float(p) for p in percentiles)
    params = dict(image_size=size[0], require_modality=require_modality, allow_gaps=bool(allow_gaps),
                  allow_empty=bool(allow_empty), tumor_outside_kidney=tumor_outside_kidney, percentiles=[low, high])
    fingerprint = _fingerprint(root, cases, params)
    if cache_path is not None:
        cache_path = Path(cache_path)
        if cache_path.suffix != ".npz":
            raise ValueError(f"cache_path must end in .npz, got {cache_path}")
        if not force and cache_path.is_file():
            cached = _load_cache(cache_path, fingerprint)
            if cached is not None:
                cached.source_root = str(root)
                return cached

    source = "phantom" if (root / "phantom.json").is_file() else "user"
    weightings = _read_weightings(root)
    images, kidneys, tumors, rows = [], [], [], []
    for case in cases:
        volume, metas = read_series(case / "dicom", case_id=case.name, require_modality=require_modality,
                                    allow_gaps=allow_gaps)
        kidney, tumor = read_png_masks(case / "masks", metas, allow_empty=allow_empty,
                                       tumor_outside_kidney=tumor_outside_kidney)
        for i, meta in enumerate(metas):
            image = resize_image(normalise(volume[i], low, high), size)
            k = resize_mask(kidney[i], size)
            t = resize_mask(tumor[i], size)
            n_before = len(np.unique(tumor[i])) - (1 if (tumor[i] == 0).any() else 0)
            n_after = len(np.unique(t)) - (1 if (t == 0).any() else 0)
            if n_after < n_before:
                warnings.warn(f"{case / 'masks' / (meta.sop_instance_uid + '_tumor.png')}: "
                              f"{n_before - n_after} tumour instance(s) vanished when resizing to {size[0]}", stacklevel=2)
            images.append(image)
            kidneys.append(k)
            tumors.append(t)
            rows.append(dict(
                source=source, case_id=meta.case_id, series_instance_uid=meta.series_instance_uid,
                sop_instance_uid=meta.sop_instance_uid, slice_index=meta.slice_index,
                file=(case.relative_to(root) / "dicom" / meta.file_name).as_posix(),
                weighting=weightings.get(meta.case_id, "unknown"), n_tumors=n_after,
                rows=meta.rows, columns=meta.columns, source_sha256=meta.pixel_sha256,
                image_sha256=hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest(),
            ))
    index_csv = pd.DataFrame(rows, columns=_INDEX_COLUMNS).to_csv(index=False, lineterminator="\n")
    data = Dataset(np.stack(images).astype(np.float32), np.stack(kidneys).astype(np.uint8),
                   np.stack(tumors).astype(np.uint16), _index_from_csv(index_csv), fingerprint, cached=False,
                   source_root=str(root))
    if cache_path is not None:
        with atomic_path(cache_path) as tmp:
            np.savez_compressed(tmp, images=data.images, kidney_masks=data.kidney_masks,
                                tumor_labels=data.tumor_labels, index_csv=np.array(index_csv),
                                fingerprint=np.array(fingerprint))
        write_text(_index_csv_path(cache_path), index_csv)
    return data


# ----------------------------------------------------------------------------- splits


def partition_fractions(name: str) -> tuple[float, float]:
    """(train, val) fractions of a Table I partition, by key ("TD-70% VD-6%") or slug ("70-6")."""
    key = PARTITION_SLUGS.get(name, name)
    if key not in PARTITIONS:
        raise ValueError(f"unknown partition {name!r}: choose one of {list(PARTITIONS)} or {list(PARTITION_SLUGS)}")
    return PARTITIONS[key]


def partition_slug(name: str) -> str:
    """The short file-name form ("70-6") of a Table I partition key or slug."""
    key = PARTITION_SLUGS.get(name, name)
    partition_fractions(key)
    return {v: k for k, v in PARTITION_SLUGS.items()}[key]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def split_sizes(n_cases: int, train: float = 0.70, val: float = 0.06) -> tuple[int, int, int]:
    """(n_train, n_val, n_test) for ``n_cases`` cases (section III.A.3, Table I).

    Rule: train and val counts are ``fraction x n`` rounded half up, at least 1 each; test
    takes the remainder and must be at least 1 (30 cases at 70%/6%: 21, 2, 7).
    """
    for name, value in (("train", train), ("val", val)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} fraction must be a number, got {value!r}")
    if train <= 0 or val <= 0:
        raise ValueError(f"train and val fractions must be > 0 (the validation set must not be empty); "
                         f"got train={train}, val={val}")
    if train + val >= 1:
        raise ValueError(f"train + val must be < 1 so that the test set is not empty; got {train} + {val}")
    n_train = max(1, _round_half_up(train * n_cases))
    n_val = max(1, _round_half_up(val * n_cases))
    n_test = n_cases - n_train - n_val
    if n_test < 1:
        raise ValueError(f"{n_cases} cases are too few for train={train}, val={val}: the test set would be "
                         f"empty ({n_train} train, {n_val} val); use more cases or smaller fractions")
    return n_train, n_val, n_test


def _case_list(index_or_case_ids: Any) -> list[str]:
    if isinstance(index_or_case_ids, Dataset):
        index_or_case_ids = index_or_case_ids.index
    if isinstance(index_or_case_ids, pd.DataFrame):
        if "case_id" not in index_or_case_ids.columns:
            raise ValueError("the index has no case_id column")
        values = index_or_case_ids["case_id"].tolist()
    elif isinstance(index_or_case_ids, str):
        raise ValueError("give a list of case ids, a Dataset or its index, not one string")
    else:
        values = list(index_or_case_ids)
    return sorted({str(v) for v in values})


def split(index_or_case_ids: Any, train: float = 0.70, val: float = 0.06, seed: int = 0) -> dict[str, list[str]]:
    """Split CASE ids into train / val / test (section III.A.3, Table I).

    Accepts a :class:`Dataset`, its index (several slices per case) or case ids; splits
    by case, never by slice, so one patient is never on two sides. Sizes follow
    :func:`split_sizes`; the order is ``numpy.random.default_rng(seed)``'s permutation of
    the sorted unique ids, so the result does not depend on the input order. Each list
    is returned sorted.
    """
    cases = _case_list(index_or_case_ids)
    n_train, n_val, _ = split_sizes(len(cases), train, val)
    order = np.random.default_rng(seed).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    return {"train": sorted(shuffled[:n_train]),
            "val": sorted(shuffled[n_train:n_train + n_val]),
            "test": sorted(shuffled[n_train + n_val:])}


def split_partition(index_or_case_ids: Any, partition: str, seed: int = 0) -> dict[str, Any]:
    """:func:`split` for a named Table I partition, with its name, slug, seed and fractions recorded."""
    train, val = partition_fractions(partition)
    record: dict[str, Any] = split(index_or_case_ids, train, val, seed)
    record.update(partition=PARTITION_SLUGS.get(partition, partition), slug=partition_slug(partition),
                  seed=int(seed), train_fraction=train, val_fraction=val)
    return record


def save_splits(path: str | os.PathLike, splits_by_name: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write splits as JSON (nnU-Net ``splits_final.json`` style), atomically.

    The file is a list of ``{"name", "train", "val", "test", ...}``, one per entry of
    ``splits_by_name``; extra keys of an entry (partition, seed, fractions, as given by
    :func:`split_partition`) are kept. Train, val and test must be disjoint.
    """
    records = []
    for name, entry in splits_by_name.items():
        record = {k: v for k, v in dict(entry).items()}
        for key in ("train", "val", "test"):
            if key not in record:
                raise ValueError(f"split {name!r} has no {key!r} list")
            record[key] = [str(c) for c in record[key]]
        sets = [set(record[k]) for k in ("train", "val", "test")]
        if sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]:
            raise ValueError(f"split {name!r}: a case is on two sides")
        record["name"] = str(name)
        records.append(record)
    return write_json(path, records)


def load_splits(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a file written by :func:`save_splits`: {name: {"train", "val", "test", ...}}."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KtsInputError(path, "does not exist; write it with kts.data.save_splits") from None
    except json.JSONDecodeError as exc:
        raise KtsInputError(path, f"is not valid JSON ({exc})") from None
    if isinstance(records, dict):
        records = [dict(v, name=k) for k, v in records.items()]
    if not isinstance(records, list):
        raise KtsInputError(path, "must hold a list of {train, val, test} objects")
    out: dict[str, dict[str, Any]] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), list) for k in ("train", "val", "test")):
            raise KtsInputError(path, f"entry {i} needs train, val and test lists of case ids")
        name = str(record.get("name", i))
        out[name] = {k: v for k, v in record.items() if k != "name"}
    return out
