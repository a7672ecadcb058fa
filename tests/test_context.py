"""brainseg/context.py (2.5D input) where it is used: data.py's pipelines reading real array
files, the NIfTI preprocessing path of inference, and a 2-worker training whose checkpoint
segments a NIfTI case with no flag."""
import hashlib
import json
import math
import os
import re

import keras
import nibabel as nib
import numpy as np
import pytest

import data
import inference
from brainseg import checkpoints, context, dataset, layouts, preprocessing
from conftest import REPO_DIR, SMALL_SHAPE, TINY_MODEL, case_names, run

MODALITIES = len(layouts.MODALITIES)


def samples(imgs, msks, table, indices=None):
    """Every (image, mask) of the arrays, in order, through data.py's evaluation pipeline."""
    indices = np.arange(len(imgs)) if indices is None else np.asarray(indices)
    batches = list(data.evaluation_dataset(imgs, msks, indices, 8, neighbours=table))
    return (np.concatenate([images.numpy() for images, _ in batches]),
            np.concatenate([masks.numpy() for _, masks in batches]))


def stacked_rows(imgs, rows):
    """The rows stacked along the channels, read through the memory map (not data.py)."""
    return np.concatenate([np.asarray(imgs[row], np.float32) for row in rows], axis=-1)


def write_split(folder, images, cases, masks=None):
    """Real files: imgs_train.npy, msks_train.npy (by default every pixel of row r's mask is
    r) and a manifest whose train cases are (name, first row, slices)."""
    np.save(folder / "imgs_train.npy", images)
    if masks is None:
        masks = (np.arange(len(images), dtype=np.uint8).reshape(-1, 1, 1, 1)
                 * np.ones((1, *images.shape[1:3], 1), np.uint8))
    np.save(folder / "msks_train.npy", masks)
    entries = [{"case": name, "rows": [first, first + len(slices)], "slices": slices}
               for name, first, slices in cases]
    dataset.write_manifest(folder, {"splits": {"train": entries}})
    return dataset.open_split(folder, "train")


@pytest.mark.parametrize("context_slices", [1, 2])
def test_a_sample_is_its_neighbouring_rows_in_its_case_edge_padded(converted_dir,
                                                                   context_slices):
    """On the converted synthetic cases: every sample is rows r-k .. r+k of its own case,
    the case's first (last) row repeated below (above) it, never a row of the next case."""
    manifest = dataset.load_manifest(converted_dir)
    imgs, msks = dataset.open_split(converted_dir, "train")
    entries = manifest["splits"]["train"]
    assert len(entries) >= 2
    for entry in entries:  # the default slice policy keeps a contiguous run of slices
        assert np.all(np.diff(entry["slices"]) == 1), entry["slices"]
    table = context.split_neighbours(manifest, "train", len(imgs), context_slices)
    images, masks = samples(imgs, msks, table)
    assert images.shape == (len(imgs), *imgs.shape[1:3], MODALITIES * (2 * context_slices + 1))
    np.testing.assert_array_equal(masks, np.asarray(msks, np.float32))  # the centre's mask
    for entry in entries:
        first, end = entry["rows"]
        for row in range(first, end):
            rows = [min(max(row + offset, first), end - 1)
                    for offset in range(-context_slices, context_slices + 1)]
            np.testing.assert_array_equal(images[row], stacked_rows(imgs, rows))
    # At each boundary between two cases the neighbouring rows differ, so a leak would show.
    for before, after in zip(entries, entries[1:]):
        last, first = before["rows"][1] - 1, after["rows"][0]
        assert not np.array_equal(imgs[last], imgs[first])
        below = images[first][..., :MODALITIES]  # the lowest neighbour of the case's first row
        np.testing.assert_array_equal(below, np.asarray(imgs[first], np.float32))
        above = images[last][..., -MODALITIES:]
        np.testing.assert_array_equal(above, np.asarray(imgs[last], np.float32))


