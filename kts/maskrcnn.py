"""Mask R-CNN tumour instance segmentation inside kidney regions (section III.B, Fig. 4).

The paper's second stage: a Mask R-CNN [13] (RPN proposals, ROI Align, box/class head
and an FCN mask head) that delineates tumour instances in kidney images. kts does not
re-implement Mask R-CNN: :class:`TumorMaskRCNN` wraps the maintained TF2 implementation
of the TensorFlow Model Garden (``tf-models-official``, ``official.vision``) in a small,
CPU-sized configuration with two classes (background, tumour) and no pretrained weights.
Its settings, :class:`~kts.config.MaskRCNNConfig`, live with the profiles in :mod:`kts.config`
(``get_profile("paper").maskrcnn``); this module re-exports the class.

Model Garden builds ``tf_keras`` (Keras 2) models; every ``tf_keras`` and ``official``
import of kts lives in this file (and only inside functions), the rest of kts is Keras 3.

Pitfalls handled here (each cost someone an afternoon):

* Model Garden's parser normalises with ImageNet mean/std; :meth:`TumorMaskRCNN.predict`
  calls the very same ``preprocess_ops`` functions.
* Weights go through ``tf.train.Checkpoint`` (``.h5`` reloads into a rebuilt model
  silently load wrong values), with the config as JSON beside them.
* ``mask_ops.paste_instance_masks`` takes xywh boxes; detections come as yxyx.
* Batch norm momentum is 0.9, not COCO's 0.997: after a few hundred steps from scratch
  the 0.997 moving averages still remember their initial values and inference breaks.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kts.config import MASK_PASTES, MaskRCNNConfig, get_profile  # noqa: F401 (kts.maskrcnn re-exports MaskRCNNConfig)
from kts.io import write_json

LOSS_NAMES = ("total_loss", "rpn_score_loss", "rpn_box_loss", "frcnn_cls_loss", "frcnn_box_loss", "mask_loss")
CONFIG_FILE = "maskrcnn_config.json"
CHECKPOINT_PREFIX = "weights"
PREDICT_BATCH = 8


# ----------------------------------------------------------------------------- input checks

def _as_crops(images: Any, crop_size: int, what: str = "images") -> np.ndarray:
    """Greyscale crops [N, S, S] as float32 in 0..255 (uint8 or float input)."""
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(
            f"{what} must be greyscale crops of shape [N, {crop_size}, {crop_size}] (or one "
            f"[{crop_size}, {crop_size}] crop); got shape {arr.shape}")
    if arr.shape[1:] != (crop_size, crop_size):
        raise ValueError(
            f"{what} must be {crop_size}x{crop_size} (the config's crop_size); got {arr.shape[1]}x{arr.shape[2]}. "
            "Cut kidney crops with kts.cascade.extract_crops(..., crop_size) first")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{what} must be numeric; got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contain NaN or infinite values")
    if arr.size and (arr.min() < -0.5 or arr.max() > 255.5):  # tolerate resampling round-off
        raise ValueError(
            f"{what} must hold intensities in 0..255 (uint8 or float); got {arr.min():.4g}..{arr.max():.4g}. "
            "Map raw MR values with kts.data.normalise first")
    return np.clip(arr, 0.0, 255.0)


def _as_label_maps(label_maps: Any, shape: tuple[int, ...], what: str = "instance_label_maps") -> np.ndarray:
    arr = np.asarray(label_maps)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape != shape:
        raise ValueError(f"{what} must have the images' shape {shape}; got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{what} must hold integer instance labels (0 background, 1..n); got dtype {arr.dtype}")
    if arr.min(initial=0) < 0:
        raise ValueError(f"{what} must hold labels >= 0 (0 background, 1..n instances)")
    return arr.astype(np.int32)


def _instances(label_map: np.ndarray, max_instances: int) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids and normalised yxyx boxes of one crop label map (largest first if too many)."""
    ids = np.unique(label_map)
    ids = ids[ids > 0]
    h, w = label_map.shape
    boxes, areas = [], []
    for i in ids:
        rows, cols = np.nonzero(label_map == i)
        boxes.append([rows.min() / h, cols.min() / w, (rows.max() + 1) / h, (cols.max() + 1) / w])
        areas.append(rows.size)
    if len(ids) > max_instances:
        keep = np.sort(np.argsort(areas, kind="stable")[::-1][:max_instances])
        ids, boxes = ids[keep], [boxes[k] for k in keep]
    return ids.astype(np.int32), np.asarray(boxes, np.float32).reshape(-1, 4)


# ----------------------------------------------------------------------------- the Model Garden model and its input

