"""brainseg/postprocessing.py: small lesions removed by volume in mm^3, small enhancement
relabelled as core, small fragments of enhancement and of core relabelled; each off at 0."""
import numpy as np

from brainseg import postprocessing


def two_lesions():
    """A 6x6x6 lesion (edema around a core with an enhancing voxel block) and, far from it,
    a 2x2x2 island of edema."""
    labels = np.zeros((30, 30, 20), np.uint8)
    labels[4:10, 4:10, 4:10] = 2
    labels[5:9, 5:9, 5:9] = 1
    labels[6:8, 6:8, 6:8] = 4
    labels[20:22, 20:22, 12:14] = 2
    return labels


def test_islands_below_the_volume_are_removed_and_the_lesion_kept():
    labels = two_lesions()
    cleaned = postprocessing.remove_small_lesions(labels, (1.0, 1.0, 1.0), min_volume_mm3=10)
    assert not cleaned[20:22, 20:22, 12:14].any()
    np.testing.assert_array_equal(cleaned[:15], labels[:15])
    # The threshold is a volume: with 2 mm voxels the island is 64 mm^3 and survives.
    kept = postprocessing.remove_small_lesions(labels, (2.0, 2.0, 2.0), min_volume_mm3=10)
    np.testing.assert_array_equal(kept, labels)
    np.testing.assert_array_equal(postprocessing.remove_small_lesions(labels, (1, 1, 1), 0),
                                  labels)


def test_diagonal_neighbours_are_one_lesion():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2, 2, 2] = labels[3, 3, 3] = 2  # touch at a corner only: 26-connected
    cleaned = postprocessing.remove_small_lesions(labels, (1.0, 1.0, 1.0), min_volume_mm3=2)
    np.testing.assert_array_equal(cleaned, labels)


def test_small_enhancement_becomes_core_and_large_enhancement_stays():
    labels = two_lesions()  # 8 voxels of enhancing tumor
    relabelled = postprocessing.relabel_small_enhancing(labels, (1.0, 1.0, 1.0), 9)
    assert not (relabelled == 4).any()
    np.testing.assert_array_equal(relabelled == 1, (labels == 1) | (labels == 4))
    np.testing.assert_array_equal(postprocessing.relabel_small_enhancing(labels, (1, 1, 1), 8),
                                  labels)


def test_postprocess_drops_islands_before_counting_enhancement():
    labels = two_lesions()
    labels[6:8, 6:8, 6:8] = 1  # the main lesion does not enhance ...
    labels[20:22, 20:22, 12:14] = 4  # ... but an island does (8 voxels)
    cleaned = postprocessing.postprocess(labels, (1.0, 1.0, 1.0), min_lesion_mm3=10,
                                         min_enhancing_mm3=5)
    assert not (cleaned == 4).any() and not cleaned[20:, 20:].any()
    np.testing.assert_array_equal(cleaned[:15], labels[:15])


def test_small_core_fragments_become_edema_and_the_main_core_stays():
    labels = two_lesions()  # main core 4x4x4 = 64 voxels (8 of them enhancing)
    labels[10:14, 4:10, 4:10] = 2  # more edema on one side of the lesion ...
    labels[12, 6, 6] = 1  # ... holding a 1-voxel core fragment apart from the main core
    labels[4, 9, 9] = 1  # a core voxel touching the main core at a corner: the same component
    labels[20, 20, 12] = 4  # an enhancing voxel in the island
    relabelled = postprocessing.relabel_small_cores(labels, (1.0, 1.0, 1.0), 10)
    assert relabelled[12, 6, 6] == 2 and relabelled[20, 20, 12] == 2
    assert relabelled[4, 9, 9] == 1
    unchanged = np.ones(labels.shape, bool)
    unchanged[12, 6, 6] = unchanged[20, 20, 12] = False
    np.testing.assert_array_equal(relabelled[unchanged], labels[unchanged])
    # A volume: with 2 mm voxels the fragments are 8 mm^3 each, the main core 520 mm^3.
    coarse = postprocessing.relabel_small_cores(labels, (2.0, 2.0, 2.0), 100)
    np.testing.assert_array_equal(coarse, relabelled)
    np.testing.assert_array_equal(postprocessing.relabel_small_cores(labels, (1, 1, 1), 0),
                                  labels)


def test_enhancement_relabelled_as_core_can_then_be_a_small_core_fragment():
    labels = two_lesions()
    labels[20, 20, 12] = 4  # the island's only enhancing voxel, and the case's ET is small
    labels[6:8, 6:8, 6:8] = 1
    cleaned = postprocessing.postprocess(labels, (1.0, 1.0, 1.0), min_lesion_mm3=0,
                                         min_enhancing_mm3=5, min_core_mm3=10)
    assert cleaned[20, 20, 12] == 2  # 4 -> 1 (rule 2) -> 2 (rule 4)
    np.testing.assert_array_equal(cleaned[:15], labels[:15])


