"""model.py: U-Net shapes and variants, and Dice / loss values on masks with known answers."""
import numpy as np
import pytest

import model as unet
from brainseg import metrics


@pytest.mark.parametrize("transposed,batch_norm,dropout", [(True, False, 0.0),
                                                           (False, True, 0.3)])
def test_unet_maps_slices_to_probabilities_of_the_same_size(transposed, batch_norm, dropout):
    net = unet.build_unet(image_size=32, channels=4, num_classes=1, base_filters=4, depth=3,
                          use_transposed_conv=transposed, use_batch_norm=batch_norm,
                          dropout=dropout)
    probabilities = np.asarray(net(np.random.default_rng(0).random((2, 32, 32, 4))))
    assert probabilities.shape == (2, 32, 32, 1)
    assert probabilities.min() >= 0 and probabilities.max() <= 1
    assert any("batch_normalization" in type(layer).__name__.lower() or "_bn" in layer.name
               for layer in net.layers) == batch_norm


def test_filters_double_at_every_level():
    net = unet.build_unet(image_size=32, base_filters=8, depth=2)
    assert net.get_layer("down0_conv1").filters == 8
    assert net.get_layer("down1_conv1").filters == 16
    assert net.get_layer("bottleneck_conv1").filters == 32


def test_image_size_must_survive_every_halving():
    with pytest.raises(ValueError, match="divisible"):
        unet.build_unet(image_size=36, depth=3)


def masks(*pixels, size=4):
    mask = np.zeros((1, size, size, 1), np.float32)
    for row, col in pixels:
        mask[0, row, col, 0] = 1
    return mask


def test_dice_on_known_overlaps():
    truth = masks((0, 0), (0, 1), (1, 0), (1, 1))
    half = masks((0, 0), (0, 1), (3, 3), (3, 2))
    smooth = unet.SMOOTH
    assert float(unet.dice_coefficient(truth, truth)) == pytest.approx(1.0)
    assert float(unet.dice_coefficient(truth, half)) == pytest.approx((4 + smooth) / (8 + smooth))
    assert float(unet.dice_coefficient(truth, masks((3, 3)))) == pytest.approx(
        smooth / (5 + smooth))
    assert float(unet.dice_coefficient(masks(), masks())) == 1.0  # both empty: perfect
    assert metrics.dice_from_sums(2, 8, smooth) == pytest.approx((4 + smooth) / (8 + smooth))


def test_dice_thresholds_probabilities():
    truth = masks((0, 0), (0, 1))
    probabilities = truth * 0.6 + 0.3  # 0.9 on the tumor, 0.3 elsewhere
    assert float(unet.dice_coefficient(truth, probabilities)) == pytest.approx(1.0)


def test_soft_dice_loss_values():
    truth = masks((0, 0), (0, 1), (1, 0), (1, 1))
    assert float(unet.soft_dice_loss(truth, truth)) == pytest.approx(0.0)
    assert float(unet.soft_dice_loss(truth, masks())) == pytest.approx(1 - 1 / (4 + unet.SMOOTH))
    halfway = np.full_like(truth, 0.5)  # intersection 2, total 4 + 8
    assert float(unet.soft_dice_loss(truth, halfway)) == pytest.approx(1 - 5 / 13)


def test_bce_dice_loss_adds_cross_entropy():
    truth = masks((0, 0), (0, 1))
    prediction = np.clip(truth, 0.1, 0.9)
    bce = -np.mean(truth * np.log(prediction) + (1 - truth) * np.log(1 - prediction))
    expected = bce + float(unet.soft_dice_loss(truth, prediction))
    assert float(unet.bce_dice_loss(truth, prediction)) == pytest.approx(expected, rel=1e-4)
    assert float(unet.bce_dice_loss(truth, truth)) < 1e-3


