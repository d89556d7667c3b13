"""Algorithm 1: the built CU-Net has the structure the paper describes."""
from collections import Counter

import keras

import pytest

from kts.cunet import PAPER_MU_LITERAL, build_cunet, forward_flops, layer_flops, layer_table


@pytest.fixture(scope="module")
def model():
    return build_cunet()


def test_default_parameter_count(model):
    # z=16, mu=(1,2,4,8), BN on, 320x320x1: the figure quoted in README
    assert model.count_params() == 2_164_305


def test_layer_counts_match_algorithm_1(model):
    kinds = Counter(type(layer).__name__ for layer in model.layers)
    assert kinds["Conv2D"] == 4 * 2 + 2 + 4 * 2 + 1  # contracting, connected, expansive, output
    assert kinds["Conv2DTranspose"] == 4
    assert kinds["MaxPooling2D"] == 4
    assert kinds["Dropout"] == 8  # after each pool and after each concat
    assert kinds["Concatenate"] == 4
    # after each 3x3 convolution (section II.B); TensorFlow's fused kernel by default (issue 15)
    assert kinds["FusedBatchNormalization"] == 18


def test_filter_sizes_follow_z_and_mu(model):
    filters = {layer.name: layer.filters for layer in model.layers if hasattr(layer, "filters")}
    for i, m in enumerate((1, 2, 4, 8), start=1):
        assert filters[f"enc{i}_conv1"] == filters[f"enc{i}_conv2"] == 16 * m
        assert filters[f"dec{i}_upconv"] == filters[f"dec{i}_conv1"] == 16 * m
    assert filters["bottleneck_conv1"] == filters["bottleneck_conv2"] == 16 * 8 * 2
    assert filters["I_out"] == 1


def test_output_is_one_sigmoid_channel_at_input_size(model):
    assert tuple(model.output.shape) == (None, 320, 320, 1)
    out = model.get_layer("I_out")
    assert out.activation.__name__ == "sigmoid"
    assert tuple(out.kernel_size) == (1, 1)


def test_literal_mu_widens_the_bottleneck():
    literal = build_cunet(input_shape=(64, 64, 1), z=4, mu=PAPER_MU_LITERAL)
    assert literal.get_layer("bottleneck_conv1").filters == 4 * 16 * 2


def test_batch_norm_off_and_literal_output():
    no_bn = build_cunet(input_shape=(32, 32, 1), z=2, batch_norm=False)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in no_bn.layers)
    literal = build_cunet(input_shape=(32, 32, 1), z=2, output_from="input")
    # I_out computed from cn_1 = I_in: a 1x1 convolution of the raw input
    assert literal.get_layer("I_out").input.shape[-1] == 1


def test_flops_and_layer_table(model):
    assert 9.5e9 < forward_flops(model) < 10.5e9
    first = next(layer for layer in model.layers if layer.name.startswith("conv") or "conv" in layer.name)
    # the first 3x3 convolution: 320 x 320 outputs x z=16 filters x 3 x 3 x 1 input channel, 2 FLOPs per MAC
    assert layer_flops(first) == 2 * 320 * 320 * 16 * 3 * 3 * 1
    table = layer_table(model)
    assert sum(row["params"] for row in table) == model.count_params()


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(input_shape=(100, 100, 1)), "divisible by 16"),
    (dict(z=0), "z (base filters)"),
    (dict(z=-4), "z (base filters)"),
    (dict(mu=(1, 2, 4)), "4 level multipliers"),
    (dict(mu=(1, 2, 0, 8)), "positive ints"),
    (dict(f_rate=1.5), "f_rate"),
    (dict(p="valid"), "must be 'same', got 'valid'"),
    (dict(p="full"), "must be 'same', got 'full'"),
    (dict(input_shape=(32, 32)), "height, width, channels"),
    (dict(k=(3, 0)), "k must be"),
    (dict(s=(1, 1)), "must equal the pool size"),
    (dict(output_from="middle"), "output_from"),
])
def test_bad_arguments_raise_value_error(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build_cunet(**kwargs)


def test_fused_batch_norm_matches_keras_batch_norm(tmp_path):
    """The fused kernel, the CU-Net's default (issue 15): same output, moving statistics and gradients as Keras' layer,
    up to rounding, in training and inference; a model with it saves and loads."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kts.cunet import FusedBatchNormalization

    x = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, (4, 8, 8, 5)).astype("float32"))
    plain, fused = keras.layers.BatchNormalization(momentum=0.9), FusedBatchNormalization(momentum=0.9)
    plain.build(x.shape)
    fused.build(x.shape)
    for layer in (plain, fused):
        layer.gamma.assign(np.linspace(0.5, 1.5, 5).astype("float32"))
        layer.beta.assign(np.linspace(-1.0, 1.0, 5).astype("float32"))
    outputs, grads = [], []
    for layer in (plain, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * tf.sin(y))
        outputs.append(y.numpy())
        grads.append(tape.gradient(loss, [x, layer.gamma, layer.beta]))
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5)
    np.testing.assert_allclose(fused(x, training=False).numpy(), plain(x, training=False).numpy(), atol=1e-5)
    np.testing.assert_allclose(fused.moving_mean.numpy(), plain.moving_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance.numpy(), plain.moving_variance.numpy(), rtol=1e-5)
    for g_plain, g_fused in zip(*grads):
        np.testing.assert_allclose(g_fused.numpy(), g_plain.numpy(), rtol=1e-4, atol=1e-4)

    # the fused kernel is what runs (a fallback to Keras' computation would pass the comparisons above)
    graph = tf.function(lambda t: fused(t, training=True)).get_concrete_function(x).graph
    assert "FusedBatchNormV3" in {op.type for op in graph.get_operations()}

    model = build_cunet(input_shape=(32, 32, 1), z=2)  # the default
    assert sum(isinstance(layer, FusedBatchNormalization) for layer in model.layers) == 18
    keras_layers = build_cunet(input_shape=(32, 32, 1), z=2, fused_batch_norm=False).layers
    assert sum(type(layer) is keras.layers.BatchNormalization for layer in keras_layers) == 18
    model.save(tmp_path / "fused.keras")
    loaded = keras.saving.load_model(tmp_path / "fused.keras", safe_mode=True)
    image = np.zeros((1, 32, 32, 1), "float32")
    np.testing.assert_array_equal(loaded.predict(image, verbose=0), model.predict(image, verbose=0))