def test_a_gap_in_a_cases_slices_is_edge_padded_not_bridged(tmp_path, monkeypatch):
    """Slices 3 4 5 8 9 of case a, then slices 0 1 of case b: row 2 (slice 5) is followed
    by row 3 in the file, but that holds slice 8, so slice 5 is repeated instead. Each
    distinct row is read with one pread, the file is never read whole."""
    values = np.arange(7, dtype=np.float16).reshape(-1, 1, 1, 1) * np.ones((1, 4, 4, MODALITIES))
    values += np.arange(MODALITIES, dtype=np.float16) / 10  # modality m of row r: r + m/10
    imgs, msks = write_split(tmp_path, values.astype(np.float16),
                             [("a", 0, [3, 4, 5, 8, 9]), ("b", 5, [0, 1])])
    table = context.split_neighbours(dataset.load_manifest(tmp_path), "train", 7, 1)
    images, masks = samples(imgs, msks, table)
    expected = [[0, 0, 1], [0, 1, 2], [1, 2, 2], [3, 3, 4], [3, 4, 4], [5, 5, 6], [5, 6, 6]]
    for row, rows in enumerate(expected):
        np.testing.assert_array_equal(images[row], stacked_rows(imgs, rows))
        assert (masks[row] == row).all()
    assert context.split_neighbours(dataset.load_manifest(tmp_path), "train", 7, 2)[2].tolist() \
        == [0, 1, 2, 2, 2]  # slice 5 with k = 2: slices 3, 4, 5, then 5 twice (gap)

    reads = []
    real_preadv = os.preadv
    monkeypatch.setattr(data.os, "preadv", lambda fd, buffers, offset: reads.append(
        (os.readlink(f"/proc/self/fd/{fd}"), offset)) or real_preadv(fd, buffers, offset))
    images, _ = samples(imgs, msks, table, indices=[3])
    np.testing.assert_array_equal(images[0], stacked_rows(imgs, [3, 3, 4]))
    image_reads = sorted(offset for path, offset in reads if path.endswith("imgs_train.npy"))
    row_bytes = imgs[:1].nbytes
    assert image_reads == [imgs.offset + 3 * row_bytes, imgs.offset + 4 * row_bytes]
    assert len(reads) == 3  # and one for the mask


def test_a_manifest_that_does_not_account_for_every_row_is_refused(tmp_path):
    imgs, _ = write_split(tmp_path, np.zeros((6, 4, 4, MODALITIES), np.float16),
                          [("a", 0, [0, 1, 2]), ("b", 3, [0, 1])])
    with pytest.raises(ValueError, match="1 of the 6 rows of the train arrays belong to no case"):
        context.split_neighbours(dataset.load_manifest(tmp_path), "train", len(imgs), 1)
    with pytest.raises(ValueError, match="case b has rows 3-5 and 2 slices; the train arrays "
                                         "have 4 rows"):
        context.split_neighbours(dataset.load_manifest(tmp_path), "train", 4, 1)


def symmetries(array):
    """The 8 flips and rotations of the square, as data.augment draws them."""
    for flipped in (array, array[:, ::-1]):
        for quarter_turns in range(4):
            yield np.rot90(flipped, quarter_turns, axes=(0, 1))


