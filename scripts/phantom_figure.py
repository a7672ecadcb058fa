"""Figure of realistic synthetic cases: FLAIR, T1, T1ce, T2 and the labels, one case per row.

It shows at a glance whether brainseg/phantom.py still looks like BraTS (skull-stripped brain,
FLAIR-bright edema, ring-enhancing lesion on T1ce) after a change to it.

    python scripts/phantom_figure.py --seeds 19 29 13 --out docs/phantom.png
"""
import argparse
import io
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402  (matplotlib's own dependency)

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
from brainseg import phantom  # noqa: E402

# BraTS's usual colours: edema green, necrotic/non-enhancing core red, enhancing yellow.
LABEL_COLOURS = {2: ("edema (2)", "#30c030"), 1: ("necrosis / non-enhancing (1)", "#e02020"),
                 4: ("enhancing (4)", "#ffe030")}
COLUMNS = ("flair", "t1", "t1ce", "t2")


def tumor_slice(seg):
    """Axial slice with the most tumor core (else whole tumor), where BraTS figures cut."""
    core = np.isin(seg, (1, 4)).sum(axis=(0, 1))
    return int(np.argmax(core if core.any() else (seg > 0).sum(axis=(0, 1))))


def brain_box(volume, margin=4):
    """In-plane index ranges around the brain of an axial-slice stack."""
    inside = np.flatnonzero(volume.any(axis=(1, 2))), np.flatnonzero(volume.any(axis=(0, 2)))
    return tuple(slice(max(i.min() - margin, 0), i.max() + margin + 1) for i in inside)


def show(axis, image):
    """Axial slice as radiologists view it: anterior up, the patient's right on the left
    (BraTS arrays run left and posterior along their first two axes)."""
    axis.imshow(image.T, cmap="gray", interpolation="nearest",
                vmin=0, vmax=np.percentile(image[image > 0], 99.5) if image.any() else 1)
    axis.set_xticks([])
    axis.set_yticks([])


def draw(seeds, out_path, shape):
    """Write the figure: one row per seed."""
    labels_cmap = ListedColormap([colour for _, colour in LABEL_COLOURS.values()])
    figure, axes = plt.subplots(len(seeds), len(COLUMNS) + 1,
                                figsize=(2.2 * (len(COLUMNS) + 1), 2.55 * len(seeds)))
    axes = np.atleast_2d(axes)
    for row, seed in zip(axes, seeds):
        case, truth = phantom.make_case_with_truth(seed, shape)
        z = tumor_slice(case["seg"])
        box = brain_box(case["t1"])
        for axis, modality in zip(row, COLUMNS):
            show(axis, case[modality][box + (z,)])
            thick = truth["thick_slice_mm"][modality]
            axis.set_title(modality.upper() + (f" ({thick:.0f} mm slices)" if thick else ""),
                           fontsize=8)
        show(row[-1], case["flair"][box + (z,)])
        seg = case["seg"][box + (z,)].T
        index = np.select([seg == label for label in LABEL_COLOURS],
                          np.arange(len(LABEL_COLOURS)), -1)
        row[-1].imshow(np.ma.masked_less(index, 0), cmap=labels_cmap, vmin=0,
                       vmax=len(LABEL_COLOURS) - 1, alpha=0.55, interpolation="nearest")
        grade = "high grade" if truth["high_grade"] else "lower grade"
        row[-1].set_title(f"labels: seed {seed}, {grade}", fontsize=8)
        row[0].set_ylabel(f"slice {z}", fontsize=8)
    figure.legend(handles=[Patch(color=c, label=name) for name, c in LABEL_COLOURS.values()],
                  loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    # 256 colours hold the grey levels and the three label colours: a third of the bytes.
    Image.open(buffer).convert("RGB").quantize(256).save(out_path, optimize=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # A ring-enhancing glioblastoma with mass effect, a multifocal one, and a lower-grade
    # glioma (no enhancement) with thick-slice FLAIR and T2.
    parser.add_argument("--seeds", type=int, nargs="+", default=[19, 29, 13])
    parser.add_argument("--out", default=os.path.join(REPO_DIR, "docs", "phantom.png"))
    parser.add_argument("--shape", type=int, nargs=3, default=list(phantom.BRATS_SHAPE),
                        metavar=("X", "Y", "Z"))
    args = parser.parse_args(argv)
    draw(args.seeds, args.out, tuple(args.shape))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
