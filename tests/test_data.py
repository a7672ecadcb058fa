"""data.py: disjoint shards, equal steps on every rank, augmentation that keeps image and
mask aligned, and clear errors for bad arrays."""
import os

import numpy as np
import pytest

import data
from brainseg import dataset


@pytest.mark.parametrize("num_samples,num_ranks", [(103, 4), (10, 3), (64, 2), (5, 8)])
def test_shards_are_disjoint_and_cover_every_sample(num_samples, num_ranks):
    shards = [data.shard_indices(num_samples, rank, num_ranks) for rank in range(num_ranks)]
    combined = np.concatenate(shards)
    assert len(combined) == len(set(combined.tolist())) == num_samples
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_every_rank_gets_the_same_number_of_batches_with_an_uneven_count(tmp_path):
    num_samples, num_ranks, batch_size = 21, 2, 4  # shards of 11 and 10 slices
    imgs = np.arange(num_samples, dtype=np.float32).reshape(-1, 1, 1, 1) * np.ones((1, 4, 4, 2))
    msks = np.zeros((num_samples, 4, 4, 1), np.uint8)
    steps = data.steps_per_epoch(num_samples, num_ranks, batch_size)
    assert steps == 3
    for rank in range(num_ranks):
        shard = data.shard_indices(num_samples, rank, num_ranks)
        dataset = data.training_dataset(imgs, msks, shard, batch_size, seed=rank)
        batches = list(dataset.take(steps))
        assert len(batches) == steps  # the shard repeats: no rank runs out early
        seen = {int(v) for images, _ in batches for v in images.numpy()[:, 0, 0, 0]}
        assert seen <= set(shard.tolist()) and len(seen) >= len(shard) - 1


def test_a_small_dataset_is_drawn_more_than_once_per_epoch_up_to_the_floor():
    """min_samples counts the slices all ranks draw together; below one pass it changes
    nothing, so a large dataset keeps its epoch of one pass."""
    assert data.steps_per_epoch(21, 2, 4, min_samples=80) == 10  # 80 / (2 x 4)
    assert data.steps_per_epoch(21, 2, 4, min_samples=81) == 11  # never fewer slices
    assert data.steps_per_epoch(21, 2, 4, min_samples=20) == 3  # one pass is more already
    assert data.steps_per_epoch(21, 4, 4, min_samples=80) == 5  # more workers, fewer steps


def test_augmentation_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    pattern = rng.random((8, 8, 1)).astype(np.float32)
    image = np.concatenate([pattern, 2 * pattern], axis=-1)
    variants = set()
    for seed in range(40):
        augmented_image, augmented_mask = data.augment(image, pattern, np.array([seed, 1]))
        np.testing.assert_array_equal(augmented_image[..., :1], augmented_mask)
        np.testing.assert_array_equal(augmented_image[..., 1:], 2 * augmented_mask.numpy())
        variants.add(augmented_mask.numpy().tobytes())
    assert len(variants) == 8  # all flips and rotations of the square occur


def test_training_batches_are_reproducible_for_a_seed():
    imgs = np.random.default_rng(1).random((12, 8, 8, 4), dtype=np.float32)
    msks = (imgs[..., :1] > 0.5).astype(np.uint8)
    shard = np.arange(12)

    def first_batches(seed):
        return [b[0].numpy() for b in data.training_dataset(imgs, msks, shard, 4, seed).take(3)]
    np.testing.assert_array_equal(first_batches(3), first_batches(3))
    assert not np.array_equal(first_batches(3), first_batches(4))


def test_evaluation_dataset_reads_the_shard_once_in_order():
    imgs = np.arange(7, dtype=np.float32).reshape(-1, 1, 1, 1) * np.ones((1, 2, 2, 1))
    msks = np.zeros((7, 2, 2, 1), np.uint8)
    values = [v for images, _ in data.evaluation_dataset(imgs, msks, np.array([1, 3, 5]), 2)
              for v in images.numpy()[:, 0, 0, 0]]
    assert values == [1, 3, 5]


