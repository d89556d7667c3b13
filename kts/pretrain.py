"""A pretrained start for the tumour stage: the stand-in for COCO weights (issue 12, errata E35).

The paper's Mask R-CNN (section III.B; Keras 2.4 / TF 2.3) almost surely fine-tuned COCO
weights; none can be downloaded here. kts pretrains its own on a large synthetic corpus:
kidney crops from phantom cases whose seed (``CORPUS_SEED``) never meets the study's phantom
seeds 0, 1, 2, ..., with held-out synthetic cases (``HELD_OUT_SEED``) to score it. The result
is shipped in ``kts/weights/maskrcnn-<profile>/`` with its provenance, so notebooks, the quick
profile and CI fine-tune from it in minutes::

    python -m kts pretrain --profile quick          # resumable: run it again to continue

Training runs in chunks of ``CHUNK_STEPS`` steps; after each chunk the weights and
``pretrain_state.json`` are written (atomically), so an interrupted run resumes at the last
finished chunk. Each chunk restarts Adam's moment estimates; the learning-rate schedule
(warm-up, one cosine) runs over all chunks.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from kts import config as kts_config
from kts.io import differences, write_json

CORPUS_SEED = 1000
HELD_OUT_SEED = 1001
#: phantom cases in the corpus, held-out cases, total steps, per profile
CORPUS_CASES = {"paper": 360, "quick": 480}
HELD_OUT_CASES = 60
STEPS = {"paper": 1800, "quick": 3000}
CHUNK_STEPS = 300
BOX_JITTER = {"paper": 8, "quick": 4}   # kidney-box jitter in slice pixels (CU-Net-like crops)
STATE_FILE = "pretrain_state.json"


def weights_dir(profile: str) -> Path:
    """Where the shipped pretrained weights of a profile live: ``kts/weights/maskrcnn-<profile>``."""
    return Path(__file__).resolve().parent / "weights" / f"maskrcnn-{profile}"


def _slices_to_arrays(slices, image_size: int):
    """Phantom slices -> the arrays ``kts.data.build_dataset`` makes from their DICOM files."""
    from kts import data

    images = np.stack([data.resize_image(data.normalise(s.image), image_size) for s in slices])
    kidneys = np.stack([data.resize_mask(s.kidney_mask, image_size) for s in slices])
    tumors = np.stack([data.resize_mask(s.tumor_labels, image_size) for s in slices])
    return images, kidneys, tumors


def corpus_crops(profile_name: str, n_cases: int, seed: int, crop_size: int, copies: int = 1,
                 jitter: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Kidney crops and tumour instance maps of ``n_cases`` phantom cases drawn with ``seed``.

    All three MR weightings, "paper" difficulty, the profile's image size; crops cut from the
    ground-truth kidney masks (``copies`` jittered cuts per kidney).
    """
    from kts import cascade, phantom

    profile = kts_config.get_profile(profile_name)
    if seed < 100:
        raise ValueError(f"corpus seed {seed} could meet the study's phantom seeds (0, 1, 2, ...); use >= 100")
    slices = phantom.generate(n_cases=n_cases, seed=seed, difficulty=profile.difficulty)
    images, kidneys, tumors = _slices_to_arrays(slices, profile.image_size)
    return cascade.training_crops(images, kidneys, tumors, crop_size, copies=copies, jitter=jitter, seed=seed)


