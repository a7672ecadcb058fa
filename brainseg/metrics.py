"""Segmentation quality the way the BraTS challenge reports it, per region of each case.

Dice, 95th-percentile Hausdorff distance in millimetres, sensitivity and specificity of a
predicted mask against the ground truth, on the voxel grid of the scan (voxel spacing from
the NIfTI header, so distances are in mm whatever the resolution).

Empty masks follow the BraTS convention:
  - both empty: Dice 1, HD95 0 (nothing to find, nothing found);
  - one empty: Dice 0, HD95 = the diagonal of the volume in mm (373.13 for the 240x240x155
    BraTS grid, the value the challenge's ranking uses): the worst distance possible there,
    rather than infinity or NaN, so means and medians stay defined and a miss costs the most.
Sensitivity is 1 when the truth is empty (no tumor was missed); specificity is computed over
the whole volume.

lesion_wise() adds the lesion-wise Dice and HD95 of the official BraTS evaluation package
(brats-evaluation on panoptica), and ranking_lesion_wise() those of BraTS 2023's ranking
scripts, which group nearby true lesions and leave out the smallest; how their conventions
differ from the ones above is in docs/official_metrics.md.
"""
import functools
import warnings

import numpy as np
import scipy.ndimage
import scipy.spatial

from brainseg import preprocessing

METRIC_NAMES = ("dice", "hd95_mm", "sensitivity", "specificity")
# Lesion-wise Dice and HD95, reported beside the per-case figures when computed: the official
# package's (lesion_wise(): every lesion counts, none grouped) and BraTS 2023's ranking
# (ranking_lesion_wise()).
LESION_METRIC_NAMES = ("lesion_dice", "lesion_hd95_mm", "ranking_lesion_dice",
                       "ranking_lesion_hd95_mm")


def dice_from_sums(intersection, total, smooth=0.0):
    """Dice = 2|A and B| / (|A| + |B|) from its sums: the one formula behind every Dice in
    the project, on numbers, arrays or tensors alike. Case scores use smooth 0 (with the
    convention above for empty masks, see dice()); training adds model.SMOOTH so that its
    loss and per-epoch figures stay defined on batches without tumor."""
    return (2.0 * intersection + smooth) / (total + smooth)


def dice(truth, prediction):
    truth, prediction = truth.astype(bool, copy=False), prediction.astype(bool, copy=False)
    total = np.count_nonzero(truth) + np.count_nonzero(prediction)
    if total == 0:
        return 1.0
    return dice_from_sums(np.count_nonzero(truth & prediction), total)


def surface(mask):
    """Voxels of the mask with a face-neighbour outside it."""
    faces = scipy.ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = scipy.ndimage.binary_erosion(mask, faces, border_value=0)
    return mask & ~eroded


def surface_points(mask, spacing):
    """Positions (mm) of the mask's surface voxels, one row each."""
    return np.argwhere(surface(mask)) * np.asarray(spacing, np.float64)


def grid_diagonal(shape, spacing):
    """The HD95 of a region found where there is none or missed: the volume's diagonal."""
    return float(np.linalg.norm(np.multiply(shape, spacing)))


def hausdorff95(truth, prediction, spacing):
    """95th percentile of the symmetric surface distances, as in MedPy's hd95 (used by the
    BraTS evaluations): both directions pooled, then the percentile; the empty-mask
    conventions above. region_metrics' figure, which computes it on the masks' box."""
    return region_metrics(truth, prediction, spacing)["hd95_mm"]


