"""NIfTI files from elsewhere: headers checked before any voxel is read, every volume read in
one orientation, and results written back in the file's own.

A release is data this project did not make, and a NIfTI header may declare anything. So,
before a voxel is read (nibabel allocates what the header declares, then reads):

- the declared size is bounded by MAX_VOXELS, and checked against what the file can hold:
  an uncompressed file must be as long as the data it declares, and a gzip file cannot
  expand more than DEFLATE_MAX_RATIO times. A 2000^3 header in a 1 kB file would otherwise
  ask for 16 GB before failing;
- a volume must have the dimensions expected of it. Trailing dimensions of 1 do not count:
  some tools write a 3-D scan as (X, Y, Z, 1).

Files store their voxels in any order and direction; the affine says which. Every volume is
read in CANONICAL_AXES, the orientation of the BraTS files (and of the synthetic cases), so
array axis 2 always runs from foot to head and its slices are axial, whatever the file
stores. Not nibabel's as_closest_canonical (RAS): that would mirror every BraTS slice
left-right and front-back, changing the arrays of every BraTS case and the input of every
model trained before. Results are written back in the file's own orientation, affine and
header (from_canonical), so they overlay the scan voxel for voxel.
"""
import dataclasses
import math
import os

import nibabel as nib
import numpy as np

try:  # ISA-L's gzip decoder: a BraTS .nii.gz decodes twice as fast as with zlib
    from isal import igzip
except ImportError:  # then nibabel decodes them with Python's gzip (zlib)
    igzip = None

# The most values (voxels x channels) a file may declare: 2^28, 268 million. A BraTS scan has
# 8.9 million voxels (240 x 240 x 155 at 1 mm), a 0.5 mm whole-head scan about 100 million
# (512 x 512 x 400). As float32, 2^28 values are 1 GiB, and a case of four such files already
# needs over 8 GiB per converter worker (read, stacked, normalized): a header declaring
# more is damaged or hostile, not a brain scan, and is refused before anything is allocated.
MAX_VOXELS = 2**28
# Deflate, gzip's compression, encodes at most 258 bytes in about 2 bits: no gzip file
# expands more than 1032 times (zlib's technical details), so a header declaring more data
# than 1032 x the file's size declares data that is not there.
DEFLATE_MAX_RATIO = 1032
CANONICAL_AXES = ("L", "P", "S")  # voxel axes x, y, z point left, posterior, superior
_CANONICAL = nib.orientations.axcodes2ornt(CANONICAL_AXES)
# Two files share a grid when every voxel of one lies within this fraction of a voxel of
# the same voxel of the other: round-off in stored affines (float32, quaternions) is far
# below it, a real misregistration or another scan's grid far above.
GRID_TOLERANCE_VOXELS = 0.1


class NiftiError(Exception):
    """A file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
    """Where a volume's voxels are, in the canonical orientation: spatial shape, voxel
    sizes (mm, as the header states them) and the voxel-to-world affine."""
    shape: tuple
    zooms: tuple
    affine: np.ndarray

    def distance(self, other):
        """How far (in voxels of this grid) the voxels of `other` lie from the same voxels
        of this one, at worst. Affines are linear, so the grid's corners bound every voxel."""
        corners = np.array([[x, y, z, 1.0] for x in (0, self.shape[0] - 1)
                            for y in (0, self.shape[1] - 1) for z in (0, self.shape[2] - 1)]).T
        moved = np.linalg.solve(self.affine, other.affine @ corners)
        return float(np.abs(moved - corners)[:3].max())


def _unreadable(path, error):
    return NiftiError(f"{path}: unreadable NIfTI ({type(error).__name__}: {error})")


def volume_shape(path, declared, ndim):
    """The declared shape with trailing dimensions of 1 beyond `ndim` dropped ((X, Y, Z, 1)
    is a 3-D volume), or NiftiError when it has another number of dimensions."""
    shape = tuple(int(n) for n in declared)
    while len(shape) > ndim and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != ndim:
        raise NiftiError(f"{path}: expected a {ndim}-D volume, got shape {tuple(declared)}")
    return shape


