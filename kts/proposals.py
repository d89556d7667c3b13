"""Kidney-mask proposals for real MR series that have none, written as DICOM-SEG for review (issue 16).

The paper's masks were never published (errata E14), so a user with TCGA-KIRC series but no
masks has nothing to train or score against. A CU-Net trained on the phantom, best one trained
with the domain-randomised recipe (``TrainConfig(intensity="synth")``, :mod:`kts.synth`) so that
it does not depend on one MR contrast, can draft kidney masks for such a series. They are
**proposals**: the DICOM-SEG says so in its series description and segment labels, and they must
be reviewed and corrected in a viewer (3D Slicer, OHIF) before anyone trains on or reports them.

``python -m kts propose --model work/.../cunet --series data/tcga-kirc/<case>/dicom --out proposal.seg.dcm``
"""
from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np


def propose_kidney_masks(model: Any, series_folder: str | os.PathLike, out_path: str | os.PathLike,
                         threshold: float = 0.5) -> dict[str, Any]:
    """Segment the kidneys of one MR series with ``model`` (or the CU-Net training folder holding it) and write them as a proposal DICOM-SEG.

    Each slice goes through the preprocessing of the training data (``kts.data.normalise``,
    resize to the model's input), the CU-Net's probabilities are thresholded and resized back to
    the slice's grid, and :func:`kts.masks.write_seg` writes them with ``proposal=True``.
    Returns the path and the kidney fraction per slice (a reviewer's first check).
    """
    from kts import data, dicom, masks
    from kts.train import load_best_model, predict_probabilities

    if isinstance(model, (str, os.PathLike)):
        model = load_best_model(model)
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    volume, metas = dicom.read_series(series_folder, require_modality="MR")
    size = tuple(int(v) for v in model.input_shape[1:3])
    images = np.stack([data.resize_image(data.normalise(slice_), size) for slice_ in volume])
    probabilities = predict_probabilities(model, images)
    kidney = np.stack([data.resize_mask((p > threshold).astype(np.uint8), s.shape)
                       for p, s in zip(probabilities, volume)])
    path = masks.write_seg(out_path, series_folder, metas, kidney, None, proposal=True)
    return {"path": path, "n_slices": len(metas),
            "kidney_fraction_per_slice": [round(float(k.mean()), 4) for k in kidney]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kts propose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a CU-Net training folder (holds best.keras)")
    parser.add_argument("--series", required=True, help="one MR series folder (DICOM files)")
    parser.add_argument("--out", required=True, help="the DICOM-SEG to write (e.g. proposal.seg.dcm)")
    parser.add_argument("--threshold", type=float, default=0.5, help="CU-Net probability threshold")
    args = parser.parse_args(argv)
    out = propose_kidney_masks(args.model, args.series, args.out, args.threshold)
    print(f"wrote {out['path']}: kidney PROPOSALS for {out['n_slices']} slices (unreviewed: check and correct "
          "them in a viewer before any use)")
    return 0
