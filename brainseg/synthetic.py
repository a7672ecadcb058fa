"""Synthetic BraTS cases: four MRI modalities and a tumor segmentation in the BraTS layout.

Real BraTS data is only handed out after registration (and a data-use agreement), so the
demo and the tests run on synthetic cases instead, of two kinds:
- "realistic" (brainseg/phantom.py): real brain anatomy and gliomas as they look in BraTS,
  with what mimics them; the demo and the accuracy benchmark use it;
- "cartoon" (this module): fast and easy, for the unit tests, which check plumbing, not
  accuracy (any U-Net segments it almost perfectly).
Both are written here, in the files and folders of any release layout.

The cartoon is a head phantom on the BraTS grid
(240 x 240 x 155 voxels of 1 mm, axial slices last): scalp, skull, grey and white matter,
ventricles and a CSF rim, with a tumor (sometimes two) of random position, size and shape.
The tumor has the nested BraTS labels (2 edema outside, 4 enhancing rim, 1 necrotic core),
and every tissue has the contrast it has in real FLAIR, T1, T1ce and T2 scans, under a coil
bias field, Rician-like noise and a random gain per modality: segmenting it needs all four
channels and a per-case intensity normalization, as with real data.

synthetic_brats.py is its command line.
"""
import gzip
import json
import os

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from brainseg import atomic, layouts, messages, phantom

CASE_PREFIX = "BraTS20_Training_"

# The anatomy is defined in mm on the full BraTS grid and sampled at the voxels of whatever
# grid is asked for, so a small test grid holds the same head, only coarser.
FULL_GRID_MM = np.array([240.0, 240.0, 155.0])
BRAIN_CENTER_MM = np.array([119.5, 119.5, 80.0])
BRAIN_SEMI_AXES_MM = np.array([68.0, 80.0, 53.0])  # left-right, front-back, foot-head
HEAD_OUTER_RADIUS = 1.10  # scalp surface, in units of the brain's normalized radius

# Tissue classes of the phantom (index into the contrast tables below).
BACKGROUND, SCALP, BONE, CSF, GREY, WHITE, EDEMA, ENHANCING, NECROSIS = range(9)
BRAIN_TISSUES = (CSF, GREY, WHITE, EDEMA, ENHANCING, NECROSIS)
TUMOR_TISSUE_BY_LABEL = {2: EDEMA, 4: ENHANCING, 1: NECROSIS}

# Relative intensity of each tissue class per modality, in the orderings of real scans:
# T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: like T2 with CSF suppressed; T1ce: T1 plus
# enhancement. Edema is bright on FLAIR and T2, the enhancing rim only on T1ce, necrosis is
# dark on T1 and T1ce. Columns: background, scalp, bone, CSF, grey, white, edema, rim, core.
CONTRAST = {
    "flair": (0.0, 0.70, 0.12, 0.20, 1.00, 0.78, 1.65, 1.30, 0.95),
    "t1": (0.0, 1.30, 0.15, 0.30, 0.72, 1.00, 0.62, 0.68, 0.38),
    "t1ce": (0.0, 1.35, 0.15, 0.32, 0.74, 1.00, 0.64, 1.65, 0.36),
    "t2": (0.0, 0.65, 0.12, 1.85, 1.00, 0.70, 1.45, 1.15, 1.70),
}
SCANNER_UNITS = {"flair": 420.0, "t1": 650.0, "t1ce": 800.0, "t2": 950.0}  # per unit contrast
NOISE_LEVEL = 0.03  # noise standard deviation, in the units of the contrast tables
GZIP_LEVEL = 1  # most of the volume is zeros: level 1 is almost as small and much faster


CASE_IDS = {"brats2017": "Brats17_{:03d}_1", "brats2020": CASE_PREFIX + "{:03d}",
            "brats2023": "BraTS-GLI-{:05d}-000", "msd": "BRATS_{:03d}"}


