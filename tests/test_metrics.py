"""brainseg/metrics.py: Dice, HD95 (against an independent implementation), the BraTS
conventions for empty masks, and the summary."""
import numpy as np
import pytest
import scipy.ndimage
import scipy.spatial

from brainseg import metrics


def points(shape, *voxels):
    mask = np.zeros(shape, bool)
    for voxel in voxels:
        mask[voxel] = True
    return mask


def test_metrics_on_hand_computed_masks():
    truth = points((4, 4, 1), (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0))
    prediction = points((4, 4, 1), (0, 0, 0), (0, 1, 0), (3, 3, 0))
    assert metrics.dice(truth, prediction) == pytest.approx(2 * 2 / 7)
    scores = metrics.region_metrics(truth, prediction, (1, 1, 1))
    assert scores["dice"] == pytest.approx(2 * 2 / 7)
    assert scores["sensitivity"] == pytest.approx(2 / 4)
    assert scores["specificity"] == pytest.approx(11 / 12)  # over the grid, not the box


def test_hausdorff95_of_single_voxels_is_their_distance_in_mm():
    truth, prediction = points((10, 10, 3), (1, 1, 1)), points((10, 10, 3), (4, 5, 1))
    assert metrics.hausdorff95(truth, prediction, (1, 1, 1)) == pytest.approx(5.0)
    assert metrics.hausdorff95(truth, prediction, (2, 1, 3)) == pytest.approx(np.hypot(6, 4))


def test_empty_masks_follow_the_brats_convention():
    empty = np.zeros((240, 240, 155), bool)
    tumor = points(empty.shape, (100, 100, 70))
    assert metrics.region_metrics(empty, empty, (1, 1, 1))["dice"] == 1.0
    assert metrics.region_metrics(empty, empty, (1, 1, 1))["hd95_mm"] == 0.0
    for truth, prediction in ((empty, tumor), (tumor, empty)):
        scores = metrics.region_metrics(truth, prediction, (1, 1, 1))
        assert scores["dice"] == 0.0
        assert scores["hd95_mm"] == pytest.approx(373.13, abs=0.01)  # the BraTS grid diagonal
    assert metrics.region_metrics(empty, tumor, (1, 1, 1))["sensitivity"] == 1.0
    assert metrics.region_metrics(tumor, empty, (1, 1, 1))["specificity"] == 1.0


def brute_force_hd95(truth, prediction, spacing):
    """Independent: surface voxels by comparing with the 6 neighbours of a zero-padded copy,
    every pairwise distance by scipy.spatial, then MedPy's pooled 95th percentile."""
    def surface_points(mask):
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(3):
            for shift in (-1, 1):
                inner &= np.roll(padded, shift, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)
    a, b = surface_points(truth), surface_points(prediction)
    distances = scipy.spatial.distance.cdist(a, b)
    return np.percentile(np.concatenate([distances.min(axis=1), distances.min(axis=0)]), 95)


@pytest.mark.parametrize("seed", range(4))
def test_hausdorff95_matches_an_independent_implementation(seed):
    rng = np.random.default_rng(seed)
    grid = np.indices((24, 20, 12)).transpose(1, 2, 3, 0)

    def blob():
        center, radii = rng.uniform(5, 12, 3) * [1, 1, 0.5], rng.uniform(2, 6, 3)
        return (((grid - center) / radii) ** 2).sum(axis=-1) <= 1
    truth, prediction = blob(), blob()
    spacing = tuple(rng.uniform(0.5, 2.0, 3))
    assert metrics.hausdorff95(truth, prediction, spacing) == pytest.approx(
        brute_force_hd95(truth, prediction, spacing), rel=1e-6)


def full_grid_metrics(truth, prediction, spacing):
    """The metrics as computed before the bounding box and the k-d tree: every count over
    the whole grid, and the surface distances from a Euclidean distance transform of it."""
    def surface_distances(from_mask, to_mask):
        to_surface = scipy.ndimage.distance_transform_edt(~metrics.surface(to_mask),
                                                          sampling=spacing)
        return to_surface[metrics.surface(from_mask)]
    distances = np.concatenate([surface_distances(truth, prediction),
                                surface_distances(prediction, truth)])
    overlap = np.count_nonzero(truth & prediction)
    return {"dice": 2 * overlap / (np.count_nonzero(truth) + np.count_nonzero(prediction)),
            "hd95_mm": float(np.percentile(distances, 95)),
            "sensitivity": overlap / np.count_nonzero(truth),
            "specificity": np.count_nonzero(~truth & ~prediction) / np.count_nonzero(~truth)}


