"""A 2D U-Net (Ronneberger et al., MICCAI 2015) and the Dice losses used to train it.

The network maps a [H, W, channels] slice to per-pixel tumor probabilities. Its encoder halves
the resolution DEPTH times while doubling the filters; the decoder mirrors it and concatenates
the encoder features of the same resolution, which is what lets a U-Net draw sharp borders.
"""
import math

import keras
import tensorflow as tf
from keras import layers, ops

from brainseg import metrics

# Added to the Dice numerator and denominator in training (loss and per-epoch figures), so
# they stay defined and differentiable on batches without tumor; the case scores of
# brainseg/metrics.py use none (metrics.dice_from_sums is the one formula for both).
SMOOTH = 1.0

# The output layer's bias starts at the logit of this probability, not at 0 (probability 0.5):
# tumor is a few percent of a slice's pixels, so the network starts where the data are (the
# "prior probability" initialization of Lin et al., Focal Loss, 2017). It matters with batch
# normalization: every layer's output is renormalized, so the logits can only grow as fast as
# Adam moves the last layer (about one learning rate per step). From 0.5, the background was
# still at probability 0.34 after 60 steps on the realistic cases, and the loss took about 5
# of 12 epochs to come down; from 0.01 it is at 0.01 from the start (loss after 60 steps:
# 1.40 -> 0.48, the same as without batch normalization).
OUTPUT_PRIOR = 0.01

