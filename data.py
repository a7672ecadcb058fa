"""Input pipeline: memory-mapped slice arrays -> one disjoint shard per rank -> tf.data batches.

The arrays written by converter.py can be far larger than memory (13 GB of images in the seed
project), so they are opened memory-mapped by brainseg.dataset.open_split (shape checks,
nothing read) and each sample is read from the file when the pipeline needs it. Every rank
must run the same number of steps per epoch: Horovod's allreduce waits for all ranks, and a
rank that stops early leaves the others waiting forever.
"""
import math
import mmap
import os

import numpy as np
import tensorflow as tf

from brainseg import context


def shard_indices(num_samples, rank, num_ranks):
    """Rank r gets samples r, r + num_ranks, ...: disjoint shards that together cover every
    sample, each holding slices of every patient (consecutive rows are one patient)."""
    return np.arange(rank, num_samples, num_ranks)


def steps_per_epoch(num_samples, num_ranks, batch_size, min_samples=0):
    """Steps every rank runs per epoch: enough for the largest shard to be seen once, and for
    the ranks together to draw at least `min_samples` slices (a small dataset is then seen
    more than once per epoch, as nnU-Net fixes an epoch's iterations rather than its data).
    Smaller shards wrap around (the dataset repeats), so no rank finishes early and hangs the
    rest."""
    largest_shard = math.ceil(num_samples / num_ranks)
    return max(1, math.ceil(largest_shard / batch_size),
               math.ceil(min_samples / (num_ranks * batch_size)))


def row_reader(array):
    """A function i -> array[i] as float32. Rows of a memory-mapped .npy file are read with
    os.pread rather than through the map: every mapped page the process touches (and the
    kernel's read-around of its neighbours) counts as the process's resident memory until the
    mapping goes, so an epoch through the map would grow every rank's RSS by up to the size of
    the dataset. pread goes through the same page cache, which the kernel shares and evicts,
    but maps nothing. Arrays already in memory (small data, tests) are indexed."""
    if not is_file_map(array):
        # In memory, or a view of a map (its .offset is the parent's): index it.
        return lambda index: np.asarray(array[index], dtype=np.float32)
    if not array.flags.c_contiguous:
        raise ValueError(f"{array.filename}: rows must be stored contiguously (C order)")
    file = open(array.filename, "rb", buffering=0)  # closed with the reader

    def read(index):
        return pread_rows(file, array, int(index), 1)[0].astype(np.float32, copy=False)
    return read


def is_file_map(array):
    """True for an array memory-mapped from its .npy file (np.load(mmap_mode=...))."""
    return isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap)


def pread_rows(file, array, start, count):
    """Rows start .. start + count - 1 of a memory-mapped array, read from its open file
    with os.pread into a new array: through the page cache, nothing mapped."""
    rows = np.empty((count, *array.shape[1:]), array.dtype)
    if os.preadv(file.fileno(), [rows], array.offset + start * array[:1].nbytes) != rows.nbytes:
        where = f"row {start}" if count == 1 else f"rows {start}-{start + count - 1}"
        raise ValueError(f"{array.filename}: {where} ends past the end of the file "
                         f"(truncated?)")
    return rows


# The slices TUMOR_SAMPLE_SHARE draws from: a test of which of a block's [N, K] "region
# present" flags qualify. "unenhanced_core" needs the three regions (whole tumor, tumor core,
# enhancing tumor): a core without enhancement is a lower-grade glioma's, or the end of one
# with an enhancing rim, the slices where the benchmark's tumor core is missed most.
OVERSAMPLED_SLICES = {
    "tumor": lambda present: present.any(axis=1),
    "unenhanced_core": lambda present: present[:, 1] & ~present[:, 2],
}


def tumor_rows(msks, rows_per_read=4096, slices="tumor"):
    """Indices of the mask rows with any tumor pixel, or with the OVERSAMPLED_SLICES kind
    named by `slices`. Read in blocks with os.pread (see row_reader: a pass through the map
    would count the whole mask file as resident memory); 4096 rows of 128x128x3 masks are
    200 MB, read once at start-up."""
    if slices not in OVERSAMPLED_SLICES:
        raise ValueError(f"oversampled slices {slices!r}: expected one of "
                         f"{', '.join(OVERSAMPLED_SLICES)}")
    if slices == "unenhanced_core" and msks.shape[-1] != 3:
        raise ValueError(f"oversampled slices 'unenhanced_core' need the three regions' masks "
                         f"(LABEL_MODE = \"regions\"); these have {msks.shape[-1]} channel(s)")
    qualifies = OVERSAMPLED_SLICES[slices]

    def rows_in(block):
        return np.flatnonzero(qualifies(block.reshape(len(block), -1, block.shape[-1]).any(1)))
    if not is_file_map(msks):
        return rows_in(np.asarray(msks))
    found = [np.zeros(0, np.int64)]
    with open(msks.filename, "rb", buffering=0) as file:
        for start in range(0, len(msks), rows_per_read):
            found.append(start + rows_in(pread_rows(file, msks, start,
                                                    min(rows_per_read, len(msks) - start))))
    return np.concatenate(found)


