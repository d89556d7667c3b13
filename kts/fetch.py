"""Download the public MR series named in ``data_manifest.csv``, verified and resumable.

Section IV: the paper's images come from TCGA-KIRC [33] on The Cancer Imaging Archive. Two
routes, both public and without login:

* ``source="tcia"``: TCIA's NBIA REST API v4, ``<base>/getImage?SeriesInstanceUID=<uid>``,
  which returns one zip per series. ``base`` defaults to ``TCIA_BASE_URL`` and can be changed
  with ``base_url=`` or the ``KTS_TCIA_BASE_URL`` environment variable (tests point it at a
  local server).
* ``source="idc"``: NCI Imaging Data Commons through the optional ``idc-index`` package
  (``pip install idc-index``; it fetches its own index and the ``s5cmd`` tool at run time),
  calling ``IDCClient().download_from_selection(seriesInstanceUID=[uid], downloadDir=...)``.

Every series lands in ``<dest>/<patient_id>/<SeriesInstanceUID>/`` only after verification:
the zip is extracted safely (no absolute paths, ``..``, links or oversized members) into a
temporary folder beside it; the number of instances must equal the manifest's
``n_instances``; every file must read as DICOM with the row's SeriesInstanceUID (and, where the
manifest has a ``sha256`` column, the series digest must match, see :func:`series_digest`).
Then a ``.kts-verified.json`` marker with the per-file SHA-256 is written and the folder is
renamed into place. A verified series is never fetched again; a half-fetched one (a leftover
temporary folder, or a target without a marker) is fetched again. Nothing downloaded is ever
executed or unpickled. Failures raise :class:`kts.errors.FetchError` naming the series UID or
URL and the problem; no patient name is ever logged.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Sequence

from kts.errors import FetchError
from kts.io import write_json, sha256_file
from kts.manifest import TCIA_BASE_URL  # the one place the public NBIA endpoint is written

TCIA_ENV = "KTS_TCIA_BASE_URL"
MARKER = ".kts-verified.json"
PARTIAL_PREFIX = ".kts-partial-"
MAX_SERIES_BYTES = 4 * 1024**3  # refuse zips that would expand beyond 4 GiB (zip bombs)
USER_AGENT = "kts-fetch (kidney tumour segmentation companion)"


@dataclass(frozen=True)
class FetchResult:
    """What happened to one series: ``status`` is ``"fetched"`` or ``"cached"``."""

    series_instance_uid: str
    folder: Path
    status: str
    n_instances: int


# ----------------------------------------------------------------------------- helpers
def tcia_base_url(base_url: str | None = None) -> str:
    """``base_url``, else ``$KTS_TCIA_BASE_URL``, else the public NBIA v4 endpoint."""
    return (base_url or os.environ.get(TCIA_ENV) or TCIA_BASE_URL).rstrip("/")


def tcia_series_url(series_uid: str, base_url: str | None = None) -> str:
    """The NBIA v4 ``getImage`` URL of one series."""
    query = urllib.parse.urlencode({"SeriesInstanceUID": series_uid})
    return f"{tcia_base_url(base_url)}/getImage?{query}"


def _rows(manifest_rows: Any) -> list[dict[str, Any]]:
    if hasattr(manifest_rows, "to_dict"):
        return [dict(r) for r in manifest_rows.to_dict("records")]
    if isinstance(manifest_rows, Mapping):
        return [dict(manifest_rows)]
    return [dict(r) for r in manifest_rows]


def series_digest(file_hashes: Iterable[str]) -> str:
    """SHA-256 of the sorted per-file SHA-256 hex digests joined by newlines (order-free)."""
    return hashlib.sha256("\n".join(sorted(file_hashes)).encode()).hexdigest()


def series_folder(dest: str | os.PathLike, row: Mapping[str, Any]) -> Path:
    """``<dest>/<patient_id>/<SeriesInstanceUID>`` (the public catalogue pseudonym, never a name)."""
    patient = str(row.get("patient_id", "")).strip() or "unknown"
    if any(ch in patient for ch in "/\\") or patient in (".", ".."):
        raise FetchError(f"series {row.get('series_instance_uid')}", f"unusable patient_id {patient!r} for a folder")
    return Path(dest) / patient / str(row["series_instance_uid"])


def is_verified(folder: Path, row: Mapping[str, Any] | None = None) -> bool:
    """True when ``folder`` has a marker whose files all exist with the recorded sizes."""
    marker = folder / MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if row is not None and info.get("series_instance_uid") != str(row["series_instance_uid"]):
        return False
    files = info.get("files", {})
    if row is not None and len(files) != int(row["n_instances"]):
        return False
    for name, entry in files.items():
        path = folder / name
        try:
            if path.stat().st_size != entry["size"]:
                return False
        except OSError:
            return False
    return bool(files)


# ----------------------------------------------------------------------------- HTTP
_RETRYABLE = (socket.timeout, TimeoutError, ConnectionError, http.client.IncompleteRead,
              http.client.RemoteDisconnected)


def download_url(url: str, target: Path, *, series_uid: str, timeout: float = 60.0, retries: int = 4,
                 backoff: float = 1.0, progress: bool = True, sleep: Callable[[float], None] = time.sleep) -> int:
    """Stream ``url`` into ``target``; retry 5xx, timeouts and broken connections with backoff.

    The wait before retry ``k`` (1-based) is ``backoff * 2**(k-1)`` seconds. A 4xx answer or
    a body shorter than its Content-Length after the last retry raises :class:`FetchError`.
    Returns the number of bytes written.
    """
    last_problem = ""
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                written = _stream(response, target, expected, series_uid, progress)
            if expected is not None and written != expected:
                raise http.client.IncompleteRead(b"", expected - written)
            return written
        except urllib.error.HTTPError as exc:
            if 500 <= exc.code < 600:
                last_problem = f"server error HTTP {exc.code}"
                continue
            raise FetchError(url, f"HTTP {exc.code} {exc.reason} for series {series_uid}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, _RETRYABLE) or isinstance(exc.reason, OSError):
                last_problem = f"connection problem ({exc.reason})"
                continue
            raise FetchError(url, f"cannot reach the server for series {series_uid} ({exc.reason})") from None
        except _RETRYABLE as exc:
            last_problem = f"timed out or connection dropped after {timeout:g} s ({type(exc).__name__})"
            continue
    raise FetchError(url, f"series {series_uid}: gave up after {retries + 1} attempts; last problem: {last_problem}")


def _stream(response: Any, target: Path, expected: int | None, series_uid: str, progress: bool) -> int:
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=expected, unit="B", unit_scale=True, desc=f"series ...{series_uid[-12:]}", leave=False)
    written = 0
    try:
        with open(target, "wb") as out:
            while True:
                block = response.read(1 << 16)
                if not block:
                    break
                out.write(block)
                written += len(block)
                if written > MAX_SERIES_BYTES:
                    raise FetchError(f"series {series_uid}", f"download exceeds {MAX_SERIES_BYTES} bytes; refused")
                if bar is not None:
                    bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
    return written


# ----------------------------------------------------------------------------- extraction
def safe_extract(zip_path: Path, folder: Path, *, source: str, max_bytes: int = MAX_SERIES_BYTES) -> list[Path]:
    """Extract the regular files of ``zip_path`` into ``folder`` (flat), refusing zip-slip.

    Refuses absolute names, drive letters, ``..`` components, symbolic links and other
    non-regular members, duplicate file names, and archives expanding beyond ``max_bytes``.
    """
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FetchError(source, f"the download is not a valid zip archive ({exc}); truncated or not a series") from None
    written: list[Path] = []
    total = 0
    with archive:
        for info in archive.infolist():
            name = info.filename.replace("\\", "/")
            pure = PurePosixPath(name)
            if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in pure.parts:
                raise FetchError(source, f"zip member {info.filename!r} would escape the target folder; refused")
            mode = (info.external_attr >> 16) & 0xFFFF
            if info.is_dir():
                continue
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no type recorded (plain file)
                raise FetchError(source, f"zip member {info.filename!r} is a link or special file; refused")
            total += info.file_size
            if total > max_bytes:
                raise FetchError(source, f"zip expands beyond {max_bytes} bytes; refused")
            target = folder / pure.name
            if target.exists():
                raise FetchError(source, f"zip holds two files named {pure.name!r}")
            try:
                with archive.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
                raise FetchError(source, f"zip member {info.filename!r} is corrupt or truncated ({exc})") from None
            written.append(target)
    if not written:
        raise FetchError(source, "the zip archive holds no files")
    return written


# ----------------------------------------------------------------------------- verification
def verify_series(folder: Path, row: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Check a downloaded folder against its manifest row; return the marker content.

    Instance count equals ``n_instances``; every file reads as DICOM (``pydicom``, header only),
    carries the row's SeriesInstanceUID and a distinct SOPInstanceUID; the optional ``sha256``
    column, when filled, equals :func:`series_digest` of the files.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    uid = str(row["series_instance_uid"])
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    expected = int(row["n_instances"])
    if len(files) != expected:
        raise FetchError(source, f"series {uid}: got {len(files)} files but the manifest says {expected} instances")
    entries: dict[str, dict[str, Any]] = {}
    sops: set[str] = set()
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as exc:
            raise FetchError(source, f"series {uid}: file {path.name} is not readable DICOM ({type(exc).__name__})") from None
        got = str(ds.get("SeriesInstanceUID", ""))
        if got != uid:
            raise FetchError(source, f"series {uid}: file {path.name} belongs to series {got or '(none)'}; "
                                     "the server sent another series")
        sop = str(ds.get("SOPInstanceUID", ""))
        if not sop or sop in sops:
            raise FetchError(source, f"series {uid}: file {path.name} has a missing or repeated SOPInstanceUID")
        sops.add(sop)
        entries[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size,
                                                        "sop_instance_uid": sop}
    digest = series_digest(e["sha256"] for e in entries.values())
    wanted = str(row.get("sha256", "") or "").strip().lower()
    if wanted and wanted != "nan" and wanted != digest:
        raise FetchError(source, f"series {uid}: checksum {digest} differs from the manifest's {wanted}")
    return {"series_instance_uid": uid, "n_instances": len(entries), "sha256": digest, "files": entries}


def _finish(tmp: Path, final: Path, info: dict[str, Any]) -> None:
    write_json(tmp / MARKER, info)
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def _clean_partials(parent: Path, uid: str) -> None:
    if parent.is_dir():
        for old in parent.glob(f"{PARTIAL_PREFIX}{uid}-*"):
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- IDC
def idc_selection(manifest_rows: Any) -> list[str]:
    """The SeriesInstanceUIDs an IDC download would request (manifest order, no phantom rows)."""
    return [str(r["series_instance_uid"]) for r in _rows(manifest_rows) if r.get("source") != "phantom"]


def idc_download_call(series_uids: Sequence[str], download_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The exact ``idc-index`` call kts makes: method name and keyword arguments."""
    return "download_from_selection", {"seriesInstanceUID": list(series_uids), "downloadDir": str(download_dir)}


