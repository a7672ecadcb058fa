"""inference.py and metrics.py: BraTS metrics against hand-computed answers and an independent
implementation, NIfTI in and out on the scan's grid, release label conventions, bad input."""
import csv
import os

import keras
import nibabel as nib
import numpy as np
import pytest
import scipy.spatial

import inference
import layouts
import metrics
import model as unet
import preprocessing
import synthetic_brats
from conftest import SMALL_IMAGE_SIZE, SMALL_SHAPE

# --- Metrics ---------------------------------------------------------------------------------


def points(shape, *voxels):
    mask = np.zeros(shape, bool)
    for voxel in voxels:
        mask[voxel] = True
    return mask


def test_metrics_on_hand_computed_masks():
    truth = points((4, 4, 1), (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0))
    prediction = points((4, 4, 1), (0, 0, 0), (0, 1, 0), (3, 3, 0))
    assert metrics.dice(truth, prediction) == pytest.approx(2 * 2 / 7)
    assert metrics.sensitivity(truth, prediction) == pytest.approx(2 / 4)
    assert metrics.specificity(truth, prediction) == pytest.approx(11 / 12)


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
    assert metrics.sensitivity(empty, tumor) == 1.0


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


def test_summary_has_mean_median_and_std():
    rows = [{"whole_tumor_dice": d, "whole_tumor_hd95_mm": 1.0, "whole_tumor_sensitivity": 1.0,
             "whole_tumor_specificity": 1.0} for d in (0.5, 0.7, 0.9)]
    dice_summary = metrics.summarize(rows, ["whole_tumor"])[0]
    assert (dice_summary["mean"], dice_summary["median"]) == pytest.approx((0.7, 0.7))
    assert dice_summary["std"] == pytest.approx(np.std([0.5, 0.7, 0.9]))


# --- Geometry and labels ----------------------------------------------------------------------

@pytest.mark.parametrize("crop_mode", ["center", "brain_box"])
def test_slices_put_back_on_the_original_grid_match_the_truth(crop_mode):
    """The ground truth through the same preprocessing and back: what a perfect model's
    segmentation would be. It must match the original mask up to resampling."""
    case = synthetic_brats.make_case(5, shape=(96, 96, 40))
    image = np.stack([case[m] for m in ("flair", "t1", "t1ce", "t2")], axis=-1).astype(np.float32)
    options = preprocessing.Preprocessing(64, 96, crop_mode, "brain", "regions")
    _, msks, geometry = preprocessing.preprocess_case(image, case["seg"], options)
    restored = np.zeros((96, 96, 40, 3), np.float32)
    restored[:, :, geometry["slices"]] = preprocessing.from_slices(
        msks, geometry["crop_box"], (96, 96), order=1)
    truth = preprocessing.targets(case["seg"], "regions")
    dices = [metrics.dice(truth[..., k], restored[..., k] > 0.5) for k in range(3)]
    assert truth.any(axis=(0, 1, 2)).all()
    # A one-voxel shift of the whole tumor already drops its Dice to 0.87 on this case.
    assert dices[0] > 0.95 and min(dices) > 0.85, dices


@pytest.mark.parametrize("layout,expected", [("brats2020", {0, 1, 2, 4}),
                                             ("brats2023", {0, 1, 2, 3}), ("msd", {0, 1, 2, 3})])
def test_regions_become_the_release_labels(layout, expected):
    internal = np.array([0, 1, 2, 4, 4, 2]).reshape(1, 2, 3)
    masks = preprocessing.targets(internal, "regions").astype(bool)
    labels = inference.release_labels(masks, "regions", layout)
    assert set(np.unique(labels)) == expected
    back = layouts.LAYOUTS[layout].label_map  # release -> internal: the round trip is exact
    np.testing.assert_array_equal(np.vectorize(back.get)(labels), internal)


# --- NIfTI in, NIfTI out --------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return str(trained_run[0] / "model.keras")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release2023")
    synthetic_brats.write_dataset(str(root), 2, seed=21, shape=SMALL_SHAPE, layout="brats2023")
    return root


def test_a_case_folder_is_segmented_on_its_own_grid(checkpoint, converted_dir, release, tmp_path):
    case_dir = release / "BraTS-GLI-00001-000"
    inference.main(["--input", str(case_dir), "--checkpoint", checkpoint, "--data-dir",
                    str(converted_dir), "--output-dir", str(tmp_path), "--probabilities"])
    scan = nib.load(case_dir / "BraTS-GLI-00001-000-t2f.nii.gz")
    segmentation = nib.load(tmp_path / "BraTS-GLI-00001-000_seg.nii.gz")
    assert segmentation.shape == scan.shape == SMALL_SHAPE
    np.testing.assert_array_equal(segmentation.affine, scan.affine)
    assert segmentation.header.get_zooms() == scan.header.get_zooms()
    assert set(np.unique(np.asarray(segmentation.dataobj))) <= {0, 1}  # a whole-tumor model
    probabilities = nib.load(tmp_path / "BraTS-GLI-00001-000_probabilities.nii.gz").get_fdata()
    assert probabilities.shape == SMALL_SHAPE
    assert 0 <= probabilities.min() <= probabilities.max() <= 1
    np.testing.assert_array_equal(np.asarray(segmentation.dataobj), probabilities > 0.5)
    with open(tmp_path / "per_case_metrics.csv") as file:
        [row] = list(csv.DictReader(file))
    truth = np.asarray(nib.load(case_dir / "BraTS-GLI-00001-000-seg.nii.gz").dataobj) > 0
    assert float(row["whole_tumor_dice"]) == pytest.approx(
        metrics.dice(truth, np.asarray(segmentation.dataobj) > 0))
    assert os.path.exists(tmp_path / "BraTS-GLI-00001-000_montage.png")
    assert os.path.exists(tmp_path / "dice_distribution.png")