def _reader(imgs, msks, neighbours=None):
    """A tf.data map function that reads sample i of the arrays. With a neighbour table
    (brainseg/context.py, 2.5D input) the image is row i stacked with its neighbouring rows
    as channels, one pread per distinct row; the mask is row i's."""
    read_image, read_mask = row_reader(imgs), row_reader(msks)
    image_shape = imgs.shape[1:]
    if neighbours is not None:
        read_row = read_image
        read_image = lambda index: context.assemble(read_row, neighbours[index])  # noqa: E731
        image_shape = (*imgs.shape[1:3], imgs.shape[3] * neighbours.shape[1])

    def read(index):
        return read_image(index), read_mask(index)

    def read_in_graph(index):
        image, mask = tf.numpy_function(read, [index], (tf.float32, tf.float32),
                                        stateful=False)
        image.set_shape(image_shape)
        mask.set_shape(msks.shape[1:])
        return image, mask
    return read_in_graph


def random_zoom_and_turn(image, mask, seed, max_scale, max_degrees):
    """Image and mask scaled about the slice centre by a factor drawn from [1 - max_scale,
    1 + max_scale] and turned by an angle drawn from +-max_degrees, as nnU-Net augments:
    tumors of other sizes and orientations than the few training cases have. The image is
    interpolated bilinearly with 0 (the background) outside; each mask channel too, then
    thresholded at 1/2, which keeps the regions nested (a weighted mean of nested binary
    masks is ordered the same way)."""
    scale_seed, angle_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    scale = 1 + tf.random.stateless_uniform([], scale_seed, -max_scale, max_scale)
    angle = tf.random.stateless_uniform([], angle_seed, -max_degrees, max_degrees) * math.pi / 180
    height, width = image.shape[0], image.shape[1]
    centre = tf.constant([(width - 1) / 2, (height - 1) / 2])
    # Output pixel (x, y) is read from input centre + R(angle) (x, y - centre) / scale.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    offset = centre - tf.stack([cos * centre[0] - sin * centre[1],
                                sin * centre[0] + cos * centre[1]])
    transform = tf.stack([cos, -sin, offset[0], sin, cos, offset[1], 0.0, 0.0])[tf.newaxis]
    channels = image.shape[-1]
    both = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.concat([image, tf.cast(mask, image.dtype)], axis=-1)[tf.newaxis],
        transforms=transform, output_shape=[height, width], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    return both[..., :channels], tf.cast(both[..., channels:] >= 0.5, mask.dtype)