def test_skipping_samples_continues_the_stream_of_an_uninterrupted_run():
    """A run resumed after k epochs must see the batches the uninterrupted run saw next."""
    imgs = np.random.default_rng(2).random((10, 8, 8, 4), dtype=np.float32)
    msks = (imgs[..., :1] > 0.5).astype(np.uint8)
    shard, batch_size, steps = np.arange(1, 10, 2), 2, 3  # shard of 5: wraps within an epoch
    whole = [tuple(t.numpy() for t in batch) for batch in
             data.training_dataset(imgs, msks, shard, batch_size, seed=5).take(3 * steps)]
    resumed = [tuple(t.numpy() for t in batch) for batch in data.training_dataset(
        imgs, msks, shard, batch_size, seed=5, skip_samples=2 * steps * batch_size).take(steps)]
    for (image, mask), (expected_image, expected_mask) in zip(resumed, whole[2 * steps:]):
        np.testing.assert_array_equal(image, expected_image)
        np.testing.assert_array_equal(mask, expected_mask)


def test_same_seed_and_rank_count_give_the_same_shards_and_augmentations():
    """What each rank of a 2-rank run reads (shard and augmented batches, seeded with
    SEED + rank as train_horovod.py does) is the same in every run with the same seed."""
    imgs = np.random.default_rng(3).random((14, 8, 8, 4), dtype=np.float32)
    msks = (imgs[..., :1] > 0.5).astype(np.uint8)

    def run(seed, num_ranks=2):
        per_rank = []
        for rank in range(num_ranks):
            shard = data.shard_indices(len(imgs), rank, num_ranks)
            batches = data.training_dataset(imgs, msks, shard, 3, seed=seed + rank).take(4)
            per_rank.append((shard, [np.concatenate([b[0].numpy(), b[1].numpy()], axis=-1)
                                     for b in batches]))
        return per_rank
    first, again = run(42), run(42)
    for (shard, batches), (shard_again, batches_again) in zip(first, again):
        np.testing.assert_array_equal(shard, shard_again)
        np.testing.assert_array_equal(batches, batches_again)
    assert not np.array_equal(first[0][1], first[1][1])  # ranks see different batches
    assert not np.array_equal(first[0][1], run(43)[0][1])  # and another seed changes them


def mapped_resident_kib(path):
    """How much of `path` is mapped into this process and resident (/proc/self/smaps)."""
    resident, in_mapping = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                in_mapping = fields[-1] == str(path)
            elif in_mapping and fields[0] == "Rss:":
                resident += int(fields[1])
    return resident


def test_rows_of_a_memory_map_are_read_without_becoming_resident_memory(tmp_path):
    """Reading an epoch through the map would make every touched page count as the rank's
    resident memory, growing with the dataset; row_reader reads the file instead."""
    images = np.random.default_rng(3).random((64, 32, 32, 4)).astype(np.float16)  # 512 KiB
    np.save(tmp_path / "imgs_train.npy", images)
    np.save(tmp_path / "msks_train.npy", (images[..., :1] > 0.5).astype(np.uint8))
    dataset.write_manifest(tmp_path, {})
    imgs, msks = dataset.open_split(tmp_path, "train")
    read = data.row_reader(imgs)
    for index in range(len(imgs)):
        np.testing.assert_array_equal(read(index), images[index].astype(np.float32))
    assert mapped_resident_kib(tmp_path / "imgs_train.npy") == 0
    np.asarray(imgs[:32], dtype=np.float32)  # the same rows through the map: now resident
    assert mapped_resident_kib(tmp_path / "imgs_train.npy") >= 200
    # A view of the map carries its parent's file offset, so it is indexed, not pread.
    np.testing.assert_array_equal(data.row_reader(imgs[10:])(0), images[10].astype(np.float32))
    # Both arrays through the tf.data pipeline, in order.
    batch_images, batch_masks = next(iter(data.evaluation_dataset(imgs, msks, np.arange(4), 4)))
    np.testing.assert_array_equal(batch_images, images[:4].astype(np.float32))
    np.testing.assert_array_equal(batch_masks, images[:4, ..., :1] > 0.5)


