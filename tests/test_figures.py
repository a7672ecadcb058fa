"""brainseg/figures.py: the montage outlines each region in its own colour, truth above and
prediction below."""
import matplotlib.colors
import numpy as np

from brainseg import figures

REGIONS = ("whole_tumor", "tumor_core", "enhancing_tumor")


def test_montage_outlines_every_region_in_its_colour_for_truth_and_prediction(tmp_path):
    flair = np.random.default_rng(0).random((6, 16, 16)).astype(np.float32)
    truth = np.zeros((6, 16, 16, 3), bool)
    truth[2:4, 3:12, 3:12, 0] = True
    truth[2:4, 5:10, 5:10, 1] = True
    truth[2:4, 6:8, 6:8, 2] = True
    prediction = np.zeros_like(truth)
    prediction[..., 0] = truth[..., 0]  # only the whole tumor predicted
    figure = figures.montage(flair, truth, prediction, REGIONS, "case", count=2)
    top, bottom = figure.axes[:2], figure.axes[2:]
    assert len(figure.axes) == 4

    def colours(axes):
        return {matplotlib.colors.to_hex(c) for ax in axes for collection in ax.collections
                for c in np.atleast_2d(collection.get_edgecolor())}
    expected = {matplotlib.colors.to_hex(figures.REGION_COLORS[r]) for r in REGIONS}
    assert colours(top) == expected
    assert colours(bottom) == {matplotlib.colors.to_hex(figures.REGION_COLORS["whole_tumor"])}
    figures.save(figure, str(tmp_path / "montage.png"))
    assert (tmp_path / "montage.png").stat().st_size > 1000


def test_slices_holding_any_layout_equals_any_over_each_slice():
    """The fast row reduction on inference's C-ordered volumes, the plain one on any other
    layout: both name exactly the slices that hold a voxel of some region."""
    rng = np.random.default_rng(1)
    volume = np.zeros((12, 10, 9, 3), bool)  # [H, W, slices, K], as inference holds masks
    for slice_index, region in ((1, 0), (4, 2), (8, 1)):
        volume[rng.integers(12), rng.integers(10), slice_index, region] = True
    expected = np.zeros(9, bool)
    expected[[1, 4, 8]] = True
    for layout in (volume, np.asfortranarray(volume)):
        masks = np.moveaxis(layout, 2, 0)  # [slices, H, W, K]
        assert (figures.slices_holding(masks) == expected).all()
    stacked = np.ascontiguousarray(np.moveaxis(volume, 2, 0))  # already [slices, H, W, K]
    assert (figures.slices_holding(stacked) == expected).all()