def test_training_augmentation_moves_every_slice_and_the_mask_together(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.normal(size=(10, 8, 8, MODALITIES)).astype(np.float16)
    pattern = rng.random((10, 8, 8, 1)) < 0.5  # row r's mask: r + 1 on a pattern of its own
    masks = (pattern * np.arange(1, 11).reshape(-1, 1, 1, 1)).astype(np.uint8)
    imgs, msks = write_split(tmp_path, images, [("a", 0, list(range(6))),
                                                ("b", 6, list(range(4)))], masks)
    table = context.split_neighbours(dataset.load_manifest(tmp_path), "train", len(imgs), 1)
    transforms_seen = set()
    for batch_images, batch_masks in data.training_dataset(imgs, msks, np.arange(10), 5, seed=1,
                                                           neighbours=table).take(6):
        for image, mask in zip(batch_images.numpy(), batch_masks.numpy()):
            row = int(mask.max()) - 1
            centre = image[..., MODALITIES:2 * MODALITIES]
            matches = [number for number, view in
                       enumerate(symmetries(np.asarray(imgs[row], np.float32)))
                       if np.array_equal(view, centre)]
            assert len(matches) == 1
            transform = list(symmetries(stacked_rows(imgs, table[row])))[matches[0]]
            np.testing.assert_array_equal(image, transform)  # all 12 channels alike
            np.testing.assert_array_equal(
                mask, list(symmetries(np.asarray(msks[row], np.float32)))[matches[0]])
            transforms_seen.add(matches[0])
    assert len(transforms_seen) >= 4


def test_intensity_augmentation_changes_a_modality_alike_on_every_slice():
    """Scale and shift are drawn per modality, not per channel, and each slice keeps its
    own background: a neighbour outside the brain stays 0."""
    rng = np.random.default_rng(3)
    image = np.zeros((8, 8, 3 * MODALITIES), np.float32)
    image[2:6, 2:6, :2 * MODALITIES] = rng.normal(size=(4, 4, 2 * MODALITIES))
    mask = np.zeros((8, 8, 1), np.float32)
    plain, _ = data.augment(image, mask, np.array([5, 1]), modalities=MODALITIES)
    changed, _ = data.augment(image, mask, np.array([5, 1]), intensity=0.2,
                              modalities=MODALITIES)
    plain, changed = plain.numpy(), changed.numpy()
    assert not changed[..., 2 * MODALITIES:].any()  # the slice above has no brain
    brain = plain[..., :MODALITIES].any(axis=-1)
    for modality in range(MODALITIES):
        fits = [np.polyfit(plain[brain][:, channel], changed[brain][:, channel], 1)
                for channel in (modality, modality + MODALITIES)]
        np.testing.assert_allclose(fits[0], fits[1], atol=1e-5)
        assert abs(fits[0][0] - 1) > 1e-4 or abs(fits[0][1]) > 1e-4


# sha256 of the batches below as data.py made them before 2.5D input existed (commit
# 7591a39, with the same calls minus `neighbours`): CONTEXT_SLICES = 0 must not change a bit.
TODAYS_BATCHES = "174657f3dca0b595be1a40199c60467812d4d73481757cb11f0d18ca79de7d83"


def test_context_slices_0_gives_exactly_todays_batches(tmp_path):
    rng = np.random.default_rng(2018)
    images = rng.normal(size=(20, 16, 16, MODALITIES)).astype(np.float16)
    images[:, :3] = 0  # some background, for the intensity augmentation
    np.save(tmp_path / "imgs_train.npy", images)
    np.save(tmp_path / "msks_train.npy", (images[..., :3] > 1).astype(np.uint8))
    dataset.write_manifest(tmp_path, {"splits": {"train": [
        {"case": "a", "rows": [0, 12], "slices": list(range(12))},
        {"case": "b", "rows": [12, 20], "slices": list(range(8))}]}})
    imgs, msks = dataset.open_split(tmp_path, "train")
    neighbours = context.split_neighbours(dataset.load_manifest(tmp_path), "train", len(imgs), 0)
    assert neighbours is None and context.channels(MODALITIES, 0) == MODALITIES
    keras.utils.set_random_seed(42)  # as train_horovod.py does (SEED)
    digest = hashlib.sha256()
    shard = data.shard_indices(len(imgs), 1, 2)
    for batch in data.training_dataset(imgs, msks, shard, 4, seed=43, skip_samples=4,
                                       intensity_augmentation=0.1,
                                       neighbours=neighbours).take(4):
        digest.update(batch[0].numpy().tobytes())
        digest.update(batch[1].numpy().tobytes())
    for batch in data.evaluation_dataset(imgs, msks, shard, 4, neighbours=neighbours):
        digest.update(batch[0].numpy().tobytes())
        digest.update(batch[1].numpy().tobytes())
    assert digest.hexdigest() == TODAYS_BATCHES


def test_a_nifti_case_is_assembled_from_its_own_slices_as_in_training(raw_dir, converted_dir):
    """Inference's path (preprocess_case, then stack_case) gives a training case exactly the
    samples data.py reads from the converted arrays."""
    manifest = dataset.load_manifest(converted_dir)
    imgs, msks = dataset.open_split(converted_dir, "train")
    table = context.split_neighbours(manifest, "train", len(imgs), 1)
    options = preprocessing.Preprocessing(**manifest["preprocessing"])
    cases = {case.case_id: case for case in layouts.find_cases(str(raw_dir))[1]}
    for entry in manifest["splits"]["train"][:2]:
        image, _ = layouts.read_case(cases[entry["case"]])
        slices, _, geometry = preprocessing.preprocess_case(image, None, options)
        assert geometry["slices"] == entry["slices"]
        stacked = context.stack_case(slices, geometry["slices"], 1)
        first, end = entry["rows"]
        expected, _ = samples(imgs, msks, table, indices=range(first, end))
        np.testing.assert_array_equal(stacked.astype(np.float32), expected)


def test_a_2_5d_model_trains_and_segments_a_nifti_case_without_a_flag(
        raw_dir, converted_dir, tmp_path, capsys):
    """--context-slices 1 through the launcher: 2 workers train a tiny 12-channel U-Net for
    an epoch; its checkpoint says so, and inference follows it on a NIfTI case and on the
    converted test split with no flag; a plain Keras copy (no description) too. The epoch
    is the floor's (--min-slices-per-epoch, twice the training slices), not one pass."""
    train_dir = tmp_path / "train"
    num_train = len(dataset.open_split(converted_dir, "train")[0])
    result = run([os.path.join(REPO_DIR, "run_multinode.sh"), "--",
                  "--data-dir", str(converted_dir), "--train-dir", str(train_dir),
                  "--epochs", "1", "--context-slices", "1",
                  "--min-slices-per-epoch", str(2 * num_train), *TINY_MODEL], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"CONTEXT_SLICES += 1$", result.stdout, re.MULTILINE), result.stdout
    steps = math.ceil(2 * num_train / (2 * 8))  # 2 workers x batch 8 (TINY_MODEL)
    assert steps > math.ceil(num_train / 2 / 8)  # more than one pass over the largest shard
    assert f"; {steps} steps per epoch of 8 x 2 slices ({steps * 16 / num_train:.1f} passes " \
           f"over the training slices)" in result.stdout
    assert checkpoints.load_state(str(train_dir)).progress.steps_per_epoch == steps
    checkpoint = str(train_dir / "model.keras")
    assert checkpoints.read_description(checkpoint)["context_slices"] == 1
    model = keras.models.load_model(checkpoint, compile=False)
    assert model.input_shape[-1] == 3 * MODALITIES

    case = case_names(raw_dir)[0]
    inference.main(["--input", str(raw_dir / case), "--checkpoint", checkpoint,
                    "--output-dir", str(tmp_path / "nifti")])
    assert f"2.5D input: 1 neighbouring slice(s) on each side of every slice (from " \
           f"{checkpoint})" in capsys.readouterr().out
    segmentation = nib.load(tmp_path / "nifti" / f"{case}.nii.gz")
    assert segmentation.shape == SMALL_SHAPE

    inference.main(["--data-dir", str(converted_dir), "--checkpoint", checkpoint,
                    "--output-dir", str(tmp_path / "arrays")])
    with open(tmp_path / "arrays" / "metrics.json") as file:
        assert 0 <= json.load(file)["whole_tumor_dice_all_slices"] <= 1

    capsys.readouterr()
    model.save(tmp_path / "plain.keras")  # plain Keras: no description, 12 channels
    inference.main(["--input", str(raw_dir / case), "--checkpoint", str(tmp_path / "plain.keras"),
                    "--data-dir", str(converted_dir), "--output-dir", str(tmp_path / "plain")])
    assert "(from the model's 12 input channels)" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "plain" / f"{case}.nii.gz")