def case_id(index, layout="brats2020"):
    """Folder and file prefix of case `index` (1-based), named as in that release."""
    return CASE_IDS[layout].format(index)


def _lattice(low, high, spacing):
    """Node positions (mm) every `spacing` mm, covering [low, high] with one node to spare."""
    return np.arange(low - spacing, high + 2 * spacing, spacing)


def _smooth_field(rng, coords, nodes):
    """Smooth random field of unit variance, sampled at the voxel positions `coords` (mm).

    Random values on a coarse lattice blended with Gaussian bumps one axis at a time: as
    cheap as upsampling, free of interpolation kinks, and a function of mm positions only,
    so the field (hence the anatomy) does not depend on the grid it is sampled on."""
    weights = []
    for axis_coords, axis_nodes in zip(coords, nodes):
        spacing = axis_nodes[1] - axis_nodes[0]
        bumps = np.exp(-0.5 * ((axis_coords[:, None] - axis_nodes[None, :]) / spacing) ** 2)
        weights.append((bumps / np.pi**0.25).astype(np.float32))  # unit variance
    lattice = rng.standard_normal([len(n) for n in nodes], dtype=np.float32)
    field = np.einsum("ia,jb,kc,abc->ijk", *weights, lattice, optimize=True)
    return np.ascontiguousarray(field)  # einsum may return a strided view: slow to use


def _ellipsoid_radius(coords, center, semi_axes):
    """Normalized radius (1 on the surface) of an axis-aligned ellipsoid, by broadcasting."""
    x, y, z = (((c - c0) / a).astype(np.float32) for c, c0, a in zip(coords, center, semi_axes))
    return np.sqrt(x[:, None, None] ** 2 + y[None, :, None] ** 2 + z[None, None, :] ** 2)


def _box(coords, center, half_size):
    """Index ranges of the voxels within `half_size` mm of `center` (a box, per axis)."""
    return tuple(slice(np.searchsorted(c, c0 - r), np.searchsorted(c, c0 + r))
                 for c, c0, r in zip(coords, center, np.broadcast_to(half_size, 3)))


def _draw_head(rng, coords):
    """Head phantom: tissue classes and the brain's normalized radius `rho` at every voxel.

    Only the box around the head is computed (half the grid), which halves the run time."""
    center = BRAIN_CENTER_MM + rng.uniform(-1, 1, 3) * [3.0, 3.0, 1.5]
    semi_axes = BRAIN_SEMI_AXES_MM * rng.uniform(0.97, 1.03, 3)
    reach = semi_axes * HEAD_OUTER_RADIUS * 1.06 + 2  # 1.06: the largest deformation below
    crop = _box(coords, center, reach)
    coords = [c[s] for c, s in zip(coords, crop)]

    # A smooth deformation keeps the brain from being a perfect ellipsoid.
    whole_grid = [_lattice(0, mm, 40.0) for mm in FULL_GRID_MM]
    deformation = 1 + 0.03 * np.clip(_smooth_field(rng, coords, whole_grid), -2, 2)
    rho = _ellipsoid_radius(coords, center, semi_axes) / deformation
    tissue = np.full(rho.shape, BACKGROUND, np.uint8)
    for outer_radius, tissue_class in [(HEAD_OUTER_RADIUS, SCALP), (1.02, BONE), (1.0, CSF),
                                       (0.965, GREY)]:
        tissue[rho < outer_radius] = tissue_class
    # White matter under a cortex band of varying thickness, like gyri seen at 1 mm.
    gyri = _smooth_field(rng, coords, [_lattice(0, mm, 10.0) for mm in FULL_GRID_MM])
    tissue[rho < np.minimum(0.82 * (1 + 0.09 * gyri), 0.93)] = WHITE

    for side in (-1, 1):  # lateral ventricles, either side of the midline
        ventricle_center = center + semi_axes * [0.15 * side, 0.02, 0.15]
        ventricle_axes = semi_axes * [0.075, 0.3, 0.17]
        box = _box(coords, ventricle_center, ventricle_axes)
        ventricle = _ellipsoid_radius([c[s] for c, s in zip(coords, box)], ventricle_center,
                                      ventricle_axes)
        tissue[box][ventricle < 1] = CSF
    fissure = (np.abs(coords[0] - center[0]) < 1.0)[:, None, None] & (rho > 0.5) & (rho < 1)
    tissue[fissure] = CSF  # the falx between the hemispheres
    return crop, coords, tissue, rho, center, semi_axes


