"""A 2D U-Net (Ronneberger et al., MICCAI 2015) and the Dice losses used to train it.

The network maps a [H, W, channels] slice to per-pixel tumor probabilities. Its encoder halves
the resolution DEPTH times while doubling the filters; the decoder mirrors it and concatenates
the encoder features of the same resolution, which is what lets a U-Net draw sharp borders.
"""
import keras
from keras import layers, ops

SMOOTH = 1.0  # added to Dice numerator and denominator: defined (=1) when both masks are empty
PRECISIONS = ("auto", "float32", "mixed_bfloat16")
# Only AMX makes bfloat16 training faster than float32. Measured on this project's 2-core
# VM, whose CPU has AVX512_BF16 but no AMX (bench/training.py, reference U-Net, batch 16,
# 2 threads): mixed_bfloat16 trains at 0.67x float32, because oneDNN's avx512_core_bf16
# convolutions themselves take 1.62x the time of its float32 avx512_core ones (casts and
# layout reorders: 6 ms of a 290 ms step in both). AMX tiles (Sapphire Rapids and later)
# roughly double the float32 rate.
FAST_BF16_CPU_FLAGS = ("amx_bf16",)


def cpu_flags(cpuinfo_path="/proc/cpuinfo"):
    """The CPU feature flags Linux lists in /proc/cpuinfo; empty elsewhere."""
    try:
        with open(cpuinfo_path) as file:
            return {word for line in file if line.startswith("flags") for word in line.split()}
    except OSError:  # not Linux: no way to tell
        return set()


def cpu_supports_bfloat16(cpuinfo_path="/proc/cpuinfo"):
    """True when the CPU does bfloat16 arithmetic in hardware (AVX512_BF16 or AMX-BF16),
    whether or not that is faster than float32 (see cpu_has_fast_bfloat16)."""
    return bool(cpu_flags(cpuinfo_path) & {"avx512_bf16", "amx_bf16"})


def cpu_has_fast_bfloat16(cpuinfo_path="/proc/cpuinfo"):
    """True when /proc/cpuinfo lists AMX-BF16: bfloat16 matrix tiles, where mixed precision
    pays. With AVX512_BF16 alone it is slower than float32 (see FAST_BF16_CPU_FLAGS), and
    without either TensorFlow emulates bfloat16."""
    return bool(cpu_flags(cpuinfo_path) & set(FAST_BF16_CPU_FLAGS))


def resolve_precision(precision, cpuinfo_path="/proc/cpuinfo"):
    """The Keras dtype policy name for a PRECISION setting: 'auto' becomes mixed_bfloat16
    when the CPU has AMX-BF16, float32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "mixed_bfloat16" if cpu_has_fast_bfloat16(cpuinfo_path) else "float32"
    return precision


def set_precision(precision):
    """Sets the global Keras dtype policy; call it before building the model. Under
    mixed_bfloat16 layers compute in bfloat16 but keep float32 weights (the optimizer updates
    those), the output layer is float32 (see build_unet) and the losses cast to float32. No
    loss scaling: bfloat16 has float32's exponent range, so gradients do not underflow."""
    policy = resolve_precision(precision)
    keras.mixed_precision.set_dtype_policy(policy)
    return policy


def forward_flops_per_slice(model):
    """Multiply-adds x 2 of the convolutions (all but a fraction of a percent of a U-Net's
    arithmetic) for one slice through the network. Training costs about 3x this (forward,
    gradient of the input, gradient of the weights)."""
    flops = 0
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, layers.Conv2DTranspose)):
            kernel = layer.kernel.shape  # (kh, kw, in, out) for both kinds
            grid = layer.input.shape if isinstance(layer, layers.Conv2DTranspose) \
                else layer.output.shape  # a transposed conv applies its kernel per input pixel
            flops += 2 * grid[1] * grid[2] * kernel[0] * kernel[1] * kernel[2] * kernel[3]
    return flops


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
    outputs = layers.Conv2D(num_classes, 1, activation="sigmoid", dtype="float32",
                            name="tumor_probability")(x)
    return keras.Model(inputs, outputs, name="unet")


def dice_sums(y_true, y_pred):
    """Intersection and total mask size over the batch: summed, not averaged per image,
    so slices without tumor do not dominate, and so sums from several ranks can be added."""
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    return ops.sum(y_true * y_pred), ops.sum(y_true) + ops.sum(y_pred)


def dice_from_sums(intersection, total):
    """Dice = 2|A and B| / (|A| + |B|), smoothed; the one formula behind every Dice reported."""
    return float((2.0 * intersection + SMOOTH) / (total + SMOOTH))


def dice_coefficient(y_true, y_pred, threshold=0.5):
    """Hard Dice of the thresholded prediction: the quality metric reported everywhere."""
    y_pred = ops.cast(ops.cast(y_pred, "float32") > threshold, "float32")
    intersection, total = dice_sums(y_true, y_pred)
    return (2.0 * intersection + SMOOTH) / (total + SMOOTH)


def soft_dice_loss(y_true, y_pred):
    """1 - soft Dice on probabilities: differentiable, and insensitive to class imbalance
    (tumor is a few percent of the pixels)."""
    intersection, total = dice_sums(y_true, y_pred)
    return 1.0 - (2.0 * intersection + SMOOTH) / (total + SMOOTH)


def bce_dice_loss(y_true, y_pred):
    """Binary cross-entropy + soft Dice: BCE gives well-behaved per-pixel gradients early
    in training, Dice keeps the small tumor class from being ignored."""
    bce = ops.mean(keras.losses.binary_crossentropy(
        ops.cast(y_true, "float32"), ops.cast(y_pred, "float32")))
    return bce + soft_dice_loss(y_true, y_pred)
