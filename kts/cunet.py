"""Algorithm 1 of the paper: the Custom U-Net (CU-Net) that segments kidneys-with-tumours.

Section III.A.3 and Algorithm 1. The paper's symbols are the parameters of
:func:`build_cunet`:

======== ================================================ ==================
symbol   meaning                                          parameter
======== ================================================ ==================
I_in     input image                                      ``input_shape``
z        neurons (base filters)                           ``z``
mu       level multipliers ``[v1, v2, v3, v4]``           ``mu``
k        kernel ``k_{m x n}``                             ``k``
s        transposed-convolution stride ``s_{m x n}``      ``s``
p        padding                                          ``p``
phi      activation                                       ``phi``
e        pool size ``e_{m x n}``                          ``e``
f_rate   dropout rate                                     ``f_rate``
======== ================================================ ==================

Section II.B adds batch normalization after each convolution (``batch_norm``).
Where the algorithm's text is inconsistent, the evident intent is the default and the
literal reading a parameter; ``docs/errata.md`` lists each decision (E1-E5).
"""
from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

PAPER_MU_LITERAL = (1, 2, 4, 16)
"""mu exactly as printed in section III.A.3 (the doubling rule gives (1, 2, 4, 8)); errata E1."""


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return value  # type: ignore[return-value]


@keras.saving.register_keras_serializable(package="kts")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' ``BatchNormalization`` computed by TensorFlow's fused kernel: one op forward and one
    backward instead of Keras' moments, normalisation and their gradients (issue 15: batch norm is
    memory-bound work on every activation of the CU-Net).

    The same parameters, moving statistics (biased batch variance, as Keras keeps it) and output up
    to float rounding; the CU-Net's default since the results of 2026-12-07 (``build_cunet(fused_batch_norm=False)``
    gives Keras' layer, whose rounding the earlier committed results have). Other backends, masks and
    axes other than the last fall back to Keras' own computation.
    """

    def call(self, inputs, training=None, mask=None):
        if mask is not None or keras.backend.backend() != "tensorflow" or self.axis not in (-1, len(inputs.shape) - 1) \
                or len(inputs.shape) != 4 or inputs.dtype != "float32" or not (self.scale and self.center):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, self.gamma, self.beta, epsilon=self.epsilon, is_training=True, data_format="NHWC")
            count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], variance.dtype)
            variance = variance * (count - 1.0) / tf.maximum(count, 1.0)  # the kernel returns the unbiased one
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return outputs
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, mean=self.moving_mean, variance=self.moving_variance,
            epsilon=self.epsilon, is_training=False, data_format="NHWC")
        return outputs


def conv_block(x, filters: int, k, phi: str, p: str, batch_norm: bool, name: str, momentum: float = 0.9,
               fused_batch_norm: bool = True):
    """Two ``con2D`` of Algorithm 1, each followed by batch norm and ``phi`` (section II.B)."""
    norm = FusedBatchNormalization if fused_batch_norm else layers.BatchNormalization
    for j in (1, 2):
        x = layers.Conv2D(filters, k, padding=p, kernel_initializer="he_normal", name=f"{name}_conv{j}")(x)
        if batch_norm:
            x = norm(momentum=momentum, name=f"{name}_bn{j}")(x)
        x = layers.Activation(phi, name=f"{name}_{phi}{j}")(x)
    return x


def build_cunet(
    input_shape: tuple[int, int, int] = (320, 320, 1),
    z: int = 16,
    mu: Sequence[int] = (1, 2, 4, 8),
    k: int | Sequence[int] = (3, 3),
    s: int | Sequence[int] = (2, 2),
    p: str = "same",
    phi: str = "relu",
    e: int | Sequence[int] = (2, 2),
    f_rate: float = 0.1,
    batch_norm: bool = True,
    batch_norm_momentum: float = 0.9,
    transpose_activation: bool = True,
    output_from: str = "decoder",
    fused_batch_norm: bool = True,
    name: str = "cunet",
) -> keras.Model:
    """Build the CU-Net of Algorithm 1 (section III.A.3) as a Keras functional model.

    Contracting path (``for i = 1 to 4``): two convolutions with ``z * mu[i-1]`` filters
    (``C_i``), max-pooling with pool ``e`` (``Q_i``), dropout ``f_rate``. Connected layers:
    two convolutions with ``z * mu[3] * 2`` filters (``C_m``). Expansive path (``for i = 4 to 1``):
    transposed convolution with kernel ``k`` and stride ``s`` (``D_i``), concatenation with
    ``C_i``, dropout, two convolutions with the filters of level ``i``. Output ``I_out``: a 1x1
    convolution with one filter and a sigmoid (kidney-with-tumour probability).

    ``batch_norm_momentum``: 0.9 rather than Keras' 0.99, because with 30 images an epoch is
    about ten steps and the slower moving averages would leave validation (inference-mode)
    predictions many epochs behind training.
    ``transpose_activation``: Algorithm 1 lists ``phi`` among the arguments of ``con2DTrans``;
    ``True`` applies it (literal), ``False`` leaves the up-convolution linear (errata E6).
    ``output_from``: ``"decoder"`` (evident intent) or ``"input"``, the literal
    ``I_out = con2D(1, k_1x1)(cn_1)`` with ``cn_1 = I_in``, which bypasses the whole network
    (errata E2, E3); kept only to show why the literal reading cannot be meant.
    ``fused_batch_norm``: batch norm through TensorFlow's fused kernel (:class:`FusedBatchNormalization`;
    same values up to rounding, 15-35 % faster training on CPU, issue 15); ``False`` gives Keras' own layer.
    The algorithm prints the output activation as ``phi``; a binary mask trained with binary
    cross-entropy (section IV) needs a sigmoid (errata E4).
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}")
    height, width, channels = input_shape
    if not all(isinstance(v, int) and v > 0 for v in input_shape):
        raise ValueError(f"input_shape must hold positive ints, got {input_shape!r}")
    if not isinstance(z, int) or z <= 0:
        raise ValueError(f"z (base filters) must be a positive int, got {z!r}")
    mu = tuple(mu)
    if len(mu) != 4:
        raise ValueError(f"mu must have 4 level multipliers [v1, v2, v3, v4] (Algorithm 1), got {len(mu)}: {mu!r}")
    if not all(isinstance(v, int) and v > 0 for v in mu):
        raise ValueError(f"mu must hold positive ints, got {mu!r}")
    k, s, e = _pair(k, "k"), _pair(s, "s"), _pair(e, "e")
    if s != e:
        raise ValueError(f"the transposed-conv stride s={s} must equal the pool size e={e} so the decoder "
                         "restores each level's size")
    levels = len(mu)
    factor_h, factor_w = e[0] ** levels, e[1] ** levels
    if height % factor_h or width % factor_w:
        raise ValueError(
            f"input size {height}x{width} (input_shape, or the training images' size) must be divisible by "
            f"{factor_h}x{factor_w} (pool {e} applied {levels} times); "
            f"resize to e.g. {(height // factor_h + 1) * factor_h}x{(width // factor_w + 1) * factor_w}")
    if not 0.0 <= float(f_rate) < 1.0:
        raise ValueError(f"f_rate (dropout rate) must be in [0, 1), got {f_rate!r}")
    if p != "same":
        raise ValueError(f"p (padding) must be 'same', got {p!r}: 'valid' shrinks each convolution so the "
                         "skip connections of Algorithm 1 no longer align")
    if not 0.0 < float(batch_norm_momentum) < 1.0:
        raise ValueError(f"batch_norm_momentum must be in (0, 1), got {batch_norm_momentum!r}")
    if output_from not in ("decoder", "input"):
        raise ValueError(f"output_from must be 'decoder' or 'input', got {output_from!r}")

    inputs = keras.Input(shape=input_shape, name="I_in")
    x = inputs
    skips = []  # C_1..C_4
    # contracting path
    for i in range(1, levels + 1):
        c_i = conv_block(x, z * mu[i - 1], k, phi, p, batch_norm, f"enc{i}", batch_norm_momentum,
                         fused_batch_norm=fused_batch_norm)
        skips.append(c_i)
        q_i = layers.MaxPooling2D(pool_size=e, name=f"enc{i}_pool")(c_i)
        x = layers.Dropout(f_rate, name=f"enc{i}_dropout")(q_i)
    # connected layers
    c_m = conv_block(x, z * mu[levels - 1] * 2, k, phi, p, batch_norm, "bottleneck", batch_norm_momentum,
                     fused_batch_norm=fused_batch_norm)
    # expansive path
    for i in range(levels, 0, -1):
        d_i = layers.Conv2DTranspose(z * mu[i - 1], k, strides=s, padding=p,
                                     activation=phi if transpose_activation else None,
                                     kernel_initializer="he_normal", name=f"dec{i}_upconv")(c_m)
        d_i = layers.Concatenate(name=f"dec{i}_concat")([d_i, skips[i - 1]])
        d_i = layers.Dropout(f_rate, name=f"dec{i}_dropout")(d_i)
        c_m = conv_block(d_i, z * mu[i - 1], k, phi, p, batch_norm, f"dec{i}", batch_norm_momentum,
                         fused_batch_norm=fused_batch_norm)
    source = c_m if output_from == "decoder" else inputs
    outputs = layers.Conv2D(1, (1, 1), padding=p, activation="sigmoid", name="I_out")(source)
    return keras.Model(inputs, outputs, name=name)