def check_size(path, header, shape):
    """NiftiError unless the declared data is of a sane size that the file can hold."""
    voxels = math.prod(shape)
    if voxels == 0:
        raise NiftiError(f"{path}: the header declares an empty volume, shape {shape}")
    if voxels > MAX_VOXELS:
        raise NiftiError(f"{path}: the header declares {voxels:,} voxels "
                         f"({' x '.join(map(str, shape))}), more than the {MAX_VOXELS:,} a "
                         f"scan may have")
    dtype = header.get_data_dtype()
    if dtype.kind not in "iuf":
        raise NiftiError(f"{path}: voxels of type {dtype}, not real numbers")
    declared = int(header.get_data_offset()) + voxels * dtype.itemsize
    size = os.path.getsize(path)
    if path.endswith(".gz") and declared > DEFLATE_MAX_RATIO * size:
        raise NiftiError(f"{path}: the header declares {declared:,} bytes, more than a "
                         f"{size:,}-byte gzip file can hold (gzip expands at most "
                         f"{DEFLATE_MAX_RATIO} times)")
    if not path.endswith(".gz") and declared > size:
        raise NiftiError(f"{path}: the header declares {declared:,} bytes, the file holds "
                         f"{size:,}")


def _to_canonical(affine):
    """nibabel's orientation transform from a file's voxel axes to CANONICAL_AXES."""
    own = nib.io_orientation(affine)
    if np.isnan(own).any():
        raise ValueError(f"its affine gives a voxel axis no direction "
                         f"({np.round(affine[:3, :3], 3).tolist()})")
    return nib.orientations.ornt_transform(own, _CANONICAL)


def canonical_grid(image):
    """The Grid of a loaded image's voxels as read() returns them, from its header alone
    (ValueError for an affine without an orientation)."""
    return _grid(image, _to_canonical(image.affine))


def _grid(image, transform):
    shape, zooms = image.shape[:3], image.header.get_zooms()[:3]
    order = np.argsort(transform[:, 0])  # canonical axis k is the file's axis order[k]
    return Grid(tuple(shape[i] for i in order), tuple(zooms[i] for i in order),
                image.affine @ nib.orientations.inv_ornt_aff(transform, shape))


def read(path, ndim=3):
    """(float32 voxels in the canonical orientation, their Grid) of an `ndim`-D volume, its
    header checked before anything is read; NiftiError naming the file and the problem."""
    if not os.path.exists(path):
        raise NiftiError(f"{path}: file not found")
    try:
        image = nib.load(path)  # the header only: voxels are read below
    except Exception as error:  # nibabel and gzip raise many types for damaged files
        raise _unreadable(path, error) from error
    shape = volume_shape(path, image.header.get_data_shape(), ndim)
    check_size(path, image.header, shape)
    try:
        transform = _to_canonical(image.affine)
    except ValueError as error:
        raise NiftiError(f"{path}: {error}") from error
    try:
        volume = _voxels(path, image).reshape(shape)
    except Exception as error:
        raise _unreadable(path, error) from error
    if not np.isfinite(volume).all():
        raise NiftiError(f"{path}: contains NaN or infinite voxels")
    return nib.orientations.apply_orientation(volume, transform), _grid(image, transform)


def _voxels(path, image):
    """The voxels of a loaded image as float32, scaled as its header says. A .nii.gz is
    decompressed with igzip when it is installed, and only the bytes the header declares
    (a gzip bomb behind a small header stays in the file); nibabel then reads them from
    memory, with its own scaling, so the values are those it reads from the file itself."""
    if igzip is None or not path.endswith(".gz") or not hasattr(image, "from_bytes"):
        return np.asarray(image.dataobj, dtype=np.float32)
    declared = image.dataobj.offset + math.prod(image.shape) * image.get_data_dtype().itemsize
    with igzip.open(path, "rb") as file:
        data = file.read(declared)
    if len(data) < declared:
        raise EOFError(f"the file ends {declared - len(data):,} bytes before the end of the "
                       f"data its header declares")
    return np.asarray(type(image).from_bytes(data).dataobj, dtype=np.float32)


def from_canonical(volume, image):
    """The inverse of read's reorientation: `volume` ([X, Y, Z, ...] in the canonical
    orientation) in the voxel order of `image`, a loaded scan."""
    back = nib.orientations.ornt_transform(_CANONICAL, nib.io_orientation(image.affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(volume, back))
