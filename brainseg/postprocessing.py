"""BraTS-style clean-up of a predicted label map, before it is written and scored.

A 2D model sees one slice at a time, so it leaves what a radiologist would never draw: small
islands of "tumor" far from the lesion (a FLAIR-bright vessel or a white-matter
hyperintensity), a few voxels of enhancing tumor in a lesion that has none (lower-grade
gliomas do not enhance), and specks of core in the edema or of enhancement in the core.
They cost the most where BraTS counts: lesion-wise metrics punish every false-positive
fragment, and an enhancing-tumor prediction in a case without enhancement scores Dice 0
instead of 1. Five rules, the first two as in the BraTS-winning nnU-Net post-processing
(Isensee et al. 2020), each off when its threshold is 0:

1. connected components of the whole tumor smaller than MIN_LESION_MM3 are removed;
2. when the enhancing tumor of a case is smaller than MIN_ENHANCING_MM3 in all, it becomes
   necrosis / non-enhancing core (label 1): the core stays, the enhancement goes;
3. connected components of the enhancing tumor smaller than MIN_ENHANCING_LESION_MM3 become
   core (label 1);
4. connected components of the tumor core (labels 1 and 4) smaller than MIN_CORE_MM3 become
   edema (label 2): the whole tumor stays, a fragment of core inside it goes;
5. connected components of the whole tumor without any core, farther than FAR_LESION_MM
   from every component that has core and from the largest, are removed: a FLAIR-bright
   lesion centimetres from the tumor with nothing but "edema" is a white-matter
   hyperintensity, not tumor, while a lower-grade tumor without a core is the largest
   component and stays.
The lesion-wise scores count each fragment that rules 3 and 4 take away as a false-positive
lesion of its region.

Labels are the internal ones (1 core, 2 edema, 4 enhancing); volumes are in mm^3, so the
thresholds mean the same on any grid.
"""
import numpy as np
import scipy.ndimage
import scipy.spatial

from brainseg import metrics, preprocessing


def components_in_box(region):
    """The region's 3-D connected components (26-connected), numbered 1..count, within its
    bounding box (a few percent of the grid, and the same components): (box, components,
    count)."""
    box = preprocessing.bounding_box(region)
    components, count = scipy.ndimage.label(region[box], structure=np.ones((3, 3, 3)))
    return box, components, count


def relabel_small_components(labels, region, spacing, min_volume_mm3, new_label):
    """Every 3-D connected component (26-connected) of the region (a boolean mask of labels)
    whose volume is below min_volume_mm3 gets new_label; the labels themselves if none."""
    if min_volume_mm3 <= 0 or not region.any():
        return labels
    box, components, count = components_in_box(region)
    voxel_mm3 = float(np.prod(spacing))
    sizes = np.bincount(components.ravel(), minlength=count + 1) * voxel_mm3
    small = sizes < min_volume_mm3
    small[0] = False  # the background
    relabelled = labels.copy()
    relabelled[box][small[components]] = new_label
    return relabelled


def remove_small_lesions(labels, spacing, min_volume_mm3):
    """Zeroes every component of the whole tumor whose volume is below min_volume_mm3."""
    return relabel_small_components(labels, labels > 0, spacing, min_volume_mm3, 0)


def relabel_small_enhancing_lesions(labels, spacing, min_volume_mm3):
    """Every component of the enhancing tumor (4) below min_volume_mm3 becomes core (1)."""
    return relabel_small_components(labels, labels == 4, spacing, min_volume_mm3, 1)


def relabel_small_cores(labels, spacing, min_volume_mm3):
    """Every component of the tumor core (1 and 4) below min_volume_mm3 becomes edema (2)."""
    return relabel_small_components(labels, (labels == 1) | (labels == 4), spacing,
                                    min_volume_mm3, 2)


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


def remove_far_coreless_lesions(labels, spacing, far_mm):
    """Zeroes every component of the whole tumor that holds no core (labels 1 and 4) and
    lies farther than far_mm from every component that does, and from the largest one.

    Two voxel sets are nearest at voxels of their surfaces (a voxel with all six face
    neighbours inside has one nearer), so the distances come from a k-d tree of surface
    points, as metrics.hausdorff95_in_box's do: a distance transform of a box holding
    lesions across the brain took 10-30x longer."""
    tumor = labels > 0
    if far_mm <= 0 or not tumor.any():
        return labels
    box, components, count = components_in_box(tumor)
    if count < 2:
        return labels
    anchors = np.zeros(count + 1, bool)
    core = (labels[box] == 1) | (labels[box] == 4)
    anchors[np.unique(components[core])] = True
    anchors[np.argmax(np.bincount(components.ravel())[1:]) + 1] = True
    anchors[0] = False  # the background
    if anchors[1:].all():
        return labels
    # No two components touch, not even at a corner: the union's surface voxels are each
    # component's own.
    surface = np.argwhere(metrics.surface(tumor[box]))
    owner = components[tuple(surface.T)]
    points_mm = surface * np.asarray(spacing, np.float64)
    tree = scipy.spatial.cKDTree(points_mm[anchors[owner]])
    others = ~anchors[owner]
    distance_mm = tree.query(points_mm[others],  # inf beyond the bound
                             distance_upper_bound=np.nextafter(far_mm, np.inf))[0]
    nearest_mm = np.full(count + 1, np.inf)
    np.minimum.at(nearest_mm, owner[others], distance_mm)
    far = ~anchors & (nearest_mm > far_mm)
    far[0] = False
    if not far.any():
        return labels
    kept = labels.copy()
    kept[box][far[components]] = 0
    return kept


def postprocess(labels, spacing, min_lesion_mm3, min_enhancing_mm3,
                min_enhancing_lesion_mm3=0.0, min_core_mm3=0.0, far_lesion_mm=0.0):
    """The five rules in order: lesions first (an island's enhancement must not count towards
    rule 2), then the enhancement, whose relabelled voxels are core for rule 4; last the
    distant lesions, once a speck of core (rule 4) no longer makes a lesion look like tumor."""
    labels = remove_small_lesions(labels, spacing, min_lesion_mm3)
    labels = relabel_small_enhancing(labels, spacing, min_enhancing_mm3)
    labels = relabel_small_enhancing_lesions(labels, spacing, min_enhancing_lesion_mm3)
    labels = relabel_small_cores(labels, spacing, min_core_mm3)
    return remove_far_coreless_lesions(labels, spacing, far_lesion_mm)