def test_a_truncated_array_file_is_named(tmp_path):
    np.save(tmp_path / "imgs_train.npy", np.zeros((4, 8, 8, 4), np.float32))
    imgs = np.load(tmp_path / "imgs_train.npy", mmap_mode="r")
    read = data.row_reader(imgs)
    os.truncate(tmp_path / "imgs_train.npy", imgs.offset + 3 * 8 * 8 * 4 * 4 + 10)
    np.testing.assert_array_equal(read(2), 0)
    with pytest.raises(ValueError, match="imgs_train.npy.*row 3"):
        read(3)


def test_intensity_augmentation_scales_and_shifts_each_modality_inside_the_brain():
    rng = np.random.default_rng(3)
    image = np.zeros((8, 8, 4), np.float32)
    image[2:6, 2:6] = rng.normal(size=(4, 4, 4))
    mask = (image[..., :1] > 0).astype(np.float32)
    plain_image, plain_mask = data.augment(image, mask, np.array([5, 1]))
    changed_image, changed_mask = data.augment(image, mask, np.array([5, 1]), intensity=0.2)
    np.testing.assert_array_equal(changed_mask, plain_mask)  # same flips and rotations
    plain_image, changed_image = plain_image.numpy(), changed_image.numpy()
    brain = plain_image.any(axis=-1)
    assert not changed_image[~brain].any()  # the background stays 0
    for channel in range(4):
        scale, shift = np.polyfit(plain_image[brain][:, channel], changed_image[brain][:, channel],
                                  1)
        assert abs(scale - 1) <= 0.2 + 1e-5 and abs(shift) <= 0.2 + 1e-5
        assert abs(scale - 1) > 1e-4 or abs(shift) > 1e-4
    other, _ = data.augment(image, mask, np.array([6, 1]), intensity=0.2)
    assert not np.allclose(np.sort(other.numpy().ravel()), np.sort(changed_image.ravel()))


@pytest.mark.parametrize("slices", [1, 3])  # one slice, and a 2.5D stack of 3
def test_gamma_bends_each_modality_inside_the_brain_and_keeps_its_statistics(slices):
    """The flips and turns are those of the same seed without gamma, the background stays 0,
    each modality keeps the order of its brain pixels (a power curve is monotonic) and their
    mean and standard deviation, yet the values change, by another curve per modality."""
    rng = np.random.default_rng(4)
    image = np.zeros((8, 8, slices, 4), np.float32)
    image[2:7, 1:6] = rng.normal(size=(5, 5, slices, 4))
    image = image.reshape(8, 8, slices * 4)
    mask = (image[..., :1] > 0).astype(np.float32)
    modalities = 4 if slices > 1 else None
    plain_image, plain_mask = data.augment(image, mask, np.array([5, 1]), modalities=modalities)
    bent_image, bent_mask = data.augment(image, mask, np.array([5, 1]), modalities=modalities,
                                         gamma=0.5)
    np.testing.assert_array_equal(bent_mask, plain_mask)
    plain, bent = (array.numpy().reshape(8, 8, slices, 4) for array in (plain_image, bent_image))
    brain = plain.any(axis=-1)
    assert not bent[~brain].any()
    changes = []
    for modality in range(4):
        before, after = plain[..., modality][brain], bent[..., modality][brain]
        np.testing.assert_array_equal(np.argsort(before, kind="stable"),
                                      np.argsort(after, kind="stable"))
        np.testing.assert_allclose([after.mean(), after.std()], [before.mean(), before.std()],
                                   atol=1e-4)
        changes.append(np.abs(after - before).max())
    assert min(changes) > 1e-3  # every modality bent
    alike = np.repeat(image.reshape(8, 8, slices, 4)[..., :1], 4, axis=-1).reshape(image.shape)
    bent_alike = data.augment(alike, mask, np.array([5, 1]), modalities=modalities,
                              gamma=0.5)[0].numpy().reshape(8, 8, slices, 4)
    assert np.abs(np.diff(bent_alike[brain], axis=-1)).max() > 1e-3  # a curve per modality