def _tumor_center(rng, side, radius_mm, center, semi_axes):
    """Tumor centre in one hemisphere, deep enough for the tumor to stay mostly in the brain."""
    for _ in range(1000):
        offset = rng.uniform([0.15, -0.7, -0.55], [0.7, 0.7, 0.65]) * [side, 1, 1]
        if np.linalg.norm(offset) + 0.5 * radius_mm / semi_axes.min() < 0.85:
            break
    return center + offset * semi_axes


def _draw_tumor(rng, seg, rho, coords, center, semi_axes, radius_mm, high_grade):
    """Paint one tumor into `seg`: edema (2), inside it an enhancing rim (4) around necrosis (1).

    The whole tumor is a randomly oriented ellipsoid whose surface is pushed in and out by a
    smooth random field; the core follows the same field, so the labels stay nested. Lower
    grade tumors have no enhancing rim and at most a small non-enhancing core (label 1)."""
    side = rng.choice([-1, 1])
    tumor_center = _tumor_center(rng, side, radius_mm, center, semi_axes)
    rotation = np.linalg.qr(rng.standard_normal((3, 3)))[0].astype(np.float32)
    radii = radius_mm * np.exp(rng.normal(0, 0.15, 3))
    reach = 1.5 * radii.max()
    box = _box(coords, tumor_center, reach)
    local = [(c[s] - c0).astype(np.float32) for c, s, c0 in zip(coords, box, tumor_center)]
    x, y, z = local[0][:, None, None], local[1][None, :, None], local[2][None, None, :]
    rho_tumor = np.sqrt(sum(((x * rotation[0, k] + y * rotation[1, k] + z * rotation[2, k])
                             / radii[k]) ** 2 for k in range(3)))

    nodes = [_lattice(-reach, reach, max(radii.min() * 0.6, 4.0))] * 3
    edema_field = np.clip(_smooth_field(rng, local, nodes), -2, 2)
    core_field = np.clip(_smooth_field(rng, local, nodes), -2, 2)
    whole = rho_tumor < 1 + 0.25 * edema_field
    whole &= rho[box] < 0.95  # the tumor stays in the parenchyma and the falx stops it
    whole &= (side * (local[0] + tumor_center[0] - center[0]) > 0)[:, None, None]
    if high_grade:
        core_radius = rng.uniform(0.4, 0.7)
        # A 3-7 mm enhancing rim; small tumors may be solid, without necrosis.
        necrosis_radius = core_radius - rng.uniform(3.0, 7.0) / radius_mm
    else:
        core_radius = rng.uniform(0.2, 0.4) if rng.random() < 0.5 else 0.0
        necrosis_radius = core_radius  # no enhancing rim
    core = whole & (rho_tumor < core_radius * (1 + 0.15 * core_field))
    necrosis = core & (rho_tumor < necrosis_radius * (1 + 0.15 * core_field))

    labels = seg[box]
    labels[whole & (labels == 0)] = 2
    labels[core] = 4
    labels[necrosis] = 1


