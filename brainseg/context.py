"""2.5D input: each axial slice fed together with its neighbouring slices as extra channels.

A 2D U-Net sees one slice; a radiologist scrolls through the neighbours to tell a vessel
from enhancing tumor, or the end of a lesion from noise. Stacking the k slices below and
the k above as channels gives the network that context at almost no cost (only the first
convolution grows). With CONTEXT_SLICES = k a sample has 2k + 1 slices of C modalities,
lowest slice first: channels [slice z-k: C modalities, ..., slice z: C, ..., slice z+k: C].
Its mask is that of the centre slice.

The converted arrays are not changed: the neighbours of a row are assembled when it is read,
from the rows of the same case (the manifest's per-case row ranges and slice numbers). A
neighbour is the adjacent row only if that row belongs to the case and is the adjacent axial
slice; anywhere else (the first and last slices of a case, a gap in the kept slices) the
nearest slice of the case in that direction is repeated (edge padding), so a case never
borrows slices from the next case in the file.

One function assembles every sample (`assemble`): the training and validation pipelines
(data.py, reading rows from the files), and inference, on converted arrays and on NIfTI
cases (the slices preprocessing.preprocess_case returns). TensorFlow-free.
"""
import numpy as np


def channels(modalities, context_slices):
    """Input channels of a model that sees `context_slices` neighbours on each side."""
    return modalities * (2 * context_slices + 1)


def from_channels(num_channels, modalities):
    """The context_slices a model with this many input channels was trained with, or None
    when the count is not modalities x an odd number."""
    slices, remainder = divmod(num_channels, modalities)
    if remainder or slices % 2 == 0:
        return None
    return (slices - 1) // 2


def _check(context_slices):
    if int(context_slices) != context_slices or context_slices < 0:
        raise ValueError(f"context_slices must be a whole number >= 0, got {context_slices!r}")


def case_neighbours(slices, context_slices):
    """[n, 2k + 1] positions (0 .. n-1) within one case whose n kept axial slices, in row
    order, are `slices` (slice numbers z, ascending): row p's neighbour at offset d is row
    p + d when every row from p to p + d exists and holds slice z_p + d step by step;
    otherwise the last row that did (edge padding)."""
    _check(context_slices)
    z = np.asarray(slices, dtype=np.int64)
    positions = np.arange(len(z))
    table = np.repeat(positions[:, None], 2 * context_slices + 1, axis=1)
    for sign in (-1, 1):
        for distance in range(1, context_slices + 1):
            previous = table[:, context_slices + sign * (distance - 1)]
            candidate = positions + sign * distance
            inside = (candidate >= 0) & (candidate < len(z))
            clipped = np.clip(candidate, 0, max(len(z) - 1, 0))
            adjacent = (inside & (previous == positions + sign * (distance - 1))
                        & (z[clipped] == z + sign * distance))
            table[:, context_slices + sign * distance] = np.where(adjacent, candidate, previous)
    return table


def split_neighbours(manifest, split, num_rows, context_slices):
    """[num_rows, 2k + 1] rows of a split's arrays to stack for each row, from the manifest's
    cases (their "rows" [first, end) and kept "slices"); None when context_slices is 0, which
    leaves the one-slice path untouched. ValueError when the manifest does not account for
    every row (it must describe these very arrays)."""
    _check(context_slices)
    if context_slices == 0:
        return None
    entries = (manifest or {}).get("splits", {}).get(split)
    if entries is None:
        raise ValueError(f"2.5D input needs the manifest's {split} cases (their rows and "
                         f"slices), and there is none")
    table = np.full((num_rows, 2 * context_slices + 1), -1, np.int64)
    for entry in entries:
        first, end = entry["rows"]
        if len(entry["slices"]) != end - first or not 0 <= first <= end <= num_rows:
            raise ValueError(f"manifest: case {entry['case']} has rows {first}-{end} and "
                             f"{len(entry['slices'])} slices; the {split} arrays have "
                             f"{num_rows} rows")
        table[first:end] = first + case_neighbours(entry["slices"], context_slices)
    if (table < 0).any():
        raise ValueError(f"manifest: {int((table[:, 0] < 0).sum())} of the {num_rows} rows "
                         f"of the {split} arrays belong to no case")
    return table


def assemble(read, rows):
    """One 2.5D sample: read(row) -> [S, S, C] for each row of `rows` (a row of a neighbour
    table), stacked along the channels, lowest slice first. Each distinct row is read once
    (an edge-padded neighbour repeats a row already read)."""
    distinct = {}
    for row in rows:
        if row not in distinct:
            distinct[row] = read(row)
    return np.concatenate([distinct[row] for row in rows], axis=-1)


def stack_case(images, slices, context_slices):
    """A case's preprocessed slices [n, S, S, C] (preprocessing.preprocess_case, kept slice
    numbers `slices`) -> [n, S, S, C x (2k + 1)], neighbours from the case's own slices."""
    return StackedRows(images, case_neighbours(slices, context_slices))[:]


class StackedRows:
    """The rows of a split's image array as 2.5D samples, read as they are indexed:
    len(), .shape and [index or slice] like the array [N, S, S, C x (2k + 1)] it stands for,
    without ever holding it (inference indexes it one batch at a time)."""

    def __init__(self, images, table):
        self.images, self.table = images, table
        self.shape = (*images.shape[:3], images.shape[3] * table.shape[1])
        self.dtype = images.dtype

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        rows = self.table[index]
        if rows.ndim == 1:
            return assemble(self.images.__getitem__, rows)
        if not len(rows):
            return np.empty((0, *self.shape[1:]), self.dtype)
        return np.stack([assemble(self.images.__getitem__, sample) for sample in rows])