@pytest.mark.parametrize("seed", range(3))
def test_metrics_on_the_bounding_box_equal_the_full_grid(seed):
    """Two lesions far apart, one of them cut by the grid's edge (where the erosion's border
    decides what is surface), on an anisotropic BraTS-like grid."""
    rng = np.random.default_rng(seed)
    shape = (96, 80, 40)
    grid = np.indices(shape).transpose(1, 2, 3, 0)

    def lesions(*centers):
        mask = np.zeros(shape, bool)
        for center in centers:
            mask |= (((grid - center) / rng.uniform(3, 9, 3)) ** 2).sum(axis=-1) <= 1
        return mask
    truth = lesions(rng.uniform(20, 40, 3) * [1, 1, 0.5], (95, 40, 20))  # the second at the edge
    prediction = lesions(rng.uniform(20, 40, 3) * [1, 1, 0.5], (70, 10, 38))
    spacing = tuple(rng.uniform(0.8, 3.0, 3))
    expected = full_grid_metrics(truth, prediction, spacing)
    assert metrics.hausdorff95(truth, prediction, spacing) == pytest.approx(
        expected["hd95_mm"], rel=1e-12)
    scores = metrics.region_metrics(truth, prediction, spacing)
    assert scores == pytest.approx(expected, rel=1e-12)
    assert expected["specificity"] < 1  # the prediction has false positives to count


def test_summary_has_mean_median_and_std():
    rows = [{"whole_tumor_dice": d, "whole_tumor_hd95_mm": 1.0, "whole_tumor_sensitivity": 1.0,
             "whole_tumor_specificity": 1.0} for d in (0.5, 0.7, 0.9)]
    dice_summary = metrics.summarize(rows, ["whole_tumor"])[0]
    assert (dice_summary["mean"], dice_summary["median"]) == pytest.approx((0.7, 0.7))
    assert dice_summary["std"] == pytest.approx(np.std([0.5, 0.7, 0.9]))


def test_summary_leaves_out_undefined_lesion_wise_figures():
    rows = [{"whole_tumor_dice": 0.8, "whole_tumor_hd95_mm": 2.0, "whole_tumor_sensitivity": 1,
             "whole_tumor_specificity": 1, "whole_tumor_lesion_dice": lesion_dice,
             "whole_tumor_lesion_hd95_mm": lesion_hd95}
            for lesion_dice, lesion_hd95 in ((0.5, 10.0), (float("nan"), float("nan")),
                                             (0.7, 20.0))]
    summary = {s["metric"]: s for s in metrics.summarize(rows, ["whole_tumor"])}
    assert summary["dice"]["cases"] == 3
    assert summary["lesion_dice"]["cases"] == 2
    assert summary["lesion_dice"]["mean"] == pytest.approx(0.6)
    assert summary["lesion_hd95_mm"]["median"] == pytest.approx(15.0)


def cube(mask, corner, size):
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
    return mask


def test_ranking_lesion_wise_groups_nearby_lesions_and_skips_the_smallest():
    """BraTS 2023's ranking on hand-made masks. True: a tumor, a speck 2 voxels from it
    (within the 3 dilations: the same lesion), a small far speck (27 mm^3: not counted) and
    a far lesion of 64 mm^3 that is missed. Predicted: the tumor, a fragment 2 voxels from
    it (the tumor's, not a false positive), the small speck (no false positive either) and a
    far false positive. So 1 lesion found, 1 missed, 1 false positive."""
    shape, spacing = (48, 40, 30), (1.0, 1.0, 1.0)
    tumor = cube(np.zeros(shape, bool), (10, 10, 5), (8, 8, 6))
    truth = cube(tumor.copy(), (20, 12, 6), (2, 2, 2))  # 2 voxels beyond x = 17
    truth = cube(cube(truth, (40, 30, 20), (3, 3, 3)), (5, 30, 20), (4, 4, 4))
    prediction = cube(cube(tumor.copy(), (10, 20, 6), (3, 2, 2)), (40, 30, 20), (3, 3, 3))
    prediction = cube(prediction, (30, 2, 25), (2, 2, 2))
    scores = metrics.ranking_lesion_wise(truth, prediction, spacing)
    assert (scores["tp"], scores["fn"], scores["fp"]) == (1, 1, 1)
    lesion = cube(tumor.copy(), (20, 12, 6), (2, 2, 2))
    found = cube(tumor.copy(), (10, 20, 6), (3, 2, 2))
    assert metrics.dice(lesion, found) == pytest.approx(2 * 384 / (392 + 396))
    assert scores["dice"] == pytest.approx(metrics.dice(lesion, found) / 3)
    assert scores["hd95_mm"] == pytest.approx(
        (metrics.hausdorff95(lesion, found, spacing) + 2 * metrics.RANKING_HD95_CAP_MM) / 3)


