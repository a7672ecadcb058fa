"""Tests of the realistic phantom (brainseg/phantom.py): format, labels, anatomy, contrast,
mimics, thick slices and resampling.

The tissue maps that a case is made from ("truth") tell which voxels are white matter, grey
matter or CSF, so the contrast orderings are measured on the generated images themselves.
Grids are small (2-5 mm voxels) except one full-size case; the file takes about 20 s.
"""
import dataclasses
import functools
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
from brainseg import phantom  # noqa: E402
from brainseg.phantom import TumorPhenomena, make_case, make_case_with_truth  # noqa: E402

SMALL_SHAPE = (48, 48, 24)
MEDIUM_SHAPE = (64, 64, 40)
FINE_SHAPE = (96, 96, 62)  # 2.5 mm voxels: the rim and the tissues are resolved
FULL_SHAPE = phantom.BRATS_SHAPE
MODALITIES = ("flair", "t1", "t1ce", "t2")
HIGH_GRADE = TumorPhenomena(lower_grade_probability=0.0)
LOWER_GRADE = TumorPhenomena(lower_grade_probability=1.0)


@functools.lru_cache(maxsize=None)
def case(seed, shape, phenomena=TumorPhenomena()):
    """Cached (case, truth): several tests look at the same cases."""
    return make_case_with_truth(seed, shape, phenomena)


def test_make_case_is_deterministic_in_the_seed():
    first, again, other = (make_case(seed, SMALL_SHAPE) for seed in (7, 7, 8))
    assert sorted(first) == sorted(MODALITIES + ("seg",))
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name]), name


def test_make_case_matches_make_case_with_truth():
    volumes, _ = case(3, SMALL_SHAPE)
    for name, volume in make_case(3, SMALL_SHAPE).items():
        np.testing.assert_array_equal(volume, volumes[name])


def test_format_and_background():
    volumes, truth = case(1, MEDIUM_SHAPE)
    brain = truth["brain"]
    assert volumes["seg"].dtype == np.uint8 and volumes["seg"].shape == MEDIUM_SHAPE
    assert set(np.unique(volumes["seg"])) <= {0, 1, 2, 4}
    for modality in MODALITIES:
        image = volumes[modality]
        assert image.dtype == np.int16 and image.shape == MEDIUM_SHAPE
        assert np.all(image[~brain] == 0), modality  # skull-stripped: exactly 0 outside
        assert np.all(image[brain] > 0), modality
    # The brain fills the grid like a BraTS brain: centred, about 1.2-1.9 litres.
    spacing = phantom.voxel_spacing_mm(MEDIUM_SHAPE)
    assert 1.2e6 < brain.sum() * np.prod(spacing) < 1.9e6
    centre_mm = (np.argwhere(brain).mean(axis=0) + 0.5) * spacing
    np.testing.assert_allclose(centre_mm, np.array(FULL_SHAPE) / 2, atol=12)


def test_voxel_spacing_spans_the_brats_field_of_view():
    np.testing.assert_allclose(phantom.voxel_spacing_mm(SMALL_SHAPE), [5.0, 5.0, 155 / 24])
    np.testing.assert_allclose(phantom.voxel_spacing_mm(FULL_SHAPE), [1.0, 1.0, 1.0])


