"""data_manifest.csv: regenerated offline from the shipped IDC index, schema-checked on every read."""
from __future__ import annotations

import pytest

from kts import config
from kts import manifest as km
from kts.errors import ManifestError

COMMITTED = config.project_root() / "data_manifest.csv"


@pytest.fixture(scope="module")
def idc_index():
    return km.load_idc_index()


@pytest.fixture(scope="module")
def committed():
    return km.read_manifest(COMMITTED)


def test_committed_manifest_reads_and_has_every_source(committed):
    counts = committed["source"].value_counts()
    assert counts["tcga-kirc"] >= 30 and counts["cptac-ccrcc"] >= 10 and counts["phantom"] == 30
    kirc = committed[committed["source"] == "tcga-kirc"]
    assert kirc["patient_id"].is_unique and set(kirc["modality"]) == {"MR"}
    assert set(kirc["licence"]) == {"CC BY 3.0"} and set(kirc["doi"]) == {"10.7937/K9/TCIA.2016.V6PBVTDR"}
    phantom = committed[committed["source"] == "phantom"]
    assert list(phantom["patient_id"]) == [f"KTS-PHANTOM-{i:04d}" for i in range(1, 31)]
    assert (phantom["tcia_url"] == "").all() and (phantom["seed"] == "0").all()


def test_every_uid_exists_in_the_shipped_index_with_collection_and_modality(committed, idc_index):
    real = committed[committed["source"] != "phantom"]
    by_uid = idc_index.set_index("SeriesInstanceUID")
    for row in real.itertuples():
        assert row.series_instance_uid in by_uid.index, row.series_instance_uid
        hit = by_uid.loc[row.series_instance_uid]
        assert hit["collection_id"] == km.SOURCE_COLLECTION[row.source]
        assert hit["Modality"] == row.modality
        assert hit["StudyInstanceUID"] == row.study_instance_uid
        assert hit["PatientID"] == row.patient_id
        assert int(hit["instanceCount"]) == row.n_instances
    rt = real[real["modality"] == "RTSTRUCT"]
    assert len(rt) > 0
    for row in rt.itertuples():
        ref = by_uid.loc[row.references_series_uid]
        assert ref["Modality"] == "MR" and ref["StudyInstanceUID"] == row.study_instance_uid
        assert "kidney" in row.series_description.lower() and "seed" not in row.series_description.lower()
    assert set(rt["references_series_uid"]) == set(real[(real["source"] == "cptac-ccrcc")
                                                         & (real["modality"] == "MR")]["series_instance_uid"])


def test_catalogue_rows_regenerate_byte_identically(committed, idc_index):
    if committed["catalogue_version"].iloc[0] != km.catalogue_version():
        pytest.skip(f"committed manifest was built from {committed['catalogue_version'].iloc[0]}, "
                    f"installed is {km.catalogue_version()}")
    text = km.manifest_csv_text(km.build_manifest(idc_index, include_phantom=False))
    lines = COMMITTED.read_text(encoding="utf-8").splitlines(keepends=True)
    assert text == "".join(line for line in lines if not line.startswith("phantom,"))


def test_build_regenerates_the_committed_file_byte_identically(tmp_path):
    out = tmp_path / "data_manifest.csv"
    assert km.main(["build", "--out", str(out)]) == 0
    new, old = out.read_text(encoding="utf-8"), COMMITTED.read_text(encoding="utf-8")
    phantom_new = [x for x in new.splitlines() if x.startswith("phantom,")]
    phantom_old = [x for x in old.splitlines() if x.startswith("phantom,")]
    assert phantom_new == phantom_old, ("phantom rows differ between runs: kts.phantom must derive its UIDs "
                                        "deterministically from the seed")
    assert out.read_bytes() == COMMITTED.read_bytes()


