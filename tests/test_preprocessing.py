"""brainseg/preprocessing.py: normalization, slice choice, crops, resampling and its inverse,
target channels and their inverse, on hand-made volumes."""
import numpy as np
import pytest

from brainseg import layouts, metrics, preprocessing, synthetic


def test_normalize_zscores_brain_voxels_and_keeps_background_zero():
    rng = np.random.default_rng(0)
    image = np.zeros((10, 10, 4, 2), np.float32)
    image[2:8, 2:8] = rng.normal([300.0, 1200.0], [40.0, 90.0], size=(6, 6, 4, 2))
    normalized = preprocessing.normalize(image)
    brain = normalized[2:8, 2:8].reshape(-1, 2)
    np.testing.assert_allclose(brain.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(brain.std(axis=0), 1, atol=1e-5)
    assert not normalized[:2].any() and not normalized[8:].any()


def test_normalize_stays_finite_up_to_max_intensity_and_refuses_beyond():
    """float32 statistics: values of max_intensity give finite z-scores; 1e38, finite in
    float32, would overflow the sum of squares and turn the channel into NaN."""
    image = np.zeros((16, 16, 8, 1), np.float32)
    image[::2] = image[1::2] = preprocessing.max_intensity(image.size)
    image[1::2] *= -1
    normalized = preprocessing.normalize(image)
    np.testing.assert_allclose(np.abs(normalized), 1, rtol=1e-5)
    image[0, 0, 0] = 1e38
    with pytest.raises(ValueError, match="channel 0: values up to 1e\\+38 overflow"):
        preprocessing.normalize(image)


def test_slices_are_cropped_resampled_and_put_back():
    volume = np.zeros((60, 60, 3, 1), np.float32)
    volume[20:40, 20:40] = 1  # a centred square, half the 40-voxel crop
    box = preprocessing.crop_box(volume[..., 0] > 0, "center", 40)
    assert box == (10, 10, 40)
    slices = preprocessing.to_slices(volume, box, image_size=20, order=0)
    assert slices.shape == (3, 20, 20, 1)
    assert slices[0, 5:15, 5:15].all() and slices[0].sum() == 100
    np.testing.assert_array_equal(preprocessing.from_slices(slices, box, (60, 60), order=0),
                                  volume)


def test_resampling_matches_scipy_zoom():
    import scipy.ndimage
    volume = np.random.default_rng(0).random((24, 24, 2, 3)).astype(np.float32)
    expected = scipy.ndimage.zoom(volume, (16 / 24, 16 / 24, 1, 1), order=1, grid_mode=True,
                                  mode="nearest").transpose(2, 0, 1, 3)
    np.testing.assert_allclose(preprocessing.to_slices(volume, (0, 0, 24), 16, order=1),
                               expected, atol=1e-5)


def test_brain_box_crops_to_the_brain():
    brain = np.zeros((60, 60, 4), bool)
    brain[10:30, 25:41, 1:3] = True  # 20 x 16 in-plane
    assert preprocessing.crop_box(brain, "brain_box", 192) == (10, 23, 20)
    assert list(preprocessing.selected_slices(brain, "brain")) == [1, 2]
    assert list(preprocessing.selected_slices(brain, "all")) == [0, 1, 2, 3]


def test_region_targets_are_nested():
    labels = np.array([0, 1, 2, 4]).reshape(1, 1, 4)
    regions = preprocessing.targets(labels, "regions")[0, 0]
    # channels: whole tumor, tumor core, enhancing tumor
    np.testing.assert_array_equal(regions, [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]])


@pytest.mark.parametrize("label_mode", ["regions", "whole_tumor"])
def test_targets_are_each_channels_membership_of_the_label(label_mode):
    labels = np.random.default_rng(7).choice([0, 1, 2, 4], (9, 8, 7)).astype(np.uint8)
    actual = preprocessing.targets(labels, label_mode)
    assert actual.dtype == np.uint8
    for k, members in enumerate(preprocessing.LABEL_MODES[label_mode].values()):
        np.testing.assert_array_equal(actual[..., k], np.isin(labels, members))