def test_every_case_has_its_own_brain():
    masks = [case(seed, MEDIUM_SHAPE)[1]["brain"] for seed in (1, 2)]
    dice = 2 * (masks[0] & masks[1]).sum() / (masks[0].sum() + masks[1].sum())
    assert 0.75 < dice < 0.98  # the same template, deformed differently


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_tumors_lie_inside_the_brain(seed):
    volumes, truth = case(seed, MEDIUM_SHAPE)
    tumor = volumes["seg"] > 0
    assert tumor.any()
    assert not np.any(tumor & ~truth["brain"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_high_grade_labels_are_nested(seed):
    seg = case(seed, FINE_SHAPE, HIGH_GRADE)[0]["seg"]
    whole, core, enhancing = seg > 0, np.isin(seg, (1, 4)), seg == 4
    assert enhancing.any() and (seg == 1).any()
    # Edema around the core: most voxels just outside the core are edema.
    around = ndimage.binary_dilation(core) & ~core
    assert np.mean(seg[around] == 2) > 0.5
    # The enhancing rim around the necrosis: label 1 lies deeper in the core than label 4.
    depth = ndimage.distance_transform_edt(core)
    assert depth[seg == 1].mean() > depth[enhancing].mean()
    # Enhancing tumor is a small part of the whole tumor, as in BraTS.
    assert 0.03 < enhancing.sum() / whole.sum() < 0.5


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_lower_grade_has_no_enhancing_tumor(seed):
    volumes, truth = case(seed, MEDIUM_SHAPE, LOWER_GRADE)
    assert not truth["high_grade"]
    assert (volumes["seg"] > 0).any()
    assert not np.any(volumes["seg"] == 4)


def test_default_mix_of_grades_is_mostly_high_grade():
    grades = [case(seed, SMALL_SHAPE)[1]["high_grade"] for seed in range(20)]
    assert 10 <= sum(grades) <= 19


def _median(image, mask):
    assert mask.sum() > 20, "too few voxels to measure"
    return float(np.median(image[mask]))


@pytest.mark.parametrize("seed", [1, 2])
def test_contrast_orderings_hold_on_the_images(seed):
    volumes, truth = case(seed, FINE_SHAPE, HIGH_GRADE)
    seg = volumes["seg"]
    normal = (seg == 0) & truth["brain"] & (truth["flair_mimic"] < 0.05)
    # The tumor's surroundings are excluded: its edema fades out across the labelled border.
    normal &= ~ndimage.binary_dilation(seg > 0, iterations=3)
    tissue = {"wm": normal & (truth["white"] > 0.9), "gm": normal & (truth["grey"] > 0.6),
              "csf": normal & (truth["csf"] > 0.9)}
    median = {m: {t: _median(volumes[m], mask) for t, mask in tissue.items()} for m in MODALITIES}
    assert median["t1"]["wm"] > median["t1"]["gm"] > median["t1"]["csf"]
    assert median["t1ce"]["wm"] > median["t1ce"]["gm"] > median["t1ce"]["csf"]
    assert median["t2"]["csf"] > median["t2"]["gm"] > median["t2"]["wm"]
    assert median["flair"]["gm"] > median["flair"]["wm"] > median["flair"]["csf"]
    # Edema is bright on FLAIR and T2; the enhancing rim is bright on T1ce only; necrosis
    # (label 1 deep in the core) is dark on T1.
    edema, enhancing = seg == 2, seg == 4
    assert _median(volumes["flair"], edema) > median["flair"]["wm"]
    assert _median(volumes["t2"], edema) > median["t2"]["wm"]
    rest = truth["brain"] & ~enhancing
    assert _median(volumes["t1ce"], enhancing) > np.percentile(volumes["t1ce"][rest], 90)
    assert _median(volumes["t1"], enhancing) < median["t1"]["wm"]
    necrosis = (seg == 1) & (ndimage.distance_transform_edt(np.isin(seg, (1, 4))) > 2)
    assert _median(volumes["t1"], necrosis) < median["t1"]["gm"]


def test_flair_bright_mimics_are_labelled_background():
    with_mimics = TumorPhenomena(mimic_lesion_probability=1.0, mimic_lesion_count=(12, 12))
    volumes, truth = case(4, FINE_SHAPE, with_mimics)
    lesion = truth["flair_mimic"] > 0.5
    assert lesion.sum() > 5
    assert np.all(volumes["seg"][truth["flair_mimic"] > 0] == 0)
    white = (volumes["seg"] == 0) & (truth["white"] > 0.9) & (truth["flair_mimic"] == 0)
    assert _median(volumes["flair"], lesion) > 1.2 * _median(volumes["flair"], white)
    _, without = case(4, FINE_SHAPE, TumorPhenomena(mimic_lesion_probability=0.0))
    assert not without["flair_mimic"].any()


def test_enhancing_mimics_are_labelled_background():
    _, truth = case(4, FINE_SHAPE, TumorPhenomena(enhancing_mimic_probability=1.0))
    volumes = case(4, FINE_SHAPE, TumorPhenomena(enhancing_mimic_probability=1.0))[0]
    bright = truth["t1ce_mimic"] > 0.3
    assert bright.sum() > 5
    assert np.mean(volumes["seg"][bright] == 0) > 0.95
    _, without = case(4, FINE_SHAPE, TumorPhenomena(enhancing_mimic_probability=0.0))
    assert not without["t1ce_mimic"].any()


def _roughness_z_over_x(image, brain):
    """Mean absolute neighbour difference along z over that along x, inside the brain."""
    inner = ndimage.binary_erosion(brain, iterations=2)
    image = image.astype(np.float32)
    along_x = np.abs(np.diff(image, axis=0))[inner[1:] & inner[:-1]].mean()
    along_z = np.abs(np.diff(image, axis=2))[inner[..., 1:] & inner[..., :-1]].mean()
    return along_z / along_x


def test_thick_slices_are_smoother_along_z():
    shape = (120, 120, 78)  # 2 mm voxels in every direction
    thick = TumorPhenomena(thick_slice_probability=1.0, thick_slice_mm=(6.0, 6.0))
    thin = TumorPhenomena(thick_slice_probability=0.0)
    thick_volumes, thick_truth = make_case_with_truth(5, shape, thick)
    thin_volumes, thin_truth = make_case_with_truth(5, shape, thin)
    assert thick_truth["thick_slice_mm"]["flair"] == 6.0
    assert thin_truth["thick_slice_mm"]["flair"] == 0.0
    thick_ratio = _roughness_z_over_x(thick_volumes["flair"], thick_truth["brain"])
    thin_ratio = _roughness_z_over_x(thin_volumes["flair"], thin_truth["brain"])
    assert thick_ratio < 0.8 and thick_ratio < 0.8 * thin_ratio


def test_a_smaller_grid_is_the_same_case_resampled():
    seed = 2
    full = case(seed, FULL_SHAPE, HIGH_GRADE)[0]["seg"]
    volumes = {shape: case(seed, shape, HIGH_GRADE)[0]["seg"] for shape in (MEDIUM_SHAPE,
                                                                             FINE_SHAPE)}
    volumes[FULL_SHAPE] = full

    def whole_tumor(shape):
        seg = volumes[shape]
        spacing = phantom.voxel_spacing_mm(shape)
        tumor = seg > 0
        return tumor.sum() * np.prod(spacing), (np.argwhere(tumor).mean(axis=0) + 0.5) * spacing

    reference_mm3, reference_centre = whole_tumor(FULL_SHAPE)
    assert reference_mm3 > 5000
    for shape in (MEDIUM_SHAPE, FINE_SHAPE):
        volume_mm3, centre = whole_tumor(shape)
        assert abs(volume_mm3 / reference_mm3 - 1) < 0.25, shape
        np.testing.assert_allclose(centre, reference_centre, atol=4)


def test_module_needs_neither_tensorflow_nor_settings_nor_nilearn_import():
    code = ("import sys; from brainseg import phantom; phantom._reference(); "
            "bad = {'tensorflow', 'settings', 'nilearn'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, check=True, timeout=120)


def test_template_cache_is_outside_the_repository():
    path = os.path.realpath(phantom._cache_path())
    assert not path.startswith(os.path.realpath(REPO_DIR) + os.sep)
    reference = phantom._reference()
    fractions = reference["maps"].astype(np.float32) / 255
    assert fractions.sum(axis=0).max() <= 1.02  # grey + white + CSF add up to the brain


def test_phenomena_from_text_sets_fields_by_their_default_types():
    phenomena = phantom.phenomena_from(["bias_field_strength=0.3", "core_radius_mm=10,15",
                                        "mimic_lesion_count=1,3"])
    assert phenomena == dataclasses.replace(TumorPhenomena(), bias_field_strength=0.3,
                                            core_radius_mm=(10.0, 15.0),
                                            mimic_lesion_count=(1, 3))
    for bad, message in (("bias=0.3", "no phenomenon 'bias'; the phenomena are"),
                         ("lobulation", "expected NAME=VALUE"),
                         ("lobulation=strong", "'strong' is not a value like its default 0.3"),
                         ("core_radius_mm=10", "like its default 10.0,25.0"),
                         ("mimic_lesion_count=1.5,3", r"like its default 2,12 \(int\)")):
        with pytest.raises(ValueError, match=message):
            phantom.phenomena_from([bad])
