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
