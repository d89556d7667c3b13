"""One seed, two runs, identical results: the phantom, the dataset cache and one Table I run.

What is bitwise repeatable here (same machine, same library versions, CPU): the phantom's DICOM
and PNG files, the extracted arrays and the dataset cache, and one partition-seed of the split
study (``kts.study.run_one``: CU-Net training with ``enable_op_determinism``, Mask R-CNN
training, the cascade, the scores and the predictions).

What is not, and why:
- On a GPU, cuDNN picks convolution algorithms at run time and some kernels (atomic adds in
  backward passes, ``tf.image`` resizes, ROI Align gradients) have no deterministic variant or
  a slower one only; ``enable_op_determinism`` makes TF raise or choose deterministic kernels,
  but results still differ from the CPU's, and between GPU models.
- Across machines and thread counts: oneDNN and Eigen split reductions by the number of
  threads and by the CPU's vector width (AVX2 vs AVX-512), so float sums may round differently;
  runs are repeatable on one machine, not bitwise across machines.
- Wall-clock fields (``wall_s``, timings) and zip member dates inside ``.npz`` files change from
  run to run; the tests compare everything else.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from kts import config, data, phantom

N_CASES, IMAGE_SIZE = 12, 64
VOLATILE = {"wall_s"}


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _stable(record: dict) -> dict:
    """A run record without its volatile keys, NaN (an undefined metric, errata E37) made comparable."""
    return {k: "NaN" if isinstance(v, float) and v != v else v for k, v in record.items() if k not in VOLATILE}


def _npz(path: Path) -> dict[str, bytes]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k].tobytes() + str(z[k].dtype).encode() + str(z[k].shape).encode() for k in z.files}


@pytest.fixture(scope="module")
def two_phantoms(tmp_path_factory):
    base = tmp_path_factory.mktemp("rep")
    out = []
    for name in ("a", "b"):
        root = phantom.write_dataset(base / name / "phantom", n_cases=N_CASES, seed=3)
        dataset = data.build_dataset(root, cache_path=base / name / "cache" / "ds.npz", image_size=IMAGE_SIZE)
        out.append((root, base / name / "cache", dataset))
    return out


def test_phantom_files_are_byte_identical(two_phantoms):
    (a, _, _), (b, _, _) = two_phantoms
    tree_a, tree_b = _tree(a), _tree(b)
    assert len(tree_a) > 3 * N_CASES
    assert tree_a == tree_b


def test_dataset_cache_is_byte_identical(two_phantoms):
    (_, cache_a, ds_a), (_, cache_b, ds_b) = two_phantoms
    assert ds_a.fingerprint == ds_b.fingerprint
    assert _npz(cache_a / "ds.npz") == _npz(cache_b / "ds.npz")
    assert (cache_a / "ds_index.csv").read_bytes() == (cache_b / "ds_index.csv").read_bytes()
    assert (cache_a / "ds.npz").read_bytes() == (cache_b / "ds.npz").read_bytes(), \
        "cache file bytes differ (zip member dates?)"


@pytest.mark.slow
def test_one_study_run_is_bitwise_repeatable(two_phantoms, tmp_path):
    from kts import study

    quick = config.get_profile("quick")
    profile = dataclasses.replace(quick, n_cases=N_CASES, image_size=IMAGE_SIZE, maskrcnn_steps=5,
                                  cunet_training=dataclasses.replace(quick.cunet_training, epochs=2))
    _, _, dataset = two_phantoms[0]
    records = []
    for name in ("a", "b"):
        record = study.run_one(dataset, "TD-70% VD-6%", 0, profile, tmp_path / name / "work",
                               tmp_path / name / "predictions", progress=False)
        records.append(record)
    a, b = (_stable(r) for r in records)
    assert a == b
    saved = [json.loads((tmp_path / n / "work" / "study" / "70-6-seed0" / "metrics.json").read_text()) for n in "ab"]
    assert _stable(saved[0]) == _stable(saved[1])
    pred_a, pred_b = (_npz(tmp_path / n / "predictions" / "70-6-seed0.npz") for n in "ab")
    assert pred_a == pred_b
    for name in ("cunet/history.csv", "splits.json"):
        assert (tmp_path / "a" / "work" / "study" / "70-6-seed0" / name).read_bytes() == \
            (tmp_path / "b" / "work" / "study" / "70-6-seed0" / name).read_bytes()