@pytest.mark.parametrize("description, n, tier", [
    ("Axial T1 post", 24, 1), ("ax fatsat +c abd", 29, 1), ("t1_vibe_fs_tra_p2_320_BH POST", 72, 1),
    ("Ax LAVA BH Asset +5 MIN", 116, 1), ("lava post", 116, 2), ("ax dynamic +c", 30, 3),
    ("PRE GAD T1", 44, None), ("COR T1 FSPGR FS POST", 24, None), ("t1_vibe_fs_cor_p3_bh POST", 88, None),
    ("obl 3D post", 168, None), ("SUB_S25-S21_1 post", 96, None), ("Axial flow sensitive post", 40, None),
    ("AxLAVA DYNAMIC(1xpre 3x POST)", 384, None), ("Ax FAME BH POST (X3)", 240, None),
    ("lava post", 432, None), ("PosDisp: [10] AX T1 VIBE +C 70", 1, None), ("Axial T2", 30, None),
    ("Ax spgr gad pelvis", 30, None), ("Coronal MRA post", 88, None),
])
def test_keyword_rules(description, n, tier):
    assert km.classify_series(description, n)[0] == tier


def test_selection_is_one_series_per_patient_and_deterministic(idc_index):
    a = km.select_tcga_kirc(idc_index)
    b = km.select_tcga_kirc(idc_index.sample(frac=1.0, random_state=1))
    assert a["PatientID"].is_unique
    assert list(a["SeriesInstanceUID"]) == list(b["SeriesInstanceUID"])
    assert "TCGA-CZ-5987" not in set(a["PatientID"])  # only PRE/POST DYN and coronal post: excluded
    assert "patients selected" in km.review_selection(idc_index)


# ----------------------------------------------------------------------------- schema errors
def _write(tmp_path, df):
    path = tmp_path / "m.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture()
def small(committed):
    return committed.iloc[[0, 1, len(committed) - 1]].astype(str).reset_index(drop=True)


def test_missing_column_names_the_file(tmp_path, small):
    path = _write(tmp_path, small.drop(columns=["doi"]))
    with pytest.raises(ManifestError, match=r"m\.csv: missing column\(s\) \['doi'\]"):
        km.read_manifest(path)


@pytest.mark.parametrize("column, value, message", [
    ("series_instance_uid", "1.2.03.4", "row 3, column series_instance_uid: malformed DICOM UID"),
    ("series_instance_uid", "1.2.abc", "malformed DICOM UID"),
    ("study_instance_uid", "1." + "2" * 70, "column study_instance_uid: malformed"),
    ("source", "tcga-luad", "row 3, column source: unknown source 'tcga-luad'"),
    ("n_instances", "twelve", "column n_instances: must be a positive integer"),
    ("n_instances", "0", "must be a positive integer"),
    ("size_mb", "-1", "column size_mb: must be a non-negative number"),
    ("tcia_url", "", "column tcia_url: tcga-kirc rows need a tcia_url"),
])
def test_bad_cells_name_file_row_and_column(tmp_path, small, column, value, message):
    small.loc[1, column] = value
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        km.read_manifest(_write(tmp_path, small))
    assert str(tmp_path / "m.csv") in str(info.value)


def test_duplicate_uid_and_phantom_without_seed(tmp_path, small):
    dup = small.copy()
    dup.loc[1, "series_instance_uid"] = dup.loc[0, "series_instance_uid"]
    with pytest.raises(ManifestError, match="row 3, column series_instance_uid: duplicate SeriesInstanceUID "
                                            r"\(also on row 2\)"):
        km.read_manifest(_write(tmp_path, dup))
    seedless = small.copy()
    seedless.loc[2, "seed"] = ""
    with pytest.raises(ManifestError, match="row 4, column seed: phantom rows need an integer seed"):
        km.read_manifest(_write(tmp_path, seedless))
    dangling = small.copy()
    dangling.loc[0, "references_series_uid"] = "1.2.3"
    with pytest.raises(ManifestError, match="not a row of the manifest"):
        km.read_manifest(_write(tmp_path, dangling))


def test_unreadable_or_missing_file_and_cli_check(tmp_path, capsys):
    with pytest.raises(ManifestError, match="file not found"):
        km.read_manifest(tmp_path / "absent.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("source,patient_id\nphantom,KTS-PHANTOM-0001\n")
    assert km.main(["check", str(bad)]) == 1
    assert "missing column" in capsys.readouterr().err


def test_uid_syntax():
    assert km.is_valid_uid("1.2.840.10008.5.1.4.1.1.4") and km.is_valid_uid("2.25.0")
    for bad in ("", "1..2", "1.2.", ".1", "1.02", "1.2a", "1." + "1" * 63):
        assert not km.is_valid_uid(bad), bad
