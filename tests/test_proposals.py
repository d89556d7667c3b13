"""kts propose: kidney-mask proposals for a series without masks, as a DICOM-SEG marked unreviewed (issue 16)."""
import pydicom
import pytest

from kts import cunet, dicom, phantom, proposals, train


@pytest.fixture(scope="module")
def series_and_model(tmp_path_factory):
    base = tmp_path_factory.mktemp("propose")
    root = phantom.write_dataset(base / "phantom", n_cases=1, seed=5)
    series = next(root.glob("*/dicom"))
    train.set_seed(0)
    model = cunet.build_cunet(input_shape=(64, 64, 1), z=2)
    (base / "cunet").mkdir()
    model.save(base / "cunet" / train.BEST_FILE)
    return series, base / "cunet"


def test_a_proposal_seg_says_it_is_a_proposal_and_covers_the_series(series_and_model, tmp_path):
    series, model_dir = series_and_model
    out = proposals.propose_kidney_masks(model_dir, series, tmp_path / "proposal.seg.dcm")
    seg = pydicom.dcmread(out["path"])
    assert "PROPOSED" in seg.SeriesDescription and seg.ContentLabel == "KTS_PROPOSAL"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Kidney (PROPOSAL, unreviewed)"]
    _, metas = dicom.read_series(series)
    referenced = {ref.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence
                  for ref in item.ReferencedInstanceSequence}
    assert referenced == {m.sop_instance_uid for m in metas}
    assert out["n_slices"] == len(metas) and all(0.0 <= f <= 1.0 for f in out["kidney_fraction_per_slice"])


def test_the_command_line_writes_the_same_and_bad_input_is_named(series_and_model, tmp_path, capsys):
    series, model_dir = series_and_model
    assert proposals.main(["--model", str(model_dir), "--series", str(series),
                           "--out", str(tmp_path / "p.dcm")]) == 0
    assert "PROPOSALS" in capsys.readouterr().out and (tmp_path / "p.dcm").is_file()
    with pytest.raises(ValueError, match="no best.keras"):
        proposals.propose_kidney_masks(tmp_path, series, tmp_path / "r.dcm")
    with pytest.raises(ValueError, match="threshold"):
        proposals.propose_kidney_masks(model_dir, series, tmp_path / "q.dcm", threshold=1.5)
    assert not (tmp_path / "q.dcm").exists()