@pytest.mark.parametrize("crop_mode", ["center", "brain_box"])
def test_slices_put_back_on_the_original_grid_match_the_truth(crop_mode):
    """The ground truth through the same preprocessing and back: what a perfect model's
    segmentation would be. It must match the original mask up to resampling."""
    case = synthetic.make_case(5, shape=(96, 96, 40))
    image = np.stack([case[m] for m in ("flair", "t1", "t1ce", "t2")], axis=-1).astype(np.float32)
    options = preprocessing.Preprocessing(64, 96, crop_mode, "brain", "regions")
    _, msks, geometry = preprocessing.preprocess_case(image, case["seg"], options)
    restored = preprocessing.to_volume(msks, geometry, (96, 96, 40))
    truth = preprocessing.targets(case["seg"], "regions")
    dices = [metrics.dice(truth[..., k], restored[..., k] > 0.5) for k in range(3)]
    assert truth.any(axis=(0, 1, 2)).all()
    # A one-voxel shift of the whole tumor already drops its Dice to 0.87 on this case.
    assert dices[0] > 0.95 and min(dices) > 0.85, dices


@pytest.mark.parametrize("dtype", [bool, np.uint8])
def test_each_voxel_takes_the_innermost_region_predicted_there(dtype):
    """A model may predict an inner region without the outer ones: enhancing wins over
    core, core over whole tumor, whatever the other channels say."""
    combinations = np.array([[w, c, e] for w in (0, 1) for c in (0, 1) for e in (0, 1)])
    expected = [4 if e else 1 if c else 2 if w else 0 for w, c, e in combinations]
    masks = combinations.reshape(2, 4, 1, 3).astype(dtype)
    labels = preprocessing.labels_from_targets(masks, "regions")
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels.ravel(), expected)


@pytest.mark.parametrize("layout,expected", [("brats2020", {0, 1, 2, 4}),
                                             ("brats2023", {0, 1, 2, 3}), ("msd", {0, 1, 2, 3})])
def test_regions_become_the_release_labels(layout, expected):
    internal = np.array([0, 1, 2, 4, 4, 2]).reshape(1, 2, 3)
    masks = preprocessing.targets(internal, "regions").astype(bool)
    np.testing.assert_array_equal(preprocessing.labels_from_targets(masks, "regions"), internal)
    labels = layouts.to_release_labels(preprocessing.labels_from_targets(masks, "regions"), layout)
    assert set(np.unique(labels)) == expected
    back = layouts.LAYOUTS[layout].label_map  # release -> internal: the round trip is exact
    np.testing.assert_array_equal(np.vectorize(back.get)(labels), internal)
    np.testing.assert_array_equal(layouts.to_internal_labels(labels, layout), internal)


# --- The cropped normalization against the whole-volume reference ----------------------------

def case_image(seed, shape=(96, 96, 40)):
    case = synthetic.make_case(seed, shape=shape)
    image = np.stack([case[m] for m in layouts.MODALITIES], axis=-1).astype(np.float32)
    return image, case["seg"]


def nifti_layout(volume):
    """The same values laid out as read_case returns a NIfTI case: x fastest, then y and z,
    with the channels (if any) innermost."""
    if volume.ndim == 3:
        return np.asfortranarray(volume)
    return np.ascontiguousarray(volume.transpose(2, 1, 0, 3)).transpose(2, 1, 0, 3)


def planar_layout(volume):
    """Laid out as read_case gives a case's image: each channel a plane of its own, x fastest."""
    if volume.ndim == 3:
        return nifti_layout(volume)
    planar = preprocessing.planar_channels(volume.shape[:3], volume.shape[3])
    planar[...] = volume
    return planar


def test_a_case_is_read_with_each_channel_a_plane_of_its_own(tmp_path):
    synthetic.write_dataset(str(tmp_path), 1, seed=3, shape=(40, 36, 20))
    _, cases = layouts.find_cases(str(tmp_path), "auto")
    image, labels = layouts.read_case(cases[0])
    assert image.shape == (40, 36, 20, len(layouts.MODALITIES))
    for channel in range(image.shape[3]):
        assert image[..., channel].flags.f_contiguous  # x fastest, nothing in between
    assert image.strides[3] == image[..., 0].nbytes