def hausdorff95_in_box(truth, prediction, spacing):
    """hausdorff95 of two non-empty masks cut to the box holding both plus one voxel.

    The box, not the whole grid: every surface voxel lies in it, and a Euclidean distance
    does not depend on what lies outside, so the result is the same (the margin keeps the
    erosion's border as it was), for a few percent of the 240x240x155 grid. The distances
    from each surface to the other's nearest voxel come from a k-d tree of surface points
    (scipy.spatial), not a distance transform of the box: the surfaces hold a few percent of
    the box's voxels, and the whole-tumor HD95 took 4x less time that way."""
    truth_surface = surface_points(truth, spacing)
    prediction_surface = surface_points(prediction, spacing)
    distances = np.concatenate([
        scipy.spatial.cKDTree(prediction_surface).query(truth_surface)[0],
        scipy.spatial.cKDTree(truth_surface).query(prediction_surface)[0]])
    return float(np.percentile(distances, 95))


def region_metrics(truth, prediction, spacing):
    """{metric name: value} of one region of one case.

    Counted on the box holding both masks plus one voxel: outside it both masks are empty,
    so it holds every true and predicted voxel and only true negatives lie outside, which
    the specificity counts from the sizes. Full-volume comparisons of the 240x240x155 grid
    were most of the scoring time."""
    truth, prediction = truth.astype(bool, copy=False), prediction.astype(bool, copy=False)
    either = truth | prediction
    if not either.any():
        return {"dice": 1.0, "hd95_mm": 0.0, "sensitivity": 1.0, "specificity": 1.0}
    box = preprocessing.bounding_box(either, margin=1)
    volume_shape, volume_voxels = truth.shape, truth.size
    truth, prediction = truth[box], prediction[box]
    true_voxels = np.count_nonzero(truth)
    predicted_voxels = np.count_nonzero(prediction)
    overlap = np.count_nonzero(truth & prediction)
    negatives = volume_voxels - true_voxels
    true_negatives = volume_voxels - np.count_nonzero(either[box])
    if true_voxels and predicted_voxels:
        hd95 = hausdorff95_in_box(truth, prediction, spacing)
    else:
        hd95 = grid_diagonal(volume_shape, spacing)
    return {"dice": dice_from_sums(overlap, true_voxels + predicted_voxels),
            "hd95_mm": hd95,
            "sensitivity": overlap / true_voxels if true_voxels else 1.0,
            "specificity": true_negatives / negatives if negatives else 1.0}


def score_case(case_id, num_slices, truth, prediction, regions, spacing, lesions=None):
    """A per-case metrics row: every metric of every region (channel k of the [..., K]
    masks), on a grid of the given voxel spacing in mm; with `lesions` (lesion_wise() of the
    case's label maps), the lesion-wise Dice and HD95 of each region too, the package's and
    BraTS 2023's ranking (ranking_lesion_wise)."""
    row = {"case": case_id, "slices": num_slices}
    for k, region in enumerate(regions):
        # Boolean once: both scorers read them, and converting a strided channel is costly.
        true_region, predicted_region = truth[..., k] != 0, prediction[..., k] != 0
        scores = region_metrics(true_region, predicted_region, spacing)
        row.update({f"{region}_{name}": value for name, value in scores.items()})
        if lesions is not None:
            row[f"{region}_lesion_dice"] = lesions[region]["dice"]
            row[f"{region}_lesion_hd95_mm"] = lesions[region]["hd95_mm"]
            ranking = ranking_lesion_wise(true_region, predicted_region, spacing, scores)
            row[f"{region}_ranking_lesion_dice"] = ranking["dice"]
            row[f"{region}_ranking_lesion_hd95_mm"] = ranking["hd95_mm"]
    return row


def case_scores(row, regions):
    """The one-line summary of a case that inference prints: Dice of every region, and the
    whole tumor's HD95."""
    dice = "  ".join(f"{region.replace('_', ' ')} {row[f'{region}_dice']:.3f}"
                     for region in regions)
    return f"Dice {dice}  (whole-tumor HD95 {row['whole_tumor_hd95_mm']:.1f} mm)"


