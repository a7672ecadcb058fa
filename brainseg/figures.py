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


def montage(flair, truth, prediction, title, count=4):
    """A figure of `count` axial slices through the tumor: FLAIR with the ground truth
    (green) and prediction (red) outlined. Arrays are [slices, H, W]."""
    tumor = np.flatnonzero((truth | prediction).any(axis=(1, 2)) if truth is not None
                           else prediction.any(axis=(1, 2)))
    picks = tumor[np.linspace(0, len(tumor) - 1, count).round().astype(int)] if len(tumor) \
        else np.linspace(0, len(flair) - 1, count).round().astype(int)
    figure, axes = plt.subplots(1, count, figsize=(3 * count, 3.3))
    for ax, index in zip(np.atleast_1d(axes), picks):
        ax.imshow(flair[index].T, cmap="gray", origin="lower")
        for mask, color in ((truth, "lime"), (prediction, "red")):
            if mask is not None and mask[index].any():
                ax.contour(mask[index].T, levels=[0.5], colors=color, linewidths=1)
        ax.set_title(f"slice {index}", fontsize=9)
        ax.axis("off")
    figure.suptitle(f"{title}   (green: ground truth, red: prediction)", fontsize=10)
    figure.tight_layout()
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