def test_every_memory_layout_gives_the_same_bytes():
    """C order, a NIfTI volume's order with the channels interleaved, and planar channels:
    the layout decides the speed only, not one bit of the slices."""
    image, labels = case_image(7)
    options = preprocessing.Preprocessing(48, 96, "brain_box", "brain", "regions", "float16")
    results = [preprocessing.preprocess_case(layout(image), layout(labels), options)
               for layout in (np.asarray, nifti_layout, planar_layout)]
    for other in results[1:]:
        assert other[2] == results[0][2]
        for expected, actual in zip(results[0][:2], other[:2]):
            assert actual.flags.c_contiguous and actual.tobytes() == expected.tobytes()


def test_memory_order_names_the_axes_slowest_first():
    image, labels = case_image(5)
    assert preprocessing.memory_order(labels) == (0, 1, 2)
    assert preprocessing.memory_order(nifti_layout(labels)) == (2, 1, 0)
    assert preprocessing.memory_order(nifti_layout(image)[..., 0]) == (2, 1, 0)


@pytest.mark.parametrize("options", [
    preprocessing.Preprocessing(64, 80),
    preprocessing.Preprocessing(64, 80, "brain_box", "all", "whole_tumor", "float32"),
    preprocessing.Preprocessing(48, 96, "brain_box", "brain", "regions", "float16"),
])
@pytest.mark.parametrize("layout", [np.asarray, nifti_layout, planar_layout])
def test_preprocess_case_writes_the_bytes_of_the_whole_volume_reference(options, layout):
    """Normalizing only the voxels that become slices (the brain's statistics summed x
    fastest) and resampling by two taps instead of the dense product change only the
    float32 rounding of an image value: compared with the whole-volume code the converter
    ran before (bench/whole_volume.py), on a case, on the same case with a brainless slice
    inside the brain (kept slices not consecutive) and without labels, in C order and laid
    out as a NIfTI case is read (x fastest). Masks are the same bytes."""
    from bench import whole_volume
    image, labels = case_image(5)
    gap = image.copy()
    gap[:, :, 20] = 0
    image, gap, labels = layout(image), layout(gap), layout(labels)
    for volume, label_map in ((image, labels), (gap, labels), (image, None)):
        expected = whole_volume.preprocess_case(volume, label_map, options)
        actual = preprocessing.preprocess_case(volume, label_map, options)
        assert actual[2] == expected[2]
        for array, reference in zip(actual[:2], expected[:2]):
            if reference is None:
                assert array is None
                continue
            assert array.dtype == reference.dtype and array.shape == reference.shape
            if array.dtype == np.uint8:
                assert array.tobytes() == reference.tobytes()
            else:
                # float32 rounding of the sums (1e-7), which float16 storage may carry
                # into its last bit (1e-3 of the value)
                tolerance = 1e-3 if array.dtype == np.float16 else 1e-6
                np.testing.assert_allclose(array.astype(np.float32),
                                           reference.astype(np.float32), rtol=tolerance,
                                           atol=tolerance)


@pytest.mark.parametrize("threads", [2, 3, 64])
def test_threads_give_the_same_bytes(threads):
    """Runs of slices done at once, on a case whose kept slices have a gap, more threads
    than slices included: the same slices, byte for byte, as one thread."""
    image, labels = case_image(6)
    image[:, :, 20] = 0
    options = preprocessing.Preprocessing(48, 96, "brain_box", "brain", "regions", "float16")
    one = preprocessing.preprocess_case(image, labels, options)
    many = preprocessing.preprocess_case(image, labels, options, threads=threads)
    assert one[2] == many[2]
    for expected, actual in zip(one[:2], many[:2]):
        assert actual.dtype == expected.dtype and actual.tobytes() == expected.tobytes()


def test_normalize_matches_the_whole_volume_reference_bit_for_bit():
    from bench import whole_volume
    image, _ = case_image(8)
    image[:, :, :, 1] *= 1e3  # a channel of another scale
    np.testing.assert_array_equal(preprocessing.normalize(image).view(np.uint32),
                                  whole_volume.normalize(image).view(np.uint32))


