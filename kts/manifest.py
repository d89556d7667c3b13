"""The data manifest: which public MR series (and annotations) kts uses, and where to get them.

Section IV of the paper says only that "a set of 30 kidney MR images" was "collected from the
TCGA-KIRC dataset [33]"; it names no series. ``data_manifest.csv`` makes that choice explicit
and reproducible. It is generated **offline** from the NCI Imaging Data Commons (IDC) series
index shipped inside the ``idc-index-data`` wheel by a documented keyword query
(``python -m kts.manifest build``), and every command that reads it goes through
:func:`read_manifest`, which checks the schema and names the file, row and column of any fault.

Rows (one per DICOM series):

* ``tcga-kirc``: one axial T1 post-contrast MR series per TCGA-KIRC patient, chosen by
  :func:`select_tcga_kirc` (rules in ``SELECTION_RULES``). No public masks exist for these.
* ``cptac-ccrcc``: the CPTAC-CCRCC MR series that carry kidney-tumour RTSTRUCT contours
  (annotation collection "CPTAC-CCRCC-Tumor-Annotations", DOI 10.7937/SKQ4-QX48), and those
  RTSTRUCTs, with ``references_series_uid`` naming the image series each one contours.
  The shipped index has no reference column, so the referenced series is inferred as the MR
  series of the same study whose SeriesNumber equals the RTSTRUCT's (the annotation tool,
  OHIF, numbers a structure set after the series it was drawn on; every kidney RTSTRUCT in
  the index matches exactly one MR series that way). :func:`kts.masks.read_rtstruct_mask`
  checks the real reference after download.
* ``phantom``: one row per case of the default synthetic data set (``kts.phantom``), with
  ``seed`` and ``generator_version`` instead of URLs.

Licences: TCGA-KIRC is CC BY 3.0 (cite DOI 10.7937/K9/TCIA.2016.V6PBVTDR and, per TCIA's
usage policy, Clark et al., J Digit Imaging 2013); CPTAC-CCRCC images and annotations are
CC BY 4.0. ``patient_id`` is the public TCIA pseudonym from the catalogue; kts never copies
DICOM header identifiers into its own outputs.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from kts.errors import ManifestError
from kts.io import write_text

TCIA_BASE_URL = "https://services.cancerimagingarchive.net/nbia-api/services/v4"

COLUMNS: tuple[str, ...] = (
    "source", "patient_id", "study_instance_uid", "series_instance_uid", "modality",
    "series_description", "manufacturer", "n_instances", "size_mb", "licence", "doi",
    "idc_url", "tcia_url", "references_series_uid", "selection", "seed", "generator_version",
    "catalogue_version",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("sha256",)
UID_COLUMNS = ("study_instance_uid", "series_instance_uid", "references_series_uid")
SOURCES = ("tcga-kirc", "cptac-ccrcc", "phantom")
SOURCE_COLLECTION = {"tcga-kirc": "tcga_kirc", "cptac-ccrcc": "cptac_ccrcc"}

# --- the TCGA-KIRC keyword selection (case-insensitive regular expressions on SeriesDescription)
POST_CONTRAST = r"post|\+\s*c\b|\bc\+|\+\s*\d+\s*min|gad|contras|enhanc"
AXIAL = r"\bax|_tra(_|\b)|\btra\b|transverse"
OTHER_PLANE = r"(\b|_)(cor|sag|obl)"
DYNAMIC = r"dyn"
DELAYED = r"delay|\d\s*min\b"
# (pattern, reason) pairs; the first that matches excludes the series.
EXCLUSIONS: tuple[tuple[str, str], ...] = (
    (r"\bpre\b|\bpre[-_/ ]|xpre|precontrast", "pre-contrast (or pre+post in one series)"),
    (r"\bsub|subtract|\(\d+/\d+/\d+\)-", "subtraction image"),
    (r"mip", "maximum-intensity projection"),
    (r"loc\b|localizer|scout|3\s*pl|survey|posdisp|calib", "localizer/calibration/screen capture"),
    (r"mra\b|angio|flow|bolus|timing|test.?dos", "angiography/flow/timing run"),
    (r"\bt2|haste|ssfse|fiesta|bffe|fisp|mrcp|mru\b|dwi|diffusion|\badc\b",
     "not T1 (T2/steady-state/diffusion/MRCP)"),
    (r"in.?phase|out.?phase|in/out|\bip\b|\bop\b|opp|dixon|dual.?echo",
     "chemical-shift (in/out-of-phase or Dixon) image"),
    (r"pelvis|bladder", "pelvic coverage only"),
    (r"\(x\d\)|\bx\d\b|\d\s*x\s*post|@\s*art|art,", "several timepoints in one series"),
)
MIN_INSTANCES = 10   # fewer slices than this cannot cover both kidneys
MAX_INSTANCES = 250  # a single abdominal volume; more means several timepoints in one series
TIERS = {
    1: "axial T1 post-contrast",
    2: "post-contrast, plane not stated (assumed axial)",
    3: "axial post-contrast, single dynamic timepoint",
}
SELECTION_RULES = f"""TCGA-KIRC default selection (kts.manifest.select_tcga_kirc), on SeriesDescription,
case-insensitive: modality MR; post-contrast /{POST_CONTRAST}/; none of the exclusions
{[p for p, _ in EXCLUSIONS]}; not another plane /{OTHER_PLANE}/; {MIN_INSTANCES} <= instances <=
{MAX_INSTANCES}. Tier 1: axial /{AXIAL}/, not dynamic /{DYNAMIC}/; tier 2: plane not stated, not
dynamic; tier 3: axial and dynamic. Per patient: lowest tier, then not delayed /{DELAYED}/, then
most instances, then the smallest SeriesInstanceUID (string order)."""


# ----------------------------------------------------------------------------- the catalogue
def load_idc_index() -> pd.DataFrame:
    """The IDC series index shipped in the ``idc-index-data`` wheel (no network)."""
    import idc_index_data

    columns = ["collection_id", "analysis_result_id", "PatientID", "StudyInstanceUID",
               "SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber", "Manufacturer",
               "instanceCount", "series_size_MB", "series_aws_url", "license_short_name", "source_DOI"]
    return pd.read_parquet(idc_index_data.IDC_INDEX_PARQUET_FILEPATH, columns=columns)


def catalogue_version() -> str:
    """``idc-index-data <version>``: the catalogue the manifest was built from."""
    import idc_index_data

    return f"idc-index-data {idc_index_data.__version__}"


def classify_series(description: str, n_instances: int) -> tuple[int | None, str]:
    """Tier (1 best, None excluded) and the reason, for one TCGA-KIRC MR series description."""
    text = (description or "").lower()
    if not re.search(POST_CONTRAST, text):
        return None, "no post-contrast keyword"
    for pattern, reason in EXCLUSIONS:
        if re.search(pattern, text):
            return None, reason
    if re.search(OTHER_PLANE, text):
        return None, "coronal/sagittal/oblique plane"
    if n_instances < MIN_INSTANCES:
        return None, f"fewer than {MIN_INSTANCES} instances"
    if n_instances > MAX_INSTANCES:
        return None, f"more than {MAX_INSTANCES} instances (several timepoints in one series)"
    axial = bool(re.search(AXIAL, text))
    dynamic = bool(re.search(DYNAMIC, text))
    if axial and not dynamic:
        return 1, TIERS[1]
    if not dynamic:
        return 2, TIERS[2]
    if axial:
        return 3, TIERS[3]
    return None, "dynamic series, plane not stated"


def classify_tcga_kirc(index: pd.DataFrame) -> pd.DataFrame:
    """All TCGA-KIRC MR series with ``tier`` (NaN when excluded) and ``reason`` columns."""
    mr = index[(index["collection_id"] == "tcga_kirc") & (index["Modality"] == "MR")].copy()
    tiers, reasons = [], []
    for desc, n in zip(mr["SeriesDescription"].fillna(""), mr["instanceCount"].fillna(0)):
        tier, reason = classify_series(desc, int(n))
        tiers.append(tier)
        reasons.append(reason)
    mr["tier"] = pd.array(tiers, dtype="Int64")
    mr["reason"] = reasons
    return mr


def select_tcga_kirc(index: pd.DataFrame) -> pd.DataFrame:
    """One axial T1 post-contrast MR series per TCGA-KIRC patient (section IV, "TCGA-KIRC [33]").

    Rules in ``SELECTION_RULES``; deterministic tie-breaks. Returns index rows plus ``tier``.
    """
    mr = classify_tcga_kirc(index)
    cand = mr[mr["tier"].notna()].copy()
    cand["delayed"] = cand["SeriesDescription"].str.lower().str.contains(DELAYED, regex=True)
    cand = cand.sort_values(["PatientID", "tier", "delayed", "instanceCount", "SeriesInstanceUID"],
                            ascending=[True, True, True, False, True], kind="mergesort")
    return cand.groupby("PatientID", sort=True).head(1)


def select_cptac_ccrcc(index: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """CPTAC-CCRCC kidney-tumour RTSTRUCTs on MR, and the MR series they contour.

    Keeps RTSTRUCTs of ``cptac_ccrcc_tumor_annotations`` whose description names a kidney lesion
    (not the "SEED POINT" marker structures, not other organs) in a study that has MR, and pairs
    each with the MR series of the same study and SeriesNumber (see the module docstring).
    Returns ``(mr_rows, rtstruct_rows)``; ``rtstruct_rows`` has ``references_series_uid``.
    """
    c = index[index["collection_id"] == "cptac_ccrcc"]
    mr = c[c["Modality"] == "MR"]
    rt = c[(c["Modality"] == "RTSTRUCT") & (c["analysis_result_id"] == "cptac_ccrcc_tumor_annotations")]
    desc = rt["SeriesDescription"].fillna("").str.lower()
    rt = rt[desc.str.contains("kidney") & ~desc.str.contains("seed point")]
    rt = rt[rt["StudyInstanceUID"].isin(set(mr["StudyInstanceUID"]))]
    ref = mr[["StudyInstanceUID", "SeriesNumber", "SeriesInstanceUID"]].rename(
        columns={"SeriesInstanceUID": "references_series_uid"})
    if ref.duplicated(["StudyInstanceUID", "SeriesNumber"]).any():
        raise ManifestError("idc-index-data", "two CPTAC-CCRCC MR series share a study and SeriesNumber; "
                                              "the RTSTRUCT reference cannot be inferred")
    rt = rt.merge(ref, on=["StudyInstanceUID", "SeriesNumber"], how="inner")
    mr_rows = mr[mr["SeriesInstanceUID"].isin(set(rt["references_series_uid"]))]
    return mr_rows, rt


# ----------------------------------------------------------------------------- rows
def _tcia_url(series_uid: str) -> str:
    return f"{TCIA_BASE_URL}/getImage?SeriesInstanceUID={series_uid}"


def _catalogue_rows(frame: pd.DataFrame, source: str, selection: str | pd.Series, version: str) -> pd.DataFrame:
    out = pd.DataFrame({
        "source": source,
        "patient_id": frame["PatientID"].to_numpy(),
        "study_instance_uid": frame["StudyInstanceUID"].to_numpy(),
        "series_instance_uid": frame["SeriesInstanceUID"].to_numpy(),
        "modality": frame["Modality"].to_numpy(),
        "series_description": frame["SeriesDescription"].fillna("").str.strip().to_numpy(),
        "manufacturer": frame["Manufacturer"].fillna("").str.strip().to_numpy(),
        "n_instances": frame["instanceCount"].astype(int).to_numpy(),
        "size_mb": [f"{x:.3f}" for x in frame["series_size_MB"]],
        "licence": frame["license_short_name"].to_numpy(),
        "doi": frame["source_DOI"].str.upper().to_numpy(),
        "idc_url": frame["series_aws_url"].to_numpy(),
        "tcia_url": [_tcia_url(u) for u in frame["SeriesInstanceUID"]],
        "references_series_uid": (frame["references_series_uid"].to_numpy()
                                  if "references_series_uid" in frame else ""),
        "selection": selection if isinstance(selection, str) else selection.to_numpy(),
        "seed": "",
        "generator_version": "",
        "catalogue_version": version,
    })
    return out


def phantom_rows(n_cases: int | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per case of the default phantom data set (``kts.phantom``, section III.A.2 stand-in).

    The UIDs come from the generator itself: the data set is written to a temporary folder and
    its ``cases.csv`` read back, so the manifest always matches what ``write_dataset`` produces.
    """
    import tempfile

    from kts import config

    try:
        from kts import phantom
    except ImportError as exc:  # pragma: no cover - phantom is part of kts
        raise ManifestError("kts.phantom", f"cannot build phantom rows: {exc}") from exc
    profile = config.get_profile("paper")
    n = profile.n_cases if n_cases is None else n_cases
    with tempfile.TemporaryDirectory(prefix="kts-manifest-") as tmp:
        root = Path(tmp) / "phantom"
        phantom.write_dataset(root, n_cases=n, seed=seed)
        import pydicom

        cases = pd.read_csv(root / "cases.csv", dtype=str, keep_default_na=False)
        info = _read_json(root / "phantom.json")
        rows = []
        for case_id, group in cases.groupby("case_id", sort=True):
            files = sorted((root / case_id / "dicom").glob("*.dcm"))
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            if {str(ds.SeriesInstanceUID)} != set(group["series_instance_uid"]):
                raise ManifestError(root / "cases.csv", f"{case_id}: series UID differs from its DICOM files")
            size = sum(f.stat().st_size for f in files) / 1e6
            rows.append({
                "source": "phantom", "patient_id": case_id,
                "study_instance_uid": str(ds.StudyInstanceUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "modality": str(ds.Modality),
                "series_description": str(getattr(ds, "SeriesDescription", "")),
                "manufacturer": str(getattr(ds, "Manufacturer", "")),
                "n_instances": len(files), "size_mb": f"{size:.3f}",
                "licence": "MIT", "doi": "", "idc_url": "", "tcia_url": "",
                "references_series_uid": "", "selection": "phantom default data set (profile paper)",
                "seed": str(seed), "generator_version": _generator_version(info),
                "catalogue_version": "",
            })
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _generator_version(info: dict) -> str:
    """"kts.phantom 1.1.0" from a phantom folder's ``phantom.json`` (written by ``phantom.write_dataset``)."""
    return f"{info.get('generator', 'kts.phantom')} {info.get('generator_version', '')}".strip()


def build_manifest(index: pd.DataFrame | None = None, include_phantom: bool = True) -> pd.DataFrame:
    """All manifest rows, in a fixed order (source, patient, study, image before RTSTRUCT, UID)."""
    index = load_idc_index() if index is None else index
    version = catalogue_version()
    kirc = select_tcga_kirc(index)
    kirc_sel = kirc["tier"].map(lambda t: f"tier {t}: {TIERS[int(t)]}")
    mr, rt = select_cptac_ccrcc(index)
    parts = [
        _catalogue_rows(kirc, "tcga-kirc", kirc_sel, version),
        _catalogue_rows(mr, "cptac-ccrcc", "MR series contoured by a kidney-tumour RTSTRUCT", version),
        _catalogue_rows(rt, "cptac-ccrcc", "kidney-tumour RTSTRUCT (reference: same study and SeriesNumber)",
                        version),
    ]
    if include_phantom:
        parts.append(phantom_rows())
    df = pd.concat(parts, ignore_index=True)
    df["_source_rank"] = df["source"].map({s: i for i, s in enumerate(SOURCES)})
    df["_modality_rank"] = (df["modality"] == "RTSTRUCT").astype(int)
    df = df.sort_values(["_source_rank", "patient_id", "study_instance_uid", "_modality_rank",
                         "series_instance_uid"], kind="mergesort")
    return df.drop(columns=["_source_rank", "_modality_rank"]).reset_index(drop=True)[list(COLUMNS)]


def manifest_csv_text(df: pd.DataFrame) -> str:
    """The CSV bytes kts writes: fixed columns, ``\\n`` line ends, minimal quoting."""
    buffer = io.StringIO()
    df.to_csv(buffer, index=False, columns=list(COLUMNS), lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    return buffer.getvalue()


def write_manifest(path: str | Path, df: pd.DataFrame) -> Path:
    """Validate ``df`` and write it atomically as ``path``."""
    validate_manifest(df, path)
    return write_text(path, manifest_csv_text(df))


# ----------------------------------------------------------------------------- reading
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: str) -> bool:
    """DICOM UID syntax (PS3.5 9.1): digits and dots, <= 64 chars, no leading zeros in a component."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and check ``data_manifest.csv``; every command that reads the manifest uses this.

    Raises :class:`kts.errors.ManifestError` naming the file, the row (1-based data row, as a
    spreadsheet shows it: header is row 1) and the column.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except FileNotFoundError:
        raise ManifestError(path, "file not found; build it with `python -m kts.manifest build`") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ManifestError(path, f"not a readable CSV file ({exc})") from None
    validate_manifest(df, path)
    out = df.copy()
    out["n_instances"] = out["n_instances"].astype(int)
    out["size_mb"] = out["size_mb"].astype(float)
    return out


def validate_manifest(df: pd.DataFrame, path: str | Path = "data_manifest.csv") -> None:
    """Check columns, sources, UIDs (syntax and uniqueness), numbers and per-source fields."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(path, f"missing column(s) {missing}; expected {list(COLUMNS)}")

    def where(i: int, column: str) -> str:
        return f"{path}, row {i + 2}, column {column}"

    seen: dict[str, int] = {}
    for i, row in enumerate(df[list(COLUMNS)].astype(str).itertuples(index=False)):
        r = row._asdict()
        if r["source"] not in SOURCES:
            raise ManifestError(where(i, "source"), f"unknown source {r['source']!r}; use one of {list(SOURCES)}")
        for col in UID_COLUMNS:
            value = r[col]
            if col == "references_series_uid" and value == "":
                continue
            if not is_valid_uid(value):
                raise ManifestError(where(i, col), f"malformed DICOM UID {value!r} (digits and dots, "
                                                   "at most 64 characters, no leading zeros)")
        uid = r["series_instance_uid"]
        if uid in seen:
            raise ManifestError(where(i, "series_instance_uid"),
                                f"duplicate SeriesInstanceUID (also on row {seen[uid] + 2})")
        seen[uid] = i
        try:
            n = int(r["n_instances"])
        except ValueError:
            n = -1
        if n < 1 or str(n) != r["n_instances"].strip():
            raise ManifestError(where(i, "n_instances"), f"must be a positive integer; got {r['n_instances']!r}")
        try:
            size = float(r["size_mb"])
        except ValueError:
            size = math.nan
        if not (math.isfinite(size) and size >= 0):
            raise ManifestError(where(i, "size_mb"), f"must be a non-negative number; got {r['size_mb']!r}")
        if r["source"] == "phantom":
            if not r["seed"].strip().isdigit():
                raise ManifestError(where(i, "seed"), f"phantom rows need an integer seed; got {r['seed']!r}")
            if not r["generator_version"].strip():
                raise ManifestError(where(i, "generator_version"), "phantom rows need the generator version")
        else:
            for col in ("tcia_url", "idc_url", "licence", "doi"):
                if not r[col].strip():
                    raise ManifestError(where(i, col), f"{r['source']} rows need a {col}")
            if r["modality"] in ("RTSTRUCT", "SEG") and not r["references_series_uid"]:
                raise ManifestError(where(i, "references_series_uid"),
                                    "annotation rows must name the image series they reference")
    if "references_series_uid" in df:
        refs = {str(x) for x in df["references_series_uid"] if str(x)}
        unknown = sorted(refs - set(seen))
        if unknown:
            i = int(df.index[df["references_series_uid"].astype(str) == unknown[0]][0])
            raise ManifestError(where(i, "references_series_uid"),
                                f"references series {unknown[0]} which is not a row of the manifest")


# ----------------------------------------------------------------------------- review and CLI
def review_selection(index: pd.DataFrame | None = None, limit: int | None = None) -> str:
    """A readable table of every TCGA-KIRC post-contrast candidate: chosen, runner-up or excluded."""
    index = load_idc_index() if index is None else index
    mr = classify_tcga_kirc(index)
    chosen = set(select_tcga_kirc(index)["SeriesInstanceUID"])
    post = mr[mr["SeriesDescription"].fillna("").str.lower().str.contains(POST_CONTRAST, regex=True)]
    post = post.sort_values(["PatientID", "SeriesDescription", "SeriesInstanceUID"])
    lines = [SELECTION_RULES, ""]
    for row in post.itertuples():
        mark = "CHOSEN " if row.SeriesInstanceUID in chosen else ("cand.  " if pd.notna(row.tier) else "EXCL.  ")
        lines.append(f"{mark}{row.PatientID:14s} {row.SeriesDescription[:48]:48s} n={int(row.instanceCount):4d}  "
                     f"{row.reason}")
    no_series = sorted(set(mr["PatientID"]) - set(select_tcga_kirc(index)["PatientID"]))
    lines.append(f"\n{len(chosen)} patients selected; {len(no_series)} TCGA-KIRC MR patients without a "
                 f"qualifying series: {', '.join(no_series)}")
    return "\n".join(lines[: (limit + 2) if limit else None] if limit else lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kts.manifest build [--out data_manifest.csv]`` | ``check PATH`` | ``review``."""
    parser = argparse.ArgumentParser(prog="python -m kts.manifest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="regenerate the manifest from the shipped IDC index (offline)")
    b.add_argument("--out", default="data_manifest.csv")
    b.add_argument("--no-phantom", action="store_true", help="leave out the phantom rows")
    c = sub.add_parser("check", help="validate a manifest file")
    c.add_argument("path", nargs="?", default="data_manifest.csv")
    sub.add_parser("review", help="print the TCGA-KIRC keyword selection with reasons")
    args = parser.parse_args(argv)
    if args.command == "build":
        df = build_manifest(include_phantom=not args.no_phantom)
        write_manifest(args.out, df)
        counts = df["source"].value_counts().reindex(list(SOURCES)).fillna(0).astype(int)
        print(f"wrote {args.out}: {len(df)} rows ({', '.join(f'{k} {v}' for k, v in counts.items())}) "
              f"from {catalogue_version()}")
    elif args.command == "check":
        try:
            df = read_manifest(args.path)
        except ManifestError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{args.path}: {len(df)} rows, schema OK")
    else:
        print(review_selection())
    return 0


if __name__ == "__main__":
    sys.exit(main())