def layer_table(model: keras.Model) -> list[dict]:
    """One row per layer (name, kind, output shape, filters, parameters) to print beside Algorithm 1."""
    rows = []
    for layer in model.layers:
        shape = layer.output.shape if hasattr(layer, "output") else None
        rows.append({
            "layer": layer.name,
            "kind": type(layer).__name__,
            "output_shape": tuple(shape[1:]) if shape is not None else None,
            "filters": getattr(layer, "filters", None),
            "params": layer.count_params(),
        })
    return rows


def layer_flops(layer) -> int:
    """FLOPs (2 per multiply-accumulate) of one convolution or transposed convolution, one image."""
    kh, kw = layer.kernel_size
    cin = layer.input.shape[-1]
    if isinstance(layer, layers.Conv2DTranspose):
        in_h, in_w = layer.input.shape[1:3]
        macs = in_h * in_w * cin * kh * kw * layer.output.shape[-1]
    else:
        out_h, out_w, cout = layer.output.shape[1:]
        macs = out_h * out_w * cout * kh * kw * cin
    return int(2 * macs)


def forward_flops(model: keras.Model) -> int:
    """Multiply-accumulate based FLOPs (2 per MAC) of one forward pass of a single image.

    Counted analytically from the convolution layers (they hold >99% of the work, see
    :func:`layer_flops`); the benchmark cross-checks this with TensorFlow's profiler.
    """
    return int(sum(layer_flops(layer) for layer in model.layers
                   if isinstance(layer, (layers.Conv2D, layers.Conv2DTranspose))))
