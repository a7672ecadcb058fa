"""The whole-volume preprocessing this project used until the converter was sped up, kept
unchanged as a reference.

- bench/converter.py's reimplementation of the seed project's approach prepares its cases
  with it: the seed normalized whole volumes too, so its baseline does not get faster when
  brainseg/preprocessing.py does;
- tests/test_preprocessing.py checks that brainseg/preprocessing.py, which normalizes only
  the voxels that become slices, writes byte for byte the same arrays.
"""
import numpy as np
import scipy.ndimage

from brainseg.preprocessing import LABEL_MODES, crop_box, selected_slices


def normalize(image):
    """Z-scores each modality over the brain voxels of the whole volume, background 0."""
    brain = image.any(axis=-1)
    normalized = np.zeros_like(image)
    for channel in range(image.shape[-1]):
        values = image[..., channel][brain]
        std = values.std() if values.size else 0.0
        if not np.isfinite(std):
            raise ValueError(f"channel {channel}: values overflow the float32 statistics")
        normalized[..., channel][brain] = (values - values.mean()) / (std or 1.0)
    return normalized


def resampling_matrix(size_in, size_out, order):
    identity = np.eye(size_in, dtype=np.float32)
    return scipy.ndimage.zoom(identity, (size_out / size_in, 1), order=order, grid_mode=True,
                              mode="nearest")


def to_slices(volume, box, image_size, order):
    """[X, Y, Z, C] -> [Z, S, S, C]: crops the box from each axial slice, resamples it."""
    top, left, side = box
    cropped = volume[top:top + side, left:left + side].astype(np.float32)
    matrix = resampling_matrix(side, image_size, order)
    return np.einsum("ix,xyzc,jy->zijc", matrix, cropped, matrix, optimize=True)


def targets(labels, label_mode):
    return np.stack([np.isin(labels, members) for members in LABEL_MODES[label_mode].values()],
                    axis=-1).astype(np.uint8)


def preprocess_case(image, labels, options):
    """(imgs, msks or None, geometry) as brainseg.preprocessing.preprocess_case returns them."""
    brain = image.any(axis=-1)
    slices = selected_slices(brain, options.slice_policy)
    box = crop_box(brain, options.crop_mode, options.crop_size)
    imgs = to_slices(normalize(image)[:, :, slices], box, options.image_size, order=1)
    geometry = {"slices": slices.tolist(), "crop_box": list(box)}
    if labels is None:
        return imgs.astype(options.image_dtype), None, geometry
    msks = to_slices(targets(labels[:, :, slices], options.label_mode), box,
                     options.image_size, order=0)
    return imgs.astype(options.image_dtype), msks.astype(np.uint8), geometry
