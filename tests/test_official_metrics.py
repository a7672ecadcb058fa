"""The project's metrics against the official BraTS evaluation package (brats-evaluation
0.0.10 on panoptica 2.1.7) on the same NIfTI files, and brainseg.metrics.lesion_wise.

The files are label maps in the BraTS 2023 convention (3 = enhancing tumor), the one the
package's glioma configuration expects; the project reads them as it reads any BraTS 2023
segmentation (layouts.to_internal_labels). The official side is the package's own pipeline:
evaluate_single_exam (what `brats-evaluate` runs per case) and parse_seg_results /
parse_mets_results (what `brats-parse-metrics seg` / `mets` run on its JSON).

Where the two agree: Dice to 0.001 (the same formula); HD95 to 1e-6 once both are in voxel
units, since the package's global HD95 ignores the voxel spacing (docs/official_metrics.md)
and is otherwise the same computation as ours (faces-connected surfaces, pooled 95th
percentile). Where the conventions differ, the tests assert the documented difference.
"""
import csv
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from brainseg import layouts, metrics, preprocessing

SHAPE = (40, 40, 24)
SPACING = (1.0, 1.2, 2.5)  # anisotropic, as the header of every file says
REGIONS = preprocessing.LABEL_MODES["regions"]  # whole tumor {1,2,4}, core {1,4}, ET {4}
GRID = np.indices(SHAPE).transpose(1, 2, 3, 0)
OFFICIAL_CAP = 373.0  # brats_evaluation's parsers turn an infinite HD95 into this
PARSED = {"whole_tumor": "wt", "tumor_core": "tc", "enhancing_tumor": "et"}
# The official pipeline warns about the NSD threshold (unused here) and, in its parsers,
# about standard deviations over NaN and inf.
pytestmark = pytest.mark.filterwarnings("ignore:The threshold is set to 0.5",
                                        "ignore:invalid value encountered:RuntimeWarning")


def ellipsoid(center, radii):
    return (((GRID - np.asarray(center, float)) / np.asarray(radii, float)) ** 2).sum(-1) <= 1


def tumor(labels, center, radii, enhancing=True):
    """Nested BraTS labels: edema (2), inside it enhancing tumor (4) around necrosis (1)."""
    radii = np.asarray(radii, float)
    labels[ellipsoid(center, radii)] = 2
    labels[ellipsoid(center, 0.6 * radii)] = 4 if enhancing else 1
    labels[ellipsoid(center, 0.3 * radii)] = 1
    return labels


def case(*tumors):
    labels = np.zeros(SHAPE, np.uint8)
    for args in tumors:
        tumor(labels, *args)
    return labels


def with_fragment(labels):
    """A small false-positive fragment of edema, apart from everything else."""
    labels[ellipsoid((33, 6, 20), (2, 2, 1))] = 2
    return labels


BIG, SMALL = ((11, 11, 8), (7, 6, 3)), ((28, 27, 15), (5, 5, 3))
CASES = {  # name: (truth, prediction), internal labels
    # Two tumors, each found with a shifted, resized outline.
    "two_tumors": (case(BIG, SMALL), case(((13, 10, 9), (8, 7, 3)), ((26, 29, 16), (4, 4, 2)))),
    # One tumor found, plus a separate false-positive fragment of edema.
    "false_positive_fragment": (case(BIG), with_fragment(case(((11, 12, 8), (6, 6, 3))))),
    # No enhancing tumor in the truth nor in the prediction.
    "no_et_anywhere": (case((*BIG, False)), case((BIG[0], (6, 6, 3), False))),
    # Enhancing tumor predicted where the truth has none, and the reverse.
    "et_false_positive": (case((*BIG, False)), case(BIG)),
    "et_missed": (case(BIG), case((*BIG, False))),
    # A prediction that does not touch the truth.
    "disjoint": (case(BIG), case(((30, 30, 16), (5, 5, 3)))),
}


def write_label_map(path, internal_labels):
    labels = layouts.to_release_labels(internal_labels, "brats2023")
    nib.save(nib.Nifti1Image(labels, np.diag([*SPACING, 1.0])), str(path))


