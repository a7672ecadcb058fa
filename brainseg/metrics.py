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
"""
import numpy as np
import scipy.ndimage

METRIC_NAMES = ("dice", "hd95_mm", "sensitivity", "specificity")


def dice_from_sums(intersection, total, smooth=0.0):
    """Dice = 2|A and B| / (|A| + |B|) from its sums: the one formula behind every Dice in
    the project, on numbers, arrays or tensors alike. Case scores use smooth 0 (with the
    convention above for empty masks, see dice()); training adds model.SMOOTH so that its
    loss and per-epoch figures stay defined on batches without tumor."""
    return (2.0 * intersection + smooth) / (total + smooth)


def dice(truth, prediction):
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    total = np.count_nonzero(truth) + np.count_nonzero(prediction)
    if total == 0:
        return 1.0
    return dice_from_sums(np.count_nonzero(truth & prediction), total)


def surface(mask):
    """Voxels of the mask with a face-neighbour outside it."""
    faces = scipy.ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = scipy.ndimage.binary_erosion(mask, faces, border_value=0)
    return mask & ~eroded


def surface_distances(from_mask, to_mask, spacing):
    """Distance (mm) from every surface voxel of from_mask to the nearest surface voxel of
    to_mask: a Euclidean distance transform of the complement of to_mask's surface."""
    distance_to_surface = scipy.ndimage.distance_transform_edt(~surface(to_mask), sampling=spacing)
    return distance_to_surface[surface(from_mask)]


def hausdorff95(truth, prediction, spacing):
    """95th percentile of the symmetric surface distances, as in MedPy's hd95 (used by the
    BraTS evaluations): both directions pooled, then the percentile."""
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    if not truth.any() and not prediction.any():
        return 0.0
    if not truth.any() or not prediction.any():
        return float(np.linalg.norm(np.multiply(truth.shape, spacing)))
    distances = np.concatenate([surface_distances(truth, prediction, spacing),
                                surface_distances(prediction, truth, spacing)])
    return float(np.percentile(distances, 95))


def sensitivity(truth, prediction):
    positives = np.count_nonzero(truth)
    return 1.0 if positives == 0 else np.count_nonzero(truth & prediction) / positives


def specificity(truth, prediction):
    negatives = truth.size - np.count_nonzero(truth)
    return 1.0 if negatives == 0 else np.count_nonzero(~truth & ~prediction) / negatives


def region_metrics(truth, prediction, spacing):
    """{metric name: value} of one region of one case."""
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    return {"dice": dice(truth, prediction), "hd95_mm": hausdorff95(truth, prediction, spacing),
            "sensitivity": sensitivity(truth, prediction),
            "specificity": specificity(truth, prediction)}


def score_case(case_id, num_slices, truth, prediction, regions, spacing):
    """A per-case metrics row: every metric of every region (channel k of the [..., K]
    masks), on a grid of the given voxel spacing in mm."""
    row = {"case": case_id, "slices": num_slices}
    for k, region in enumerate(regions):
        scores = region_metrics(truth[..., k], prediction[..., k], spacing)
        row.update({f"{region}_{name}": value for name, value in scores.items()})
    return row


def case_scores(row, regions):
    """The one-line summary of a case that inference prints: Dice of every region, and the
    whole tumor's HD95."""
    dice = "  ".join(f"{region.replace('_', ' ')} {row[f'{region}_dice']:.3f}"
                     for region in regions)
    return f"Dice {dice}  (whole-tumor HD95 {row['whole_tumor_hd95_mm']:.1f} mm)"


def summarize(rows, regions):
    """[{region, metric, mean, median, std}] over the per-case rows of each region."""
    summary = []
    for region in regions:
        for metric in METRIC_NAMES:
            values = np.array([row[f"{region}_{metric}"] for row in rows], dtype=float)
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
