"""inference.py on untrusted input (issue 13): a case stored in another orientation gets
the segmentation of the ordinary case, written on its own grid; case names read from a
manifest cannot lead outside the output folder."""
import json
import os
import shutil

import keras
import nibabel as nib
import numpy as np
import pytest

import inference
import model as unet
from brainseg import synthetic
from conftest import SMALL_CROP_SIZE, SMALL_IMAGE_SIZE, SMALL_SHAPE
from test_layouts import ORIENTATIONS, reorient

CASE = synthetic.case_id(1)


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory):
    """A tiny three-region U-Net with fixed random weights: its output depends on every
    input voxel and is not symmetric, so a slice seen mirrored gives another answer. Its
    output bias is 0, not the tumor prior, so that about half the voxels come out as tumor
    and the segmentations compared are not empty."""
    keras.utils.set_random_seed(13)
    path = tmp_path_factory.mktemp("model") / "untrained.keras"
    net = unet.build_unet(SMALL_IMAGE_SIZE, 4, 3, base_filters=4, depth=2)
    net.get_layer("tumor_probability").bias.assign(np.zeros(3, np.float32))
    net.save(path)
    return str(path)


def segment(model, case_folder, out_dir):
    """Runs inference on one case folder, preprocessing from the flags (no training data)."""
    inference.main(["--input", str(case_folder), "--checkpoint", model, "--data-dir",
                    str(out_dir / "no_data"), "--crop-size", str(SMALL_CROP_SIZE),
                    "--output-dir", str(out_dir), "--probabilities"])
    return (nib.load(out_dir / f"{CASE}.nii.gz"),
            nib.load(out_dir / f"{CASE}_probabilities.nii.gz"))


def test_a_case_in_another_orientation_is_segmented_on_its_own_grid(untrained_model,
                                                                    tmp_path):
    synthetic.write_dataset(str(tmp_path / "LPS"), 1, seed=21, shape=SMALL_SHAPE)
    seg, probabilities = segment(untrained_model, tmp_path / "LPS" / CASE, tmp_path / "LPS_out")
    assert 0 < np.asarray(seg.dataobj).astype(bool).mean() < 1
    for name in ("RAS", "coronal"):
        shutil.copytree(tmp_path / "LPS", tmp_path / name)
        for path in (tmp_path / name / CASE).iterdir():
            transform = reorient(path, ORIENTATIONS[name])
        scan = nib.load(tmp_path / name / CASE / f"{CASE}_flair.nii.gz")
        written_seg, written_probabilities = segment(untrained_model, tmp_path / name / CASE,
                                                     tmp_path / f"{name}_out")
        for written, expected in ((written_seg, seg), (written_probabilities, probabilities)):
            assert written.shape[:3] == scan.shape
            np.testing.assert_array_equal(written.affine, scan.affine)
            np.testing.assert_array_equal(np.asarray(written.dataobj),
                                          np.asarray(expected.as_reoriented(transform).dataobj))


@pytest.mark.parametrize("relative", [True, False])
def test_a_manifest_case_name_leading_outside_is_refused(converted_dir, untrained_model,
                                                         tmp_path, relative):
    """The manifest is JSON anyone could edit; its case names become output file names
    (<case>_montage.png), so '..' or an absolute path would write outside --output-dir."""
    case = "../escaped" if relative else str(tmp_path / "escaped")
    data_dir = tmp_path / "data"
    shutil.copytree(converted_dir, data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["splits"]["test"][0]["case"] = case
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--data-dir", str(data_dir), "--checkpoint", untrained_model,
                        "--output-dir", str(out_dir)])
    assert str(exit_info.value).startswith(f"ERROR: {data_dir / 'manifest.json'}: ")
    assert repr(case) in str(exit_info.value)
    assert not os.path.exists(tmp_path / "escaped_montage.png")