def test_a_regions_model_writes_the_release_labels(converted_dir, release, tmp_path):
    """A three-region model that predicts enhancing tumor everywhere it looks is enough to
    check the convention: BraTS 2023 calls enhancing tumor 3, not 4."""
    net = unet.build_unet(SMALL_IMAGE_SIZE, 4, 3, base_filters=4, depth=2)
    output_layer = net.layers[-1]
    output_layer.kernel.assign(np.zeros(output_layer.kernel.shape))
    output_layer.bias.assign([3.0, 3.0, 3.0])  # probability 0.95 for every region
    net.save(tmp_path / "regions.keras")
    inference.main(["--input", str(release), "--checkpoint", str(tmp_path / "regions.keras"),
                    "--data-dir", str(converted_dir), "--output-dir", str(tmp_path / "out")])
    labels = np.asarray(nib.load(tmp_path / "out" / "BraTS-GLI-00002-000_seg.nii.gz").dataobj)
    assert set(np.unique(labels)) == {0, 3}  # 0 on slices without brain
    with open(tmp_path / "out" / "summary_metrics.csv") as file:
        regions = {row["region"] for row in csv.DictReader(file)}
    assert regions == {"whole_tumor", "tumor_core", "enhancing_tumor"}


def test_validation_cases_are_segmented_but_not_scored(checkpoint, converted_dir, tmp_path):
    root = tmp_path / "validation"
    synthetic_brats.write_dataset(str(root), 2, seed=4, shape=SMALL_SHAPE, with_labels=False)
    inference.main(["--input", str(root), "--checkpoint", checkpoint, "--data-dir",
                    str(converted_dir), "--output-dir", str(tmp_path / "out")])
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == ["BraTS20_Training_001_seg.nii.gz", "BraTS20_Training_002_seg.nii.gz"]


# --- Bad input ----------------------------------------------------------------------------

def test_a_folder_run_carries_on_past_bad_cases_and_lists_them(checkpoint, converted_dir,
                                                               tmp_path, capsys):
    root = tmp_path / "raw"
    synthetic_brats.write_dataset(str(root), 3, seed=8, shape=SMALL_SHAPE)
    missing = root / "BraTS20_Training_001" / "BraTS20_Training_001_t1.nii.gz"
    missing.unlink()
    wrong = root / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((*SMALL_SHAPE, 2), np.int16), np.eye(4)), str(wrong))
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--input", str(root), "--checkpoint", checkpoint, "--data-dir",
                        str(converted_dir), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    output = capsys.readouterr().out
    assert f"failed BraTS20_Training_001: {missing}: file not found" in output
    assert f"failed BraTS20_Training_002: {wrong}: expected a 3-D volume" in output
    assert os.path.exists(tmp_path / "out" / "BraTS20_Training_003_seg.nii.gz")


def test_existing_outputs_are_kept_unless_overwrite(checkpoint, converted_dir, release, tmp_path,
                                                    capsys):
    arguments = ["--input", str(release / "BraTS-GLI-00001-000"), "--checkpoint", checkpoint,
                 "--data-dir", str(converted_dir), "--output-dir", str(tmp_path)]
    target = tmp_path / "BraTS-GLI-00001-000_seg.nii.gz"
    target.write_bytes(b"precious")
    with pytest.raises(SystemExit):
        inference.main(arguments)
    assert "exists; pass --overwrite" in capsys.readouterr().out
    assert target.read_bytes() == b"precious"
    inference.main(arguments + ["--overwrite"])
    assert nib.load(target).shape == SMALL_SHAPE
    assert not [f for f in os.listdir(tmp_path) if ".partial" in f]


def test_a_checkpoint_for_other_slices_is_refused_naming_it(converted_dir, tmp_path):
    unet.build_unet(64, 4, 1, base_filters=4, depth=2).save(tmp_path / "big.keras")
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--data-dir", str(converted_dir), "--checkpoint",
                        str(tmp_path / "big.keras"), "--output-dir", str(tmp_path / "out")])
    expected = f"{tmp_path / 'big.keras'}: trained on 64x64 slices with 4 channels"
    assert expected in str(exit_info.value)
    unet.build_unet(SMALL_IMAGE_SIZE, 2, 1, base_filters=4, depth=2).save(tmp_path / "two.keras")
    with pytest.raises(SystemExit, match="with 2 channels, but .*imgs_test.npy has 32x32 with 4"):
        inference.main(["--data-dir", str(converted_dir), "--checkpoint",
                        str(tmp_path / "two.keras"), "--output-dir", str(tmp_path / "out")])


def test_a_file_that_is_not_a_model_is_refused_naming_it(converted_dir, tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match=f"{tmp_path / 'model.keras'}: not a loadable Keras model"):
        inference.main(["--data-dir", str(converted_dir), "--checkpoint",
                        str(tmp_path / "model.keras"), "--output-dir", str(tmp_path / "out")])


def test_bfloat16_predicts_like_float32():
    keras.utils.set_random_seed(0)
    net = unet.build_unet(32, 4, 1, base_filters=4, depth=2)
    bf16 = inference.with_precision(net, "mixed_bfloat16")
    assert bf16.layers[1].dtype_policy.name == "mixed_bfloat16"
    assert bf16.layers[-1].dtype_policy.name == "float32"
    slices = np.random.default_rng(0).normal(size=(4, 32, 32, 4)).astype(np.float32)
    np.testing.assert_allclose(bf16.predict_on_batch(slices), net.predict_on_batch(slices),
                               atol=0.05)
    assert inference.with_precision(net, "float32") is net
