"""The steps of Figure 4 end to end, as the notebooks and the Table I split study call them.

Each function is one step a notebook narrates: prepare the data (section III.A.2, IV),
train the kidney stage (CU-Net, section III.A.3), train the tumour stage (Mask R-CNN on
kidney crops, section III.B), run the cascade on test slices and score it (Table I).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kts import config as kts_config
from kts.config import Profile


def prepare_dataset(profile: Profile, seed: int = 0, source_root: str | os.PathLike | None = None,
                    data_dir: str | os.PathLike | None = None, header_overrides: dict | None = None):
    """The phantom written as DICOM (or ``source_root``, a folder in the same layout), extracted and cached.

    ``source_root`` defaults to ``$KTS_SOURCE_ROOT`` when set (your own data, or a phantom
    written with other header attributes), else the phantom of this profile and seed.
    Returns ``(dataset, source_root)``. The phantom is generated once per (seed, difficulty,
    size) and the dataset cache is rebuilt only when its inputs change.
    """
    from kts import data

    base = Path(data_dir) if data_dir is not None else kts_config.data_dir()
    if source_root is None and os.environ.get(kts_config.SOURCE_ENV):
        source_root = Path(os.environ[kts_config.SOURCE_ENV])
        if not source_root.is_dir():
            raise ValueError(f"{source_root}: ${kts_config.SOURCE_ENV} names no folder")
    if source_root is None:
        source_root = write_phantom(profile, seed, data_dir=base, header_overrides=header_overrides)
    source_root = Path(source_root)
    cache = base / "cache" / f"{source_root.name}-{profile.image_size}.npz"
    dataset = data.build_dataset(source_root, cache_path=cache, image_size=profile.image_size)
    return dataset, source_root


def write_phantom(profile: Profile, seed: int = 0, data_dir: str | os.PathLike | None = None,
                  header_overrides: dict | None = None) -> Path:
    """The profile's phantom (its difficulty, case count and slices) for ``seed`` as DICOM, written once
    into ``phantom.default_root``; returns that folder. ``$KTS_SOURCE_ROOT`` plays no part here."""
    from kts import phantom

    base = Path(data_dir) if data_dir is not None else kts_config.data_dir()
    root = phantom.default_root(seed, profile.difficulty, profile.n_cases, profile.slices_per_case, data_dir=base)
    if header_overrides:
        root = root.with_name(root.name + "-overrides")
    return phantom.write_dataset(root, n_cases=profile.n_cases, seed=seed, difficulty=profile.difficulty,
                                 slices_per_case=profile.slices_per_case, header_overrides=header_overrides)


def run_name(partition: str, seed: int) -> str:
    """``"70-6-seed0"``: the folder name of one partition and seed (Table I)."""
    from kts import data

    return f"{data.partition_slug(partition)}-seed{int(seed)}"


def run_folder(work_dir: str | os.PathLike, partition: str, seed: int) -> Path:
    """Where one partition-seed's models live: ``work/study/<run_name>``.

    Notebooks 02-04 and 06 train (or reload) their models here, and the split study of
    notebook 05 finds them there, so the partition they show is not trained twice.
    """
    return Path(work_dir) / "study" / run_name(partition, seed)


# the phantom seed of the synth recipe's extra label maps is this + the run's seed: never a study seed (0, 1, ...),
# pretraining's (1000, 1001) nor the hard-difficulty phantom's (kts.contrasts.HARD_SEED_OFFSET = 2000 + seed)
LABEL_POOL_SEED_OFFSET = 3000


def train_kidney_stage(dataset, splits: dict, profile: Profile, out_dir: str | os.PathLike, seed: int = 0,
                       resume: bool = True, epochs: int | None = None, verbose: int = 0, intensity: str = "none",
                       progress: bool = True):
    """Train the CU-Net on the training cases, watching the validation cases (section III.A.3).

    ``intensity="random_lut"`` adds the random intensity curves of ``kts.synth.random_lut``
    (not in the paper; notebook 07), ``"synth"`` images re-synthesised from the phantom's tissue
    label maps (``kts.synth``, SynthSeg's domain randomisation). ``progress`` shows a bar over the epochs."""
    from kts.train import train_cunet

    train_set, val_set = dataset.subset(splits["train"]), dataset.subset(splits["val"])
    tissue = pool = None
    if intensity == "synth":  # SynthSeg's recipe (kts.synth) draws from the phantom's tissue label maps
        from kts import phantom, synth

        tissue = phantom.tissue_label_maps(train_set)
        if synth.DEFAULT.label_pool:
            labels = phantom.label_map_pool(synth.DEFAULT.label_pool, LABEL_POOL_SEED_OFFSET + seed,
                                            profile.difficulty, size=train_set.images.shape[1])
            pool = (labels, np.isin(labels, phantom.KIDNEY_TISSUES).astype(np.uint8))
    return train_cunet((train_set.images, train_set.kidney_masks), (val_set.images, val_set.kidney_masks),
                       out_dir, model_kwargs=dict(z=profile.cunet_base_filters),
                       config=profile.cunet_config(epochs, intensity), seed=seed, resume=resume,
                       verbose=verbose, progress=progress, tissue_labels=tissue, label_pool=pool)


def tumor_crops(dataset, case_ids, crop_size: int, copies: int = 1, jitter: int = 0, seed: int = 0,
                return_sources: bool = False):
    """Kidney crops from the ground-truth kidney masks and their tumour instance maps (section III.B).

    ``copies``/``jitter`` cut each kidney several times with jittered boxes (training only,
    errata E38); ``return_sources`` adds the MR weighting of each crop's slice.
    """
    from kts import cascade

    part = dataset.subset(case_ids)
    crops, labels, sources = cascade.training_crops(part.images, part.kidney_masks, part.tumor_labels,
                                                    crop_size=crop_size, copies=copies, jitter=jitter, seed=seed,
                                                    return_sources=True)
    if not return_sources:
        return crops, labels
    weightings = part.index["weighting"].tolist()
    return crops, labels, [weightings[i] for i, _ in sources]


INITS = ("pretrained", "scratch")
FINE_TUNE_LR_FACTOR = 0.5  # fine-tuning takes half the pretraining's learning rate


def train_tumor_stage(dataset, splits: dict, profile: Profile, out_dir: str | os.PathLike, seed: int = 0,
                      steps: int | None = None, resume: bool = True, progress: bool = True, validate: bool = True,
                      init: str = "pretrained", in_child: bool = False):
    """Train (or reload) the Mask R-CNN on kidney crops of the training cases (section III.B).

    ``init="pretrained"`` fine-tunes the weights shipped in ``kts/weights`` (``kts.pretrain``,
    the stand-in for COCO weights, errata E35; trained once and cached if missing);
    ``"scratch"`` starts from random weights. Training crops are cut twice per kidney with
    jittered boxes (E38). Afterwards the detection score threshold is chosen on the
    validation crops (kept with the model; with no tumour there, the pretrained one stays).
    ``validate`` scores the validation crops four times during training (the curves of
    notebook 03); the split study turns it off. The pretrained start and the box jitter are
    looked up by the profile's name (``kts/weights/maskrcnn-<name>``): a profile with another
    ``maskrcnn`` architecture than its name's weights is refused when they are loaded.
    ``in_child``: train in a child process (:func:`kts.runs.in_child_process`, no progress bar) and
    load the result here, so the training's memory leaves with the child (issue 15).
    """
    from kts import pretrain
    from kts.io import write_json
    from kts.maskrcnn import TumorMaskRCNN, anchor_positives

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}; got {init!r}")
    out_dir = Path(out_dir)
    done = out_dir / "history.json"
    config = profile.maskrcnn
    if resume and done.exists():
        info = _read_json(done)
        if info.get("init", "scratch") == init and (out_dir / "model" / "maskrcnn_config.json").is_file():
            return TumorMaskRCNN.load(out_dir / "model"), info
    if in_child:
        from kts.runs import in_child_process

        in_child_process(_train_tumor_stage_only, dataset, splits, profile, out_dir, seed=seed, steps=steps,
                         resume=resume, validate=validate, init=init)
        return train_tumor_stage(dataset, splits, profile, out_dir, seed, steps, resume=True, init=init)
    jitter = pretrain.BOX_JITTER[profile.name]
    train_crops, train_labels = tumor_crops(dataset, splits["train"], config.crop_size, copies=2, jitter=jitter,
                                            seed=seed)
    val_crops, val_labels = tumor_crops(dataset, splits["val"], config.crop_size)
    model = TumorMaskRCNN(config, seed=seed)
    steps = steps or profile.maskrcnn_steps
    initial, learning_rate = None, None
    if init == "pretrained":
        initial = pretrain.weights_dir(profile.name)
        if not (initial / "provenance.json").is_file():
            print(f"No pretrained weights in {initial.name}/: pretraining them once (kts.pretrain) ...", flush=True)
            pretrain.pretrain(profile.name, progress=progress)
        model.score_threshold = pretrain.load_pretrained(profile.name).score_threshold
        learning_rate = config.learning_rate * FINE_TUNE_LR_FACTOR
    history = model.fit(train_crops, train_labels, steps=steps, seed=seed, progress=progress,
                        validation=(val_crops, val_labels) if validate else None,
                        validate_every=max(steps // 4, 1), initial_weights=initial, learning_rate=learning_rate)
    choice = model.choose_score_threshold(val_crops, val_labels)
    model.save(out_dir / "model")
    positives = anchor_positives(config, train_labels)  # issue 12: several positive anchors per tumour
    write_json(done, {"history": history, "timing": getattr(model, "timing", {}), "init": init,
                      "score_threshold": model.score_threshold, "threshold_chosen_on_validation": choice["chosen"],
                      "n_train_crops": int(len(train_crops)), "n_val_crops": int(len(val_crops)),
                      # one count per tumour instance in each training crop (each kidney is cut twice)
                      "anchor_positives": {"n_instances": int(positives.size),
                                           "median": float(np.median(positives)) if positives.size else None,
                                           "share_with_none": float(np.mean(positives == 0)) if positives.size
                                           else None}})
    return model, _read_json(done)


def _train_tumor_stage_only(*args, **kwargs) -> None:
    """:func:`train_tumor_stage` without its result (a Keras model does not pickle): a child process's task."""
    train_tumor_stage(*args, progress=False, **kwargs)


def train_tumor_reference(dataset, splits: dict, profile: Profile, out_dir: str | os.PathLike, seed: int = 0,
                          epochs: int | None = None, resume: bool = True, in_child: bool = False,
                          progress: bool = True):
    """The dense reference of issue 12 (not the paper's method): a narrow CU-Net on the same kidney crops.

    ``in_child``: trained in a child process (:func:`kts.runs.in_child_process`), loaded here."""
    from kts import pretrain, reference

    if in_child:
        from kts.runs import in_child_process

        in_child_process(_train_tumor_reference_only, dataset, splits, profile, out_dir, seed=seed, epochs=epochs,
                         resume=resume)
        return reference.load_dense_reference(out_dir)
    config = profile.maskrcnn
    jitter = pretrain.BOX_JITTER[profile.name]
    train = tumor_crops(dataset, splits["train"], config.crop_size, copies=2, jitter=jitter, seed=seed)
    val = tumor_crops(dataset, splits["val"], config.crop_size)
    reference.train_dense_reference(train[0], train[1], val[0], val[1], out_dir, z=8,
                                    epochs=epochs or REFERENCE_EPOCHS[profile.name], seed=seed, resume=resume,
                                    progress=progress)
    return reference.load_dense_reference(out_dir)


REFERENCE_EPOCHS = {"paper": 40, "quick": 15}


def _train_tumor_reference_only(*args, **kwargs) -> None:
    """:func:`train_tumor_reference` without its result: a child process's task."""
    train_tumor_reference(*args, progress=False, **kwargs)


def compare_tumor_models(models: dict, crops, labels, weightings) -> "Any":
    """One row per model and MR weighting (and ``pooled``): pooled tumour Dice, instance F1/precision/recall, mask AP.

    ``models`` maps a name to a :class:`kts.maskrcnn.TumorMaskRCNN` (its own score threshold;
    mask AP over every detection) or a dense reference Keras model (:mod:`kts.reference`).
    """
    import pandas as pd

    from kts import metrics, reference
    from kts.maskrcnn import TumorMaskRCNN, resolve_overlaps

    weightings = list(weightings)
    if len(weightings) != len(crops):
        raise ValueError(f"{len(weightings)} weightings for {len(crops)} crops")
    rows = []
    for name, model in models.items():
        if isinstance(model, TumorMaskRCNN):
            pred = model.predict_labels(crops)
            every = [resolve_overlaps(d, np.shape(crops)[1:3], 1, model.config.overlap_drop)
                     for d in model.predict(crops, score_threshold=0.0)]
        else:
            pred = reference.predict_tumor_labels(model, crops)
            every = reference.predict_detections(model, crops)
        for group in [*sorted(set(weightings)), "pooled"]:
            rows_k = [i for i, w in enumerate(weightings) if group in ("pooled", w)]
            sc = metrics.tumor_scores([pred[i] for i in rows_k], [labels[i] for i in rows_k])
            ap = metrics.mask_ap([every[i] for i in rows_k], [labels[i] for i in rows_k])
            rows.append({"model": name, "weighting": group, "crops": len(rows_k), "tumors": sc["n_gt"],
                         "tumor_dice": sc["dice"], "instance_f1": sc["instance_f1"],
                         "instance_precision": sc["instance_precision"], "instance_recall": sc["instance_recall"],
                         "n_predicted": sc["n_predicted"], "mask_ap": ap["AP"]})
    return pd.DataFrame(rows)


def write_tumor_stage_table(comparison, results_dir: str | os.PathLike) -> str:
    """``tumor_stage.md`` and ``.csv`` from :func:`compare_tumor_models` (undefined values "n/a"); returns the markdown."""
    from kts import io as kts_io
    from kts.metrics import format_metric

    keys = ("tumor_dice", "instance_f1", "instance_precision", "instance_recall", "mask_ap")
    text = kts_io.markdown_table(
        [[r.model, r.weighting, r.crops, r.tumors, *(format_metric(getattr(r, k)) for k in keys)]
         for r in comparison.itertuples()],
        ["model", "MR weighting", "crops", "tumours", "tumour Dice", "instance F1", "precision", "recall", "mask AP"])
    results_dir = Path(results_dir)
    kts_io.write_text(results_dir / "tumor_stage.md", text)
    with kts_io.atomic_path(results_dir / "tumor_stage.csv") as tmp:
        comparison.to_csv(tmp, index=False)
    return text


def _read_json(path: Path) -> Any:
    import json

    return json.loads(Path(path).read_text())


def run_cascade(cunet_model, maskrcnn_model, images, threshold: float = 0.5, score_threshold: float | None = None):
    """Figure 4 on slices: CU-Net kidney probabilities, then Mask R-CNN tumour instances in kidney crops.

    ``score_threshold`` None takes the Mask R-CNN's own (chosen on validation crops)."""
    from kts import cascade
    from kts.train import predict_probabilities

    probabilities = predict_probabilities(cunet_model, images)
    result = cascade.run_cascade(images, probabilities, maskrcnn_model, threshold=threshold,
                                 score_threshold=score_threshold)
    return probabilities, result


def score_cascade(kidney_pred, tumor_pred_labels, kidney_gt, tumor_gt_labels, instance_predictions=None,
                  all_detections=None, weightings=None) -> dict[str, float]:
    """Table I's IoU and accuracy beside Dice, tumour Dice/IoU, instance F1 and mask AP (errata E9, E37).

    Every figure is pooled over all test slices (``kts.metrics``' rule); undefined ones are NaN.
    ``iou`` and ``accuracy`` are the paper's columns: the kidney (CU-Net) foreground IoU and the
    pixel accuracy over whole slices, pooled over all test pixels as Keras' metrics pool them.
    ``tumor_dice``/``tumor_iou``: the tumour pixels (union of instances). ``accuracy_in_kidney``
    is the accuracy of the tumour-vs-rest decision over the pixels of the ground-truth kidneys
    together with every pixel that is ground-truth or predicted tumour, so that a tumour
    predicted outside the true kidney counts as an error (NaN when that set is empty; before
    E37 only the pixels inside the true kidney were counted). Instance precision, recall and F1
    pool matched/unmatched instances over all slices; precision is NaN when nothing was
    predicted, with ``n_predicted_instances`` beside it. ``kidney_mean_*``/``tumor_mean_dice``
    are per-slice means over the slices where they are defined, their counts in ``*_n_slices``.
    ``true_negative_slices``: the fraction of the ``n_tumor_free_slices`` where nothing was
    predicted.
    ``mask_ap`` (COCO, IoU 0.50:0.95) ranks detections by score, so it is computed over every
    detection (``all_detections``: a ``(label_maps, instances)`` pair from a cascade run at
    score threshold 0) when given, else over ``instance_predictions``. ``weightings`` (one MR
    weighting per slice) adds ``tumor_dice_<w>``, ``instance_f1_<w>`` and ``n_slices_<w>``.
    """
    from kts import metrics

    tumor_pred_bin = np.asarray(tumor_pred_labels) > 0
    tumor_gt_bin = np.asarray(tumor_gt_labels) > 0
    kidney = metrics.score_masks(kidney_pred, kidney_gt)
    tumor = metrics.score_masks(tumor_pred_bin, tumor_gt_bin)
    region = (np.asarray(kidney_gt) > 0) | tumor_gt_bin | tumor_pred_bin
    accuracy_in_kidney = float(np.mean(tumor_pred_bin[region] == tumor_gt_bin[region])) if region.any() else np.nan
    inst = metrics.instance_scores(list(tumor_pred_labels), list(tumor_gt_labels))
    out = {
        "iou": kidney["pooled_iou"], "accuracy": kidney["pooled_accuracy"],
        "kidney_dice": kidney["pooled_dice"],
        "kidney_mean_dice": kidney["mean_dice"], "kidney_mean_dice_n_slices": kidney["mean_dice_n_images"],
        "kidney_mean_iou": kidney["mean_iou"], "kidney_mean_iou_n_slices": kidney["mean_iou_n_images"],
        "tumor_dice": tumor["pooled_dice"], "tumor_iou": tumor["pooled_iou"],
        "tumor_mean_dice": tumor["mean_dice"], "tumor_mean_dice_n_slices": tumor["mean_dice_n_images"],
        "accuracy_in_kidney": accuracy_in_kidney, "accuracy_in_kidney_pixels": int(np.count_nonzero(region)),
        "instance_precision": inst["precision"], "instance_recall": inst["recall"], "instance_f1": inst["f1"],
        "n_predicted_instances": inst["n_predicted"], "n_gt_instances": inst["n_gt"],
        "instance_tp": inst["tp"], "instance_fp": inst["fp"], "instance_fn": inst["fn"],
        "true_negative_slices": inst["true_negative_slices"], "n_tumor_free_slices": inst["negative_slices"],
        "n_test_slices": kidney["n_images"],
    }
    if all_detections is not None:
        tumor_pred_labels_ap, instance_predictions = all_detections
    else:
        tumor_pred_labels_ap = tumor_pred_labels
    if instance_predictions is not None:
        predictions = [_instance_masks(labels, found)
                       for labels, found in zip(tumor_pred_labels_ap, instance_predictions, strict=True)]
        out["mask_ap"] = metrics.mask_ap(predictions, list(tumor_gt_labels))["AP"]
    if weightings is not None:
        weightings = list(weightings)
        if len(weightings) != len(tumor_gt_bin):
            raise ValueError(f"{len(weightings)} weightings for {len(tumor_gt_bin)} slices")
        for w in sorted(set(weightings)):
            rows = [i for i, x in enumerate(weightings) if x == w]
            sc = metrics.tumor_scores([tumor_pred_labels[i] for i in rows], [tumor_gt_labels[i] for i in rows])
            out[f"tumor_dice_{w}"], out[f"instance_f1_{w}"], out[f"n_slices_{w}"] = \
                sc["dice"], sc["instance_f1"], len(rows)
    return out


def _instance_masks(label_map, instances) -> dict:
    """The cascade's instances of one slice as ``{"masks", "scores"}`` for COCO mask AP."""
    label_map = np.asarray(label_map)
    masks = [label_map == inst["label"] for inst in instances]
    return {"masks": np.array(masks, dtype=bool).reshape(len(masks), *label_map.shape),
            "scores": np.array([inst["score"] for inst in instances], dtype=float)}


def pick_figure5_slices(tumor_labels, n: int = 4) -> list[int]:
    """Slices for Figure 5: those with tumours first (most instances first), then tumour-free ones."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the number of slices to show) must be a positive int, got {n!r}")
    counts = [len(np.unique(t[t > 0])) for t in np.asarray(tumor_labels)]
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    with_tumor = [i for i in order if counts[i] > 0]
    without = [i for i in order if counts[i] == 0]
    picked = with_tumor[: max(n - 1, 1)] + without[:1]
    picked += [i for i in order if i not in picked]
    return sorted(picked[:n])


def real_data_source(name: str, limit: int = 2, dest: str | os.PathLike | None = None) -> Path | None:
    """Where real series for ``DATA = name`` are (fetching them when online), or ``None`` for the phantom.

    Real data need the internet (TCIA or IDC) and, for TCGA-KIRC, your own kidney masks: the
    paper's were never published (README, "Real data"). When the series cannot be fetched, or
    were fetched but carry no masks yet, this says so in a ``UserWarning`` naming the folder
    and what to do, and returns ``None``: the notebook then runs on the offline phantom.
    """
    import warnings

    from kts import fetch, manifest

    sources = ("phantom", "tcga-kirc", "cptac-ccrcc")
    if name not in sources:
        raise ValueError(f"name (the data source) must be one of {sources}, got {name!r}")
    if name == "phantom":
        return None
    rows = manifest.read_manifest(kts_config.project_root() / "data_manifest.csv")
    rows = rows[rows["source"] == name]
    if name == "cptac-ccrcc":
        rows = rows[rows["modality"] == "MR"]
    dest = Path(dest) if dest is not None else kts_config.data_dir() / name
    howto = (f"To use real data: run `kts fetch --manifest data_manifest.csv --only-source {name} --dest "
             f"data/{dest.name}` on a machine with internet, put kidney masks as "
             "<case>/masks/<SOPInstanceUID>_kidney.png (and _tumor.png) beside each <case>/dicom folder, or "
             "import NIfTI, DICOM-SEG or RTSTRUCT with kts.masks (README, section \"Real data\"), and run again.")
    try:
        fetch.fetch(rows.head(limit), dest, timeout=20, retries=1, progress=False)
    except Exception as exc:  # no network here is the common case, not an error of the user's
        warnings.warn(f"data source {name!r}: could not fetch its series ({type(exc).__name__}: {str(exc)[:200]}). "
                      f"{howto} THIS RUN USES THE PHANTOM INSTEAD.", UserWarning, stacklevel=2)
        return None
    if not any(dest.glob("*/masks")):
        warnings.warn(f"data source {name!r}: the series are in {dest.name}/ but no case has a masks/ folder, so "
                      f"there is nothing to train or score against. {howto} THIS RUN USES THE PHANTOM INSTEAD.",
                      UserWarning, stacklevel=2)
        return None
    print(f"Using {name} series with masks from {dest.name}/")
    return dest