def summarize(rows, regions):
    """[{region, metric, mean, median, std, cases}] over the per-case rows of each region.
    Lesion-wise figures are undefined (NaN) for a case without any true lesion of a region:
    they are left out of that region's statistics, and `cases` counts the rest."""
    summary = []
    for region in regions:
        for metric in METRIC_NAMES + LESION_METRIC_NAMES:
            if f"{region}_{metric}" not in rows[0]:
                continue
            values = np.array([row[f"{region}_{metric}"] for row in rows], dtype=float)
            values = values[~np.isnan(values)]
            if not len(values):
                continue
            summary.append({"region": region, "metric": metric, "mean": values.mean(),
                            "median": float(np.median(values)), "std": values.std(),
                            "cases": len(values)})
    return summary


def format_summary(summary):
    """The summarize() table as text, one region and metric per line."""
    lines = [f"{'region':<16} {'metric':<12} {'mean':>8} {'median':>8} {'std':>8}"]
    lines += [f"{s['region']:<16} {s['metric']:<12} {s['mean']:8.4f} {s['median']:8.4f} "
              f"{s['std']:8.4f}" for s in summary]
    return "\n".join(lines)


# The project's regions -> the region groups of the official BraTS glioma configuration.
OFFICIAL_REGIONS = {"whole_tumor": "wt", "tumor_core": "tc", "enhancing_tumor": "et"}
OFFICIAL_HD95_CAP_MM = 373.0  # what the official parsers put for an infinite or missing HD95


@functools.lru_cache(maxsize=1)
def _official_evaluator():
    """The panoptica evaluator with brats-evaluation's glioma configuration (config_gli.yaml:
    labels 1 NETC, 2 SNFH, 3 ET; wt = 1+2+3, tc = 1+3, et = 3). The file is found without
    importing brats_evaluation, whose __init__ pulls in its pandas-based parsers."""
    import contextlib
    import importlib.util
    import io
    import os

    import panoptica
    panoptica.disable_citation_reminder()
    package_dir = importlib.util.find_spec("brats_evaluation").submodule_search_locations[0]
    config = os.path.join(package_dir, "configs", "config_gli.yaml")
    # Loading prints that labels 1-3 are in several groups (wt, tc, et overlap by design).
    with contextlib.redirect_stdout(io.StringIO()):
        official = panoptica.Panoptica_Evaluator.load_from_config(config)
    # Its matching, groups and edge cases, but only the metrics lesion_wise() reads: each
    # lesion's Dice and HD95. The configuration's normalized surface Dice and its whole-region
    # HD95 and NSD are distance transforms that took 70% of a case's lesion-wise scoring.
    settings = panoptica.Panoptica_Evaluator._yaml_repr(official)
    settings.update(instance_metrics=[panoptica.Metric.DSC, panoptica.Metric.HD95],
                    global_metrics=[panoptica.Metric.DSC])
    return panoptica.Panoptica_Evaluator(**settings)