def pretrain(profile_name: str, out_dir: str | None = None, steps: int | None = None,
             n_cases: int | None = None, held_out_cases: int = HELD_OUT_CASES, chunk_steps: int = CHUNK_STEPS,
             progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Pretrain the profile's Mask R-CNN on the synthetic corpus; resumable in chunks.

    Returns the provenance written beside the weights: commit, corpus and held-out seeds and
    sizes, steps, config, wall time, and the held-out pooled tumour Dice, instance F1 and mask
    AP at the score threshold chosen on the held-out crops.
    """
    from kts import metrics
    from kts.maskrcnn import TumorMaskRCNN
    from tqdm.auto import tqdm

    config = kts_config.get_profile(profile_name).maskrcnn
    out = Path(out_dir) if out_dir is not None else weights_dir(profile_name)
    total = int(steps or STEPS[profile_name])
    n_cases = int(n_cases or CORPUS_CASES[profile_name])
    if total < 1 or chunk_steps < 1:
        raise ValueError(f"steps and chunk_steps must be >= 1; got {total}, {chunk_steps}")
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else None
    wanted = {"profile": profile_name, "steps": total, "n_cases": n_cases, "corpus_seed": CORPUS_SEED,
              "chunk_steps": chunk_steps, "seed": seed, "config": config.to_dict()}
    if state is not None and state.get("plan") != wanted:
        shown = "; ".join(differences(state.get("plan") or {}, json.loads(json.dumps(wanted))))
        raise ValueError(f"{out}: holds a pretraining with other settings ({shown}; {STATE_FILE}); "
                         "remove the folder or pass another out_dir")
    if state is None:
        state = {"plan": wanted, "steps_done": 0, "seconds": 0.0, "losses": []}
    jitter = BOX_JITTER[profile_name]
    crops, labels = corpus_crops(profile_name, n_cases, CORPUS_SEED, config.crop_size, copies=2, jitter=jitter)
    bar = tqdm(total=total, initial=state["steps_done"], desc=f"pretrain Mask R-CNN ({profile_name})",
               disable=not progress)
    while state["steps_done"] < total:
        done = state["steps_done"]
        n = min(chunk_steps, total - done)
        model = TumorMaskRCNN(config, seed=seed)
        t0 = time.perf_counter()
        history = model.fit(crops, labels, steps=n, seed=seed + done, progress=False,
                            initial_weights=out if done else None, step_offset=done, total_steps=total)
        state["seconds"] += time.perf_counter() - t0
        state["steps_done"] = done + n
        state["losses"].append({"step": done + n, **{k: float(np.mean([h[k] for h in history[-20:]]))
                                                      for k in ("total_loss", "mask_loss", "frcnn_cls_loss")}})
        model.provenance = {"complete": False}
        model.save(out)
        write_json(state_file, state)
        bar.update(n)
        bar.set_postfix(loss=f"{state['losses'][-1]['total_loss']:.3f}")
        del model
        from kts.maskrcnn import clear_session
        clear_session()
    bar.close()
    model = TumorMaskRCNN.load(out)
    held_crops, held_labels = corpus_crops(profile_name, held_out_cases, HELD_OUT_SEED, config.crop_size)
    sweep = model.choose_score_threshold(held_crops, held_labels)
    pred = model.predict_labels(held_crops)
    scores = metrics.tumor_scores(list(pred), list(held_labels))
    all_dets = model.predict(held_crops, score_threshold=0.0)
    ap = metrics.mask_ap(all_dets, list(held_labels))
    provenance = {
        "complete": True, "what": "Mask R-CNN pretrained on synthetic phantom kidney crops (kts.pretrain)",
        "commit": kts_config.git_commit(dirty_of=Path(__file__).resolve().parent), "profile": profile_name,
        "steps": total, "chunk_steps": chunk_steps,
        "corpus": {"generator": "kts.phantom", "seed": CORPUS_SEED, "n_cases": n_cases, "n_crops": int(len(crops)),
                   "box_jitter_px": jitter, "copies": 2, "difficulty": "paper"},
        "held_out": {"seed": HELD_OUT_SEED, "n_cases": held_out_cases, "n_crops": int(len(held_crops)),
                     "score_threshold": sweep["threshold"], "tumor_dice": scores["dice"],
                     "instance_f1": scores["instance_f1"], "instance_precision": scores["instance_precision"],
                     "instance_recall": scores["instance_recall"], "mask_ap": ap["AP"], "mask_ap50": ap["AP50"]},
        "train_seconds": round(state["seconds"], 1), "seed": seed,
    }
    model.provenance = provenance
    model.save(out)
    write_json(out / "provenance.json", provenance)
    return provenance


def load_pretrained(profile_name: str, path: str | None = None):
    """The shipped pretrained Mask R-CNN of a profile; a clear error if it is missing or incomplete."""
    from kts.errors import KtsInputError
    from kts.maskrcnn import TumorMaskRCNN

    folder = Path(path) if path is not None else weights_dir(profile_name)
    prov = folder / "provenance.json"
    if not prov.is_file() or not json.loads(prov.read_text()).get("complete"):
        raise KtsInputError(folder, f"no complete pretrained weights here; run `python -m kts pretrain --profile {profile_name}`")
    return TumorMaskRCNN.load(folder)


def main(argv: list[str] | None = None) -> int:
    """``python -m kts pretrain --profile quick [--steps N] [--cases N] [--out DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="kts pretrain", description=main.__doc__)
    parser.add_argument("--profile", default="quick", choices=sorted(STEPS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cases", type=int, default=None)
    parser.add_argument("--held-out", type=int, default=HELD_OUT_CASES)
    parser.add_argument("--chunk", type=int, default=CHUNK_STEPS)
    parser.add_argument("--out", default=None, help="folder (default: the shipped kts/weights/maskrcnn-<profile>)")
    args = parser.parse_args(argv)
    prov = pretrain(args.profile, out_dir=args.out, steps=args.steps, n_cases=args.cases,
                    held_out_cases=args.held_out, chunk_steps=args.chunk)
    print(json.dumps(prov["held_out"], indent=1))
    return 0