def idc_client() -> Any:
    """An ``idc_index.IDCClient``; a missing package raises :class:`FetchError` saying how to install it."""
    try:
        from idc_index import IDCClient  # type: ignore[import-not-found]
    except ImportError:
        raise FetchError("idc-index", "the IDC route needs the optional package idc-index: "
                                      "`pip install idc-index` (it downloads its own index and s5cmd when first "
                                      "used), or use --source tcia") from None
    return IDCClient()


# ----------------------------------------------------------------------------- public API
def fetch(manifest_rows: Any, dest: str | os.PathLike, source: str = "tcia", base_url: str | None = None,
          timeout: float = 60.0, retries: int = 4, backoff: float = 1.0, progress: bool = True,
          client: Any = None) -> list[FetchResult]:
    """Download and verify the series of ``manifest_rows`` (section IV, TCGA-KIRC [33]).

    ``manifest_rows``: a DataFrame from :func:`kts.manifest.read_manifest`, or dicts with at
    least ``series_instance_uid``, ``patient_id`` and ``n_instances``. Phantom rows are skipped
    (build them with ``kts.phantom``). ``source``: ``"tcia"`` (NBIA v4 zips) or ``"idc"``
    (``idc-index``; ``client`` may pass an ``IDCClient``). ``timeout`` is per request in seconds;
    ``retries`` more attempts follow a 5xx, timeout or dropped connection, with exponential
    ``backoff``. Returns one :class:`FetchResult` per series; raises :class:`FetchError`.
    """
    if source not in ("tcia", "idc"):
        raise ValueError(f"source must be 'tcia' or 'idc', got {source!r}")
    if timeout <= 0 or retries < 0 or backoff < 0:
        raise ValueError("timeout must be > 0 and retries, backoff >= 0")
    rows = [r for r in _rows(manifest_rows) if r.get("source") != "phantom"]
    dest = Path(dest)
    results: list[FetchResult] = []
    outer = None
    if progress and len(rows) > 1:
        from tqdm.auto import tqdm

        outer = tqdm(total=len(rows), unit="series", desc=f"fetch from {source}")
    try:
        for row in rows:
            results.append(_fetch_one(row, dest, source, base_url, timeout, retries, backoff, progress, client))
            if outer is not None:
                outer.update(1)
    finally:
        if outer is not None:
            outer.close()
    return results