def read_label_map(path):
    image = nib.load(str(path))
    labels = layouts.to_internal_labels(np.asarray(image.dataobj), "brats2023")
    return labels, tuple(float(s) for s in image.header.get_zooms())


def read_parsed_csv(path):
    """The parser's CSV -> {subject: {column: float}} (empty cells are NaN)."""
    with open(path) as f:
        return {row.pop("subject_id"): {k: float(v) if v else math.nan for k, v in row.items()}
                for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Every case written to NIfTI, scored by the project and by the official pipeline."""
    assert importlib.util.find_spec("SimpleITK") is None, (
        "with SimpleITK installed panoptica reads .nii.gz through it and applies the spacing "
        "in reversed axis order; see docs/official_metrics.md")
    from brats_evaluation import (config_path, evaluate_single_exam, parse_mets_results,
                                  parse_seg_results)
    from panoptica import Panoptica_Evaluator

    root = tmp_path_factory.mktemp("official")
    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    ours, official_results, files = {}, [], {}
    for name, (truth, prediction) in CASES.items():
        truth_path, prediction_path = root / f"{name}-seg.nii.gz", root / f"{name}-pred.nii.gz"
        write_label_map(truth_path, truth)
        write_label_map(prediction_path, prediction)
        files[name] = (truth_path, prediction_path)
        (truth_labels, spacing), (prediction_labels, _) = (read_label_map(truth_path),
                                                          read_label_map(prediction_path))
        ours[name] = {region: metrics.region_metrics(np.isin(truth_labels, members),
                                                     np.isin(prediction_labels, members),
                                                     spacing)
                      for region, members in REGIONS.items()}
        official_results.append(evaluate_single_exam(str(prediction_path), str(truth_path),
                                                     name, evaluator))
    assert not any("error" in result for result in official_results), official_results
    summary = root / "summary.json"
    # brats-evaluate's own json.dump fails on numpy >= 2.3, whose count_nonzero returns numpy
    # integers (panoptica's volumes): numpy scalars are written as the numbers they hold.
    summary.write_text(json.dumps({"metrics": official_results, "missings": []},
                                  default=lambda value: value.item()))
    parse_seg_results(str(summary), str(root / "seg.csv"))
    parse_mets_results(str(summary), 0.0, 0.1, str(root / "mets.csv"))
    return {"ours": ours, "seg": read_parsed_csv(root / "seg.csv"),
            "mets": read_parsed_csv(root / "mets.csv"), "files": files}


def official(evaluated, name, region, metric):
    return evaluated["seg"][name][f"global_{metric}_{PARSED[region]}"]


def unit_spacing_hd95(name, region):
    truth, prediction = (np.isin(labels, REGIONS[region]) for labels in CASES[name])
    return metrics.hausdorff95(truth, prediction, (1.0, 1.0, 1.0))


@pytest.mark.parametrize("name", ["two_tumors", "false_positive_fragment"])
def test_dice_and_hd95_agree_where_both_masks_overlap(evaluated, name):
    for region in REGIONS:
        ours = evaluated["ours"][name][region]
        assert official(evaluated, name, region, "dsc") == pytest.approx(ours["dice"], abs=1e-3)
        # The official global HD95 is in voxel units: ours on a 1 mm grid, to rounding.
        assert official(evaluated, name, region, "hd95") == pytest.approx(
            unit_spacing_hd95(name, region), abs=1e-6)


def test_official_global_hd95_ignores_the_voxel_spacing(evaluated):
    """Ours is in mm from the header's spacing (1 x 1.2 x 2.5 here); the package's global
    HD95 is the same whatever the spacing, so on this grid it is smaller than ours."""
    for region in REGIONS:
        ours_mm = evaluated["ours"]["two_tumors"][region]["hd95_mm"]
        assert official(evaluated, "two_tumors", region, "hd95") < ours_mm - 0.5


def test_both_empty_official_nan_ours_one_and_zero(evaluated):
    ours = evaluated["ours"]["no_et_anywhere"]["enhancing_tumor"]
    assert (ours["dice"], ours["hd95_mm"]) == (1.0, 0.0)
    assert math.isnan(official(evaluated, "no_et_anywhere", "enhancing_tumor", "dsc"))
    assert math.isnan(official(evaluated, "no_et_anywhere", "enhancing_tumor", "hd95"))
    # The other regions of that case are ordinary, and agree.
    for region in ("whole_tumor", "tumor_core"):
        assert official(evaluated, "no_et_anywhere", region, "dsc") == pytest.approx(
            evaluated["ours"]["no_et_anywhere"][region]["dice"], abs=1e-3)


@pytest.mark.parametrize("name", ["et_false_positive", "et_missed"])
def test_one_empty_official_373_ours_the_grid_diagonal(evaluated, name):
    ours = evaluated["ours"][name]["enhancing_tumor"]
    diagonal = float(np.linalg.norm(np.multiply(SHAPE, SPACING)))  # 373.13 on the BraTS grid
    assert ours["dice"] == 0.0 and ours["hd95_mm"] == pytest.approx(diagonal)
    assert official(evaluated, name, "enhancing_tumor", "dsc") == 0.0
    assert official(evaluated, name, "enhancing_tumor", "hd95") == OFFICIAL_CAP


def test_no_overlap_official_373_ours_the_real_distance(evaluated):
    """The package treats any prediction that misses the truth entirely like an empty one
    (HD95 infinite, parsed as 373); ours measures how far it is."""
    for region in REGIONS:
        ours = evaluated["ours"]["disjoint"][region]
        assert official(evaluated, "disjoint", region, "dsc") == ours["dice"] == 0.0
        assert official(evaluated, "disjoint", region, "hd95") == OFFICIAL_CAP
        assert 10 < ours["hd95_mm"] < 60


def box(labels, corner, size, value=4):
    labels[tuple(slice(c, c + s) for c, s in zip(corner, size))] = value
    return labels


def test_lesion_wise_hand_computed():
    """Two true lesions: one found exactly, one missed; plus one false-positive fragment.
    Each region (enhancing tumor only, so all three alike) has 1 TP, 1 FN, 1 FP: lesion-wise
    Dice (1 + 0 + 0) / 3, HD95 (0 + 373 + 373) / 3; over the matched lesion alone 1 and 0."""
    truth = box(box(np.zeros(SHAPE, np.uint8), (4, 4, 4), (7, 7, 5)), (26, 26, 14), (6, 6, 5))
    prediction = box(box(np.zeros(SHAPE, np.uint8), (4, 4, 4), (7, 7, 5)), (32, 4, 2), (3, 3, 2))
    scores = metrics.lesion_wise(truth, prediction, SPACING)
    assert set(scores) == set(REGIONS)
    for region in REGIONS:
        assert scores[region] == pytest.approx({
            "tp": 1, "fp": 1, "fn": 1, "dice": 1 / 3, "hd95_mm": 2 * 373 / 3,
            "matched_dice": 1.0, "matched_hd95_mm": 0.0})


def test_lesion_wise_measures_each_lesion_in_mm_with_the_spacing_given():
    """One lesion predicted a slice too high: its Dice and HD95 are ours for that pair, with
    the spacing applied to the array axes in order (2.5 mm along the third)."""
    truth = box(np.zeros(SHAPE, np.uint8), (10, 10, 6), (8, 6, 4))
    prediction = box(np.zeros(SHAPE, np.uint8), (10, 10, 7), (8, 6, 4))
    scores = metrics.lesion_wise(truth, prediction, SPACING)["enhancing_tumor"]
    t, p = truth > 0, prediction > 0
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 0, 0)
    assert scores["matched_dice"] == scores["dice"] == pytest.approx(metrics.dice(t, p))
    assert scores["matched_hd95_mm"] == scores["hd95_mm"] == pytest.approx(
        metrics.hausdorff95(t, p, SPACING))
    assert scores["hd95_mm"] != pytest.approx(metrics.hausdorff95(t, p, SPACING[::-1]))


def test_lesion_wise_matches_the_official_parsers_on_the_same_files(evaluated):
    """lesion_wise on the arrays = brats-parse-metrics on brats-evaluate's output for the
    same files: `mets` (every lesion counts) for dice and hd95_mm, `seg` for the matched
    means, and the lesion counts."""
    for name in CASES:
        (truth, spacing), (prediction, _) = map(read_label_map, evaluated["files"][name])
        scores = metrics.lesion_wise(truth, prediction, spacing)
        for region, group in PARSED.items():
            mets, seg, ours = evaluated["mets"][name], evaluated["seg"][name], scores[region]
            assert (ours["tp"], ours["fp"], ours["fn"]) == tuple(
                mets[f"all_instance_{count}_{group}"] for count in ("tp", "fp", "fn"))
            for key, parsed in (("dice", mets[f"lesionwise_dsc_mean_{group}"]),
                                ("hd95_mm", mets[f"lesionwise_hd95_mean_{group}"]),
                                ("matched_dice", seg[f"lesionwise_dsc_mean_{group}"]),
                                ("matched_hd95_mm", seg[f"lesionwise_hd95_mean_{group}"])):
                assert ours[key] == pytest.approx(parsed, abs=1e-9, nan_ok=True), \
                    (name, region, key)


def test_lesion_wise_on_the_tumor_box_equals_the_full_grid():
    """lesion_wise scores the box of both maps' tumor plus a voxel: the same lesions, matches
    and distances as the package on the whole grid, a lesion on the grid's edge included."""
    truth = box(box(np.zeros(SHAPE, np.uint8), (10, 12, 6), (8, 6, 4), 1), (12, 13, 7), (3, 3, 2))
    truth = box(truth, (0, 30, 20), (5, 4, 4), 2)
    prediction = box(box(np.zeros(SHAPE, np.uint8), (11, 12, 7), (7, 7, 4), 1), (12, 14, 7),
                     (4, 2, 2))
    prediction = box(prediction, (25, 3, 3), (3, 3, 2), 2)
    release = [layouts.to_release_labels(labels, "brats2023") for labels in (truth, prediction)]
    full_grid = metrics.official_lesion_scores(*release, SPACING)
    on_the_box = metrics.lesion_wise(truth, prediction, SPACING)
    for region in REGIONS:
        assert on_the_box[region] == pytest.approx(full_grid[region], abs=1e-12)
    assert full_grid["whole_tumor"]["fp"] == 1 and full_grid["whole_tumor"]["fn"] == 1


def test_lesion_wise_without_true_lesions():
    empty = np.zeros(SHAPE, np.uint8)
    fragment = box(np.zeros(SHAPE, np.uint8), (5, 5, 5), (3, 3, 2))
    nothing = metrics.lesion_wise(empty, empty, SPACING)["whole_tumor"]
    assert (nothing["tp"], nothing["fp"], nothing["fn"]) == (0, 0, 0)
    assert all(math.isnan(nothing[key])
               for key in ("dice", "hd95_mm", "matched_dice", "matched_hd95_mm"))
    # False positives only: the official lesion-wise means stay NaN (no true lesion to
    # average over); the matched ones are the package's zero-TP values, 0 and inf.
    only_false = metrics.lesion_wise(empty, fragment, SPACING)["whole_tumor"]
    assert (only_false["tp"], only_false["fp"], only_false["fn"]) == (0, 1, 0)
    assert math.isnan(only_false["dice"]) and math.isnan(only_false["hd95_mm"])
    assert (only_false["matched_dice"], only_false["matched_hd95_mm"]) == (0.0, math.inf)


def test_lesion_wise_rejects_labels_outside_the_project_convention():
    labels = np.zeros(SHAPE, np.uint8)
    labels[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"\[3\]"):
        metrics.lesion_wise(labels, np.zeros(SHAPE, np.uint8), SPACING)


def test_importing_metrics_does_not_import_the_official_package():
    code = "import sys; from brainseg import metrics; print('panoptica' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=pathlib.Path(__file__).parents[1])
    assert out.stdout.strip() == "False"
