"""kts.fetch against a real HTTP server on 127.0.0.1 serving phantom-like series zips, with faults."""
from __future__ import annotations

import io
import json
import stat
import sys
import time
import types
import zipfile
from pathlib import Path

import pytest

from kts import fetch as kf
from kts.errors import FetchError

from realdata_helpers import PATIENT, make_uid, series_zip, tiny_mr_datasets
from realdata_helpers import LoopbackTCIA as _Server


@pytest.fixture()
def loopback_tcia():
    with _Server() as server:
        yield server


def _row(datasets, n=None, **extra):
    row = {"source": "tcga-kirc", "patient_id": PATIENT, "series_instance_uid": str(datasets[0].SeriesInstanceUID),
           "n_instances": len(datasets) if n is None else n}
    row.update(extra)
    return row


FAST = dict(timeout=2.0, retries=2, backoff=0.01, progress=False)


def test_fetch_verifies_writes_marker_and_never_refetches(loopback_tcia, tmp_path):
    ds = tiny_mr_datasets(3, seed=1)
    row = _row(ds)
    loopback_tcia.routes[row["series_instance_uid"]] = [("ok", series_zip(ds))]
    result = kf.fetch([row], tmp_path, base_url=loopback_tcia.base, **FAST)
    folder = tmp_path / PATIENT / row["series_instance_uid"]
    assert result[0].status == "fetched" and result[0].folder == folder
    marker = json.loads((folder / kf.MARKER).read_text())
    assert marker["n_instances"] == 3 and len(marker["files"]) == 3
    assert not list(tmp_path.joinpath(PATIENT).glob(".kts-partial-*"))
    again = kf.fetch([row], tmp_path, base_url=loopback_tcia.base, **FAST)
    assert again[0].status == "cached"
    assert loopback_tcia.requests.count(row["series_instance_uid"]) == 1


def test_env_variable_sets_base_url_and_checksum_column_is_checked(loopback_tcia, tmp_path, monkeypatch):
    ds = tiny_mr_datasets(2, seed=2)
    uid = str(ds[0].SeriesInstanceUID)
    loopback_tcia.routes[uid] = [("ok", series_zip(ds))]
    monkeypatch.setenv(kf.TCIA_ENV, loopback_tcia.base)
    with pytest.raises(FetchError, match="checksum"):
        kf.fetch([_row(ds, sha256="0" * 64)], tmp_path, **FAST)
    result = kf.fetch([_row(ds)], tmp_path, **FAST)
    digest = json.loads((result[0].folder / kf.MARKER).read_text())["sha256"]
    assert digest == kf.series_digest(e["sha256"] for e in json.loads((result[0].folder / kf.MARKER).read_text())["files"].values())


def test_500_then_success_is_retried(loopback_tcia, tmp_path):
    ds = tiny_mr_datasets(2, seed=3)
    row = _row(ds)
    loopback_tcia.routes[row["series_instance_uid"]] = [("status", 500), ("status", 503), ("ok", series_zip(ds))]
    assert kf.fetch([row], tmp_path, base_url=loopback_tcia.base, **FAST)[0].status == "fetched"
    assert loopback_tcia.requests.count(row["series_instance_uid"]) == 3


def test_persistent_500_gives_up_naming_url(loopback_tcia, tmp_path):
    ds = tiny_mr_datasets(2, seed=4)
    row = _row(ds)
    loopback_tcia.routes[row["series_instance_uid"]] = [("status", 500)]
    with pytest.raises(FetchError, match=r"getImage\?SeriesInstanceUID=.*gave up after 3 attempts.*HTTP 500"):
        kf.fetch([row], tmp_path, base_url=loopback_tcia.base, **FAST)
    assert not (tmp_path / PATIENT / row["series_instance_uid"]).exists()


def test_404_is_not_retried(loopback_tcia, tmp_path):
    ds = tiny_mr_datasets(2, seed=5)
    with pytest.raises(FetchError, match="HTTP 404"):
        kf.fetch([_row(ds)], tmp_path, base_url=loopback_tcia.base, **FAST)
    assert loopback_tcia.requests.count(str(ds[0].SeriesInstanceUID)) == 1


