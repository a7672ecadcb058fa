"""Pictures of segmentations: a montage per case and the Dice distribution of a run.

matplotlib draws off-screen (the Agg backend): cluster nodes have no display.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402


def save(figure, path, dpi=90):
    """Writes the figure (format from the extension of `path`) and frees it."""
    figure.savefig(path, dpi=dpi)
    plt.close(figure)


REGION_COLORS = {"whole_tumor": "yellow", "tumor_core": "red", "enhancing_tumor": "cyan"}


def slices_holding(masks):
    """[slices] bool: which slices of a [slices, H, W, K] mask hold any voxel. Inference passes
    views of C-ordered [H, W, slices, K] volumes, where any() over the three strided axes took
    0.2 s a case; reducing the rows of the volume's own layout takes a twentieth of that."""
    volume = np.moveaxis(masks, 0, -2)
    if not volume.flags.c_contiguous:  # reshaping would copy it: reduce the view as it is
        return masks.any(axis=(1, 2, 3))
    rows = volume.reshape(-1, masks.shape[0] * masks.shape[3])
    return rows.any(axis=0).reshape(masks.shape[0], -1).any(axis=1)


def montage(flair, truth, prediction, regions, title, count=4):
    """A figure of `count` axial slices through the tumor, FLAIR with every region outlined
    in its own colour: ground truth on the top row, prediction below. Arrays are
    [slices, H, W] (FLAIR) and [slices, H, W, K] (one boolean channel per region)."""
    tumor = np.flatnonzero(slices_holding(truth) | slices_holding(prediction))
    picks = tumor[np.linspace(0, len(tumor) - 1, count).round().astype(int)] if len(tumor) \
        else np.linspace(0, len(flair) - 1, count).round().astype(int)
    figure, axes = plt.subplots(2, count, figsize=(2.6 * count, 5.6))
    for row, (masks, name) in enumerate(((truth, "ground truth"), (prediction, "prediction"))):
        for ax, index in zip(axes[row], picks):
            ax.imshow(flair[index].T, cmap="gray", origin="lower")
            for k, region in enumerate(regions):
                if masks[index, ..., k].any():
                    ax.contour(masks[index, ..., k].T, levels=[0.5], linewidths=1,
                               colors=REGION_COLORS.get(region, "lime"))
            ax.set_title(f"{name}, slice {index}", fontsize=8)
            ax.axis("off")
    legend = ", ".join(f"{REGION_COLORS.get(r, 'lime')}: {r.replace('_', ' ')}" for r in regions)
    figure.suptitle(f"{title}   ({legend})", fontsize=9)
    # Fixed margins: the panels are square images with one-line titles. tight_layout drew
    # the whole figure once more to measure it (a third of a montage's time).
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.90, wspace=0.04,
                           hspace=0.12)
    return figure


def dice_distribution(rows, regions):
    """One figure for the run: the per-case Dice of every region, box plot and points."""
    figure, ax = plt.subplots(figsize=(2 + 1.6 * len(regions), 3.5))
    values = [[row[f"{region}_dice"] for row in rows] for region in regions]
    ax.boxplot(values, showfliers=False)
    for position, region_values in enumerate(values, 1):
        ax.scatter(np.full(len(region_values), position), region_values, s=12, alpha=0.6)
    ax.set_xticks(range(1, len(regions) + 1), [r.replace("_", " ") for r in regions])
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Per-case Dice, {len(rows)} cases")
    figure.tight_layout()
    return figure