def model_garden_task_config(config: MaskRCNNConfig):
    """The Model Garden ``MaskRCNNTask`` config for ``config``: backbone, FPN, heads, sampler, parser, losses."""
    from official.vision.configs import backbones as bb
    from official.vision.configs import common, decoders
    from official.vision.configs import maskrcnn as cfg

    c = config
    if c.backbone == "resnet18":
        backbone = bb.Backbone(type="resnet", resnet=bb.ResNet(model_id=18))
    else:
        backbone = bb.Backbone(type="mobilenet", mobilenet=bb.MobileNet(
            model_id="MobileNetV2", filter_size_scale=c.mobilenet_width))
    model = cfg.MaskRCNN(
        num_classes=2,
        input_size=[c.crop_size, c.crop_size, 3],
        min_level=c.min_level, max_level=c.max_level,
        anchor=cfg.Anchor(num_scales=c.num_scales, aspect_ratios=list(c.aspect_ratios),
                          anchor_size=c.anchor_size),
        include_mask=True,
        backbone=backbone,
        decoder=decoders.Decoder(type="fpn", fpn=decoders.FPN(num_filters=c.fpn_filters)),
        rpn_head=cfg.RPNHead(num_convs=1, num_filters=c.rpn_filters),
        detection_head=cfg.DetectionHead(num_convs=0, num_fcs=1, fc_dims=c.fc_dims),
        roi_generator=cfg.ROIGenerator(
            pre_nms_top_k=c.pre_nms_top_k, num_proposals=c.num_proposals,
            test_pre_nms_top_k=c.pre_nms_top_k // 2, test_num_proposals=c.test_num_proposals,
            use_batched_nms=c.batched_nms),
        roi_sampler=cfg.ROISampler(num_sampled_rois=c.num_sampled_rois,
                                   foreground_fraction=c.roi_foreground_fraction),
        detection_generator=cfg.DetectionGenerator(
            pre_nms_top_k=c.pre_nms_top_k // 2, max_num_detections=c.max_detections, use_cpu_nms=False),
        mask_head=cfg.MaskHead(num_convs=c.mask_convs, num_filters=c.mask_filters),
        mask_sampler=cfg.MaskSampler(num_sampled_masks=c.num_sampled_rois // 2),
        norm_activation=common.NormActivation(norm_momentum=c.norm_momentum, norm_epsilon=1e-4,
                                              use_sync_bn=False),
    )
    parser = cfg.Parser(aug_rand_hflip=(c.flip == "random"), max_num_instances=c.max_instances,
                        aug_scale_min=c.scale_jitter[0], aug_scale_max=c.scale_jitter[1],
                        mask_crop_size=c.mask_crop_size, rpn_match_threshold=c.rpn_match_threshold,
                        rpn_unmatched_threshold=c.rpn_unmatched_threshold,
                        rpn_batch_size_per_im=c.rpn_batch_size_per_im)
    return cfg.MaskRCNNTask(
        model=model,
        train_data=cfg.DataConfig(is_training=True, global_batch_size=c.batch_size, dtype="float32",
                                  parser=parser),
        losses=cfg.Losses(mask_weight=c.mask_loss_weight, rpn_score_weight=c.effective_rpn_score_weight,
                          l2_weight_decay=c.weight_decay),
        use_coco_metrics=False,
    )


def _input_parser(config: MaskRCNNConfig, parser_config):
    """Model Garden's training ``Parser`` (anchors, RPN targets, flips, scale jitter) for ``config``."""
    from official.vision.dataloaders import maskrcnn_input

    c, p = config, parser_config
    return maskrcnn_input.Parser(
        output_size=[c.crop_size, c.crop_size], min_level=c.min_level, max_level=c.max_level,
        num_scales=c.num_scales, aspect_ratios=list(c.aspect_ratios), anchor_size=c.anchor_size,
        rpn_match_threshold=p.rpn_match_threshold, rpn_unmatched_threshold=p.rpn_unmatched_threshold,
        rpn_batch_size_per_im=p.rpn_batch_size_per_im, rpn_fg_fraction=p.rpn_fg_fraction,
        aug_rand_hflip=p.aug_rand_hflip, aug_scale_min=p.aug_scale_min, aug_scale_max=p.aug_scale_max,
        skip_crowd_during_training=True,
        max_num_instances=c.max_instances, include_mask=True, mask_crop_size=c.mask_crop_size,
        dtype="float32")


def training_dataset(config: MaskRCNNConfig, parser_config, crops: np.ndarray, labels: np.ndarray, seed: int):
    """The input pipeline: in-memory ``tf.data`` of the parser's "decoded" dicts through ``parse_fn(True)``.

    ``parser_config`` is the task config's ``train_data.parser``; batches of ``config.batch_size``.
    """
    import tensorflow as tf

    c = config
    k = c.max_instances
    n, s, _ = crops.shape
    ids = np.zeros((n, k), np.int32)
    boxes = np.zeros((n, k, 4), np.float32)
    counts = np.zeros(n, np.int32)
    for j in range(n):
        i, b = _instances(labels[j], k)
        ids[j, : len(i)], boxes[j, : len(i)], counts[j] = i, b, len(i)

    def decode(image, label, inst_ids, inst_boxes, count, index):
        inst_ids = inst_ids[:count]
        masks = tf.cast(tf.equal(label[None], inst_ids[:, None, None]), tf.float32)
        image01 = image / 255.0
        if c.intensity_jitter > 0:  # random gamma and contrast: other scanners (section III.A)
            j = float(c.intensity_jitter)
            gamma = tf.exp(tf.random.uniform([], -j, j, seed=seed))
            gain = tf.exp(tf.random.uniform([], -j / 2, j / 2, seed=seed + 1))
            image01 = tf.clip_by_value(tf.pow(image01, gamma) * gain, 0.0, 1.0)
        image01 = tf.tile(image01[..., None], [1, 1, 3])
        return {
            "source_id": tf.strings.as_string(index),
            "image": image01,  # float in [0, 1]: normalize_image then uses MEAN_NORM/STDDEV_NORM
            "height": tf.constant(s, tf.int64), "width": tf.constant(s, tf.int64),
            "groundtruth_boxes": inst_boxes[:count],
            "groundtruth_classes": tf.ones([count], tf.int64),
            "groundtruth_is_crowd": tf.zeros([count], tf.bool),
            "groundtruth_area": tf.reduce_sum(masks, axis=[1, 2]),
            "groundtruth_instance_masks": masks,
        }

    parse = _input_parser(config, parser_config).parse_fn(is_training=True)
    ds = tf.data.Dataset.from_tensor_slices(
        (crops, labels, ids, boxes, counts, np.arange(n, dtype=np.int64)))
    ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat()
    # Sequential map: the parser's stateful random ops (flip, RPN anchor sampling) then
    # see the elements in one fixed order, so a seed gives one sequence of batches.
    ds = ds.map(decode).map(parse)
    ds = ds.batch(c.batch_size, drop_remainder=True)
    return ds.prefetch(2)


# ----------------------------------------------------------------------------- the wrapper: train, predict, save

class TumorMaskRCNN:
    """Model Garden Mask R-CNN for tumour instances in kidney crops (section III.B).

    >>> model = TumorMaskRCNN(get_profile("quick").maskrcnn)
    >>> history = model.fit(crops, crop_labels, steps=300, seed=0)
    >>> detections = model.predict(test_crops)        # boxes, scores, masks per crop
    >>> labels = model.predict_labels(test_crops)     # uint16 instance label maps
    """

    def __init__(self, config: MaskRCNNConfig | None = None, seed: int = 0):
        self.config = config if config is not None else get_profile("paper").maskrcnn
        if not isinstance(self.config, MaskRCNNConfig):
            raise ValueError(f"config must be a MaskRCNNConfig; got {type(self.config).__name__}")
        self.seed = seed
        self.score_threshold = float(self.config.score_threshold)
        self.history: list[dict[str, float]] = []
        self.timing: dict[str, float] = {}
        self._task = None
        self._model = None
        self._predict_fn = None

    # -- building (the Model Garden config: model_garden_task_config) ------------------------
    def task_config(self):
        """The Model Garden ``MaskRCNNTask`` config this wrapper builds (for inspection)."""
        return model_garden_task_config(self.config)

    def _build(self, seed: int) -> None:
        import tf_keras
        from official.vision.tasks.maskrcnn import MaskRCNNTask

        tf_keras.utils.set_random_seed(seed)
        self._task = MaskRCNNTask(self.task_config())
        self._model = self._task.build_model()
        self._predict_fn = None

    @property
    def model(self):
        """The underlying ``tf_keras`` Model Garden ``MaskRCNNModel`` (built on first use)."""
        if self._model is None:
            self._build(self.seed)
        return self._model

    def _dataset(self, crops: np.ndarray, labels: np.ndarray, seed: int):
        return training_dataset(self.config, self._task.task_config.train_data.parser, crops, labels, seed)

    # -- training ------------------------------------------------------------------------
    def fit(self, images: Any, instance_label_maps: Any, steps: int = 300,
            validation: tuple[Any, Any] | None = None, seed: int = 0, progress: bool = True,
            validate_every: int = 100, deterministic: bool = True,
            initial_weights: str | os.PathLike | None = None, learning_rate: float | None = None,
            step_offset: int = 0, total_steps: int | None = None) -> list[dict[str, float]]:
        """Train on kidney crops and their tumour instance label maps (section IV).

        From scratch by default; ``initial_weights`` (a folder written by :meth:`save`, of
        the same architecture) fine-tunes those weights instead (errata E35: the paper most
        plausibly started from pretrained weights).

        Losses per step are Model Garden's own (``MaskRCNNTask.train_step``): total, RPN
        score/box, Fast R-CNN class/box, mask. With ``validation=(crops, label_maps)``, every
        ``validate_every`` steps (and at the end) the history also gets instance precision,
        recall and F1 at IoU 0.5 on those crops. Crops without tumour are negatives.
        ``learning_rate`` overrides the config's (fine-tuning uses a smaller one);
        ``step_offset`` and ``total_steps`` place these steps inside a longer schedule (the
        chunks of :func:`kts.pretrain.pretrain`: warm-up only at step 0, one cosine over all).
        Returns the history (one dict per step); ``self.timing`` gets seconds per step and
        the cost of the first (tracing) step.
        """
        import tensorflow as tf
        import tf_keras
        from tqdm.auto import tqdm

        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        c = self.config
        crops = _as_crops(images, c.crop_size)
        labels = _as_label_maps(instance_label_maps, crops.shape)
        if len(crops) < 1:
            raise ValueError("fit needs at least one training crop")
        if validation is not None:
            if not (isinstance(validation, (tuple, list)) and len(validation) == 2):
                raise ValueError("validation must be a pair (crops, instance_label_maps) or None")
            val_crops = _as_crops(validation[0], c.crop_size, "validation crops")
            val_labels = _as_label_maps(validation[1], val_crops.shape, "validation label maps")
        if c.flip == "double":
            crops = np.concatenate([crops, crops[:, :, ::-1]])
            labels = np.concatenate([labels, labels[:, :, ::-1]])
        elif c.flip == "dihedral":  # the 8 flips/quarter turns of every crop
            crops, labels = _dihedral(crops), _dihedral(labels)
        if initial_weights is not None:
            self._saved_config(initial_weights, c)  # a clear error before anything is built
        if deterministic:
            tf.config.experimental.enable_op_determinism()
        self.seed = seed
        self._build(seed)  # seeds python, numpy and TF, then builds fresh weights
        if initial_weights is not None:
            self._read_weights(initial_weights, checked=True)
        task, model = self._task, self._model
        schedule = _WarmupSchedule(c.learning_rate if learning_rate is None else float(learning_rate),
                                   c.warmup_steps, int(total_steps or steps), c.lr_schedule, int(step_offset))
        if c.optimizer == "sgd":
            optimizer = tf_keras.optimizers.SGD(learning_rate=schedule, momentum=0.9, clipnorm=10.0)
        else:
            optimizer = tf_keras.optimizers.Adam(learning_rate=schedule, clipnorm=10.0)
        metrics = task.build_metrics(training=True)
        by_name = {m.name: m for m in metrics}

        @tf.function
        def train_step(inputs):
            for m in metrics:
                m.reset_state()
            task.train_step(inputs, model, optimizer, metrics)
            return {name: by_name[name].result() for name in LOSS_NAMES}

        _hide_unused_mobilenet_gradients()
        iterator = iter(self._dataset(crops, labels, seed))
        self.history = []
        bar = tqdm(range(int(steps)), desc=f"Mask R-CNN ({c.name})", disable=not progress, leave=False)
        start = time.perf_counter()
        first = None
        for step in bar:
            t0 = time.perf_counter()
            logs = {k: float(v.numpy()) for k, v in train_step(next(iterator)).items()}
            if first is None:
                first = time.perf_counter() - t0
            if not np.isfinite(logs["total_loss"]):
                raise FloatingPointError(
                    f"Mask R-CNN loss became {logs['total_loss']} at step {step + 1}; lower learning_rate")
            record = {"step": step + 1, **logs}
            if validation is not None and ((step + 1) % validate_every == 0 or step + 1 == steps):
                record.update({f"val_{k}": v for k, v in self.evaluate(val_crops, val_labels).items()})
            self.history.append(record)
            bar.set_postfix(loss=f"{logs['total_loss']:.3f}")
        total = time.perf_counter() - start
        rest = max(int(steps) - 1, 1)
        self.timing = {"first_step_s": first or 0.0, "seconds_per_step": (total - (first or 0.0)) / rest,
                       "total_s": total, "steps": int(steps)}
        self._predict_fn = None
        return self.history

    def evaluate(self, images: Any, instance_label_maps: Any, score_threshold: float | None = None,
                 iou_threshold: float = 0.5) -> dict[str, float]:
        """Pooled instance precision, recall, F1 (IoU >= ``iou_threshold``) and tumour Dice on crops.

        Counted over all crops (``kts.metrics`` rule): a detector that finds nothing scores Dice 0
        and F1 0, and its precision is NaN ("n/a"), with ``n_predicted`` = 0 beside it.
        """
        from kts import metrics

        crops = _as_crops(images, self.config.crop_size)
        gt = _as_label_maps(instance_label_maps, crops.shape)
        pred = self.predict_labels(crops, score_threshold=score_threshold)
        sc = metrics.tumor_scores(list(pred), list(gt), iou_threshold=iou_threshold)
        return {"precision": sc["instance_precision"], "recall": sc["instance_recall"], "f1": sc["instance_f1"],
                "dice": sc["dice"], "n_predicted": sc["n_predicted"], "n_gt": sc["n_gt"]}

    # -- inference -----------------------------------------------------------------------
    def _get_predict_fn(self):
        if self._predict_fn is None:
            self._predict_fn = inference_function(self.model, self.config.crop_size)
        return self._predict_fn

    def predict(self, images: Any, score_threshold: float | None = None) -> list[dict[str, np.ndarray]]:
        """Tumour instances per crop: ``boxes`` [n,4] yxyx pixels, ``scores`` [n], ``masks`` [n,S,S] bool.

        Section III.B: RPN proposals, ROI Align, class/box head, FCN mask head; each 28x28
        mask probability map is warped exactly (sub-pixel) into its box and thresholded at
        0.5 (``config.mask_paste="v1"``: Model Garden's older integer paste, ~1 px dilated).
        ``score_threshold`` None uses ``self.score_threshold`` (chosen on validation crops
        by :meth:`choose_score_threshold`); pass 0 for every detection (mask AP).
        """
        import tensorflow as tf

        threshold = self.score_threshold if score_threshold is None else float(score_threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1]; got {score_threshold}")
        s = self.config.crop_size
        crops = _as_crops(images, s)
        fn = self._get_predict_fn()
        results: list[dict[str, np.ndarray]] = []
        for start in range(0, len(crops), PREDICT_BATCH):
            chunk = crops[start:start + PREDICT_BATCH]
            padded = np.zeros((PREDICT_BATCH, s, s), np.float32)
            padded[: len(chunk)] = chunk
            out = {k: v.numpy() for k, v in fn(tf.constant(padded)).items()}
            results += [crop_detections(out, j, threshold, s, self.config.mask_paste) for j in range(len(chunk))]
        return results

    def predict_labels(self, images: Any, score_threshold: float | None = None, min_pixels: int = 1) -> np.ndarray:
        """uint16 instance label maps [N,S,S]: instances 1..n by score; higher score wins overlaps.

        An instance mostly covered by better-scored ones (``config.overlap_drop``) is dropped
        rather than left as a crescent-shaped false positive.
        """
        dets = self.predict(images, score_threshold=score_threshold)
        s = self.config.crop_size
        return np.stack([detections_to_labels(d, (s, s), min_pixels, self.config.overlap_drop) for d in dets]) \
            if dets else np.zeros((0, s, s), np.uint16)

    def choose_score_threshold(self, images: Any, instance_label_maps: Any,
                               candidates: Sequence[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2)),
                               iou_threshold: float = 0.5) -> dict[str, Any]:
        """Pick the detection score threshold on validation crops and keep it with the model.

        The threshold with the highest pooled instance F1 (IoU >= ``iou_threshold``) wins; ties go
        to the higher pooled tumour Dice, then to the value nearest 0.5. With no tumour in the
        crops nothing can be chosen and the current threshold stays. Returns the sweep.
        """
        from kts import metrics

        crops = _as_crops(images, self.config.crop_size)
        gt = _as_label_maps(instance_label_maps, crops.shape)
        dets = self.predict(crops, score_threshold=min(candidates))
        s = self.config.crop_size
        rows = []
        for t in candidates:
            kept = [{k: v[d["scores"] >= t] for k, v in d.items()} for d in dets]
            pred = [detections_to_labels(d, (s, s), 1, self.config.overlap_drop) for d in kept]
            sc = metrics.tumor_scores(pred, list(gt), iou_threshold=iou_threshold)
            rows.append({"threshold": float(t), "f1": sc["instance_f1"], "dice": sc["dice"]})
        if not np.any(gt):
            return {"threshold": self.score_threshold, "sweep": rows, "chosen": False}
        def key(r):
            f1 = -1.0 if np.isnan(r["f1"]) else r["f1"]
            dice = -1.0 if np.isnan(r["dice"]) else r["dice"]
            return (round(f1, 6), round(dice, 6), -abs(r["threshold"] - 0.5))
        best = max(rows, key=key)
        self.score_threshold = best["threshold"]
        return {"threshold": best["threshold"], "sweep": rows, "chosen": True}

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/weights-*`` (``tf.train.Checkpoint``) and ``path/maskrcnn_config.json``."""
        import tensorflow as tf

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        ckpt = tf.train.Checkpoint(model=self.model)
        # A checkpoint is several files: write them into a temporary folder beside the
        # target, then rename each into place; the config JSON is written last, so a
        # folder with a JSON always holds a complete checkpoint.
        (folder / CONFIG_FILE).unlink(missing_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".weights.", dir=folder))
        try:
            ckpt.write(str(tmp / CHECKPOINT_PREFIX))
            for old in folder.glob(f"{CHECKPOINT_PREFIX}.*"):
                old.unlink()
            for f in sorted(tmp.iterdir()):
                os.replace(f, folder / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_json(folder / CONFIG_FILE, {"config": self.config.to_dict(), "seed": self.seed,
                                          "score_threshold": self.score_threshold,
                                          "history_tail": self.history[-1:] if self.history else [],
                                          "provenance": getattr(self, "provenance", {})})
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike, config: MaskRCNNConfig | None = None) -> "TumorMaskRCNN":
        """Rebuild from :meth:`save` output; ``config`` (if given) must match the saved one."""
        saved_config, seed = cls._saved_config(path, config)
        obj = cls(config if config is not None else saved_config, seed=seed)
        obj._read_weights(path, checked=True)
        saved = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
        obj.score_threshold = float(saved.get("score_threshold", obj.score_threshold))
        obj.provenance = saved.get("provenance", {})
        return obj

    @staticmethod
    def _saved_config(path: str | os.PathLike, config: MaskRCNNConfig | None) -> tuple[MaskRCNNConfig, int]:
        """The config and seed :meth:`save` wrote in ``path``; checks the checkpoint is there and fits ``config``."""
        from kts.errors import KtsInputError

        folder = Path(path)
        cfg_file = folder / CONFIG_FILE
        if not cfg_file.is_file():
            raise KtsInputError(folder, f"no {CONFIG_FILE} here; save a model with TumorMaskRCNN.save(path) first")
        try:
            saved = json.loads(cfg_file.read_text(encoding="utf-8"))
            saved_config = MaskRCNNConfig.from_dict(saved["config"])
        except (ValueError, KeyError, TypeError) as exc:
            raise KtsInputError(cfg_file, f"not a Mask R-CNN config written by kts ({exc})") from None
        if config is not None and config.architecture() != saved_config.architecture():
            diff = {k: (v, saved_config.architecture()[k]) for k, v in config.architecture().items()
                    if v != saved_config.architecture()[k]}
            raise ValueError(
                f"{folder}: checkpoint was made with config {saved_config.name!r} and cannot load into "
                f"config {config.name!r}; differing fields (requested, saved): {diff}")
        if not (folder / f"{CHECKPOINT_PREFIX}.index").is_file():
            raise KtsInputError(folder, f"no checkpoint {CHECKPOINT_PREFIX}.index here; the save was incomplete")
        return saved_config, int(saved.get("seed", 0))

    def _read_weights(self, path: str | os.PathLike, checked: bool = False) -> None:
        """Read the weights :meth:`save` wrote into this (built) model."""
        import tensorflow as tf

        folder = Path(path)
        if not checked:
            self._saved_config(folder, self.config)
        try:
            status = tf.train.Checkpoint(model=self.model).read(str(folder / CHECKPOINT_PREFIX))
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as exc:
            raise ValueError(
                f"{folder}: checkpoint weights do not fit config {self.config.name!r} "
                f"({self.config.architecture()}): {str(exc).splitlines()[0][:300]}") from None
        status.expect_partial()


# ----------------------------------------------------------------------------- inference and paste-back

def inference_function(model, crop_size: int):
    """A ``tf.function`` from a batch of ``PREDICT_BATCH`` crops [B, S, S] (0..255) to Model Garden's
    detections, preprocessed exactly as the training parser does."""
    import tensorflow as tf
    from official.vision.ops import preprocess_ops

    s = crop_size

    def preprocess(image):  # [S, S] in 0..255, exactly as the training parser does
        image = tf.tile(image[..., None] / 255.0, [1, 1, 3])
        image = preprocess_ops.normalize_image(image)
        image, info = preprocess_ops.resize_and_crop_image(
            image, [s, s], padded_size=[s, s], aug_scale_min=1.0, aug_scale_max=1.0)
        return image, info

    # One fixed input shape (batches padded to PREDICT_BATCH): one trace, and the same
    # graph, hence bit-identical outputs, whatever was predicted before.
    @tf.function(input_signature=[tf.TensorSpec([PREDICT_BATCH, s, s], tf.float32)])
    def predict_fn(images):
        batch, info = tf.map_fn(preprocess, images, fn_output_signature=(
            tf.TensorSpec([s, s, 3], tf.float32), tf.TensorSpec([4, 2], tf.float32)))
        out = model(batch, image_shape=info[:, 1, :], training=False)
        return {k: out[k] for k in ("detection_boxes", "detection_scores", "detection_classes",
                                    "num_detections", "detection_masks")}

    return predict_fn


def crop_detections(out: dict[str, np.ndarray], j: int, threshold: float, crop_size: int,
                    mask_paste: str) -> dict[str, np.ndarray]:
    """Crop ``j``'s tumour detections from a batch of Model Garden outputs (numpy): those scoring at
    least ``threshold``, best first, each mask pasted into its box (:func:`paste_masks`)."""
    n = int(out["num_detections"][j])
    keep = (out["detection_scores"][j, :n] >= threshold) & (out["detection_classes"][j, :n] == 1)
    boxes = out["detection_boxes"][j, :n][keep].astype(np.float32)
    scores = out["detection_scores"][j, :n][keep].astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    probs = out["detection_masks"][j, :n][keep][order]
    return {"boxes": boxes, "scores": scores, "masks": paste_masks(probs, boxes, crop_size, mask_paste)}


def resolve_overlaps(detections: dict[str, np.ndarray], shape: Sequence[int], min_pixels: int = 1,
                     overlap_drop: float = 0.5) -> dict[str, np.ndarray]:
    """One crop's detections with overlaps resolved: ``masks`` [n,H,W] disjoint, ``scores`` [n], best first.

    Masks are taken best score first; a pixel keeps the first (best) instance that claims it.
    An instance of which at least ``overlap_drop`` of the mask is already claimed, or whose
    unclaimed part has fewer than ``min_pixels`` pixels, is dropped: a lower-scored duplicate
    would otherwise leave its uncovered crescent as a false-positive instance (mask-level NMS).
    ``overlap_drop=1`` keeps every leftover part.
    """
    shape = tuple(shape)
    masks, scores = np.asarray(detections["masks"]).astype(bool), np.asarray(detections["scores"])
    claimed = np.zeros(shape, bool)
    kept_masks, kept_scores = [], []
    for k in np.argsort(-scores, kind="stable"):
        mask = masks[k]
        area = int(mask.sum())
        if area == 0:
            continue
        free = mask & ~claimed
        n_free = int(free.sum())
        if n_free < max(min_pixels, 1) or (overlap_drop < 1.0 and (area - n_free) >= overlap_drop * area):
            continue
        claimed |= free
        kept_masks.append(free)
        kept_scores.append(float(scores[k]))
    return {"masks": np.array(kept_masks, bool).reshape(len(kept_masks), *shape),
            "scores": np.array(kept_scores, np.float32)}


def detections_to_labels(detections: dict[str, np.ndarray], shape: Sequence[int], min_pixels: int = 1,
                         overlap_drop: float = 0.5) -> np.ndarray:
    """One crop's detections -> uint16 label map, instances 1..n by descending score (:func:`resolve_overlaps`)."""
    resolved = resolve_overlaps(detections, shape, min_pixels, overlap_drop)
    out = np.zeros(tuple(shape), np.uint16)
    for label, mask in enumerate(resolved["masks"], start=1):
        out[mask] = label
    return out


def paste_masks(probabilities: np.ndarray, boxes_yxyx: np.ndarray, size: int, method: str = "exact") -> np.ndarray:
    """Mask-head probabilities [n, m, m] -> binary masks [n, size, size] in their boxes (yxyx pixels).

    ``"exact"``: Model Garden's ``paste_instance_masks_v2`` (a sub-pixel affine warp of the
    m x m grid onto the box, then > 0.5); ``"v1"``: the older ``paste_instance_masks``, which
    truncates boxes and uses the +1 width convention (about a pixel of dilation and shift).
    """
    from official.vision.ops import mask_ops

    probs = np.asarray(probabilities, np.float32)
    boxes = np.asarray(boxes_yxyx, np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros((0, size, size), bool)
    xywh = np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], axis=1)
    if method == "v1":
        return mask_ops.paste_instance_masks(probs, xywh, size, size).astype(bool)
    if method != "exact":
        raise ValueError(f"method must be one of {MASK_PASTES}; got {method!r}")
    return mask_ops.paste_instance_masks_v2(probs, xywh, size, size).astype(bool)