def test_small_enhancing_fragments_become_core_then_isolated_ones_edema():
    """Rule 3 turns an enhancing fragment into core; inside a core it stays core, and alone
    in the edema rule 4 then makes it edema. The main enhancement stays."""
    labels = two_lesions()  # main enhancement 2x2x2 = 8 voxels
    labels[10:14, 4:10, 4:10] = 2  # more edema, holding ...
    labels[11:13, 5:8, 5:8] = 1  # ... a second core of 18 voxels with ...
    labels[12, 6, 6] = 4  # ... one enhancing voxel, and ...
    labels[13, 4, 9] = 4  # ... an enhancing voxel alone in the edema
    spacing = (1.0, 1.0, 1.0)
    relabelled = postprocessing.relabel_small_enhancing_lesions(labels, spacing, 5)
    assert relabelled[12, 6, 6] == 1 and relabelled[13, 4, 9] == 1
    assert (relabelled[6:8, 6:8, 6:8] == 4).all()
    cleaned = postprocessing.postprocess(labels, spacing, min_lesion_mm3=0, min_enhancing_mm3=0,
                                         min_enhancing_lesion_mm3=5, min_core_mm3=5)
    assert cleaned[12, 6, 6] == 1 and cleaned[13, 4, 9] == 2
    assert (cleaned[6:8, 6:8, 6:8] == 4).all()
    np.testing.assert_array_equal(
        postprocessing.relabel_small_enhancing_lesions(labels, spacing, 0), labels)


def lesions_around_a_tumor():
    """A tumor (edema around a core) at one end of a 60-voxel-long grid, a core-less island
    of edema 8 voxels from it, another 40 voxels from it, and an island with a core 40
    voxels away on the other side."""
    labels = np.zeros((80, 30, 30), np.uint8)
    labels[30:40, 10:20, 10:20] = 2
    labels[33:37, 13:17, 13:17] = 1
    labels[48:51, 10:13, 10:13] = 2  # 8 voxels beyond the tumor's edge (x = 39 -> 48)
    labels[30:33, 25:28, 25:28] = 2  # 5 voxels across in y and z: near too
    labels[79:80, 0:3, 0:3] = 2  # 40 voxels beyond it
    labels[0:3, 0:3, 0:3] = 1  # far on the other side, but a core of its own
    return labels


def test_far_islands_without_core_are_removed_and_near_or_cored_ones_kept():
    labels = lesions_around_a_tumor()
    cleaned = postprocessing.remove_far_coreless_lesions(labels, (1.0, 1.0, 1.0), 20.0)
    assert not cleaned[79].any()
    np.testing.assert_array_equal(cleaned[:79], labels[:79])
    # The distance is in mm: with 0.25 mm voxels the far island is 10 mm away and stays.
    np.testing.assert_array_equal(
        postprocessing.remove_far_coreless_lesions(labels, (0.25, 1.0, 1.0), 20.0), labels)
    np.testing.assert_array_equal(
        postprocessing.remove_far_coreless_lesions(labels, (1.0, 1.0, 1.0), 0.0), labels)


def test_the_largest_lesion_stays_when_no_lesion_has_a_core():
    """A lower-grade tumor without any core is all edema: it is kept, islands far from it
    are not; with a single lesion nothing changes."""
    labels = lesions_around_a_tumor()
    labels[labels == 1] = 2
    cleaned = postprocessing.remove_far_coreless_lesions(labels, (1.0, 1.0, 1.0), 20.0)
    np.testing.assert_array_equal(cleaned[20:79], labels[20:79])
    assert not cleaned[79].any() and not cleaned[:3].any()
    alone = np.zeros_like(labels)
    alone[30:40] = labels[30:40]
    alone[:, 25:] = 0
    np.testing.assert_array_equal(
        postprocessing.remove_far_coreless_lesions(alone, (1.0, 1.0, 1.0), 1.0), alone)


def test_a_far_island_whose_core_is_only_a_speck_is_removed_after_the_speck():
    labels = lesions_around_a_tumor()
    labels[79, 1, 1] = 1  # one voxel of "core" in the far island: rule 4 makes it edema
    cleaned = postprocessing.postprocess(labels, (1.0, 1.0, 1.0), 0, 0, min_core_mm3=2,
                                         far_lesion_mm=20.0)
    assert not cleaned[79].any()
    kept = postprocessing.postprocess(labels, (1.0, 1.0, 1.0), 0, 0, min_core_mm3=2)
    assert kept[79].any()


def test_a_lesion_exactly_at_the_distance_stays_and_one_beyond_it_goes():
    """The distance is that between the nearest voxels (centre to centre), and the rule
    removes only what lies farther than it: a lesion 20 mm away stays at 20 mm."""
    labels = np.zeros((40, 12, 12), np.uint8)
    labels[0:6, 3:9, 3:9] = 1
    labels[25:28, 4:7, 4:7] = 2  # nearest voxels x = 5 and x = 25: 20 mm at 1 mm
    np.testing.assert_array_equal(
        postprocessing.remove_far_coreless_lesions(labels, (1.0, 1.0, 1.0), 20.0), labels)
    assert not postprocessing.remove_far_coreless_lesions(labels, (1.0, 1.0, 1.0),
                                                          19.9)[25:].any()
