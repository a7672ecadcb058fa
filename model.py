"""A 2D U-Net (Ronneberger et al., MICCAI 2015) and the Dice losses used to train it.

The network maps a [H, W, channels] slice to per-pixel tumor probabilities. Its encoder halves
the resolution DEPTH times while doubling the filters; the decoder mirrors it and concatenates
the encoder features of the same resolution, which is what lets a U-Net draw sharp borders.
"""
import math

import keras
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


def conv_block(x, filters, use_batch_norm, name):
    """Two 3x3 convolutions, each followed by ReLU (and batch normalization if asked)."""
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not use_batch_norm,
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        if use_batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def upsample(x, filters, use_transposed_conv, name):
    """Doubles the resolution: a learned transposed convolution, or nearest-neighbour
    up-sampling followed by a 2x2 convolution (no checkerboard artefacts)."""
    if use_transposed_conv:
        return layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_up")(x)
    x = layers.UpSampling2D(2, name=f"{name}_up")(x)
    return layers.Conv2D(filters, 2, padding="same", activation="relu", name=f"{name}_upconv")(x)


def build_unet(image_size=128, channels=4, num_classes=1, base_filters=16, depth=4,
               use_transposed_conv=True, use_batch_norm=False, dropout=0.0):
    """Returns an uncompiled Keras U-Net with a sigmoid output per class."""
    if image_size % (2 ** depth):
        raise ValueError(f"image_size {image_size} must be divisible by 2**depth = {2 ** depth}")
    inputs = keras.Input((image_size, image_size, channels), name="mri")
    x = inputs
    skips = []
    for level in range(depth):
        x = conv_block(x, base_filters * 2 ** level, use_batch_norm, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = conv_block(x, base_filters * 2 ** depth, use_batch_norm, "bottleneck")
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth)):
        filters = base_filters * 2 ** level
        x = upsample(x, filters, use_transposed_conv, f"up{level}")
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = conv_block(x, filters, use_batch_norm, f"up{level}")
    # float32 output even under mixed precision: sigmoid and losses need the range.
    prior_logit = math.log(OUTPUT_PRIOR / (1 - OUTPUT_PRIOR))
    outputs = layers.Conv2D(num_classes, 1, activation="sigmoid", dtype="float32",
                            bias_initializer=keras.initializers.Constant(prior_logit),
                            name="tumor_probability")(x)
    return keras.Model(inputs, outputs, name="unet")


def dice_sums(y_true, y_pred, per_region=False):
    """Intersection and total mask size, summed over the batch (not averaged per image, so
    slices without tumor do not dominate, and so sums from several ranks can be added): two
    numbers, or with per_region one pair per region (channel), vectors of length K."""
    axis = (0, 1, 2) if per_region else None
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    return (ops.sum(y_true * y_pred, axis=axis),
            ops.sum(y_true, axis=axis) + ops.sum(y_pred, axis=axis))


def dice_coefficient(y_true, y_pred, threshold=0.5):
    """Hard Dice of the thresholded prediction over a batch, smoothed."""
    y_pred = ops.cast(ops.cast(y_pred, "float32") > threshold, "float32")
    return metrics.dice_from_sums(*dice_sums(y_true, y_pred), SMOOTH)


def soft_dice_loss(y_true, y_pred, per_region=False):
    """1 - soft Dice on probabilities: differentiable, and insensitive to class imbalance
    (tumor is a few percent of the pixels). per_region: 1 - the mean of one soft Dice per
    region. The BraTS regions are nested and of very different sizes (enhancing tumor is a
    few percent of the whole tumor), so in one Dice pooled over the channels the whole tumor
    decides nearly everything and the enhancing tumor barely counts."""
    dice = metrics.dice_from_sums(*dice_sums(y_true, y_pred, per_region), SMOOTH)
    return 1.0 - ops.mean(dice)


def bce_dice_loss(y_true, y_pred, per_region=False):
    """Binary cross-entropy + soft Dice: BCE gives well-behaved per-pixel gradients early
    in training, Dice keeps the small tumor class from being ignored."""
    bce = ops.mean(keras.losses.binary_crossentropy(
        ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")))
    return bce + soft_dice_loss(y_true, y_pred, per_region)