def anchor_positives(config: MaskRCNNConfig, instance_label_maps: Any) -> np.ndarray:
    """How many RPN anchors each ground-truth tumour gets as positives (IoU >= the match threshold).

    Model Garden's anchors (``official.vision.ops.anchor.Anchor``) for ``config`` against every
    instance's box in every crop; 0 means the tumour is learnt only through the one anchor
    that Model Garden force-matches to it. Returns one count per instance.
    """
    from official.vision.ops import anchor

    labels = _as_label_maps(instance_label_maps, np.shape(instance_label_maps) if np.ndim(instance_label_maps) == 3
                            else (1,) + np.shape(instance_label_maps))
    s = config.crop_size
    gen = anchor.Anchor(config.min_level, config.max_level, config.num_scales, list(config.aspect_ratios),
                        config.anchor_size, [s, s])
    anchors = np.concatenate([np.reshape(b.numpy(), (-1, 4)) for b in gen.multilevel_boxes.values()])
    counts = []
    for label_map in labels:
        _, boxes = _instances(label_map, 10 ** 6)
        for b in boxes * s:
            y0, x0 = np.maximum(anchors[:, 0], b[0]), np.maximum(anchors[:, 1], b[1])
            y1, x1 = np.minimum(anchors[:, 2], b[2]), np.minimum(anchors[:, 3], b[3])
            inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
            area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
            iou = inter / (area_a + (b[2] - b[0]) * (b[3] - b[1]) - inter)
            counts.append(int(np.count_nonzero(iou >= config.rpn_match_threshold)))
    return np.asarray(counts, np.int64)