def _render(rng, noise_rng, tissue, coords, modality):
    """One modality from the tissue map: contrast, partial volume, bias field, Rician noise."""
    contrast = np.array(CONTRAST[modality], np.float32)
    contrast[1:EDEMA] *= rng.uniform(0.95, 1.05, EDEMA - 1)  # no two cases look the same
    contrast[EDEMA:] *= rng.uniform(0.9, 1.1, len(contrast) - EDEMA)
    gain = SCANNER_UNITS[modality] * np.exp(rng.uniform(-0.35, 0.35))  # normalization matters
    coil_nodes = [_lattice(0, mm, 80.0) for mm in FULL_GRID_MM]
    bias = np.exp(0.08 * _smooth_field(rng, coords, coil_nodes))  # slow intensity drift

    image = ndimage.gaussian_filter(contrast[tissue], sigma=0.6, truncate=2.0)
    image *= bias
    # Rician-like noise: magnitude images are the modulus of signal plus noise, so dark tissue
    # gets a positive noise floor (one Gaussian draw and its modulus: half the cost of two).
    image += NOISE_LEVEL * noise_rng.standard_normal(image.shape, dtype=np.float32)
    image = np.abs(image, out=image) * gain
    np.clip(image, 1, np.iinfo(np.int16).max, out=image)  # 0 is kept for the background
    image[tissue == BACKGROUND] = 0
    return np.rint(image, out=image).astype(np.int16)


def _uncrop(volume, crop, shape):
    """Put the head box back into the full grid, zero (background) around it."""
    full = np.zeros(shape, volume.dtype)
    full[crop] = volume
    return full


def _generate(seed, shape):
    """Volumes of one case and its tissue map (the tests use the map to find the brain)."""
    # The per-voxel noise has its own stream, so the anatomy does not depend on the grid size.
    rng, noise_rng = np.random.default_rng(seed).spawn(2)
    coords = [(np.arange(n) + 0.5) * (mm / n) - 0.5 for n, mm in zip(shape, FULL_GRID_MM)]
    crop, coords, tissue, rho, center, semi_axes = _draw_head(rng, coords)

    seg = np.zeros(tissue.shape, np.uint8)
    high_grade = rng.random() >= 0.2
    num_tumors = 2 if rng.random() < 0.15 else 1
    for tumor in range(num_tumors):
        radius_mm = rng.uniform(14.0, 35.0) if tumor == 0 else rng.uniform(8.0, 14.0)
        _draw_tumor(rng, seg, rho, coords, center, semi_axes, radius_mm, high_grade)
    for label, tumor_tissue in TUMOR_TISSUE_BY_LABEL.items():
        tissue[seg == label] = tumor_tissue

    volumes = {m: _render(rng, noise_rng, tissue, coords, m) for m in layouts.MODALITIES}
    volumes["seg"] = seg
    case = {name: _uncrop(volume, crop, shape) for name, volume in volumes.items()}
    return case, _uncrop(tissue, crop, shape)


def make_case(seed, shape=(240, 240, 155)):
    """Arrays "flair", "t1", "t1ce", "t2" (int16) and "seg" (uint8, BraTS labels) of one case."""
    return _generate(seed, tuple(int(n) for n in shape))[0]


