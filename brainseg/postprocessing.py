"""BraTS-style clean-up of a predicted label map, before it is written and scored.

A 2D model sees one slice at a time, so it leaves what a radiologist would never draw: small
islands of "tumor" far from the lesion (a FLAIR-bright vessel or a white-matter
hyperintensity), and a few voxels of enhancing tumor in a lesion that has none (lower-grade
gliomas do not enhance). Both cost the most where BraTS counts: lesion-wise metrics punish
every false-positive fragment, and an enhancing-tumor prediction in a case without
enhancement scores Dice 0 instead of 1. Two rules, as in the BraTS-winning nnU-Net
post-processing (Isensee et al. 2020), each off when its threshold is 0:

1. connected components of the whole tumor smaller than MIN_LESION_MM3 are removed;
2. when the enhancing tumor of a case is smaller than MIN_ENHANCING_MM3 in all, it becomes
   necrosis / non-enhancing core (label 1): the core stays, the enhancement goes.

Labels are the internal ones (1 core, 2 edema, 4 enhancing); volumes are in mm^3, so the
thresholds mean the same on any grid.
"""
import numpy as np
import scipy.ndimage

from brainseg import preprocessing


def remove_small_lesions(labels, spacing, min_volume_mm3):
    """Zeroes every 3-D connected component (26-connected) of the whole tumor whose volume is
    below min_volume_mm3."""
    if min_volume_mm3 <= 0 or not labels.any():
        return labels
    # Within the tumor's bounding box (a few percent of the grid): the same components.
    tumor = labels > 0
    box = preprocessing.bounding_box(tumor)
    components, count = scipy.ndimage.label(tumor[box], structure=np.ones((3, 3, 3)))
    voxel_mm3 = float(np.prod(spacing))
    sizes = np.bincount(components.ravel(), minlength=count + 1) * voxel_mm3
    small = sizes < min_volume_mm3
    small[0] = False  # the background
    cleaned = labels.copy()
    cleaned[box][small[components]] = 0
    return cleaned


def relabel_small_enhancing(labels, spacing, min_volume_mm3):
    """Enhancing tumor (4) becomes core (1) when there is less than min_volume_mm3 of it."""
    enhancing = labels == 4
    if min_volume_mm3 <= 0 or not enhancing.any():
        return labels
    if np.count_nonzero(enhancing) * float(np.prod(spacing)) >= min_volume_mm3:
        return labels
    relabelled = labels.copy()
    relabelled[enhancing] = 1
    return relabelled


def postprocess(labels, spacing, min_lesion_mm3, min_enhancing_mm3):
    """Both rules, lesions first (an island's enhancement must not count towards rule 2)."""
    labels = remove_small_lesions(labels, spacing, min_lesion_mm3)
    return relabel_small_enhancing(labels, spacing, min_enhancing_mm3)