@pytest.mark.parametrize("slices", [1, 3])  # one slice, and a 2.5D stack of 3
def test_modality_dropout_takes_one_whole_modality_from_some_slices(slices):
    """About the given share of the samples lose one modality, set to 0 on every slice of
    the stack; the other modalities, the mask and the flips and turns stay those of the same
    seed without it; every modality is the one lost in some samples."""
    rng = np.random.default_rng(5)
    image = rng.normal(size=(8, 8, slices * 4)).astype(np.float32)
    mask = (image[..., :1] > 0).astype(np.float32)
    modalities = 4 if slices > 1 else None
    lost = []
    for seed in range(200):
        plain_image, plain_mask = data.augment(image, mask, np.array([seed, 2]),
                                               modalities=modalities)
        dropped_image, dropped_mask = data.augment(image, mask, np.array([seed, 2]),
                                                   modalities=modalities, modality_dropout=0.3)
        np.testing.assert_array_equal(dropped_mask, plain_mask)
        plain = plain_image.numpy().reshape(8, 8, slices, 4)
        dropped = dropped_image.numpy().reshape(8, 8, slices, 4)
        changed = [m for m in range(4) if not np.array_equal(plain[..., m], dropped[..., m])]
        assert len(changed) <= 1
        if changed:
            assert not dropped[..., changed[0]].any()  # gone on every slice
            lost.append(changed[0])
    assert 0.2 < len(lost) / 200 < 0.4
    assert set(lost) == {0, 1, 2, 3}


@pytest.mark.parametrize("slices", [1, 3])  # one slice, and a 2.5D stack of 3
def test_bias_field_shades_each_modality_smoothly_inside_the_brain(slices):
    """The flips and turns are those of the same seed without the field and the background
    stays 0. Undoing the z-score's shift (BRAIN_MEAN_OVER_STD), each modality's pixels are
    multiplied by one smooth positive field, the same on every slice of a stack, another per
    modality, within what the strength allows; a larger strength shades more."""
    rng = np.random.default_rng(6)
    size = 32
    image = np.zeros((size, size, slices, 4), np.float32)
    image[3:29, 2:30] = rng.normal(size=(26, 28, slices, 4))
    image = image.reshape(size, size, slices * 4)
    mask = (image[..., :1] > 0).astype(np.float32)
    modalities = 4 if slices > 1 else None
    shift = data.BRAIN_MEAN_OVER_STD
    spreads = {}
    for strength in (0.1, 0.4):
        log_gains = []
        for seed in range(20):
            plain_image, plain_mask = data.augment(image, mask, np.array([seed, 3]),
                                                   modalities=modalities)
            shaded_image, shaded_mask = data.augment(image, mask, np.array([seed, 3]),
                                                     modalities=modalities, bias_field=strength)
            np.testing.assert_array_equal(shaded_mask, plain_mask)
            plain, shaded = (array.numpy().reshape(size, size, slices, 4)
                             for array in (plain_image, shaded_image))
            brain = plain.any(axis=-1)
            assert not shaded[~brain].any()
            gain = (shaded + shift) / (plain + shift)
            assert (gain[brain] > 0).all()
            log_gain = np.log(gain)
            # The same field on every slice of the stack, for each modality.
            np.testing.assert_allclose(log_gain[brain.all(axis=-1)].std(axis=1), 0, atol=1e-4)
            field = np.where(brain[:, :, :1], log_gain[:, :, 0], np.nan)  # [H, W, modalities]
            # Smooth: neighbouring pixels differ by a small part of the field's own range.
            steps = np.nanmax(np.abs(np.diff(field, axis=0)), axis=(0, 1))
            ranges = np.nanmax(field, axis=(0, 1)) - np.nanmin(field, axis=(0, 1))
            assert (steps <= 0.2 * ranges + 1e-4).all()
            log_gains.append(field[np.isfinite(field[..., 0])])
        log_gains = np.stack(log_gains)  # [seeds, brain pixels, modalities]
        assert np.abs(log_gains).max() < 4 * strength  # nodes of at most +-~3 sd
        spreads[strength] = log_gains.std()
        # Each sample's modalities get fields of their own.
        assert not np.allclose(log_gains[0, :, 0], log_gains[0, :, 1])
    assert 2 * spreads[0.1] < spreads[0.4]
    again, _ = data.augment(image, mask, np.array([3, 3]), modalities=modalities, bias_field=0.4)
    first, _ = data.augment(image, mask, np.array([3, 3]), modalities=modalities, bias_field=0.4)
    np.testing.assert_array_equal(again.numpy(), first.numpy())