def test_ranking_lesion_wise_counts_a_lesion_by_its_volume_in_mm3():
    """A missed lesion of 30 voxels counts (Dice 0) on 2 mm slices, 60 mm^3, and not on 1 mm
    ones; one of exactly 50 mm^3 does not either. With nothing counted and no false positive
    the score is 1 and 0, as the scripts' NaN -> 1 / 0."""
    shape = (20, 20, 12)
    small = cube(np.zeros(shape, bool), (5, 5, 5), (5, 3, 2))
    fifty = cube(np.zeros(shape, bool), (5, 5, 5), (5, 5, 2))
    nothing = np.zeros(shape, bool)
    missed = metrics.ranking_lesion_wise(small, nothing, (1.0, 1.0, 2.0))
    assert (missed["dice"], missed["hd95_mm"], missed["fn"]) == (
        0.0, metrics.RANKING_HD95_CAP_MM, 1)
    for truth in (small, fifty, nothing):
        skipped = metrics.ranking_lesion_wise(truth, nothing, (1.0, 1.0, 1.0))
        assert (skipped["dice"], skipped["hd95_mm"], skipped["fn"]) == (1.0, 0.0, 0)
    false_only = metrics.ranking_lesion_wise(nothing, small, (1.0, 1.0, 1.0))
    assert (false_only["dice"], false_only["hd95_mm"], false_only["fp"]) == (
        0.0, metrics.RANKING_HD95_CAP_MM, 1)


def test_ranking_lesion_wise_lets_one_component_serve_two_lesions():
    """Two true lesions 8 voxels apart (not joined by 3 dilations), one predicted slab over
    both: each lesion is scored against the whole slab, and nothing is a false positive."""
    shape, spacing = (40, 20, 12), (1.0, 1.0, 1.0)
    first = cube(np.zeros(shape, bool), (5, 5, 4), (6, 6, 4))
    second = cube(np.zeros(shape, bool), (19, 5, 4), (6, 6, 4))
    slab = cube(np.zeros(shape, bool), (5, 5, 4), (20, 6, 4))
    scores = metrics.ranking_lesion_wise(first | second, slab, spacing)
    assert (scores["tp"], scores["fn"], scores["fp"]) == (2, 0, 0)
    assert scores["dice"] == pytest.approx(
        (metrics.dice(first, slab) + metrics.dice(second, slab)) / 2)


def test_score_case_ranks_lesions_as_ranking_lesion_wise_does():
    """score_case reuses the region's own Dice and HD95 for a lesion that is the whole
    region: the row's ranking figures are ranking_lesion_wise's computed from scratch, for
    one lesion, for two, and for a lesion with a false positive beside it."""
    shape, spacing = (40, 30, 16), (1.0, 1.2, 2.5)
    one = cube(np.zeros(shape, bool), (5, 5, 4), (9, 7, 5))
    two = cube(one.copy(), (25, 18, 6), (6, 6, 4))
    shifted = cube(np.zeros(shape, bool), (6, 5, 5), (9, 8, 5))
    stray = cube(shifted.copy(), (30, 2, 12), (2, 2, 2))
    truth = np.stack([one, two, one], axis=-1)
    prediction = np.stack([shifted, shifted, stray], axis=-1)
    regions = ("whole_tumor", "tumor_core", "enhancing_tumor")
    unused = {"dice": float("nan"), "hd95_mm": float("nan")}
    row = metrics.score_case("case", shape[2], truth, prediction, regions, spacing,
                             lesions={region: unused for region in regions})
    for k, region in enumerate(regions):
        expected = metrics.ranking_lesion_wise(truth[..., k], prediction[..., k], spacing)
        assert row[f"{region}_ranking_lesion_dice"] == pytest.approx(expected["dice"])
        assert row[f"{region}_ranking_lesion_hd95_mm"] == pytest.approx(expected["hd95_mm"])
    assert row["whole_tumor_ranking_lesion_dice"] == pytest.approx(metrics.dice(one, shifted))
    assert row["tumor_core_ranking_lesion_dice"] < row["whole_tumor_ranking_lesion_dice"]