# Weight of the old value in batch normalization's moving averages, which replace the batch
# statistics outside training (validation, inference). Keras' default, 0.99, forgets its
# starting point (mean 0, variance 1) over a few hundred steps: the realistic benchmark's
# validation Dice was 0.03 and 0.02 after epochs 1 and 2 (45 steps each) while the training
# Dice was 0.61 and 0.80, and the demo (4 epochs) ends before the averages settle. 0.9 (the
# default of PyTorch and of nnU-Net's normalization layers) follows within about 20 steps.
BATCH_NORM_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="brainseg")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization, trained with TensorFlow's fused kernel.

    Keras 3 normalizes a batch with a dozen element-wise ops (moments, then scale and shift)
    and as many again for their gradients: measured, more time than the optimizer, the loss
    and every ReLU together. FusedBatchNormV3 (oneDNN's batch normalization on CPUs) does
    each direction in one pass. Same mathematics, same weights: outside training, and for
    anything but channels-last 4-D input, it is Keras' own layer, and exported models hold
    plain BatchNormalization layers (STOCK_LAYER, used by hardware.in_precision), so a
    checkpoint for inference loads in any Keras without this module."""

    STOCK_LAYER = layers.BatchNormalization

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.axis not in (-1, 3) \
                or len(inputs.shape) != 4 or not (self.center and self.scale):
            return super().call(inputs, training=training, mask=mask)
        # The kernel takes bfloat16 activations as they are and computes the statistics in
        # float32, as Keras does: casting them to float32 and back first gave bit-identical
        # results at twice the time (32 bfloat16 slices of 128x128x16: 12.4 -> 6.4 ms
        # forward and backward on the EPYC).
        if inputs.dtype != tf.bfloat16:
            inputs = tf.cast(inputs, "float32")
        normalized, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, tf.cast(self.gamma, "float32"), tf.cast(self.beta, "float32"),
            epsilon=self.epsilon, data_format="NHWC", is_training=True)
        self.moving_mean.assign(self.moving_mean * self.momentum
                                + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum
                                    + variance * (1.0 - self.momentum))
        return tf.cast(normalized, self.compute_dtype)


@keras.saving.register_keras_serializable(package="brainseg")
class TransposedConvolution(layers.Conv2DTranspose):
    """Keras' Conv2DTranspose, whose bias gradient is summed in float32.

    Under mixed_bfloat16 TensorFlow sums a bias gradient (BiasAddGrad) in bfloat16, with its
    8 bits of mantissa, over every pixel of the batch: measured on a trained model's
    up-sampling layers (a batch of 32 slices, 8,192 to 524,288 values per channel), the sum's
    error was 4 to 67 times the gradient itself (median over channels), the result at a
    cosine of -0.32 to 0.33 to the exact one: Adam followed noise. Summed in float32 it is
    exact to 2e-2 at worst, and 4x faster on the largest layer (8.8 -> 2.3 ms). The forward
    pass and the other gradients are the stock layer's, and exported models hold the stock
    layer (STOCK_LAYER). In float32 this is the stock layer."""

    STOCK_LAYER = layers.Conv2DTranspose

    def call(self, inputs):
        if not self.use_bias or self.compute_dtype == "float32" \
                or self.data_format != "channels_last":
            return super().call(inputs)
        outputs = ops.conv_transpose(
            inputs, self.kernel, strides=list(self.strides), padding=self.padding,
            output_padding=self.output_padding, dilation_rate=self.dilation_rate,
            data_format=self.data_format)
        outputs = add_bias_summing_its_gradient_in_float32(
            outputs, ops.cast(self.bias, outputs.dtype))
        return outputs if self.activation is None else self.activation(outputs)


@tf.custom_gradient
def add_bias_summing_its_gradient_in_float32(outputs, bias):
    """tf.nn.bias_add (channels last), with the bias gradient summed in float32 and rounded
    to the bias's type once, at the end."""
    def gradient(upstream):
        per_channel = tf.reshape(upstream, (-1, upstream.shape[-1]))
        return upstream, tf.cast(tf.reduce_sum(tf.cast(per_channel, "float32"), 0), bias.dtype)
    return tf.nn.bias_add(outputs, bias), gradient


def conv_block(x, filters, use_batch_norm, name, fused_batch_norm=True):
    """Two 3x3 convolutions, each followed by ReLU (and batch normalization if asked)."""
    batch_norm = FusedBatchNormalization if fused_batch_norm else layers.BatchNormalization
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not use_batch_norm,
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        if use_batch_norm:
            x = batch_norm(momentum=BATCH_NORM_MOMENTUM, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def upsample(x, filters, use_transposed_conv, name):
    """Doubles the resolution: a learned transposed convolution, or nearest-neighbour
    up-sampling followed by a 2x2 convolution (no checkerboard artefacts)."""
    if use_transposed_conv:
        return TransposedConvolution(filters, 2, strides=2, padding="same", name=f"{name}_up")(x)
    x = layers.UpSampling2D(2, name=f"{name}_up")(x)
    return layers.Conv2D(filters, 2, padding="same", activation="relu", name=f"{name}_upconv")(x)


def build_unet(image_size=128, channels=4, num_classes=1, base_filters=16, depth=4,
               use_transposed_conv=True, use_batch_norm=False, dropout=0.0,
               fused_batch_norm=True):
    """Returns an uncompiled Keras U-Net with a sigmoid output per class. fused_batch_norm
    False trains with Keras' own (element-wise) batch normalization, for comparison."""
    if image_size % (2 ** depth):
        raise ValueError(f"image_size {image_size} must be divisible by 2**depth = {2 ** depth}")
    inputs = keras.Input((image_size, image_size, channels), name="mri")
    x = inputs
    skips = []
    for level in range(depth):
        x = conv_block(x, base_filters * 2 ** level, use_batch_norm, f"down{level}",
                       fused_batch_norm)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = conv_block(x, base_filters * 2 ** depth, use_batch_norm, "bottleneck",
                   fused_batch_norm)
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth)):
        filters = base_filters * 2 ** level
        x = upsample(x, filters, use_transposed_conv, f"up{level}")
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = conv_block(x, filters, use_batch_norm, f"up{level}", fused_batch_norm)
    # float32 output even under mixed precision: sigmoid and losses need the range.
    prior_logit = math.log(OUTPUT_PRIOR / (1 - OUTPUT_PRIOR))
    outputs = layers.Conv2D(num_classes, 1, activation="sigmoid", dtype="float32",
                            bias_initializer=keras.initializers.Constant(prior_logit),
                            name="tumor_probability")(x)
    return keras.Model(inputs, outputs, name="unet")