def test_tumor_rows_are_found_in_memory_and_in_a_memory_map(tmp_path):
    msks = np.zeros((9, 4, 4, 3), np.uint8)
    msks[[1, 4, 8], 2, 3, 0] = 1
    msks[6, 0, 0, 2] = 1  # only the last channel: still tumor
    np.save(tmp_path / "msks.npy", msks)
    mapped = np.load(tmp_path / "msks.npy", mmap_mode="r")
    assert data.tumor_rows(msks).tolist() == [1, 4, 6, 8]
    assert data.tumor_rows(mapped, rows_per_read=2).tolist() == [1, 4, 6, 8]
    os.truncate(tmp_path / "msks.npy", mapped.offset + 7 * 4 * 4 * 3)
    with pytest.raises(ValueError, match="msks.npy.*rows 6-7"):
        data.tumor_rows(mapped, rows_per_read=2)  # opened before the file was cut


def test_unenhanced_core_rows_are_cores_without_enhancing_tumor(tmp_path):
    msks = np.zeros((6, 4, 4, 3), np.uint8)
    msks[1, 0, 0, 0] = 1                  # edema only
    msks[2, 1, 1, :2] = 1                 # a core without enhancement
    msks[3, 1, 1, :] = 1                  # an enhancing core
    msks[4, 1, 1, :2] = msks[4, 2, 2, :] = 1  # a core enhancing elsewhere on the slice
    msks[5, 3, 3, :2] = 1
    np.save(tmp_path / "msks.npy", msks)
    mapped = np.load(tmp_path / "msks.npy", mmap_mode="r")
    for array in (msks, mapped):
        assert data.tumor_rows(array, 2, "unenhanced_core").tolist() == [2, 5]
        assert data.tumor_rows(array, 2, "tumor").tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="three regions.*1 channel"):
        data.tumor_rows(msks[..., :1], slices="unenhanced_core")
    with pytest.raises(ValueError, match="'cores'.*tumor, unenhanced_core"):
        data.tumor_rows(msks, slices="cores")


def _tumor_share_of_stream(tumor_share, seed=3, samples=4000):
    shard, tumor = np.arange(0, 200, 2), np.arange(0, 200, 20)  # 10 of 100 slices hold tumor
    stream = data.sample_stream(shard, seed, tumor, tumor_share).take(samples)
    drawn = np.fromiter((int(i) for i in stream.as_numpy_iterator()), int)
    assert set(drawn.tolist()) <= set(shard.tolist())
    return np.isin(drawn, tumor).mean(), drawn


def test_tumor_oversampling_draws_the_asked_share_from_tumor_slices():
    natural, uniform = _tumor_share_of_stream(0.0)
    assert abs(natural - 0.10) < 0.02
    oversampled, drawn = _tumor_share_of_stream(0.5)
    assert abs(oversampled - (0.5 + 0.5 * 0.10)) < 0.03
    assert len(set(drawn.tolist())) == 100  # every slice of the shard still comes
    np.testing.assert_array_equal(drawn, _tumor_share_of_stream(0.5)[1])  # same seed, same draw