def lesion_wise(truth_labels, prediction_labels, spacing):
    """Lesion-wise scores of one case, computed by the official BraTS evaluation package.

    truth_labels, prediction_labels: [X, Y, Z] label maps in the project's convention (0, 1
    necrotic/non-enhancing core, 2 edema, 4 enhancing tumor); spacing: voxel size in mm per
    axis of the arrays. They are passed to panoptica with the official glioma configuration
    (computing only the metrics read here) after label 4 becomes 3 (the BraTS 2023 convention
    that configuration expects).
    Returns {region: scores} for whole_tumor, tumor_core and enhancing_tumor, where scores has
      tp, fp, fn: matched lesions, unmatched predicted lesions, missed true lesions;
      dice, hd95_mm: lesion-wise Dice and HD95 (mm) in the sense BraTS ranks by since 2023:
        the mean over every true lesion and every false-positive lesion, a missed lesion or
        a false positive counting Dice 0 and HD95 373 mm; this is the arithmetic of the
        package's `brats-parse-metrics mets` with --vol_threshold 0 (every lesion counts).
        (BraTS 2023's own scripts put 374 and dilated the true lesions first; this does not);
      matched_dice, matched_hd95_mm: the mean over matched lesions only, what the package's
        `brats-parse-metrics seg` (glioma and the other non-metastasis tasks) reports as
        lesionwise_dsc_mean / lesionwise_hd95_mean: misses and false positives do not lower
        it. With no match but some lesion: 0 and inf (the parser leaves that inf).
    Conventions of the package: a lesion is a 26-connected component of the region (cc3d),
    without dilation; predicted and true lesions are paired one to one by the maximum
    bipartite matching of their Dice, any overlap qualifying, so a second predicted fragment
    of the same lesion is a false positive. Each pair's Dice and HD95 are computed on the
    two lesions alone (HD95 in mm with this spacing). A region with no true lesion gives NaN
    for dice and hd95_mm (even with false positives, as the official parser does) and NaN
    for matched_dice and matched_hd95_mm when there is no lesion at all.
    """
    from brainseg import layouts

    truth, prediction = np.asarray(truth_labels), np.asarray(prediction_labels)
    # The box of both maps' tumor plus one voxel, as hausdorff95: every lesion, every match
    # and every distance lies in it (1.1 of the 1.5 s a case's scores took on the full grid).
    # Outside it both maps are 0, so the labels are checked and converted in the box alone.
    tumor = (truth != 0) | (prediction != 0)
    if tumor.any():
        box = preprocessing.bounding_box(tumor, margin=1)
        truth, prediction = truth[box], prediction[box]
    arrays = []
    for labels in (truth, prediction):
        unknown = set(np.unique(labels).tolist()) - set(layouts.INTERNAL_LABELS)
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} are not in the project's convention "
                             f"{sorted(layouts.INTERNAL_LABELS)}")
        arrays.append(layouts.to_release_labels(labels.astype(np.uint8), "brats2023"))
    return official_lesion_scores(*arrays, spacing)


def official_lesion_scores(truth, prediction, spacing):
    """lesion_wise() of two label maps already in the BraTS 2023 convention, on their grid."""
    with warnings.catch_warnings():
        # panoptica warns about the NSD threshold it computes but these scores do not use.
        warnings.filterwarnings("ignore", message="The threshold is set to 0.5")
        results = _official_evaluator().evaluate(
            prediction, truth, voxelspacing=tuple(float(s) for s in spacing),
            skip_groups=["netc", "snfh", "rc"])
    scores = {}
    for region, group in OFFICIAL_REGIONS.items():
        result = results[group].to_dict(True)
        tp, fp, fn = int(result["tp"]), int(result["fp"]), int(result["fn"])
        matched = [lesion for lesion in result["reference_instances"] if lesion["is_matched"]]
        if tp + fn == 0:
            dice = hd95 = float("nan")
        else:
            penalized = fp + fn
            dice = sum(lesion["sq_dsc"] for lesion in matched) / (tp + penalized)
            hd95 = (sum(lesion["sq_hd95"] for lesion in matched)
                    + OFFICIAL_HD95_CAP_MM * penalized) / (tp + penalized)
        scores[region] = {"tp": tp, "fp": fp, "fn": fn, "dice": float(dice),
                          "hd95_mm": float(hd95), "matched_dice": float(result["sq_dsc"]),
                          "matched_hd95_mm": float(result["sq_hd95"])}
    return scores


# BraTS 2023's ranking scripts, glioma task (rachitsaluja/BraTS-2023-Metrics, BraTS-GLI):
# true lesions that RANKING_DILATION dilations join are one lesion, and a true lesion of at
# most RANKING_MIN_LESION_MM3 is not counted; a missed lesion or a false positive scores HD95
# RANKING_HD95_CAP_MM (their 374 for infinity).
RANKING_DILATION = 3
RANKING_MIN_LESION_MM3 = 50.0
RANKING_HD95_CAP_MM = 374.0