def test_the_compiled_loss_on_a_sigmoid_output_is_the_loss_written_out_op_by_op():
    """bce_dice_loss runs XLA-compiled on the logits Keras keeps on the model's sigmoid output.
    Its value and its gradient with respect to those logits must be those of the loss
    written out as separate ops, including where a probability rounds to 0 or 1 (logits of
    +-30), where a loss taken from the probabilities has lost its gradient."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(3)
    truth = (rng.random((2, 16, 16, 3)) > 0.7).astype(np.uint8)
    logits = tf.constant(rng.normal(0, 3, (2, 16, 16, 3)).astype(np.float32))
    logits = tf.tensor_scatter_nd_update(logits, [[0, 0, 0, 0], [0, 0, 1, 0]], [30.0, -30.0])
    truth[0, 0, :2, 0] = (0, 1)  # both saturated pixels wrong: they must still be pushed back

    def written_out(logits):
        y, p = truth.astype(np.float32), tf.sigmoid(logits)
        bce = tf.reduce_mean(tf.maximum(logits, 0) - logits * y
                             + tf.math.log1p(tf.exp(-tf.abs(logits))))
        intersection = tf.reduce_sum(y * p, axis=(0, 1, 2))
        total = tf.reduce_sum(y, axis=(0, 1, 2)) + tf.reduce_sum(p, axis=(0, 1, 2))
        return bce + 1 - tf.reduce_mean((2 * intersection + unet.SMOOTH) / (total + unet.SMOOTH))

    def compiled(logits):
        probabilities = keras.activations.sigmoid(logits)  # carries _keras_logits
        return unet.bce_dice_loss(truth, probabilities, per_region=True)

    values, gradients = [], []
    for loss_of in (written_out, compiled):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            loss = loss_of(logits)
        values.append(float(loss))
        gradients.append(tape.gradient(loss, logits).numpy())
    assert values[1] == pytest.approx(values[0], rel=1e-6)
    np.testing.assert_allclose(gradients[1], gradients[0], rtol=1e-5, atol=1e-9)
    n = truth.size  # each saturated wrong pixel: the cross-entropy's (p - y) / n
    assert gradients[1][0, 0, 0, 0] > 0.9 / n and gradients[1][0, 0, 1, 0] < -0.9 / n


def test_per_region_dice_loss_weighs_every_region_equally():
    """A large region found perfectly and a small one missed: one Dice pooled over both
    hardly notices the miss; the mean of per-region Dice terms halves the score."""
    truth = np.zeros((1, 8, 8, 2), np.float32)
    truth[0, :, :6, 0] = 1  # 48 pixels of "whole tumor"
    truth[0, :2, 6:, 1] = 1  # 4 pixels of "enhancing tumor"
    prediction = truth.copy()
    prediction[..., 1] = 0  # the small region missed
    pooled = float(unet.soft_dice_loss(truth, prediction))
    per_region = float(unet.soft_dice_loss(truth, prediction, per_region=True))
    each = [float(unet.soft_dice_loss(truth[..., k:k + 1], prediction[..., k:k + 1]))
            for k in range(2)]
    assert per_region == pytest.approx(np.mean(each))
    assert pooled < 0.05 and per_region > 0.35  # (1 - 97/101) against (0 + (1 - 1/5)) / 2
    single = truth[..., :1]  # with one region both are the same loss
    assert float(unet.soft_dice_loss(single, prediction[..., :1], per_region=True)) == \
        pytest.approx(float(unet.soft_dice_loss(single, prediction[..., :1])))


def test_false_negative_weight_makes_a_miss_cost_more_than_a_false_alarm():
    """The Tversky index: at 0.5 it is the Dice loss itself; above 0.5 a prediction that
    misses 2 of 6 tumor pixels loses more than one that adds 2 false pixels, which Dice
    scores alike (2*4/10 against 2*6/14 apart from the smoothing)."""
    truth = masks((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1))
    missed = masks((0, 0), (0, 1), (1, 0), (1, 1))
    false_alarm = masks((0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1))
    for prediction in (missed, false_alarm, np.full_like(truth, 0.3)):
        assert float(unet.soft_dice_loss(truth, prediction, false_negative_weight=0.5)) == \
            pytest.approx(float(unet.soft_dice_loss(truth, prediction)))
    weighted = {name: float(unet.soft_dice_loss(truth, prediction, false_negative_weight=0.7))
                for name, prediction in (("missed", missed), ("false_alarm", false_alarm))}
    s = unet.SMOOTH  # 1 - (2 TP + s) / (2 (0.3 |prediction| + 0.7 |truth|) + s)
    assert weighted["missed"] == pytest.approx(1 - (8 + s) / (2 * (0.3 * 4 + 0.7 * 6) + s))
    assert weighted["false_alarm"] == pytest.approx(1 - (12 + s) / (2 * (0.3 * 8 + 0.7 * 6) + s))
    assert weighted["missed"] > weighted["false_alarm"] + 0.1
    assert float(unet.soft_dice_loss(truth, truth, false_negative_weight=0.7)) == \
        pytest.approx(0.0)
    with_bce = float(unet.bce_dice_loss(truth, np.clip(missed, 0.1, 0.9), per_region=True,
                                        false_negative_weight=0.7))
    assert with_bce > float(unet.bce_dice_loss(truth, np.clip(missed, 0.1, 0.9), per_region=True))


def test_an_untrained_network_starts_near_the_tumor_prior_not_at_one_half():
    """Tumor is a few percent of the pixels: the output bias starts at that prior, so the
    first steps are not spent pushing every background pixel down from 0.5 (slow with batch
    normalization, which renormalizes every layer)."""
    net = unet.build_unet(image_size=32, channels=4, num_classes=3, base_filters=8, depth=2,
                          use_batch_norm=True)
    probabilities = np.asarray(net(np.random.default_rng(0).normal(size=(4, 32, 32, 4))))
    assert np.median(probabilities) < 5 * unet.OUTPUT_PRIOR
    np.testing.assert_allclose(1 / (1 + np.exp(-net.get_layer("tumor_probability").bias)),
                               unet.OUTPUT_PRIOR, rtol=1e-5)


def test_fused_batch_normalization_trains_like_keras_own():
    """The fused kernel is a speed-up, not a change: the same outputs, gradients and moving
    statistics as Keras' element-wise layer (up to rounding and Bessel's correction of the
    batch variance, a factor 1 + 1/(N - 1) with N = 2 x 8 x 8 here), and the same layer
    outside training."""
    import tensorflow as tf
    import keras

    images = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, (2, 8, 8, 5)), tf.float32)
    layers = {"fused": unet.FusedBatchNormalization(momentum=0.9),
              "keras": keras.layers.BatchNormalization(momentum=0.9)}
    outputs, gradients = {}, {}
    for name, layer in layers.items():
        layer.build(images.shape)
        layer.gamma.assign(np.linspace(0.5, 1.5, 5))
        layer.beta.assign(np.linspace(-1, 1, 5))
        with tf.GradientTape() as tape:
            tape.watch(images)
            outputs[name] = layer(images, training=True)
            loss = tf.reduce_sum(outputs[name] * tf.range(5, dtype=tf.float32))
        gradients[name] = tape.gradient(loss, [images, layer.gamma, layer.beta])
    np.testing.assert_allclose(outputs["fused"], outputs["keras"], atol=1e-4)
    for fused, plain in zip(gradients["fused"], gradients["keras"]):
        np.testing.assert_allclose(fused, plain, atol=1e-3)
    np.testing.assert_allclose(layers["fused"].moving_mean, layers["keras"].moving_mean,
                               rtol=1e-5)
    n = 2 * 8 * 8  # values per channel; moving variance = 0.9 x 1 + 0.1 x batch variance
    keras_batch_variance = (np.asarray(layers["keras"].moving_variance) - 0.9) / 0.1
    np.testing.assert_allclose(layers["fused"].moving_variance,
                               0.9 + 0.1 * keras_batch_variance * n / (n - 1), rtol=1e-4)
    layers["keras"].moving_variance.assign(layers["fused"].moving_variance)
    np.testing.assert_allclose(layers["fused"](images, training=False),
                               layers["keras"](images, training=False), atol=1e-5)


def test_fused_batch_normalization_takes_bfloat16_activations_as_they_are():
    """Under mixed_bfloat16 the kernel gets the bfloat16 activations themselves (casting them
    to float32 and back took half of batch normalization's time), and the outputs, gradients
    and moving statistics are exactly those of the float32 computation rounded to bfloat16."""
    import tensorflow as tf

    images = tf.cast(np.random.default_rng(0).normal(2.0, 3.0, (2, 8, 8, 5)), tf.bfloat16)
    layer = unet.FusedBatchNormalization(momentum=0.9, dtype="mixed_bfloat16")
    layer.build(images.shape)
    layer.gamma.assign(np.linspace(0.5, 1.5, 5))
    layer.beta.assign(np.linspace(-1, 1, 5))
    weights = tf.range(5, dtype=tf.float32)

    with tf.GradientTape() as tape:
        tape.watch(images)
        outputs = layer(images, training=True)
        loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * weights)
    gradients = tape.gradient(loss, [images, layer.gamma, layer.beta])

    gamma, beta = tf.Variable(layer.gamma), tf.Variable(layer.beta)
    with tf.GradientTape() as tape:
        tape.watch(images)
        expected, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            tf.cast(images, tf.float32), gamma, beta, epsilon=layer.epsilon, is_training=True)
        expected = tf.cast(expected, tf.bfloat16)
        loss = tf.reduce_sum(tf.cast(expected, tf.float32) * weights)
    expected_gradients = tape.gradient(loss, [images, gamma, beta])

    assert outputs.dtype == tf.bfloat16
    np.testing.assert_array_equal(tf.cast(outputs, tf.float32), tf.cast(expected, tf.float32))
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        np.testing.assert_array_equal(tf.cast(gradient, tf.float32),
                                      tf.cast(expected_gradient, tf.float32))
    np.testing.assert_array_equal(layer.moving_mean, 0.1 * mean)
    np.testing.assert_array_equal(layer.moving_variance, 0.9 + 0.1 * variance)

    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(
        tf.TensorSpec(images.shape, tf.bfloat16)).graph
    kernels = [op for op in graph.get_operations() if op.type == "FusedBatchNormV3"]
    assert [op.get_attr("T") for op in kernels] == [tf.bfloat16]


def test_transposed_convolution_sums_its_bias_gradient_in_float32():
    """Under mixed_bfloat16 the bias gradient (16,384 values per channel here) is the exact
    sum to bfloat16's rounding, where TensorFlow's bfloat16 sum is far off; the outputs and
    the other gradients are the stock layer's, bit for bit."""
    import keras
    import tensorflow as tf

    ours, stock = (cls(8, 2, strides=2, padding="same", dtype="mixed_bfloat16")
                   for cls in (unet.TransposedConvolution, keras.layers.Conv2DTranspose))
    for layer in (ours, stock):
        layer.build((None, 32, 32, 4))
    ours.kernel.assign(np.random.default_rng(0).normal(0, 0.3, ours.kernel.shape))
    ours.bias.assign(np.linspace(-1, 1, 8))
    stock.set_weights(ours.get_weights())

    rng = np.random.default_rng(1)
    images = tf.cast(rng.normal(size=(4, 32, 32, 4)), tf.bfloat16)
    upstream = tf.constant(rng.uniform(0.5, 1.5, (4, 64, 64, 8)), tf.float32)
    results = []
    for layer in (ours, stock):
        with tf.GradientTape() as tape:
            tape.watch(images)
            outputs = layer(images)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * upstream)
        gradients = tape.gradient(loss, [images, layer.kernel, layer.bias])
        results.append([np.asarray(tf.cast(t, tf.float32)) for t in (outputs, *gradients)])
    (outputs, image_gradient, kernel_gradient, bias_gradient), of_stock = results
    exact = np.asarray(tf.cast(upstream, tf.bfloat16), np.float64).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(bias_gradient, exact, rtol=2 ** -8)
    assert np.max(np.abs(of_stock[3] - exact) / exact) > 0.05  # what the stock layer gives
    for mine, theirs in zip((outputs, image_gradient, kernel_gradient), of_stock):
        np.testing.assert_array_equal(mine, theirs)


def test_exported_models_hold_stock_keras_layers_only(tmp_path):
    """A checkpoint for inference must load in any Keras: the fused layer exports as Keras'
    own BatchNormalization, with its weights."""
    import json
    import zipfile

    from brainseg import checkpoints

    net = unet.build_unet(image_size=16, channels=2, num_classes=3, base_filters=4, depth=2,
                          use_batch_norm=True)
    assert type(net.get_layer("down0_bn1")) is unet.FusedBatchNormalization
    assert type(net.get_layer("up0_up")) is unet.TransposedConvolution
    path = str(tmp_path / "model.keras")
    checkpoints.export_for_inference(net, path)
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    classes = {layer["class_name"] for layer in config["config"]["layers"]}
    assert {"BatchNormalization", "Conv2DTranspose"} <= classes
    assert not {"FusedBatchNormalization", "TransposedConvolution"} & classes
    assert "brainseg" not in json.dumps(config)
