"""From a case's volumes to model-ready slices, and back again.

One code path for the converter (training arrays) and inference (segmenting new cases), so
a model always sees data prepared exactly as it was trained on. The steps, and why:

1. z-score each modality over the brain: MRI intensities have no absolute scale.
2. choose the axial slices (all, or only those containing brain: the rest are empty).
3. crop each slice to a square: the centre of the grid (as the seed project did), or the
   brain's bounding box (more pixels on the brain, but the scale then differs per case).
4. resample the square to IMAGE_SIZE x IMAGE_SIZE (linear for images, nearest for labels).
5. labels become target channels: whole tumor, or the three BraTS regions.

Each step has its inverse here too (from_slices, to_volume, labels_from_targets), which
inference uses to write a segmentation on the scan's own grid.
"""
import concurrent.futures
import dataclasses

import numpy as np
import scipy.ndimage

TUMOR_LABELS = (1, 2, 4)  # every internal label but the background
LABEL_MODES = {
    # name -> target channels, each the set of internal labels (1 core, 2 edema, 4 enhancing)
    "whole_tumor": {"whole_tumor": TUMOR_LABELS},
    "regions": {"whole_tumor": TUMOR_LABELS, "tumor_core": (1, 4), "enhancing_tumor": (4,)},
}
SLICE_POLICIES = ("brain", "all")
CROP_MODES = ("center", "brain_box")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Everything that decides what a slice looks like; stored in the manifest, so inference
    can prepare new cases the way the training data was prepared."""
    image_size: int = 128
    crop_size: int = 192
    crop_mode: str = "center"
    slice_policy: str = "brain"
    label_mode: str = "regions"
    image_dtype: str = "float16"

    def __post_init__(self):
        for value, allowed in ((self.crop_mode, CROP_MODES), (self.slice_policy, SLICE_POLICIES),
                               (self.label_mode, LABEL_MODES),
                               (self.image_dtype, ("float16", "float32"))):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")

    @property
    def target_names(self):
        return tuple(LABEL_MODES[self.label_mode])


def planar_channels(shape, channels):
    """An empty float32 [X, Y, Z, channels] image whose channels are each a plane of its own,
    x fastest (a NIfTI volume's order), rather than interleaved voxel by voxel: every step
    that works channel by channel (the brain mask, the statistics, zeroing the background,
    resampling) then walks contiguous memory. Interleaved, a channel is read at a 16-byte
    stride: the brain mask and stacking the files' channels took 0.076 and 0.071 s of a
    BraTS case's 0.49 s of preprocessing."""
    return np.empty((channels, *shape[::-1]), np.float32).transpose(3, 2, 1, 0)


def brain_mask(image):
    """Voxels non-zero in any modality: the brain of a skull-stripped scan. Compared channel
    by channel: numpy's any() over a last axis of 4 took 5 times as long."""
    brain = image[..., 0] != 0
    for channel in range(1, image.shape[-1]):
        brain |= image[..., channel] != 0
    return brain


def bounding_box(mask, margin=0):
    """The smallest box (a tuple of slices) holding every True voxel of a mask, grown by
    `margin` voxels on every side within the grid; empty slices when there is none."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(k for k in range(mask.ndim) if k != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(hits[0] - margin, 0), hits[-1] + 1 + margin) if hits.size
                   else slice(0, 0))
    return tuple(box)


def memory_order(volume):
    """The axes of a 3-D volume from the slowest-varying in memory to the fastest: (2, 1, 0)
    for a NIfTI volume (x fastest), (0, 1, 2) for a C-order one. Walking a volume in this
    order reads it front to back; in the other, every step jumps a whole plane."""
    return tuple(int(axis) for axis in np.argsort(volume.strides[:3], kind="stable")[::-1])


def brain_statistics(image, brain):
    """(means, stds): float32 per channel over the brain voxels (std 1 for a constant or
    empty channel), which normalization divides by. The voxels are gathered from the
    brain's bounding box x fastest, the memory order of a NIfTI volume (2.5x faster on a
    BraTS case than z fastest, which crosses the volume at every step). The order is that
    of the axes, not of the memory: a file stored in another orientation gives the same
    float32 sums, so the same bytes. Values beyond max_intensity overflow the float32
    sums, which raises ValueError instead of writing NaN."""
    brain, image = brain.transpose(2, 1, 0), image.transpose(2, 1, 0, 3)
    box = bounding_box(brain)
    inside = brain[box]
    means, stds = [], []
    for channel in range(image.shape[-1]):
        values = image[box + (channel,)][inside]
        std = values.std() if values.size else 0.0
        if not np.isfinite(std):  # a finite std implies a finite mean
            raise ValueError(f"channel {channel}: values up to {np.abs(values).max():.3g} "
                             f"overflow the float32 statistics (at most "
                             f"{max_intensity(values.size):.3g})")
        means.append(values.mean() if values.size else 0.0)
        stds.append(std or 1.0)
    return np.array(means, np.float32), np.array(stds, np.float32)


def zscore(voxels, inside, means, stds):
    """(voxels - mean) / std per channel where `inside` (the brain), 0 elsewhere: a new
    float32 array. Element by element the same float32 operations as over the whole
    volume, so the same values for any part of it. In the voxels' own memory order (a
    NIfTI volume's: x fastest, then y, z; see resample): a C-order result transposed the
    whole crop on the way and took twice as long. The background is zeroed channel by
    channel: one mask broadcast over the last axis (np.copyto's where=) took 1.4x as long."""
    normalized = np.subtract(voxels, means, dtype=np.float32, order="K")
    normalized /= stds
    outside = ~inside
    for channel in range(normalized.shape[-1]):
        normalized[..., channel][outside] = 0  # +0, as a background voxel
    return normalized


def normalize(image):
    """Z-scores each modality over the brain (voxels non-zero in any modality); the
    background stays 0. Statistics are float32, like the images (brain_statistics).
    The whole volume: preprocess_case normalizes only the voxels its slices keep."""
    brain = brain_mask(image)
    return zscore(image, brain, *brain_statistics(image, brain))


def max_intensity(num_voxels):
    """The largest voxel magnitude M that normalize can take in a channel of num_voxels
    voxels: its float32 sums (of the values, for the mean; of the squared deviations, for
    the std) stay below float32's maximum, 3.4e38. A deviation is at most 2M, so the sum of
    squares at most num_voxels (2M)^2; a further factor 2 leaves room for rounding. For a
    BraTS volume (8.9 million voxels) M is 2.2e15, far above any scanner's values; beyond
    it, a single voxel (1e38 is finite in float32) turns its whole channel into NaN and 0."""
    return float(np.sqrt(np.finfo(np.float32).max / (8 * max(num_voxels, 1))))


def selected_slices(brain, policy):
    """Indices of the axial slices to keep."""
    if policy == "all":
        return np.arange(brain.shape[2])
    return np.flatnonzero(brain.any(axis=(0, 1)))


def crop_box(brain, crop_mode, crop_size):
    """(top, left, side) of the square each axial slice is cropped to."""
    height, width = brain.shape[:2]
    if crop_mode == "center" or not brain.any():
        side = min(crop_size, height, width)
        return (height - side) // 2, (width - side) // 2, side
    rows = np.flatnonzero(brain.any(axis=(1, 2)))
    cols = np.flatnonzero(brain.any(axis=(0, 2)))
    side = min(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1, height, width)
    top = int(np.clip((rows[0] + rows[-1] + 1 - side) // 2, 0, height - side))
    left = int(np.clip((cols[0] + cols[-1] + 1 - side) // 2, 0, width - side))
    return top, left, int(side)


def _resampling_matrix(size_in, size_out, order):
    """Rows hold the weights scipy.ndimage.zoom uses along one axis. Resampling every slice
    is then two matrix products, which measured 3.7x faster than zooming the 4-D array."""
    identity = np.eye(size_in, dtype=np.float32)
    return scipy.ndimage.zoom(identity, (size_out / size_in, 1), order=order, grid_mode=True,
                              mode="nearest")


def nearest_indices(size_in, size_out):
    """For each of size_out pixels, the input pixel nearest resampling copies (the one weight
    1 in its row of the order-0 resampling matrix)."""
    return _resampling_matrix(size_in, size_out, order=0).argmax(axis=1)


def _two_taps(matrix):
    """(first, second, weights): a linear-interpolation matrix, whose rows each hold at most
    two neighbouring non-zero weights, as the two input indices of every row (the second
    clipped to the grid) and the [rows, 2] weights of them; None when some row holds more
    (cubic resampling)."""
    nonzero = matrix != 0
    first = nonzero.argmax(axis=1)
    last = matrix.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1)
    if (last - first > 1).any():
        return None
    second = np.minimum(first + 1, matrix.shape[1] - 1)
    rows = np.arange(len(matrix))
    weights = np.stack([matrix[rows, first], np.where(second > first, matrix[rows, second], 0)],
                       axis=1)
    return first, second, weights.astype(np.float32)


def _resample_axis(array, matrix, axis):
    """matrix @ array along `axis`: every output row a weighted sum of (at most) two input
    rows, gathered; for a linear-interpolation matrix that is 2 multiply-adds per output
    value instead of one per input row: resampling a BraTS crop (192x192x155x4 -> 128) took
    0.145 s against the dense product's 0.318 s, the same values to 1 float32 ulp. Any other
    matrix (cubic) goes through the dense product."""
    taps = _two_taps(matrix)
    if taps is None:
        return np.moveaxis(np.tensordot(matrix, array, axes=(1, axis)), 0, axis)
    first, second, weights = taps
    shape = [1] * array.ndim
    shape[axis] = len(matrix)
    result = np.take(array, first, axis=axis) * weights[:, 0].reshape(shape)
    result += np.take(array, second, axis=axis) * weights[:, 1].reshape(shape)
    return result


def slice_index(slices):
    """An index of the kept axial slices: a range (numpy then gives views) when they are
    consecutive, as the brain's are, else the indices themselves."""
    slices = np.asarray(slices)
    if len(slices) and slices[-1] - slices[0] + 1 == len(slices):  # sorted, distinct
        return slice(int(slices[0]), int(slices[-1]) + 1)
    return slices


def crop(volume, box, slices):
    """The box's square of the kept axial slices, [side, side, len(slices), ...]: a view
    when the slices are consecutive, else a copy of just those voxels."""
    top, left, side = box
    return volume[top:top + side, left:left + side][:, :, slice_index(slices)]


def resample(cropped, image_size, order):
    """[S0, S0, Z, C] cropped slices -> [Z, S, S, C] resampled to image_size. Nearest
    (order 0) copies pixels: the same values as the matrix product, in the input's dtype,
    without the float arithmetic.

    In the crop's memory order: NIfTI volumes are x-fastest, then y, z, and the channels
    are either planes of their own (images: planar_channels) or interleaved last (target
    masks), so the crop is [C, Z, y, x] or [Z, y, x, C] in memory. It is resampled along y
    first, each gather a copy of whole rows; the smaller result is reordered to put x
    before y' and resampled along x the same way, which leaves the slices in their final
    order; planar channels are interleaved last, on the resampled slices. Transposing the
    whole crop first (as the zscore's C order once did) took twice as long."""
    rows = nearest_indices(cropped.shape[0], image_size) if order == 0 else None
    matrix = None if order == 0 else _resampling_matrix(cropped.shape[0], image_size, order)
    planar = cropped.strides[3] > cropped.strides[2]
    work = cropped.transpose(3, 2, 1, 0) if planar else cropped.transpose(2, 1, 0, 3)
    y_axis = 2 if planar else 1  # then x is the next axis

    def along(array):  # resampled along y_axis
        if order == 0:
            return np.take(array, rows, axis=y_axis)
        return _resample_axis(array.astype(np.float32, copy=False), matrix, y_axis)
    along_y = along(work)
    along_x = along(np.ascontiguousarray(np.swapaxes(along_y, y_axis, y_axis + 1)))
    return np.ascontiguousarray(np.moveaxis(along_x, 0, 3) if planar else along_x)


def to_slices(volume, box, image_size, order):
    """[X, Y, Z, C] -> [Z, S, S, C]: crops the box from each axial slice, resamples it."""
    return resample(crop(volume, box, np.arange(volume.shape[2])), image_size, order)


def resample_back(slices, side, order):
    """[Z, S, S, C] slices -> [side, side, Z, C]: resampled to the crop box's size, axes in
    the volume's order (the inverse of resample)."""
    # The dense product through BLAS: gathering two taps was 2.5x slower here, where the
    # output (the crop box, larger than the slices) dominates the memory traffic.
    matrix = _resampling_matrix(slices.shape[1], side, order)
    return np.einsum("xi,zijc,yj->xyzc", matrix, slices.astype(np.float32, copy=False), matrix,
                     optimize=True)


def from_slices(slices, box, shape, order):
    """The inverse of to_slices: [Z, S, S, C] -> [X, Y, Z, C] on the original grid of `shape`
    (X, Y), zeros outside the crop box."""
    top, left, side = box
    volume = np.zeros((*shape, slices.shape[0], slices.shape[3]), np.float32)
    volume[top:top + side, left:left + side] = resample_back(slices, side, order)
    return volume


def to_volume(slice_values, geometry, shape):
    """The inverse of preprocess_case for model outputs: [N, S, S, K] values of the kept
    slices -> [X, Y, Z, K] on the case's grid of `shape` (X, Y, Z), linearly interpolated,
    zeros outside the crop box and on the slices that were not kept. The box is written
    straight into the volume (through a view when the kept slices are consecutive, as the
    brain's are): one full-size array, not two, 2.4x faster on a BraTS case."""
    top, left, side = geometry["crop_box"]
    volume = np.zeros((*shape, slice_values.shape[-1]), np.float32)
    volume[top:top + side, left:left + side, slice_index(geometry["slices"])] = resample_back(
        slice_values, side, order=1)
    return volume


def to_label_volume(slice_probabilities, geometry, shape, label_mode, threshold=0.5):
    """The [X, Y, Z] internal label map of the model's [N, S, S, K] probabilities on the
    case's grid: labels_from_targets(to_volume(...) > threshold), computed in the crop box of
    the kept slices and then placed in a zero volume. Outside the box to_volume writes 0,
    below any threshold, so the map is the same; but no full-size float volume of K channels
    is made, thresholded and scanned (the box is half a BraTS grid, the labels a twelfth of
    the probabilities' bytes)."""
    top, left, side = geometry["crop_box"]
    box_labels = labels_from_targets(resample_back(slice_probabilities, side, order=1)
                                     > threshold, label_mode)
    labels = np.zeros(shape, np.uint8)
    labels[top:top + side, left:left + side, slice_index(geometry["slices"])] = box_labels
    return labels


def slice_spacing(spacing, crop_side, image_size):
    """(slice thickness, pixel, pixel) in mm of a case's resampled slices, from the scan's
    voxel spacing (x, y, z) and the crop side that became image_size pixels."""
    x_mm, y_mm, z_mm = spacing
    scale = crop_side / image_size
    return (z_mm, x_mm * scale, y_mm * scale)


def targets(labels, label_mode):
    """[X, Y, Z] internal labels -> [X, Y, Z, K] uint8 target channels. Each channel is a
    comparison or two written into its place: 0.023 s on a BraTS grid, where a lookup in a
    table of every label value's channels took 0.13 s and np.isin longer. The labels were
    checked to be internal ones, so whole tumor is simply "not background"."""
    channels = LABEL_MODES[label_mode].values()
    # Laid out in the label map's memory order, channels last: written in C order, every
    # comparison transposed a NIfTI map (x fastest): a BraTS crop took 65 ms, now 11.
    axes = memory_order(labels)
    result = np.empty((*(labels.shape[axis] for axis in axes), len(channels)),
                      np.uint8).transpose(*np.argsort(axes), 3)
    for k, members in enumerate(channels):
        if members == TUMOR_LABELS:
            result[..., k] = labels != 0
            continue
        channel = labels == members[0]
        for member in members[1:]:
            channel |= labels == member
        result[..., k] = channel
    return result


def labels_from_targets(masks, label_mode):
    """The inverse of targets: [X, Y, Z, K] boolean channels -> [X, Y, Z] internal labels.
    Regions are nested (enhancing within core within whole tumor), so each voxel takes the
    label of the innermost region predicted there. A whole-tumor mask becomes label 1."""
    if label_mode == "whole_tumor":
        return masks[..., 0].astype(np.uint8)
    whole_tumor, core, enhancing = (masks[..., k].astype(bool, copy=False) for k in range(3))
    core = core | enhancing
    # 2 in the whole tumor, 1 lower in the core, 3 higher where it enhances: 2, 1 and 4, in
    # uint8 arithmetic (3x faster than three masked assignments)
    labels = (whole_tumor | core).view(np.uint8) * np.uint8(2)
    labels -= core.view(np.uint8)
    labels += enhancing.view(np.uint8) * np.uint8(3)
    return labels


def preprocess_case(image, labels, options, threads=1):
    """Model-ready (imgs [N, S, S, C], msks [N, S, S, K] uint8 or None, geometry), where
    geometry records the kept slices and the crop box, which inference needs to put
    predictions back on the original grid. Only the voxels of the kept slices' crop box are
    normalized (the statistics come from the whole brain): the same values as normalizing
    the whole volume and cropping it, at a fraction of the memory traffic.

    threads > 1 normalizes and resamples that many runs of slices at once (NumPy releases
    the GIL in its loops; every slice is done alone, so the values are the same): inference
    of one case, 0.34 -> 0.23 s with 2 threads. The converter keeps 1: its worker processes
    fill the cores already."""
    brain = brain_mask(image)
    slices = selected_slices(brain, options.slice_policy)
    box = crop_box(brain, options.crop_mode, options.crop_size)
    statistics = brain_statistics(image, brain)

    def slices_ready(part):
        normalized = zscore(crop(image, box, part), crop(brain, box, part), *statistics)
        return resample(normalized, options.image_size, order=1).astype(options.image_dtype)
    parts = [part for part in np.array_split(slices, max(1, threads)) if len(part)]
    if len(parts) > 1:
        with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
            imgs = np.concatenate(list(pool.map(slices_ready, parts)))
    else:
        imgs = slices_ready(slices)
    geometry = {"slices": slices.tolist(), "crop_box": list(box)}
    if labels is None:
        return imgs, None, geometry
    msks = resample(targets(crop(labels, box, slices), options.label_mode),
                    options.image_size, order=0)
    return imgs, msks, geometry