def _dihedral(stack: np.ndarray) -> np.ndarray:
    """The 8 images of each [N,S,S] item under quarter turns and horizontal flips, stacked."""
    turns = [np.rot90(stack, k, axes=(1, 2)) for k in range(4)]
    return np.ascontiguousarray(np.concatenate(turns + [t[:, :, ::-1] for t in turns]))


class _WarmupSchedule:
    """Linear warm-up, then a constant or cosine-decayed rate (a tf_keras LearningRateSchedule)."""

    def __new__(cls, rate: float, warmup_steps: int, total_steps: int = 0, kind: str = "constant", offset: int = 0):
        import math

        import tensorflow as tf
        import tf_keras

        class Schedule(tf_keras.optimizers.schedules.LearningRateSchedule):
            def __call__(self, step):
                step = tf.cast(step, tf.float32) + float(offset)
                value = tf.constant(rate, tf.float32)
                if kind == "cosine" and total_steps > warmup_steps:
                    t = tf.clip_by_value((step - warmup_steps) / float(total_steps - warmup_steps), 0.0, 1.0)
                    value = value * 0.5 * (1.0 + tf.cos(math.pi * t))
                if warmup_steps <= 0:
                    return value
                return value * tf.minimum(1.0, (step + 1.0) / float(warmup_steps))

            def get_config(self):
                return {"rate": rate, "warmup_steps": warmup_steps, "total_steps": total_steps, "kind": kind,
                        "offset": offset}

        return Schedule()


class _UnusedBlockFilter:
    """Drops tf_keras' "Gradients do not exist" warning for MobileNetV2's last block only.

    Model Garden's MobileNetV2 builds a final 1x1 conv block (``conv2dbn_block_*``) that the FPN
    never reads, so its batch-norm variables get no gradient at every step: expected, harmless.
    Any other variable without a gradient is still reported.
    """

    def filter(self, record) -> bool:
        import re

        message = record.getMessage()
        if not message.startswith("Gradients do not exist for variables"):
            return True
        names = re.findall(r"'([^']+)'", message)
        return not names or not all(n.startswith("conv2dbn_block") for n in names)


def _hide_unused_mobilenet_gradients() -> None:
    import logging

    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _UnusedBlockFilter) for f in logger.filters):
        logger.addFilter(_UnusedBlockFilter())


def clear_session() -> None:
    """Free the tf_keras graph state of models no longer referenced (between split-study runs)."""
    import tf_keras

    tf_keras.backend.clear_session()