def test_brain_mask_and_its_bounding_box():
    image = np.zeros((6, 7, 8, 3), np.float32)
    image[1, 2, 3, 2] = -1.0
    image[4, 5, 6, 0] = 2.0
    brain = preprocessing.brain_mask(image)
    np.testing.assert_array_equal(brain, image.any(axis=-1))
    assert preprocessing.bounding_box(brain) == (slice(1, 5), slice(2, 6), slice(3, 7))
    assert preprocessing.bounding_box(np.zeros((2, 2), bool)) == (slice(0, 0), slice(0, 0))


@pytest.mark.parametrize("size_in,size_out", [(192, 128), (80, 64), (48, 96), (37, 16)])
def test_nearest_resampling_copies_the_pixels_the_matrix_product_picks(size_in, size_out):
    """Masks are resampled by copying pixels: the values of the order-0 matrix product,
    whose rows each hold one weight of 1."""
    volume = np.random.default_rng(1).integers(0, 2, (size_in, size_in, 3, 2), np.uint8)
    matrix = preprocessing._resampling_matrix(size_in, size_out, order=0)
    expected = np.einsum("ix,xyzc,jy->zijc", matrix, volume.astype(np.float32), matrix)
    actual = preprocessing.resample(volume, size_out, order=0)
    assert actual.dtype == np.uint8
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("size_in,size_out", [(192, 128), (48, 96), (37, 16)])
def test_resampling_equals_the_dense_matrix_product(size_in, size_out, order):
    """Linear resampling gathers the two input rows of every output row; cubic (more than
    two weights per row) takes the dense product. Either way the product's values."""
    volume = np.random.default_rng(2).random((size_in, size_in, 3, 2), dtype=np.float32)
    matrix = preprocessing._resampling_matrix(size_in, size_out, order)
    assert (preprocessing._two_taps(matrix) is None) == (order == 3)
    expected = np.einsum("ix,xyzc,jy->zijc", matrix, volume, matrix)
    np.testing.assert_allclose(preprocessing.resample(volume, size_out, order), expected,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kept", [[3, 4, 5, 6], [2, 5, 6, 9]], ids=["consecutive", "gaps"])
def test_to_volume_writes_the_box_of_the_kept_slices(kept):
    """to_volume writes the resampled box straight into the volume: the same values as
    resampling the whole slices back (from_slices) and placing them on the kept slices."""
    rng = np.random.default_rng(5)
    values = rng.random((len(kept), 16, 16, 3), dtype=np.float32)
    geometry = {"slices": np.array(kept), "crop_box": (3, 5, 24)}
    expected = np.zeros((32, 34, 12, 3), np.float32)
    expected[:, :, kept] = preprocessing.from_slices(values, (3, 5, 24), (32, 34), order=1)
    np.testing.assert_array_equal(preprocessing.to_volume(values, geometry, (32, 34, 12)),
                                  expected)


@pytest.mark.parametrize("kept", [[3, 4, 5, 6], [2, 5, 6, 9]], ids=["consecutive", "gaps"])
@pytest.mark.parametrize("label_mode", ["regions", "whole_tumor"])
def test_the_label_volume_is_the_thresholded_probability_volume(kept, label_mode):
    """to_label_volume works in the crop box only: the same map as thresholding the
    full-size probability volume and turning its channels into labels."""
    channels = len(preprocessing.LABEL_MODES[label_mode])
    values = np.random.default_rng(6).random((len(kept), 16, 16, channels), dtype=np.float32)
    geometry = {"slices": np.array(kept), "crop_box": (3, 5, 24)}
    expected = preprocessing.labels_from_targets(
        preprocessing.to_volume(values, geometry, (32, 34, 12)) > 0.5, label_mode)
    actual = preprocessing.to_label_volume(values, geometry, (32, 34, 12), label_mode)
    assert actual.dtype == np.uint8 and set(np.unique(actual)) > {0}
    np.testing.assert_array_equal(actual, expected)