def overlap_sums(y_true, y_pred, per_region=False):
    """(intersection, true mask size, predicted mask size), summed over the batch (not
    averaged per image, so slices without tumor do not dominate, and so sums from several
    ranks can be added): three numbers, or with per_region three vectors of one sum per
    region (channel)."""
    axis = (0, 1, 2) if per_region else None
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    return (ops.sum(y_true * y_pred, axis=axis), ops.sum(y_true, axis=axis),
            ops.sum(y_pred, axis=axis))


def dice_sums(y_true, y_pred, per_region=False):
    """Intersection and total mask size (overlap_sums), the two sums of a Dice."""
    intersection, true_size, predicted_size = overlap_sums(y_true, y_pred, per_region)
    return intersection, true_size + predicted_size


def thresholded_dice_sums(y_true, probabilities, threshold=0.5, per_region=True):
    """dice_sums of the prediction thresholded at `threshold`: per region, the sums behind
    the Dice figures that training and validation print (added up over batches and ranks)."""
    predicted = ops.cast(ops.cast(probabilities, "float32") > threshold, "float32")
    return dice_sums(y_true, predicted, per_region)


def dice_coefficient(y_true, y_pred, threshold=0.5):
    """Hard Dice of the thresholded prediction over a batch, smoothed."""
    return metrics.dice_from_sums(*thresholded_dice_sums(y_true, y_pred, threshold,
                                                         per_region=False), SMOOTH)


def soft_dice_loss(y_true, y_pred, per_region=False, false_negative_weight=0.5):
    """1 - soft Dice on probabilities: differentiable, and insensitive to class imbalance
    (tumor is a few percent of the pixels). per_region: 1 - the mean of one soft Dice per
    region. The BraTS regions are nested and of very different sizes (enhancing tumor is a
    few percent of the whole tumor), so in one Dice pooled over the channels the whole tumor
    decides nearly everything and the enhancing tumor barely counts.

    false_negative_weight: the Tversky index's share of missed pixels (Salehi et al. 2017),
    2|A and B| / (2 (1 - w) |B| + 2 w |A|) for truth A and prediction B. 0.5 is Dice; above it
    a missed tumor pixel costs more than a false alarm, for a model that under-segments."""
    intersection, true_size, predicted_size = overlap_sums(y_true, y_pred, per_region)
    weighted_total = 2.0 * ((1.0 - false_negative_weight) * predicted_size
                            + false_negative_weight * true_size)
    return 1.0 - ops.mean(metrics.dice_from_sums(intersection, weighted_total, SMOOTH))


def bce_dice_loss(y_true, y_pred, per_region=False, false_negative_weight=0.5):
    """Binary cross-entropy + soft Dice: BCE gives well-behaved per-pixel gradients early
    in training, Dice keeps the small tumor class from being ignored.

    Computed from the logits Keras keeps on a sigmoid's output, as keras.losses'
    binary_crossentropy does (exact where a probability rounds to 0 or 1), so y_pred should
    be the model's output; other probabilities are turned back into logits."""
    logits = getattr(y_pred, "_keras_logits", None)
    if logits is None:
        epsilon = keras.config.epsilon()  # the clip of Keras' own binary_crossentropy
        probabilities = ops.clip(ops.cast(y_pred, "float32"), epsilon, 1.0 - epsilon)
        logits = ops.log(probabilities) - ops.log1p(-probabilities)
    return bce_dice_loss_from_logits(y_true, logits, per_region, false_negative_weight)


@tf.function(jit_compile=True)
def bce_dice_loss_from_logits(y_true, logits, per_region=False, false_negative_weight=0.5):
    """bce_dice_loss as one XLA-compiled function: some fifty small element-wise ops and sums
    over every pixel of the batch (17 ms of a 300 ms bfloat16 training step), forward and
    backward, become a few fused loops. It holds no Horovod op, which XLA cannot compile
    here (README, "Checkpoints, resume and early stopping")."""
    y_true = ops.cast(y_true, "float32")
    logits = ops.cast(logits, "float32")
    bce = ops.mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=logits))
    return bce + soft_dice_loss(y_true, ops.sigmoid(logits), per_region, false_negative_weight)
