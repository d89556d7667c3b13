"""Domain randomisation from label maps: training images re-synthesised on the fly (not in the paper).

Section III.A names the problem ("MR scan images are collected from different MR scanners, the
intensity of the input images varies"); notebook 07 measures it (a CU-Net trained on two
phantom weightings loses much of its kidney Dice on the third). The field's answer is SynthSeg
(Billot et al., "SynthSeg: segmentation of brain MRI scans of any contrast and resolution
without retraining", Medical Image Analysis 2023): train on images drawn from the anatomical
label maps with random intensities, so that no contrast can be learnt and only shape remains.

:func:`synthesise` draws one such image from a tissue label map (the phantom keeps one per
slice, ``kts.phantom.tissue_label_maps``), in this order:

1. spatial: a random affine (rotation, scale = field of view, shift) and an elastic field, applied
   to the label map and the kidney mask together (nearest neighbour);
2. a random mean grey level per tissue label (a Gaussian mixture's means, uniform in 0..1) and a
   random within-label texture (smooth noise of a random per-label s.d.);
3. a random multiplicative bias field (smooth, log-normal);
4. random blur (Gaussian) and a random acquisition resolution (down- and up-sampling);
5. for a share ``p_mixing_curve`` of the draws, a random non-monotone curve on the blurred grey levels
   (:func:`random_lut`): a partial-volume pixel then takes a level that neither tissue has,
   as MR signal that is not a linear mix of its tissues' does (the dark rims of opposed-phase imaging
   at fat-water interfaces are one case, and the phantom's T1-pre is opposed-phase: this step knows
   that kind of artefact exists, not the left-out weighting's grey levels); then a random gamma;
6. Rician noise of a random level;
7. the percentile normalisation the real slices get (``kts.data.normalise``), to 0..1.

The label map of a draw is the training item's own or, with ``label_pool`` (default 400), one of as many
label maps of new phantom anatomy (``kts.phantom.label_map_pool``, phantom seed
``kts.workflow.LABEL_POOL_SEED_OFFSET`` + the run's seed: never the study's cases): SynthSeg trains on
every label map it has, and the phantom can draw more. Only anatomy is added, no image of any
weighting; the epoch keeps its length.

Every draw is a stateless random op keyed by the item's seed, so training stays deterministic
(one seed fixes everything) and a resumed run sees the same images. All parameters live in
:class:`SynthConfig`. The recipe is opt-in: ``TrainConfig(intensity="synth")`` re-synthesises a
share ``p_synthetic`` of the training items and leaves the rest as they are. The recipe's longer
schedule is ``kts.config.SYNTH_SCHEDULE``. :func:`random_lut`, the random intensity curves of
errata A4 (``TrainConfig(intensity="random_lut")``, on real slices), lives here too: step 5 reuses it.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """The ranges of every random draw of :func:`synthesise` (uniform unless said otherwise)."""

    p_synthetic: float = 0.8                  # share of training items re-synthesised
    rotation_deg: float = 15.0                # +- rotation
    scale: tuple[float, float] = (0.75, 1.30)  # zoom: the body fills part of, or all of, the frame
    shift: float = 0.08                       # +- shift, fraction of the frame
    elastic_px: float = 3.0                   # s.d. of the elastic displacement, pixels of a 320 frame
    elastic_grid: int = 5                     # control points per side of the elastic field
    texture_sd: tuple[float, float] = (0.0, 0.10)  # within-label s.d. (fraction of the grey range)
    bias_sd: float = 0.30                     # s.d. of the log bias field
    bias_grid: int = 4                        # control points per side of the bias field
    blur_px: tuple[float, float] = (0.0, 1.2)  # Gaussian blur sigma, pixels of a 320 frame
    downsample: tuple[float, float] = (1.0, 2.5)  # acquisition resolution: frame / factor
    gamma_sd: float = 0.30                    # s.d. of log(gamma)
    noise: tuple[float, float] = (0.0, 0.06)  # Rician noise sigma (fraction of the grey range)
    percentiles: tuple[float, float] = (0.5, 99.5)  # as kts.data.DEFAULT_PERCENTILES
    p_mixing_curve: float = 0.5               # share of drawn images whose blurred (partial-volume) grey levels
    #                                           pass a random non-monotone curve (random_lut)
    label_pool: int = 400                     # label maps of new phantom anatomy drawn from besides the
    #                                           training cases' own (kts.phantom.label_map_pool; 0: none)

    def __post_init__(self):
        for name in ("p_synthetic", "p_mixing_curve"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("scale", "texture_sd", "blur_px", "downsample", "noise", "percentiles"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name} must be a (low, high) range with low <= high, got {(low, high)!r}")
        if self.scale[0] <= 0 or self.downsample[0] < 1.0:
            raise ValueError("scale must be positive and downsample >= 1")
        if isinstance(self.label_pool, bool) or not isinstance(self.label_pool, int) or self.label_pool < 0:
            raise ValueError(f"label_pool must be a non-negative int, got {self.label_pool!r}")
        if self.elastic_grid < 2 or self.bias_grid < 2:
            raise ValueError("elastic_grid and bias_grid need at least 2 control points per side")


DEFAULT = SynthConfig()
LUT_POINTS = 6  # control points of the random intensity curve (random_lut)


def random_lut(image, seed):
    """``image`` (values in 0..1) through a random piecewise-linear curve of ``LUT_POINTS`` points.

    The curve need not be monotone, so tissue grey levels are reordered as between MR
    weightings; the mapping depends only on ``seed`` (a stateless draw).
    """
    import tensorflow as tf

    levels = tf.random.stateless_uniform([LUT_POINTS], seed=seed)
    position = tf.clip_by_value(image, 0.0, 1.0) * (LUT_POINTS - 1)
    low = tf.minimum(tf.cast(tf.floor(position), tf.int32), LUT_POINTS - 2)
    t = position - tf.cast(low, position.dtype)
    return tf.gather(levels, low) * (1.0 - t) + tf.gather(levels, low + 1) * t


def _uniform(seed, low, high, shape=()):
    import tensorflow as tf

    return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def _smooth_field(seed, grid: int, height: int, width: int, channels: int = 1):
    """Standard-normal values on a ``grid`` x ``grid`` lattice, bilinearly resized to the frame."""
    import tensorflow as tf

    coarse = tf.random.stateless_normal([1, grid, grid, channels], seed=seed)
    return tf.image.resize(coarse, [height, width], method="bilinear")[0]


def _gaussian_blur(image, sigma):
    """Separable Gaussian blur of an [H, W, 1] image (radius 4 px; sigma a scalar tensor)."""
    import tensorflow as tf

    x = tf.range(-4.0, 5.0)
    kernel = tf.exp(-(x ** 2) / (2.0 * tf.maximum(sigma, 0.2) ** 2))
    kernel = kernel / tf.reduce_sum(kernel)
    image = tf.nn.conv2d(image[None], tf.reshape(kernel, [9, 1, 1, 1]), 1, "SAME")
    return tf.nn.conv2d(image, tf.reshape(kernel, [1, 9, 1, 1]), 1, "SAME")[0]


def _percentile(values, q: float):
    import tensorflow as tf

    flat = tf.sort(tf.reshape(values, [-1]))
    n = tf.shape(flat)[0]
    index = tf.cast(tf.round(q / 100.0 * tf.cast(n - 1, tf.float32)), tf.int32)
    return flat[index]


def synthesise(labels, mask, seed, n_labels: int, config: SynthConfig = DEFAULT):
    """One training item drawn from a tissue label map: ``(image [H, W, 1] in 0..1, mask [H, W, 1])``.

    ``labels``: int [H, W] tissue classes 0..n_labels-1; ``mask``: float [H, W, 1] (the kidney
    target, deformed with the labels); ``seed``: an int64 [2] tensor (stateless draws). See the
    module docstring for the steps and :class:`SynthConfig` for their ranges.
    """
    import tensorflow as tf

    c = config
    key = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 16)  # 16 independent streams
    height, width = labels.shape[0], labels.shape[1]
    frame = float(max(height, width)) / 320.0  # pixel ranges are given for a 320 frame

    # 1. spatial: output pixel p samples the labels at R(-angle) (p - centre - shift) / scale + centre + elastic
    angle = _uniform(key[0], -c.rotation_deg, c.rotation_deg) * (math.pi / 180.0)
    scale = tf.exp(_uniform(key[1], math.log(c.scale[0]), math.log(c.scale[1])))
    shift = _uniform(key[2], -c.shift, c.shift, [2]) * tf.constant([height, width], tf.float32)
    yy, xx = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32), indexing="ij")
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    dy, dx = (yy - cy - shift[0]) / scale, (xx - cx - shift[1]) / scale
    cos, sin = tf.cos(angle), tf.sin(angle)
    elastic = _smooth_field(key[3], c.elastic_grid, height, width, 2) * (c.elastic_px * frame)
    src_y = cos * dy + sin * dx + cy + elastic[..., 0]
    src_x = -sin * dy + cos * dx + cx + elastic[..., 1]
    iy, ix = tf.cast(tf.round(src_y), tf.int32), tf.cast(tf.round(src_x), tf.int32)
    inside = (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
    where = tf.stack([tf.clip_by_value(iy, 0, height - 1), tf.clip_by_value(ix, 0, width - 1)], axis=-1)
    labels = tf.where(inside, tf.gather_nd(tf.cast(labels, tf.int32), where), 0)
    mask = tf.where(inside[..., None], tf.gather_nd(mask, where), tf.zeros_like(mask))

    # 2. a random grey level and texture per label
    means = _uniform(key[4], 0.0, 1.0, [n_labels])
    sds = _uniform(key[5], c.texture_sd[0], c.texture_sd[1], [n_labels])
    texture = _smooth_field(key[6], max(height // 4, 2), height, width)[..., 0]
    image = tf.gather(means, labels) + tf.gather(sds, labels) * texture
    # 3. bias field
    image = image * tf.exp(_smooth_field(key[7], c.bias_grid, height, width)[..., 0] * c.bias_sd)
    image = image[..., None]
    # 4. blur and acquisition resolution
    image = _gaussian_blur(image, _uniform(key[8], c.blur_px[0], c.blur_px[1]) * frame)
    factor = _uniform(key[9], c.downsample[0], c.downsample[1])
    low = tf.maximum(tf.cast(tf.round(tf.cast([height, width], tf.float32) / factor), tf.int32), 8)
    image = tf.image.resize(tf.image.resize(image, low, method="bilinear", antialias=True), [height, width],
                            method="bilinear")
    # 5. gamma on the 0..1 range
    image = image - tf.reduce_min(image)
    image = image / tf.maximum(tf.reduce_max(image), 1e-6)
    if c.p_mixing_curve > 0:
        curved = tf.random.stateless_uniform([], seed=key[14]) < c.p_mixing_curve
        image = tf.where(curved, random_lut(image, key[15]), image)
    image = tf.pow(image + 1e-6, tf.exp(tf.random.stateless_normal([], seed=key[10]) * c.gamma_sd))
    # 6. Rician noise
    sigma = _uniform(key[11], c.noise[0], c.noise[1])
    real = image + sigma * tf.random.stateless_normal(tf.shape(image), seed=key[12])
    imaginary = sigma * tf.random.stateless_normal(tf.shape(image), seed=key[13])
    image = tf.sqrt(real ** 2 + imaginary ** 2)
    # 7. the real slices' normalisation (kts.data.normalise), to 0..1
    lo, hi = _percentile(image, c.percentiles[0]), _percentile(image, c.percentiles[1])
    image = tf.clip_by_value((image - lo) / tf.maximum(hi - lo, 1e-6), 0.0, 1.0)
    return tf.ensure_shape(image, [height, width, 1]), mask
