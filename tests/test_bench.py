"""Tests of kts.bench: helpers, FLOP counting, and that ``--quick`` writes every field.

No speed goal is asserted here: goals live in ``results/bench.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kts import bench


def test_median_of_repeats():
    figure = bench.median_of_repeats([3.0, 1.0, 2.0], "img/s")
    assert figure["median"] == 2.0
    assert figure["repeats"] == [3.0, 1.0, 2.0]
    assert (figure["min"], figure["max"], figure["unit"]) == (1.0, 3.0, "img/s")
    with pytest.raises(ValueError):
        bench.median_of_repeats([], "s")


def test_time_repeats_counts_calls():
    calls = []
    out = bench.time_repeats(lambda: calls.append(1), warmup=2, repeats=3, min_time=0.0)
    assert len(out) == 3 and all(t >= 0 for t in out)
    assert len(calls) == 5


def test_goal_direction_and_missing_value():
    assert bench.goal("cunet_train_fraction_of_ceiling", 0.61)["met"] is True
    assert bench.goal("cunet_train_fraction_of_ceiling", 0.59)["met"] is False
    assert bench.goal("input_pipeline_overhead_pct", 4.0)["met"] is True
    assert bench.goal("input_pipeline_overhead_pct", 6.0)["met"] is False
    missing = bench.goal("e2e_quick_wall_min", None)
    assert missing == {"goal": "<= 10", "value": None, "met": None}


def test_markdown_table_rendering():
    text = bench.markdown_table([("a|b", 1.23456, None, True), ("c", 1234.5, 2, False)], ("name", "x", "y", "ok"))
    lines = text.strip().splitlines()
    assert lines[0] == "| name | x | y | ok |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| a\\|b | 1.23 | — | yes |"
    assert lines[3] == "| c | 1234 | 2 | no |"


def test_render_markdown_from_skipped_results():
    results = bench.run_benchmark(sections=[], quick=True, progress=None)
    text = bench.render_markdown(results)
    assert "| section | figure | median | unit | goal | met |" in text
    assert "e2e_paper: takes hours" in text
    for name in bench.SECTIONS:
        assert results[name]["skipped"], name
    assert results["goals"]["cunet_train_fraction_of_ceiling"]["met"] is None


def test_merge_keeps_the_earlier_sections_not_run_now():
    earlier = bench.run_benchmark(sections=[], quick=True, progress=None)
    earlier["data"] = {**earlier["data"], "skipped": None, "read_series_slices_per_s": {"median": 321.0}}
    earlier["machine"]["date"] = "2026-01-01T00:00:00+00:00"
    merged = bench.run_benchmark(sections=[], quick=True, progress=None, previous=earlier)
    assert merged["data"]["read_series_slices_per_s"] == {"median": 321.0}
    assert merged["earlier_sections"]["sections"] == ["data"]
    assert merged["cunet"]["skipped"]  # skipped earlier, not run now: still skipped
    assert "Sections data are from an earlier run (2026-01-01" in bench.render_markdown(merged)
    with pytest.raises(ValueError, match="same --quick setting"):
        bench.run_benchmark(sections=[], quick=False, progress=None, previous=earlier)


def test_unknown_section_is_refused():
    with pytest.raises(ValueError, match="unknown sections"):
        bench.run_benchmark(sections=["nope"], progress=None)


def test_param_count_matches_keras_model():
    from kts.cunet import build_cunet

    assert bench.cunet_param_count() == bench.PAPER_CUNET_PARAMS
    assert bench.cunet_param_count(z=8) == build_cunet(input_shape=(32, 32, 1), z=8).count_params()


def test_profiler_flops_match_forward_flops():
    from kts.cunet import build_cunet, forward_flops

    model = build_cunet(input_shape=(64, 64, 1), z=16)
    counted = bench.count_flops_tf(model, (64, 64, 1))
    assert counted["total"] == pytest.approx(forward_flops(model), rel=0.02)
    assert counted["by_op_type"]["Conv2D"] > 0


def test_torch_peer_has_keras_parameter_count():
    torch = pytest.importorskip("torch")
    model = bench.torch_cunet(z=16)
    params = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert params == bench.PAPER_CUNET_PARAMS
    out = model.eval()(torch.zeros(1, 1, 32, 32))
    assert tuple(out.shape) == (1, 1, 32, 32)


def test_tree_rss_of_this_process_is_positive():
    assert bench._tree_rss_kib(os.getpid()) > 0


def test_run_measured_reads_peak_memory_and_exit_code():
    code = "import sys, time; x = bytearray(200 * 2**20); sys.stderr.write('e' * 200000); time.sleep(0.8); sys.exit(3)"
    measured = bench.run_measured([sys.executable, "-c", code], timeout=60)
    assert measured["returncode"] == 3 and not measured["timed_out"]
    assert measured["peak_largest_process_rss_kib"] >= 200 * 1024
    assert measured["peak_tree_rss_kib"] >= 200 * 1024
    assert measured["stderr_tail"].endswith("e")


@pytest.mark.slow
def test_quick_benchmark_writes_every_field(tmp_path):
    # No time limit asserted: speed lives in the benchmark's figures, never in a test (the
    # --quick mode takes about a minute on 2 quiet cores, several on a loaded machine).
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "kts.bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert (tmp_path / "bench.md").read_text().startswith("# kts benchmark")
    assert results["quick"] is True and results["complete"] is True
    for key in ("cpu_model", "cores", "memory_gb", "versions", "onednn_opts", "date"):
        assert results["machine"][key] is not None, key
    assert len(results["load_average_start"]) == 3 and len(results["load_average_end"]) == 3
    expected = {"ceiling": bench.CEILING_KEYS, "cunet": bench.CUNET_KEYS, "train_step": bench.TRAIN_STEP_KEYS,
                "variations": bench.VARIATION_KEYS,
                "torch": bench.TORCH_KEYS, "input_pipeline": bench.PIPELINE_KEYS, "maskrcnn": bench.MASKRCNN_KEYS,
                "data": bench.DATA_KEYS, "e2e_quick": bench.E2E_KEYS, "e2e_paper": bench.E2E_KEYS}
    for section, keys in expected.items():
        assert set(keys) | {"skipped"} <= set(results[section]), section
    for section in bench.QUICK_SECTIONS:
        assert results[section]["skipped"] is None, (section, results[section]["skipped"])
    figures = [results["ceiling"][k] for k in ("tf_all_core", "tf_single_core", "numpy_all_core", "numpy_single_core")]
    figures += [results["cunet"][k] for k in ("train_images_per_s", "infer_images_per_s")]
    figures += [results["input_pipeline"][k] for k in ("pipeline_s_per_step", "tensors_s_per_step")]
    figures += [results["data"][k] for k in ("generate_slices_per_s", "write_slices_per_s",
                                             "read_series_slices_per_s", "build_dataset_slices_per_s")]
    for figure in figures:
        assert figure["median"] > 0 and len(figure["repeats"]) >= 2 and all(v > 0 for v in figure["repeats"])
    cunet = results["cunet"]
    assert cunet["flops_forward_profiler"] == pytest.approx(cunet["flops_forward_analytic"], rel=0.02)
    assert 0 < cunet["train_fraction_of_ceiling"] and 0 < cunet["infer_fraction_of_ceiling"]
    assert cunet["layers"] and cunet["limits"]
    step = results["train_step"]  # issue 15: one training step taken apart, each part with its share
    assert [p["part"] for p in step["parts"]] == [name for name, *_ in bench.STEP_PARTS] + ["checkpoint"]
    assert step["step_ms"] > 0 and sum(p["ms"] for p in step["parts"]) == pytest.approx(step["step_ms"], rel=1e-3)
    assert "train_step" in (tmp_path / "bench.md").read_text()
    assert set(results["goals"]) == set(bench.GOALS)
    for name, g in results["goals"].items():
        assert {"goal", "value", "met"} <= set(g), name
    assert isinstance(results["goals"]["cunet_train_fraction_of_ceiling"]["met"], bool)


def test_torch_peer_runs_interleaved_and_the_ratio_pools_every_round(monkeypatch):
    """kts, torch, kts, torch, ... each in its own worker; kts under op determinism as train_cunet trains;
    the ratio is of the medians over all repeats of all rounds (issue 15)."""
    import importlib.util

    calls = []
    rates = {"cunet": iter([[2.0, 4.0], [3.0, 3.0]]), "torch_cunet": iter([[1.0, 1.0], [2.0, 2.0]])}

    def fake_spawn(tasks, determinism=False, **_):
        name = tasks[0]["name"]
        calls.append((name, determinism))
        train = next(rates[name])
        value = {"train_images_per_s": train, "infer_images_per_s": [t * 10 for t in train],
                 "version": "x", "threads": 2, "params": 1}
        return {"results": [{"ok": True, "value": value}], "load_average": [0.0, 0.0, 0.0]}

    monkeypatch.setattr(bench, "spawn", fake_spawn)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    s = bench._settings(quick=True)
    out = bench.section_torch(s, rounds=2)
    assert calls == [("cunet", True), ("torch_cunet", False)] * 2
    assert out["order"] == ["kts", "torch", "kts", "torch"]
    assert out["kts_train_images_per_s"]["median"] == 3.0 and out["train_images_per_s"]["median"] == 1.5
    assert out["kts_over_torch_train"] == 2.0 and out["kts_over_torch_infer"] == 2.0


def test_fp32_ceiling_is_the_faster_all_core_matmul():
    assert bench.fp32_ceiling({"tf_all_core": {"median": 76.0}, "numpy_all_core": {"median": 160.0}}) == 160.0
    assert bench.fp32_ceiling({"tf_all_core": {"median": 243.0}, "numpy_all_core": None}) == 243.0
    assert bench.fp32_ceiling({"tf_all_core": None, "numpy_all_core": None}) is None