def random_gamma(image, seed, max_gamma, modalities=None):
    """Each modality's brain pixels bent by a power curve, as nnU-Net augments contrast:
    rescaled to [0, 1] between their minimum and maximum, raised to a gamma drawn
    log-uniformly from [1 / (1 + max_gamma), 1 + max_gamma], scaled back, and then given
    their mean and standard deviation again (nnU-Net's retain_stats), so the z-score stays
    while lesions grow brighter or darker against grey matter, as another scanner or
    sequence shows them. The background stays 0. A 2.5D image (several slices of
    `modalities` channels) bends each modality alike on every slice."""
    channels = image.shape[-1]
    modalities = modalities or channels
    shape = tf.shape(image)
    pixels = tf.reshape(image, tf.concat([shape[:2], [channels // modalities, modalities]], 0))
    brain = tf.reduce_any(pixels != 0, axis=-1, keepdims=True)
    weight = tf.cast(brain, pixels.dtype)
    count = tf.maximum(tf.reduce_sum(weight), 1.0)
    axes = (0, 1, 2)

    def mean_and_std(values):
        mean = tf.reduce_sum(values * weight, axes) / count
        return mean, tf.sqrt(tf.reduce_sum(tf.square(values - mean) * weight, axes) / count)
    mean, std = mean_and_std(pixels)
    low = tf.reduce_min(tf.where(brain, pixels, pixels.dtype.max), axes)
    span = tf.maximum(tf.reduce_max(tf.where(brain, pixels, pixels.dtype.min), axes) - low,
                      1e-6)
    log_gamma = tf.random.stateless_uniform([modalities], seed, -math.log1p(max_gamma),
                                            math.log1p(max_gamma))
    bent = tf.pow(tf.clip_by_value((pixels - low) / span, 0.0, 1.0), tf.exp(log_gamma))
    bent_mean, bent_std = mean_and_std(bent)
    # A slice without brain has nothing to bend: its NaNs (0 / 0 above) are never selected.
    result = tf.where(brain, (bent - bent_mean) / tf.maximum(bent_std, 1e-6) * std + mean, 0.0)
    return tf.reshape(result, shape)


# A brain's mean intensity over its standard deviation, 2.7 to 4.5 on the four modalities of
# six phantom cases (CSF and tumor spread the values): what a z-scored pixel adds to undo the
# normalization's shift, so that a bias field can multiply the intensity.
BRAIN_MEAN_OVER_STD = 3.5
BIAS_FIELD_NODES = 3  # per side of the slice: about 100 mm apart on a 192 mm crop


def random_bias_field(image, seed, strength, modalities=None):
    """Each modality multiplied by a smooth random field, as a receive coil's sensitivity
    shades a scan that was not bias-corrected (BraTS is not): the log of the field is a
    bicubic surface through BIAS_FIELD_NODES x BIAS_FIELD_NODES normal draws, whose standard
    deviation is drawn per modality from [0, strength]. The z-scored pixels are shifted back
    by BRAIN_MEAN_OVER_STD before the product and forward again after it, so grey matter
    brightened by the field comes near edema as it does in a shaded scan. The background
    stays 0; a 2.5D stack shades each modality alike on every slice."""
    channels = image.shape[-1]
    modalities = modalities or channels
    amplitude_seed, node_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    amplitude = tf.random.stateless_uniform([modalities], amplitude_seed, 0.0, strength)
    nodes = tf.random.stateless_normal([1, BIAS_FIELD_NODES, BIAS_FIELD_NODES, modalities],
                                       node_seed) * amplitude
    log_field = tf.image.resize(nodes, image.shape[:2], method="bicubic")[0]
    gain = tf.tile(tf.exp(log_field), [1, 1, channels // modalities])
    brain = tf.reduce_any(image != 0, axis=-1, keepdims=True)
    shaded = (image + BRAIN_MEAN_OVER_STD) * gain - BRAIN_MEAN_OVER_STD
    return tf.where(brain, shaded, tf.zeros_like(image))


def random_modality_dropout(image, seed, probability, modalities=None):
    """With `probability`, one modality drawn at random is set to 0 (the brain's mean after
    normalization; on every slice of a 2.5D stack of `modalities` channels each). What sets
    a lower-grade tumor's core apart from its edema is a different modality from case to
    case; a network that cannot count on any one modality learns to read them all."""
    channels = image.shape[-1]
    modalities = modalities or channels
    chance, which = tf.unstack(tf.random.stateless_uniform([2], seed))
    dropped = tf.cast(which * modalities, tf.int32)
    lost = (tf.range(channels) % modalities == dropped) & (chance < probability)
    return image * (1.0 - tf.cast(lost, image.dtype))


def augment(image, mask, seed, intensity=0.0, modalities=None, max_scale=0.0,
            max_degrees=0.0, gamma=0.0, modality_dropout=0.0, bias_field=0.0):
    """A random left-right flip followed by a random number of 90-degree rotations: together
    they reach all 8 symmetries of the square. Image and mask are transformed together
    (concatenated), so the labels stay on their pixels. With intensity > 0, each modality's
    brain voxels are then scaled by 1 + u and shifted by v, u and v uniform in
    [-intensity, intensity]; the background stays 0. A 2.5D image (several slices of
    `modalities` channels each) gets each modality's change on every slice, inside that
    slice's own brain. With max_scale or max_degrees, the pair is then zoomed and turned
    (random_zoom_and_turn), from a seed of its own: without, the batches are as before.
    With bias_field > 0, each modality is then shaded (random_bias_field); with
    gamma > 0, its contrast is bent (random_gamma), and with
    modality_dropout > 0 a modality may be lost (random_modality_dropout), each from a seed
    of its own too."""
    flip_seed, rotation_seed, intensity_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    both = tf.concat([image, mask], axis=-1)
    both = tf.image.stateless_random_flip_left_right(both, flip_seed)
    quarter_turns = tf.random.stateless_uniform([], rotation_seed, minval=0, maxval=4,
                                                dtype=tf.int32)
    both = tf.image.rot90(both, quarter_turns)
    channels = image.shape[-1]
    image, mask = both[..., :channels], both[..., channels:]
    if max_scale or max_degrees:
        image, mask = random_zoom_and_turn(
            image, mask, tf.random.experimental.stateless_fold_in(seed, 3), max_scale,
            max_degrees)
    if intensity and modalities not in (None, channels):  # 2.5D: [H, W, slices, modalities]
        scale_shift = tf.random.stateless_uniform([2, modalities], intensity_seed,
                                                  minval=-intensity, maxval=intensity)
        slices = tf.reshape(image, tf.concat([tf.shape(image)[:2],
                                              [channels // modalities, modalities]], axis=0))
        brain = tf.cast(tf.reduce_any(slices != 0, axis=-1, keepdims=True), image.dtype)
        image = tf.reshape(slices * (1 + scale_shift[0]) + scale_shift[1] * brain,
                           tf.shape(image))
    elif intensity:
        scale_shift = tf.random.stateless_uniform([2, channels], intensity_seed,
                                                  minval=-intensity, maxval=intensity)
        brain = tf.cast(tf.reduce_any(image != 0, axis=-1, keepdims=True), image.dtype)
        image = image * (1 + scale_shift[0]) + scale_shift[1] * brain
    if bias_field:
        image = random_bias_field(image, tf.random.experimental.stateless_fold_in(seed, 6),
                                  bias_field, modalities)
    if gamma:
        image = random_gamma(image, tf.random.experimental.stateless_fold_in(seed, 4), gamma,
                             modalities)
    if modality_dropout:
        image = random_modality_dropout(image, tf.random.experimental.stateless_fold_in(seed, 5),
                                        modality_dropout, modalities)
    return image, mask


def sample_stream(indices, seed, tumor_indices=None, tumor_share=0.0):
    """Endless sample indices of the shard, reshuffled every pass. With tumor_share > 0 each
    sample is drawn with that probability from the shard's slices with tumor
    (`tumor_indices`), otherwise from all of them, as nnU-Net forces a third of its patches
    onto foreground: most brain slices hold no tumor, and the small regions (the core, the
    enhancing rim) are a few percent of what the network sees."""
    def endless(rows, stream_seed):
        rows = tf.data.Dataset.from_tensor_slices(rows)
        return rows.shuffle(len(rows), seed=stream_seed, reshuffle_each_iteration=True).repeat()
    everything = endless(indices, seed)
    if not tumor_share or tumor_indices is None or len(tumor_indices) == 0:
        return everything
    return tf.data.Dataset.sample_from_datasets(
        [everything, endless(tumor_indices, seed + 1)], [1 - tumor_share, tumor_share],
        seed=seed + 2)


def training_dataset(imgs, msks, indices, batch_size, seed, skip_samples=0,
                     intensity_augmentation=0.0, neighbours=None, tumor_indices=None,
                     tumor_share=0.0, max_scale=0.0, max_degrees=0.0, gamma=0.0,
                     modality_dropout=0.0, bias_field=0.0):
    """Endless shuffled, augmented batches of the given shard; the caller takes
    steps_per_epoch() batches per epoch. The same seed gives the same batches. `neighbours`
    (brainseg/context.py's table for these arrays, None for one slice) makes 2.5D samples;
    tumor_share draws that share of the samples from `tumor_indices` (sample_stream);
    max_scale and max_degrees zoom and turn each sample (random_zoom_and_turn), gamma bends
    its contrast (random_gamma), modality_dropout may take a modality away
    (random_modality_dropout), bias_field shades each modality (random_bias_field).

    skip_samples drops that many samples from the start of the stream: a run resumed after
    k epochs passes k x steps x batch size and sees exactly the batches the uninterrupted run
    would have seen. The skip happens before any slice is read: only shuffled indices and
    augmentation seeds are drawn for the skipped samples."""
    samples = sample_stream(indices, seed, tumor_indices, tumor_share)
    augment_seeds = tf.data.Dataset.random(seed=seed).batch(2)
    samples = tf.data.Dataset.zip(samples, augment_seeds).skip(skip_samples)
    read = _reader(imgs, msks, neighbours)
    modalities = None if neighbours is None else imgs.shape[3]
    dataset = samples.map(lambda index, aug_seed: (*read(index), aug_seed),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.map(lambda image, mask, aug_seed: augment(image, mask, aug_seed,
                                                               intensity_augmentation,
                                                               modalities, max_scale,
                                                               max_degrees, gamma,
                                                               modality_dropout,
                                                               bias_field),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(imgs, msks, indices, batch_size, neighbours=None):
    """The shard once, in order, without augmentation (2.5D samples with `neighbours`)."""
    dataset = tf.data.Dataset.from_tensor_slices(indices)
    dataset = dataset.map(_reader(imgs, msks, neighbours), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