def test_dropped_connection_is_retried(loopback_tcia, tmp_path):
    ds = tiny_mr_datasets(2, seed=6)
    row = _row(ds)
    body = series_zip(ds)
    loopback_tcia.routes[row["series_instance_uid"]] = [("drop", body), ("ok", body)]
    assert kf.fetch([row], tmp_path, base_url=loopback_tcia.base, **FAST)[0].status == "fetched"


def test_truncated_zip_is_refused(loopback_tcia, tmp_path):
    ds = tiny_mr_datasets(3, seed=7)
    row = _row(ds)
    body = series_zip(ds)
    loopback_tcia.routes[row["series_instance_uid"]] = [("ok", body[: len(body) * 2 // 3])]
    with pytest.raises(FetchError, match="not a valid zip|corrupt or truncated"):
        kf.fetch([row], tmp_path, base_url=loopback_tcia.base, **FAST)
    assert not (tmp_path / PATIENT / row["series_instance_uid"]).exists()
    assert not list((tmp_path / PATIENT).glob(".kts-partial-*"))


def test_zip_of_another_series_is_refused(loopback_tcia, tmp_path):
    wanted = tiny_mr_datasets(2, seed=8)
    other = tiny_mr_datasets(2, seed=9)
    row = _row(wanted)
    loopback_tcia.routes[row["series_instance_uid"]] = [("ok", series_zip(other))]
    with pytest.raises(FetchError, match=f"belongs to series {other[0].SeriesInstanceUID}"):
        kf.fetch([row], tmp_path, base_url=loopback_tcia.base, **FAST)


def test_zip_slip_entry_is_refused(loopback_tcia, tmp_path):
    ds = tiny_mr_datasets(1, seed=10)
    row = _row(ds, n=2)
    loopback_tcia.routes[row["series_instance_uid"]] = [("ok", series_zip(ds, extra={"../evil.dcm": b"x"}))]
    dest = tmp_path / "dest"
    with pytest.raises(FetchError, match="escape the target folder"):
        kf.fetch([row], dest, base_url=loopback_tcia.base, **FAST)
    assert not list(tmp_path.rglob("evil.dcm"))


def test_symlink_and_absolute_entries_are_refused(tmp_path):
    link = io.BytesIO()
    with zipfile.ZipFile(link, "w") as archive:
        info = zipfile.ZipInfo("link.dcm")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    (tmp_path / "link.zip").write_bytes(link.getvalue())
    (tmp_path / "out").mkdir()
    with pytest.raises(FetchError, match="link or special file"):
        kf.safe_extract(tmp_path / "link.zip", tmp_path / "out", source="test")
    absolute = io.BytesIO()
    with zipfile.ZipFile(absolute, "w") as archive:
        archive.writestr("/tmp/abs.dcm", b"x")
    (tmp_path / "abs.zip").write_bytes(absolute.getvalue())
    with pytest.raises(FetchError, match="escape"):
        kf.safe_extract(tmp_path / "abs.zip", tmp_path / "out", source="test")


def test_slow_server_times_out(loopback_tcia, tmp_path):
    ds = tiny_mr_datasets(1, seed=11)
    row = _row(ds)
    loopback_tcia.routes[row["series_instance_uid"]] = [("slow", 1.0, series_zip(ds))]
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out|gave up"):
        kf.fetch([row], tmp_path, base_url=loopback_tcia.base, timeout=0.2, retries=1, backoff=0.01, progress=False)
    assert time.monotonic() - start < 3.0


def test_instance_count_mismatch_is_refused(loopback_tcia, tmp_path):
    ds = tiny_mr_datasets(2, seed=12)
    row = _row(ds, n=3)
    loopback_tcia.routes[row["series_instance_uid"]] = [("ok", series_zip(ds))]
    with pytest.raises(FetchError, match="got 2 files but the manifest says 3"):
        kf.fetch([row], tmp_path, base_url=loopback_tcia.base, **FAST)


def test_non_dicom_member_is_refused(loopback_tcia, tmp_path):
    ds = tiny_mr_datasets(1, seed=13)
    row = _row(ds, n=2)
    loopback_tcia.routes[row["series_instance_uid"]] = [("ok", series_zip(ds, extra={"notes.dcm": b"hello"}))]
    with pytest.raises(FetchError, match="not readable DICOM"):
        kf.fetch([row], tmp_path, base_url=loopback_tcia.base, **FAST)


def test_half_fetched_series_is_redone(loopback_tcia, tmp_path):
    ds = tiny_mr_datasets(2, seed=14)
    row = _row(ds)
    uid = row["series_instance_uid"]
    loopback_tcia.routes[uid] = [("ok", series_zip(ds))]
    stale = tmp_path / PATIENT / f"{kf.PARTIAL_PREFIX}{uid}-old"
    stale.mkdir(parents=True)
    (stale / "half.dcm").write_bytes(b"partial")
    unverified = tmp_path / PATIENT / uid
    unverified.mkdir()
    (unverified / "junk.dcm").write_bytes(b"junk")
    result = kf.fetch([row], tmp_path, base_url=loopback_tcia.base, **FAST)
    assert result[0].status == "fetched"
    assert not stale.exists() and not (unverified / "junk.dcm").exists()
    assert kf.is_verified(unverified, row)
    # a verified series whose file was damaged afterwards is fetched again
    first = sorted(unverified.glob("*.dcm"))[0]
    first.write_bytes(b"short")
    assert kf.fetch([row], tmp_path, base_url=loopback_tcia.base, **FAST)[0].status == "fetched"


def test_phantom_rows_are_skipped_and_bad_arguments_rejected(tmp_path):
    assert kf.fetch([{"source": "phantom", "series_instance_uid": "1.2", "patient_id": "X", "n_instances": 1}],
                    tmp_path, progress=False) == []
    with pytest.raises(ValueError, match="source must be"):
        kf.fetch([], tmp_path, source="ftp")


# ----------------------------------------------------------------------------- IDC route (offline only)
def test_idc_without_idc_index_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "idc_index", None)  # import fails as if not installed
    ds = tiny_mr_datasets(1, seed=15)
    with pytest.raises(FetchError, match="pip install idc-index"):
        kf.fetch([_row(ds)], tmp_path, source="idc", progress=False)


def test_idc_selection_and_exact_call_without_network(monkeypatch, tmp_path):
    calls = []

    class FakeClient:
        def download_from_selection(self, **kwargs):  # records the call, downloads nothing
            calls.append(kwargs)

    monkeypatch.setitem(sys.modules, "idc_index", types.SimpleNamespace(IDCClient=FakeClient))
    ds = tiny_mr_datasets(2, seed=16)
    rows = [_row(ds), {"source": "phantom", "series_instance_uid": "1.2.3", "patient_id": "KTS-PHANTOM-0002",
                       "n_instances": 1}]
    assert kf.idc_selection(rows) == [str(ds[0].SeriesInstanceUID)]
    assert kf.idc_download_call(["1.2"], "/x") == ("download_from_selection",
                                                    {"seriesInstanceUID": ["1.2"], "downloadDir": "/x"})
    # nothing was downloaded, so verification must fail: no faked success
    with pytest.raises(FetchError, match="got 0 files but the manifest says 2"):
        kf.fetch(rows, tmp_path, source="idc", progress=False)
    assert len(calls) == 1 and calls[0]["seriesInstanceUID"] == [str(ds[0].SeriesInstanceUID)]
    assert Path(calls[0]["downloadDir"]).parent == tmp_path / PATIENT


def test_cli_dry_run_lists_urls(tmp_path, capsys, monkeypatch):
    from kts import manifest as km

    ds = tiny_mr_datasets(2, seed=17)
    uid = str(ds[0].SeriesInstanceUID)
    row = {c: "" for c in km.COLUMNS}
    row.update(source="tcga-kirc", patient_id="TCGA-XX-0001", study_instance_uid=str(ds[0].StudyInstanceUID),
               series_instance_uid=uid, modality="MR", n_instances="2", size_mb="0.010", licence="CC BY 3.0",
               doi="10.7937/K9/TCIA.2016.V6PBVTDR", idc_url="s3://x/y/*", tcia_url=kf.tcia_series_url(uid))
    import pandas as pd

    km.write_manifest(tmp_path / "m.csv", pd.DataFrame([row], columns=list(km.COLUMNS)))
    assert kf.main(["--manifest", str(tmp_path / "m.csv"), "--dest", str(tmp_path / "d"), "--dry-run",
                    "--base-url", "http://127.0.0.1:9/nbia"]) == 0
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:9/nbia/getImage?SeriesInstanceUID={uid}" in out
    assert make_uid("x") != uid