def ranking_lesion_wise(truth, prediction, spacing, whole=None):
    """Lesion-wise Dice and HD95 of one region (binary masks) as BraTS 2023 ranked gliomas.

    The true mask is dilated RANKING_DILATION times (18-connected steps) and each
    26-connected component of that is one true lesion: the true voxels in it, so a speck of
    edema beside the tumor belongs to the tumor. The predicted components that touch a
    lesion's dilation are its prediction (one component may serve two lesions); the others
    are false positives. Each true lesion larger than RANKING_MIN_LESION_MM3 scores the Dice
    and HD95 of its prediction (0 and the cap when there is none); the smaller ones are not
    counted, nor are predictions near them false positives. The Dice is the sum of the
    counted lesions' Dice over their number plus the false positives'; HD95 the same with
    the cap for each false positive. Nothing to count (no true lesion above the size, no false
    positive) gives Dice 1 and HD95 0, as the scripts' NaN -> 1 and 0 do. Returns
    {"dice", "hd95_mm", "tp", "fn", "fp"}, tp and fn counting the counted lesions.
    The lesions' HD95 is hausdorff95's (face-connected surface voxels), where the scripts
    used surface-element distances (DeepMind's surface_distance): a voxel's fraction apart.
    `whole`, region_metrics() of the same masks, is reused when the one lesion is the whole
    truth and its prediction the whole prediction, as it mostly is: the lesion's HD95 was
    half of the ranking's time."""
    nothing = {"dice": 1.0, "hd95_mm": 0.0, "tp": 0, "fn": 0, "fp": 0}
    truth, prediction = truth.astype(bool, copy=False), prediction.astype(bool, copy=False)
    either = truth | prediction
    if not either.any():
        return nothing
    # The box of both plus the dilation's reach: every lesion, prediction and join lies in it.
    box = preprocessing.bounding_box(either, margin=RANKING_DILATION + 1)
    truth, prediction = truth[box], prediction[box]
    all_neighbours = np.ones((3, 3, 3), bool)
    step = scipy.ndimage.generate_binary_structure(3, 2)
    reach, num_lesions = scipy.ndimage.label(
        scipy.ndimage.binary_dilation(truth, step, iterations=RANKING_DILATION), all_neighbours)
    components, num_components = scipy.ndimage.label(prediction, all_neighbours)
    voxel_mm3 = float(np.prod(spacing))
    found_components, dice_scores, hd95_scores, found_lesions = set(), [], [], 0
    for lesion, where in enumerate(scipy.ndimage.find_objects(reach), start=1):
        in_reach = reach[where] == lesion
        touching = np.unique(components[where][in_reach])
        touching = touching[touching != 0]
        found_components.update(touching.tolist())
        true_lesion = in_reach & truth[where]
        if np.count_nonzero(true_lesion) * voxel_mm3 <= RANKING_MIN_LESION_MM3:
            continue
        if not touching.size:
            dice_scores.append(0.0)
            hd95_scores.append(RANKING_HD95_CAP_MM)
            continue
        found_lesions += 1
        if whole is not None and num_lesions == 1 and touching.size == num_components:
            dice_scores.append(whole["dice"])
            hd95_scores.append(min(whole["hd95_mm"], RANKING_HD95_CAP_MM))
            continue
        found = np.isin(components, touching)
        lesion_mask = np.zeros_like(truth)
        lesion_mask[where] = true_lesion
        dice_scores.append(dice(lesion_mask, found))
        hd95_scores.append(min(hausdorff95_in_box(lesion_mask, found, spacing),
                               RANKING_HD95_CAP_MM))
    false_positives = num_components - len(found_components)
    counted = len(dice_scores) + false_positives
    if counted == 0:
        return nothing
    penalty = RANKING_HD95_CAP_MM * false_positives
    return {"dice": float(sum(dice_scores) / counted),
            "hd95_mm": float((sum(hd95_scores) + penalty) / counted),
            "tp": found_lesions, "fn": len(dice_scores) - found_lesions, "fp": false_positives}