def _fetch_one(row: dict[str, Any], dest: Path, source: str, base_url: str | None, timeout: float, retries: int,
               backoff: float, progress: bool, client: Any) -> FetchResult:
    uid = str(row["series_instance_uid"])
    final = series_folder(dest, row)
    if is_verified(final, row):
        return FetchResult(uid, final, "cached", int(row["n_instances"]))
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_partials(final.parent, uid)
    tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{uid}-", dir=final.parent))
    try:
        if source == "tcia":
            url = tcia_series_url(uid, base_url)
            zip_path = Path(tempfile.mkstemp(prefix=f"{PARTIAL_PREFIX}{uid}-", suffix=".zip", dir=final.parent)[1])
            try:
                download_url(url, zip_path, series_uid=uid, timeout=timeout, retries=retries, backoff=backoff,
                             progress=progress)
                safe_extract(zip_path, tmp, source=url)
            finally:
                zip_path.unlink(missing_ok=True)
            where = url
        else:
            client = idc_client() if client is None else client
            method, kwargs = idc_download_call([uid], tmp)
            where = f"IDC series {uid}"
            try:
                getattr(client, method)(**kwargs)
            except FetchError:
                raise
            except Exception as exc:  # idc-index / s5cmd failures
                raise FetchError(where, f"idc-index download failed ({type(exc).__name__}: {exc})") from None
        info = verify_series(tmp, row, source=where)
        _finish(tmp, final, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FetchResult(uid, final, "fetched", int(row["n_instances"]))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kts.fetch --manifest data_manifest.csv --source tcia --dest data/tcga-kirc``."""
    from kts.errors import ManifestError
    from kts.manifest import read_manifest

    parser = argparse.ArgumentParser(prog="python -m kts.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default="data_manifest.csv")
    parser.add_argument("--source", choices=("tcia", "idc"), default="tcia")
    parser.add_argument("--dest", required=True)
    parser.add_argument("--only-source", choices=("tcga-kirc", "cptac-ccrcc"), default=None)
    parser.add_argument("--limit", type=int, default=None, help="fetch at most N series")
    parser.add_argument("--base-url", default=None, help=f"TCIA API base (default ${TCIA_ENV} or {TCIA_BASE_URL})")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--retries", type=int, default=4)
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    args = parser.parse_args(argv)
    try:
        df = read_manifest(args.manifest)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 2
    df = df[df["source"] != "phantom"]
    if args.only_source:
        df = df[df["source"] == args.only_source]
    if args.limit is not None:
        df = df.head(args.limit)
    if args.dry_run:
        for row in df.itertuples():
            where = tcia_series_url(row.series_instance_uid, args.base_url) if args.source == "tcia" else row.idc_url
            print(f"{row.source}\t{row.series_instance_uid}\t{row.n_instances}\t{where}")
        print(f"{len(df)} series, {df['size_mb'].sum():.1f} MB")
        return 0
    try:
        results = fetch(df, args.dest, source=args.source, base_url=args.base_url, timeout=args.timeout,
                        retries=args.retries)
    except FetchError as exc:
        print(exc, file=sys.stderr)
        return 1
    fetched = sum(r.status == "fetched" for r in results)
    print(f"{len(results)} series verified in {args.dest} ({fetched} fetched, {len(results) - fetched} already there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