def _save_nifti(volume, path):
    """Write a 1 mm NIfTI with the BraTS orientation, atomically (temporary name, then rename).

    A reader never sees a half-written file, and an interrupted run leaves no corrupt case."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = volume.shape[1] - 1  # BraTS files put the origin on the opposite y edge
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    compressed = gzip.compress(image.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)

    def write(temporary):
        with open(temporary, "wb") as file:
            file.write(compressed)
    atomic.replace_atomically(path, write)


KINDS = ("cartoon", "realistic")


def write_case(root, index, seed, shape=(240, 240, 155), layout="brats2020", with_labels=True,
               kind="cartoon", phenomena=None):
    """Write case `index` in the files and folders of `layout` (see layouts.py), e.g.
    root/BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz for brats2020. Without
    labels it looks like a validation release. `phenomena` (phantom.TumorPhenomena) replaces
    a realistic case's defaults. Returns the case folder (or image file)."""
    if kind == "realistic":
        volumes = phantom.make_case(seed, shape, phenomena or phantom.TumorPhenomena())
    else:
        volumes = make_case(seed, shape)
    name = case_id(index, layout)
    seg = layouts.to_release_labels(volumes.pop("seg"), layout)
    if layout == "msd":  # one 4-D image per case; labels in a parallel folder
        image = np.stack([volumes[modality] for modality in layouts.MSD_CHANNELS], axis=-1)
        paths = {"image": os.path.join(root, "imagesTr", f"{name}.nii.gz"),
                 "seg": os.path.join(root, "labelsTr", f"{name}.nii.gz")}
        volumes = {"image": image, "seg": seg} if with_labels else {"image": image}
        written = paths["image"]
    else:
        spec = layouts.LAYOUTS[layout]
        grade_folder = ("HGG" if index % 2 else "LGG") if layout == "brats2017" else ""
        folder = os.path.join(root, grade_folder, name)
        if with_labels:
            volumes["seg"] = seg
        paths = {kind: os.path.join(folder, f"{name}{spec.separator}{spec.file_names[kind]}.nii.gz")
                 for kind in volumes}
        written = folder
    for kind, volume in volumes.items():
        os.makedirs(os.path.dirname(paths[kind]), exist_ok=True)
        _save_nifti(volume, paths[kind])
    return written


def _write_msd_dataset_json(root, num_cases, with_labels):
    """The Decathlon's dataset.json, with the fields the real Task01 file has."""
    description = {
        "name": "BRATS", "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                   "3": "enhancing tumour"},
        "numTraining": num_cases if with_labels else 0,
        "training": [{"image": f"./imagesTr/{case_id(i, 'msd')}.nii.gz",
                      "label": f"./labelsTr/{case_id(i, 'msd')}.nii.gz"}
                     for i in range(1, num_cases + 1)] if with_labels else []}
    with open(os.path.join(root, "dataset.json"), "w") as file:
        json.dump(description, file, indent=1)


def _case_seed(seed, index):
    """Seed of case `index`: depends on (seed, index) only, so a case never depends on how
    many cases are written."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# Marks a folder as the generator's own: the only folder whose cases it may overwrite.
MARKER = ".synthetic_brats"


def claim_folder(root):
    """Refuses a folder that holds anything the generator did not write there: synthetic
    cases carry real BraTS IDs (BraTS20_Training_001...), so a user's release in that folder
    would be overwritten case by case. Marks an empty or new folder as the generator's."""
    if os.path.isdir(root) and not os.path.exists(os.path.join(root, MARKER)):
        found = sorted(os.listdir(root))
        if found:
            raise ValueError(f"{root}: holds files this generator did not write "
                             f"({messages.first_few(found, 3)}); "
                             f"synthetic cases go to a new or empty folder")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, MARKER), "w") as file:
        file.write("Synthetic BraTS cases written by synthetic_brats.py; not real data.\n")


def write_dataset(root, num_cases, seed, shape=(240, 240, 155), layout="brats2020",
                  with_labels=True, kind="cartoon", phenomena=None):
    """Write cases 1..num_cases (overwriting earlier synthetic ones) of a kind in `layout`
    into a folder that is new, empty or the generator's own; returns their folders.
    `phenomena` (realistic cases only) changes what the phantom draws, case k staying the
    same patient: with a stronger bias field, say, only the field is stronger."""
    if kind not in KINDS:
        raise ValueError(f"synthetic kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if phenomena is not None and kind != "realistic":
        raise ValueError("tumor phenomena apply to realistic cases, not to the cartoon")
    claim_folder(root)
    written = [write_case(root, index, _case_seed(seed, index), shape, layout, with_labels, kind,
                         phenomena)
               for index in tqdm(range(1, num_cases + 1), desc="synthetic cases", unit="case")]
    if layout == "msd":
        _write_msd_dataset_json(root, num_cases, with_labels)
    return written