def test_without_oversampling_the_stream_is_the_one_of_before():
    """TUMOR_SAMPLE_SHARE = 0 must leave the batches, and so every earlier run, unchanged."""
    import tensorflow as tf
    shard = np.arange(3, 40, 3)
    before = tf.data.Dataset.from_tensor_slices(shard).shuffle(
        len(shard), seed=7, reshuffle_each_iteration=True).repeat().take(50)
    after = data.sample_stream(shard, 7, np.array([3, 6]), 0.0).take(50)
    assert list(before.as_numpy_iterator()) == list(after.as_numpy_iterator())


def test_oversampled_zoomed_training_resumes_on_the_same_batches():
    imgs = np.random.default_rng(4).random((20, 8, 8, 4), dtype=np.float32)
    msks = np.zeros((20, 8, 8, 1), np.uint8)
    msks[[2, 12], 3, 3] = 1
    shard, tumor, batch_size = np.arange(0, 20, 2), np.array([2, 12]), 2
    kwargs = dict(seed=6, tumor_indices=tumor, tumor_share=0.5, max_scale=0.2, max_degrees=20)
    whole = [b[0].numpy() for b in
             data.training_dataset(imgs, msks, shard, batch_size, **kwargs).take(6)]
    resumed = [b[0].numpy() for b in data.training_dataset(
        imgs, msks, shard, batch_size, skip_samples=4 * batch_size, **kwargs).take(2)]
    np.testing.assert_array_equal(resumed, whole[4:])


def test_zoom_and_turn_move_image_and_mask_together_and_keep_regions_nested():
    import tensorflow as tf
    yy, xx = np.mgrid[:48, :48]
    distance = np.hypot(yy - 14.0, xx - 32.0)  # 13 pixels off-centre: turning moves it
    regions = np.stack([distance < r for r in (9, 6, 3)], axis=-1).astype(np.float32)
    image = np.concatenate([regions, 2 * regions[..., :1]], axis=-1)  # channels = the masks
    moved = set()
    for seed in range(12):
        augmented_image, augmented_mask = (t.numpy() for t in data.random_zoom_and_turn(
            tf.constant(image), tf.constant(regions), tf.constant([seed, 0]), 0.2, 30.0))
        whole, core, enhancing = (augmented_mask[..., k].astype(bool) for k in range(3))
        assert (enhancing <= core).all() and (core <= whole).all()
        # The image went through the same transform: its channels threshold to the masks.
        np.testing.assert_array_equal(augmented_image[..., :3] >= 0.5, augmented_mask > 0)
        area = whole.sum() / (regions[..., 0] > 0).sum()
        assert 0.8 ** 2 * 0.9 < area < 1.2 ** 2 * 1.1  # zoomed by at most 20%
        moved.add(tuple(np.argwhere(enhancing).mean(axis=0).round().astype(int)))
    assert len(moved) > 6  # the lesion's centre ends in many places


def test_zoom_and_turn_of_zero_is_the_identity_and_off_by_default():
    import tensorflow as tf
    image = np.random.default_rng(5).random((16, 16, 4)).astype(np.float32)
    mask = (image[..., :1] > 0.5).astype(np.float32)
    same_image, same_mask = data.random_zoom_and_turn(
        tf.constant(image), tf.constant(mask), tf.constant([1, 2]), 0.0, 0.0)
    np.testing.assert_allclose(same_image, image, atol=1e-5)
    np.testing.assert_array_equal(same_mask, mask)
    plain = data.augment(image, mask, tf.constant([3, 4]))
    explicit = data.augment(image, mask, tf.constant([3, 4]), max_scale=0.0, max_degrees=0.0)
    np.testing.assert_array_equal(plain[0], explicit[0])
