"""Realistic synthetic BraTS cases: a real brain, gliomas as they look, and what mimics them.

The cartoon generator (synthetic_brats.py) draws an ellipsoid head with a round tumor whose
every tissue has a textbook contrast: thresholding FLAIR nearly segments it, so a network that
learns it says little about real BraTS. This module makes cases in the same format from a real
brain and adds what makes BraTS hard:

- anatomy: the MNI152 2009 template that nilearn ships (1 mm T1, grey and white matter
  probability maps), skull-stripped and placed on the BraTS grid, then deformed per case (size,
  pose, a smooth warp of a few mm, ventricle size), so no two brains are alike and partial
  volume comes with the probability maps;
- tumors: lobulated, sometimes multifocal, centred in white matter that they push aside; edema
  that spreads along white matter; in high grade a thin, irregular, broken enhancing rim around
  necrosis plus some solid non-enhancing tumor; lower grade without enhancement;
- tumor intensities that overlap normal tissue, FLAIR-bright lesions that are not tumor
  (white-matter hyperintensities, periventricular caps) and T1ce-bright structures that are not
  tumor (vessels, dura, choroid plexus), all labelled 0;
- acquisition: coil bias field, Rician noise, a random scanner gain and thick-slice (2-D)
  acquisitions resampled to 1 mm, as in the multi-centre BraTS data.

Every phenomenon has a knob in TumorPhenomena, so a test or an ablation can turn it up or off.
The module needs numpy, scipy, nibabel and the nilearn wheel (for its data files only: nilearn
itself is never imported, which would take seconds). The template on the BraTS grid is cached in
memory and under ~/.cache/brainseg, so a second process starts fast.
"""
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import tempfile
import zipfile

import nibabel as nib
import numpy as np
from scipy import ndimage, special

MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_SHAPE = (240, 240, 155)  # voxels of 1 mm, axial slices last
FULL_GRID_MM = np.array(BRATS_SHAPE, float)
GRID_CENTRE_MM = (FULL_GRID_MM - 1) / 2  # the brain is centred on the grid, as in BraTS
BRATS_AXES = ("L", "P", "S")  # array axes of BraTS files read with nibabel (affine -1, -1, 1)

# The 2009c nonlinear symmetric MNI152 template, as shipped in nilearn/datasets/data. nilearn's
# own brain mask is the T1 template above 0.2 of its maximum (load_mni152_brain_mask); there is
# no CSF map, so CSF is what the mask holds beyond grey and white matter.
TEMPLATE_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
BRAIN_THRESHOLD = 0.2
TEMPLATE_MARGIN = 4  # voxels kept around the brain in the cached template
CACHE_FORMAT = 3  # bump when the cached template or its derived sites change

# Labels of the internal BraTS 2017-2020 convention.
NECROTIC_CORE, EDEMA_LABEL, ENHANCING_LABEL = 1, 2, 4

# Tissue compartments and their relative intensity per modality, in the orderings of real scans:
# T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR like T2 with CSF suppressed; T1ce T1 plus
# enhancement. Edema and non-enhancing tumor are bright on FLAIR and T2, the enhancing rim only
# on T1ce, necrosis dark on T1 and T1ce and bright on T2. White-matter hyperintensities (the
# mimics) look like edema on FLAIR and T2 but are milder on T1 and never enhance.
CSF, GREY, WHITE, EDEMA, NON_ENHANCING, ENHANCING, NECROSIS, WM_LESION = range(8)
NORMAL_TISSUES = (CSF, GREY, WHITE)
LESIONS = (EDEMA, NON_ENHANCING, ENHANCING, NECROSIS, WM_LESION)
CONTRAST = {  # CSF, grey, white, edema, non-enhancing, enhancing, necrosis, WM lesion
    "flair": (0.22, 1.00, 0.78, 1.60, 1.45, 1.35, 1.05, 1.50),
    "t1": (0.32, 0.68, 1.00, 0.62, 0.58, 0.66, 0.40, 0.85),
    "t1ce": (0.33, 0.72, 1.00, 0.64, 0.60, 1.65, 0.40, 0.87),
    "t2": (2.00, 1.05, 0.72, 1.50, 1.40, 1.20, 1.85, 1.40),
}
HETEROGENEITY = {EDEMA: 0.12, NON_ENHANCING: 0.12, ENHANCING: 0.12, NECROSIS: 0.15}
TUMOR_COMPARTMENTS = {"edema": EDEMA, "non_enhancing": NON_ENHANCING, "enhancing": ENHANCING,
                      "necrosis": NECROSIS}
SCANNER_UNITS = {"flair": 420.0, "t1": 650.0, "t1ce": 800.0, "t2": 950.0}  # per unit contrast
T1CE_THICK_SLICE_SHARE = 0.25  # T1ce is a 3-D acquisition in most protocols
EDEMA_SPREAD = 1.82  # largest edema reach, in units of the case's edema extent (exp(0.6))
MIN_EDEMA_MM = 2.0  # edema margin around the core wherever there is parenchyma
WARP_LATTICE_MM = 32.0  # node spacing of the smooth anatomical deformation
BIAS_LATTICE_MM = 100.0  # a coil's sensitivity varies over about the head's size


@dataclasses.dataclass(frozen=True)
class TumorPhenomena:
    """What makes a case realistic, one knob per phenomenon; the defaults aim at BraTS itself.

    Probabilities are per case unless said otherwise; ranges (low, high) are drawn uniformly.
    Set a probability to 0 or 1 to switch a phenomenon off or force it (the tests do)."""
    # About 20-30 % of BraTS 2017-2020 training cases are lower-grade gliomas, without an
    # enhancing rim (76 of 335 in 2018): these get no label 4 at all.
    lower_grade_probability: float = 0.25
    # Multifocal glioma (two or three separate tumors) is seen in roughly a tenth of cases.
    multifocal_probability: float = 0.12
    # Relative amplitude of the random bumps on every tumor surface: 0 gives ellipsoids; 0.3
    # gives the lobulated, irregular outlines of real gliomas.
    lobulation: float = 0.3
    # Tumor-core radius (mm) of the main tumor; 10-25 mm gives core volumes of 4-65 mL around
    # BraTS's median of about 30 mL.
    core_radius_mm: tuple = (10.0, 25.0)
    # Thickness (mm) of the enhancing rim, varying along the rim: thin and irregular as in
    # glioblastoma, so the enhancing tumor is a small part of the whole tumor.
    rim_thickness_mm: tuple = (2.0, 8.0)
    # Fraction of the rim (by area) that does not enhance: broken rims are common in BraTS.
    rim_gap_fraction: float = 0.15
    # Edema reach (mm) beyond the core in white matter; whole tumor is ~2-3x the core volume.
    edema_extent_mm: tuple = (5.0, 22.0)
    # 0: edema spreads the same in all tissues; 1: only along white matter. Vasogenic edema
    # follows white-matter tracts and spares the cortex, hence finger-like outlines.
    edema_white_matter_preference: float = 0.75
    # Peak displacement of the surrounding brain, as a fraction of the core radius: tumors push
    # white matter, ventricles and sulci aside (mass effect).
    mass_effect: tuple = (0.1, 0.35)
    # How close tumor intensities are drawn to those of normal grey/white matter: 0 keeps the
    # textbook contrasts, 1 may make a compartment as dark or bright as normal tissue. Real
    # edema and non-enhancing tumor are often hard to tell from grey matter on one modality.
    intensity_overlap: float = 0.4
    # FLAIR-bright lesions that are not tumor (label 0): white-matter hyperintensities of small
    # vessel disease and periventricular caps, common in the older patients who have gliomas.
    mimic_lesion_probability: float = 0.5
    mimic_lesion_count: tuple = (2, 12)
    # T1ce-bright structures that are not tumor (label 0): cortical vessels, dura left by skull
    # stripping, choroid plexus. Nearly every post-contrast scan shows some.
    enhancing_mimic_probability: float = 0.9
    # Coil bias: standard deviation of the log intensity over the brain (BraTS is not
    # bias-corrected; 0.15 is a mild to moderate field).
    bias_field_strength: float = 0.15
    # Noise standard deviation relative to white matter (per case, x0.6-1.4): SNR ~ 20-50.
    noise_level: float = 0.03
    # Probability that FLAIR, T1 or T2 (each on its own) is a thick-slice 2-D acquisition,
    # resampled to 1 mm: frequent in the multi-centre BraTS data; T1ce gets a quarter of it.
    thick_slice_probability: float = 0.4
    thick_slice_mm: tuple = (3.0, 6.0)
    # Brain size relative to the MNI152 template, which is larger than most brains.
    brain_scale: tuple = (0.88, 0.98)
    # Standard deviation (mm) of the smooth random deformation that gives each case its own
    # anatomy, and the largest residual head rotation (degrees) after registration to SRI24.
    anatomy_warp_mm: float = 2.5
    head_rotation_deg: float = 4.0
    # Ventricle enlargement (mm at the ventricle wall) and the factor by which sulcal CSF is
    # widened: atrophy varies with age, and the template (an average) has thin sulci.
    ventricle_enlargement_mm: tuple = (0.0, 4.0)
    sulcal_widening: tuple = (1.2, 2.5)


def phenomena_from(settings):
    """TumorPhenomena with some fields set from "NAME=VALUE" texts as a command line gives
    them ("bias_field_strength=0.3", "core_radius_mm=10,15"): held-out cases with a
    phenomenon stronger than the training cases had show how a recipe copes."""
    defaults = TumorPhenomena()
    changed = {}
    for setting in settings:
        name, equals, text = setting.partition("=")
        if not equals:
            raise ValueError(f"phenomenon {setting!r}: expected NAME=VALUE")
        if not hasattr(defaults, name):
            known = ", ".join(field.name for field in dataclasses.fields(TumorPhenomena))
            raise ValueError(f"no phenomenon {name!r}; the phenomena are {known}")
        default = getattr(defaults, name)
        ranged = isinstance(default, tuple)  # (low, high), say; else one number
        kind = type(default[0] if ranged else default)
        try:
            values = tuple(kind(part) for part in (text.split(",") if ranged else [text]))
        except ValueError:
            values = None
        if values is None or (ranged and len(values) != len(default)):
            example = ",".join(map(str, default)) if ranged else default
            raise ValueError(f"phenomenon {name}: {text!r} is not a value like its default "
                             f"{example} ({kind.__name__})")
        changed[name] = values if ranged else values[0]
    return dataclasses.replace(defaults, **changed)


# ----------------------------------------------------------------------------------------
# The template on the BraTS grid


def _template_dir():
    """Folder of nilearn's bundled data files, found without importing nilearn (slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the realistic phantom needs nilearn's MNI152 template: "
                                  "pip install -r requirements.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def _cache_path():
    """Disk cache of the template on the BraTS grid, keyed by nilearn's version."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    version = importlib.metadata.version("nilearn")
    return os.path.join(root, "brainseg", f"mni152-brats-nilearn{version}-v{CACHE_FORMAT}.npz")


def _load_template():
    """Template T1 (0-1), grey and white matter fractions, reoriented to the BraTS axes, and the
    MNI coordinates (mm) of every voxel along each axis."""
    arrays = {}
    for name, file_name in TEMPLATE_FILES.items():
        image = nib.load(os.path.join(_template_dir(), file_name))
        to_brats = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine),
                                                   nib.orientations.axcodes2ornt(BRATS_AXES))
        data = image.get_fdata(dtype=np.float32)
        arrays[name] = nib.orientations.apply_orientation(data / data.max(), to_brats)
    # MNI coordinates per axis (the template has a diagonal affine; reorientation flips axes).
    inverse = nib.orientations.inv_ornt_aff(to_brats, image.shape)
    affine = image.affine @ inverse
    mni = [affine[axis, axis] * np.arange(n) + affine[axis, 3]
           for axis, n in enumerate(arrays["t1"].shape)]
    return arrays, mni


def _tissue_fractions(arrays):
    """Skull-stripped brain mask and grey, white and CSF fractions that add up to it."""
    brain = ndimage.binary_fill_holes(arrays["t1"] > BRAIN_THRESHOLD)
    grey = np.where(brain, arrays["gm"], 0)
    white = np.where(brain, arrays["wm"], 0)
    total = np.maximum(grey + white, 1)
    grey, white = grey / total, white / total
    csf = np.where(brain, 1 - grey - white, 0)
    return brain, grey, white, csf


def _sample_sites(mask, origin, step=2):
    """Positions (mm on the BraTS grid) of the voxels of `mask` on a `step` mm lattice."""
    sparse = np.zeros_like(mask)
    sparse[::step, ::step, ::step] = mask[::step, ::step, ::step]
    return (np.argwhere(sparse) + origin).astype(np.float32)


def _brain_bounds(brain):
    """First and last index of the brain along each axis."""
    extents = [np.flatnonzero(brain.any(axis=tuple({0, 1, 2} - {axis}))) for axis in range(3)]
    return np.array([e[0] for e in extents]), np.array([e[-1] for e in extents])


def _build_reference():
    """The template cropped around the brain, on the BraTS grid, with the sites where tumors,
    white-matter lesions, choroid plexus and vessels may be placed (all in grid mm)."""
    arrays, mni = _load_template()
    brain, grey, white, csf = _tissue_fractions(arrays)
    low, high = _brain_bounds(brain)
    low, high = low - TEMPLATE_MARGIN, high + TEMPLATE_MARGIN  # may reach past the template
    crop = tuple(slice(lo + TEMPLATE_MARGIN, hi + TEMPLATE_MARGIN + 1) for lo, hi in zip(low, high))
    brain, grey, white, csf = (np.pad(v, TEMPLATE_MARGIN)[crop] for v in (brain, grey, white, csf))
    x, y, z = (np.pad(c, TEMPLATE_MARGIN, mode="linear_ramp", end_values=(
        c[0] - TEMPLATE_MARGIN * (c[1] - c[0]), c[-1] + TEMPLATE_MARGIN * (c[1] - c[0])))[s]
        for c, s in zip(mni, crop))
    # The brain's bounding box goes to the centre of the grid, whole voxels only (no blur).
    origin = low + np.rint(GRID_CENTRE_MM - (low + high) / 2)  # grid mm of the first voxel
    midline_mm = origin[0] + np.interp(0.0, x[::-1], np.arange(len(x))[::-1])  # MNI x = 0
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]

    # Cerebrum: above the tentorium, without cerebellum and brainstem (MNI mm, approximate).
    cerebrum = (z > -20) & ~((y < -40) & (z < 8)) & ~((np.abs(x) < 12) & (z < 5))
    depth = ndimage.distance_transform_edt(brain)  # mm to the brain surface
    deep_csf = (csf > 0.5) & (depth > 12) & cerebrum & (np.abs(x) < 35)
    components, count = ndimage.label(deep_csf)
    sizes = ndimage.sum_labels(deep_csf, components, np.arange(1, count + 1))
    ventricles = np.isin(components, 1 + np.flatnonzero(sizes > 1000))
    to_ventricle = ndimage.distance_transform_edt(~ventricles)
    ventricle_y = y.ravel()[np.flatnonzero(ventricles.any(axis=(0, 2)))]
    horns = (y > ventricle_y.max() - 15) | (y < ventricle_y.min() + 20)  # frontal, occipital
    atrium = y < ventricle_y.min() + 0.3 * np.ptp(ventricle_y)

    surface = brain & ~ndimage.binary_erosion(brain)
    reference = {
        "maps": np.stack([np.rint(v * 255) for v in (grey, white, csf)]).astype(np.uint8),
        "origin": origin.astype(np.float32),
        "midline_mm": np.float32(midline_mm),
        "surface_points": _sample_sites(surface, origin, step=3),
        "tumor_sites": _sample_sites((white > 0.5) & (depth > 10) & cerebrum
                                     & (np.abs(x) > 8), origin),
        "deep_wm_sites": _sample_sites((white > 0.85) & (depth > 15) & cerebrum
                                       & (to_ventricle > 8), origin),
        "periventricular_sites": _sample_sites((white > 0.5) & (to_ventricle > 1)
                                               & (to_ventricle < 5) & horns, origin),
        "choroid_sites": _sample_sites(ventricles & atrium, origin, step=1),
        "sulcal_sites": _sample_sites((csf > 0.5) & (depth > 2) & (depth < 10) & cerebrum
                                      & ~ventricles, origin),
        "ventricle_centres": np.array([(np.argwhere(ventricles & (x * side > 0)).mean(axis=0)
                                        + origin) for side in (-1, 1)], np.float32),
    }
    reference["tumor_site_depth"] = depth[tuple(
        np.rint(reference["tumor_sites"] - origin).astype(int).T)].astype(np.float32)
    return reference


def _save_reference(reference, path):
    """Write the cache atomically; a read-only or full disk only costs the next process time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".npz",
                                         delete=False) as file:
            np.savez_compressed(file, **reference)
        os.chmod(file.name, 0o644)  # like any other file in the cache
        os.replace(file.name, path)
    except OSError:
        pass


@functools.lru_cache(maxsize=1)
def _reference():
    """The template on the BraTS grid (from the disk cache when there is one)."""
    path = _cache_path()
    try:
        with np.load(path) as cached:
            reference = dict(cached)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # none yet, or unreadable
        reference = _build_reference()
        _save_reference(reference, path)
    return reference


@functools.lru_cache(maxsize=4)
def _template_maps(spacing):
    """Grey, white and CSF fractions (float32) smoothed for a grid of `spacing` mm, so that a
    coarse grid sees the partial volume of its large voxels instead of aliasing."""
    maps = _reference()["maps"].astype(np.float32) / 255
    sigma = [0.42 * s if s > 1.2 else 0.0 for s in spacing]  # FWHM about one voxel
    if any(sigma):
        maps = np.stack([ndimage.gaussian_filter(m, sigma, truncate=3.0) for m in maps])
    return maps


# ----------------------------------------------------------------------------------------
# Smooth random fields and the deformation


class _SmoothField:
    """Smooth random field of unit variance over a box (mm), with `channels` components.

    Random values on a lattice blended with Gaussian bumps one axis at a time: cheap, free of
    interpolation kinks, and a function of mm positions only, so it does not depend on the grid
    it is sampled on."""

    def __init__(self, rng, low, high, spacing, channels=1):
        self.spacing = float(spacing)
        self.nodes = [np.arange(lo - spacing, hi + 2 * spacing, spacing)
                      for lo, hi in zip(low, high)]
        self.values = rng.standard_normal([len(n) for n in self.nodes] + [channels],
                                          dtype=np.float32)

    def _weights(self, axis, positions):
        positions = np.asarray(positions, np.float32)[:, None]
        offsets = (positions - self.nodes[axis][None, :]) / self.spacing
        return (np.exp(-0.5 * offsets ** 2) / np.pi ** 0.25).astype(np.float32)  # unit variance

    def on_grid(self, coords):
        """Field at the grid with per-axis positions `coords`: (channels, X, Y, Z)."""
        weights = [self._weights(axis, c) for axis, c in enumerate(coords)]
        field = np.einsum("ia,jb,kc,abcn->nijk", *weights, self.values, optimize=True)
        return np.ascontiguousarray(field)

    def at(self, points):
        """Field at scattered points (N, 3): (N, channels)."""
        wx, wy, wz = (self._weights(axis, points[:, axis]) for axis in range(3))
        a, b, c, n = self.values.shape
        planes = (wx[:, :, None] * wy[:, None, :]).reshape(len(points), a * b)
        planes = (planes @ self.values.reshape(a * b, c * n)).reshape(len(points), c, n)
        return np.einsum("pc,pcn->pn", wz, planes)  # one matrix product: fast for many points


def _rotation(angles):
    """Rotation matrix from three angles (radians) about x, y and z."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        turn = np.eye(3)
        turn[i, i] = turn[j, j] = np.cos(angle)
        turn[i, j], turn[j, i] = -np.sin(angle), np.sin(angle)
        matrix = matrix @ turn
    return matrix


def _bump(offsets, peak_mm, radius_mm):
    """Radial displacement that pushes tissue away from a centre: `peak_mm` at `radius_mm`,
    fading beyond it. `offsets` (..., 3) are positions relative to the centre."""
    squared = np.sum(offsets ** 2, axis=-1, keepdims=True) / radius_mm ** 2
    return offsets * (peak_mm / radius_mm) * np.exp(0.5 * (1 - squared))


class _Deformation:
    """Where each point of a case's grid (mm) takes its anatomy from in the template (mm).

    A pull-back map: scaling and a small rotation about the grid centre, a shift, a smooth
    random warp, and radial bumps that enlarge the ventricles or model a tumor's mass effect."""

    def __init__(self, rng, phenomena):
        scale = rng.uniform(*phenomena.brain_scale) * rng.uniform(0.97, 1.03, 3)
        rotation = _rotation(np.radians(rng.uniform(-1, 1, 3) * phenomena.head_rotation_deg))
        self.linear = (np.diag(1 / scale) @ rotation.T).astype(np.float32)
        self.shift = (rng.uniform(-1, 1, 3) * [3.0, 3.0, 2.0]).astype(np.float32)
        self.warp_mm = phenomena.anatomy_warp_mm
        self.warp = _SmoothField(rng, (0, 0, 0), FULL_GRID_MM, WARP_LATTICE_MM, channels=3)
        self.bumps = []  # (centre, peak mm, radius mm)

    def add_bump(self, centre, peak_mm, radius_mm):
        """Push the tissue around `centre` (case mm) outwards; keeps the map one-to-one."""
        self.bumps.append((np.asarray(centre, np.float32), min(peak_mm, 0.5 * radius_mm),
                           radius_mm))

    def at(self, points):
        """Template positions (N, 3) of case positions `points` (N, 3), in mm."""
        points = np.asarray(points, np.float32)
        displacement = sum((_bump(points - c, p, r) for c, p, r in self.bumps),
                           np.zeros_like(points))
        source = (points - GRID_CENTRE_MM - self.shift - displacement) @ self.linear.T
        return source + GRID_CENTRE_MM + self.warp_mm * self.warp.at(points)

    def inverse(self, sources):
        """Case positions whose template positions are `sources` (N, 3): a few fixed-point
        steps, since the map is close to linear."""
        sources = np.atleast_2d(np.asarray(sources, np.float32))
        inverse_linear = np.linalg.inv(self.linear).astype(np.float32)
        points = (sources - GRID_CENTRE_MM) @ inverse_linear.T + GRID_CENTRE_MM + self.shift
        for _ in range(8):
            points += (sources - self.at(points)) @ inverse_linear.T
        return points

    def on_grid(self, coords):
        """Template positions (3, X, Y, Z) of the grid with per-axis positions `coords`."""
        centred = [(c - GRID_CENTRE_MM[axis] - self.shift[axis]).astype(np.float32)
                   for axis, c in enumerate(coords)]
        source = self.warp_mm * self.warp.on_grid(coords)
        for out in range(3):
            source[out] += (self.linear[out, 0] * centred[0][:, None, None]
                            + self.linear[out, 1] * centred[1][None, :, None]
                            + self.linear[out, 2] * centred[2][None, None, :]
                            + GRID_CENTRE_MM[out])
        for centre, peak, radius in self.bumps:
            box = _box(coords, centre, 3 * radius)
            offsets = np.stack(np.meshgrid(*[(c[s] - c0).astype(np.float32) for c, s, c0
                                             in zip(coords, box, centre)], indexing="ij"), -1)
            shift = _bump(offsets, peak, radius) @ self.linear.T
            for out in range(3):
                source[out][box] -= shift[..., out]
        return source


def _box(coords, centre, half_size):
    """Index ranges of the voxels within `half_size` mm of `centre` (a box, per axis)."""
    return tuple(slice(np.searchsorted(c, c0 - r), np.searchsorted(c, c0 + r))
                 for c, c0, r in zip(coords, centre, np.broadcast_to(half_size, 3)))


def _local(coords, box, centre):
    """Positions relative to `centre` of the voxels of `box`, as broadcastable x, y, z."""
    x, y, z = ((c[s] - c0).astype(np.float32) for c, s, c0 in zip(coords, box, centre))
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _ramp(signed_mm, width_mm):
    """Fraction of a voxel inside a surface, from a signed distance (negative inside)."""
    return np.clip(0.5 - signed_mm / width_mm, 0, 1)


# ----------------------------------------------------------------------------------------
# Tumors


@dataclasses.dataclass
class _TumorPlan:
    """What is decided before the anatomy is warped: where a tumor is and how big."""
    centre: np.ndarray  # case mm
    core_radius: float  # mm
    high_grade: bool
    has_core: bool
    side: int  # hemisphere: the sign of the template's x - midline


def _plan_tumors(rng, reference, deformation, phenomena):
    """Grade, number, size and position of the tumors; adds their mass effect to the warp."""
    high_grade = rng.random() >= phenomena.lower_grade_probability
    multifocal = rng.random() < phenomena.multifocal_probability
    num_tumors = rng.choice([2, 3], p=[0.75, 0.25]) if multifocal else 1
    sites, depth = reference["tumor_sites"], reference["tumor_site_depth"]
    plans, first_site = [], None
    for index in range(num_tumors):
        if index == 0:
            radius = rng.uniform(*phenomena.core_radius_mm)
            allowed = depth >= min(radius + 8, depth.max())  # mostly inside the brain
        else:  # satellites: smaller, mostly near the main tumor
            radius = rng.uniform(0.3, 0.6) * phenomena.core_radius_mm[1]
            distance = np.linalg.norm(sites - first_site, axis=1)
            near = rng.random() < 0.7
            allowed = (depth >= min(radius + 5, depth.max())) & (
                ((distance > 20) & (distance < 45)) if near else (distance > 45))
            if not allowed.any():
                allowed = distance > 20
        site = sites[rng.choice(np.flatnonzero(allowed))]
        first_site = site if index == 0 else first_site
        has_core = high_grade or rng.random() < 0.8  # most lower-grade cases have a label-1 core
        side = 1 if site[0] > reference["midline_mm"] else -1
        plans.append(_TumorPlan(deformation.inverse(site)[0], radius, high_grade, has_core, side))
        deformation.add_bump(plans[-1].centre, rng.uniform(*phenomena.mass_effect) * radius,
                             radius)
    return plans


def _draw_tumor(rng, plan, phenomena, coords, tissue, lesions, spacing):
    """Paint one tumor into `lesions` (compartment fractions and the label rank map); returns
    the box it painted, or None.

    A lobulated core (a randomly oriented ellipsoid whose surface a smooth random field pushes
    in and out); in high grade its outer shell of varying thickness enhances except in gaps,
    necrosis fills the inside and lobes of solid non-enhancing tumor stick out; edema reaches
    beyond the core, far along white matter and little into cortex, never into CSF nor across
    the midline. Edema fades out over a few mm on the images, across its labelled border."""
    radius = plan.core_radius
    radii = radius * np.exp(rng.normal(0, 0.18, 3))
    rotation = np.linalg.qr(rng.standard_normal((3, 3)))[0].astype(np.float32)
    edema_mm = rng.uniform(*phenomena.edema_extent_mm) * (1.0 if plan.high_grade else 0.7)
    if not plan.has_core:
        radius, radii = 0.6 * radius, 0.6 * radii  # a seed for the FLAIR lesion only
    lobulation = phenomena.lobulation
    reach = radii.max() * (1 + 2.1 * lobulation) + EDEMA_SPREAD * edema_mm + MIN_EDEMA_MM + 3
    low, high = -np.full(3, reach), np.full(3, reach)
    large = _SmoothField(rng, low, high, max(0.5 * radius, 5.0))
    small = _SmoothField(rng, low, high, max(0.2 * radius, 3.0))
    edema_field = _SmoothField(rng, low, high, 8.0)
    rim_field = _SmoothField(rng, low, high, max(0.35 * radius, 4.0), channels=2)
    solid_field = _SmoothField(rng, low, high, max(0.5 * radius, 5.0))
    texture_field = _SmoothField(rng, low, high, 5.0)
    rim_range = phenomena.rim_thickness_mm
    solid_mm = rng.uniform(3.0, 10.0)

    box = _box(coords, plan.centre, reach)
    if any(s.stop <= s.start for s in box):
        return None
    local_coords = [(c[s] - c0) for c, s, c0 in zip(coords, box, plan.centre)]
    x, y, z = _local(coords, box, plan.centre)
    normalized = np.sqrt(sum(((x * rotation[0, k] + y * rotation[1, k] + z * rotation[2, k])
                              / radii[k]) ** 2 for k in range(3)))
    bumps = (lobulation * np.clip(large.on_grid(local_coords)[0], -1.5, 1.5)
             + 0.4 * lobulation * np.clip(small.on_grid(local_coords)[0], -1.5, 1.5))
    core_mm = (normalized / np.maximum(1 + bumps, 0.2) - 1) * radius  # signed, <0 inside

    # Shrink the box to where the tumor can reach before evaluating the other fields.
    width = max(1.0, float(np.mean(spacing)))  # partial volume across one voxel
    soft_width = 0.35 * edema_mm + width  # edema fades out over a few mm
    inside = core_mm < EDEMA_SPREAD * edema_mm + MIN_EDEMA_MM + soft_width
    if not inside.any():
        return None
    shrunk = [np.flatnonzero(inside.any(axis=tuple({0, 1, 2} - {a}))) for a in range(3)]
    keep = tuple(slice(i.min(), i.max() + 1) for i in shrunk)
    box = tuple(slice(b.start + k.start, b.start + k.stop) for b, k in zip(box, keep))
    local_coords = [c[k] for c, k in zip(local_coords, keep)]
    core_mm = core_mm[keep]

    grey, white, csf, brain_fraction, midline_mm = (t[box] for t in tissue)
    preference = phenomena.edema_white_matter_preference
    reach_mm = edema_mm * (1 - preference + preference * np.clip(white / 0.9, 0, 1))
    reach_mm *= np.exp(0.3 * np.clip(edema_field.on_grid(local_coords)[0], -2, 2))
    reach_mm += MIN_EDEMA_MM  # infiltrated tissue surrounds the core, even in cortex
    no_csf = np.clip((0.6 - csf) / 0.3, 0, 1)  # edema stops at the ventricles and sulci
    reach_mm *= no_csf
    # The falx stops the tumor at the midline: the core (and its rim) flattens against it.
    falx_mm = 1.0 - plan.side * midline_mm  # signed, <0 on the tumor's side
    core_mm = np.maximum(core_mm, falx_mm)
    whole_mm = np.maximum(core_mm - reach_mm, falx_mm)

    core = _ramp(core_mm, width) if plan.has_core else np.zeros_like(core_mm)
    whole = np.maximum(_ramp(whole_mm, width), core)
    whole_soft = np.maximum(_ramp(whole_mm, soft_width) * no_csf, core)
    if plan.high_grade:
        rim = rim_field.on_grid(local_coords)
        thickness = rim_range[0] + (rim_range[1] - rim_range[0]) * special.ndtr(rim[0])
        gap = rim[1] < special.ndtri(phenomena.rim_gap_fraction)
        necrosis = _ramp(core_mm + thickness, width)
        solid = np.minimum(_ramp(core_mm - solid_mm * np.clip(
            solid_field.on_grid(local_coords)[0] - 0.5, 0, None), width), whole)
    else:
        necrosis = solid = np.zeros_like(core)
        gap = np.ones(core.shape, bool)  # the whole core is non-enhancing tumor
    solid_part = np.maximum(solid - core, 0)
    shell = core - necrosis
    enhancing = np.where(gap, 0, shell)
    non_enhancing = np.where(gap, shell, 0) + solid_part
    edema = np.maximum(whole_soft - core - solid_part, 0)

    rank = np.where(whole >= 0.5, 1, 0)  # label ranks: 0 < edema < enhancing < necrotic core
    rank[core >= 0.5] = np.where(gap, 3, 2)[core >= 0.5]
    rank[necrosis >= 0.5] = 3
    rank[(solid >= 0.5) & (core < 0.5)] = 3
    rank[brain_fraction < 0.5] = 0
    target = lesions["rank"][box]
    np.maximum(target, rank.astype(np.uint8), out=target)
    for name, fraction in (("edema", edema), ("non_enhancing", non_enhancing),
                           ("enhancing", enhancing), ("necrosis", necrosis)):
        np.maximum(lesions[name][box], fraction, out=lesions[name][box])
    lesions["texture"][box] += texture_field.on_grid(local_coords)[0] * whole_soft
    return box


RANK_TO_LABEL = np.array([0, EDEMA_LABEL, ENHANCING_LABEL, NECROTIC_CORE], np.uint8)


# ----------------------------------------------------------------------------------------
# Mimics: FLAIR-bright and T1ce-bright structures that are not tumor


def _paint_blob(target, coords, centre, radii, rotation, width):
    """Soft ellipsoid (fractions) into `target`, keeping the larger value where they meet."""
    box = _box(coords, centre, radii.max() + width)
    if any(s.stop <= s.start for s in box):
        return
    x, y, z = _local(coords, box, centre)
    normalized = np.sqrt(sum(((x * rotation[0, k] + y * rotation[1, k] + z * rotation[2, k])
                              / radii[k]) ** 2 for k in range(3)))
    np.maximum(target[box], _ramp((normalized - 1) * radii.mean(), width), out=target[box])


def _draw_white_matter_lesions(rng, reference, deformation, phenomena, coords, width, out):
    """White-matter hyperintensities (deep, round) and periventricular caps (elongated)."""
    if rng.random() >= phenomena.mimic_lesion_probability:
        return
    count = rng.integers(phenomena.mimic_lesion_count[0], phenomena.mimic_lesion_count[1] + 1)
    for _ in range(count):
        periventricular = rng.random() < 0.4
        sites = reference["periventricular_sites" if periventricular else "deep_wm_sites"]
        centre = deformation.inverse(sites[rng.integers(len(sites))])[0]
        radii = (rng.uniform([2.5, 4.0, 2.5], [5.0, 9.0, 5.0]) if periventricular
                 else rng.uniform(1.2, 4.5) * np.exp(rng.normal(0, 0.2, 3)))
        rotation = _rotation(rng.uniform(-0.3, 0.3, 3)) if periventricular else \
            np.linalg.qr(rng.standard_normal((3, 3)))[0]
        _paint_blob(out, coords, centre, radii, rotation, width)


def _draw_vessels(rng, reference, deformation, coords, spacing, out):
    """Cortical vessels: tubes of 0.5-1.1 mm radius winding 15-50 mm from sulcal CSF, as their
    volume fraction per voxel (so a coarse grid sees them faintly, as a scanner would)."""
    count = rng.integers(3, 11)
    voxel_volume = float(np.prod(spacing))
    density = np.zeros(out.shape, np.float32)
    for _ in range(count):
        sites = reference["sulcal_sites"]
        start = deformation.inverse(sites[rng.integers(len(sites))])[0]
        length, radius = rng.uniform(15, 50), rng.uniform(0.5, 1.1)
        frame = np.linalg.qr(rng.standard_normal((3, 3)))[0]
        amplitudes, wavelengths = rng.uniform(2, 6, 2), rng.uniform(10, 30, 2)
        phases = rng.uniform(0, 2 * np.pi, 2)
        t = np.arange(0, length, 0.5)[:, None]
        points = (start + t * frame[0]
                  + amplitudes[0] * np.sin(2 * np.pi * t / wavelengths[0] + phases[0]) * frame[1]
                  + amplitudes[1] * np.sin(2 * np.pi * t / wavelengths[1] + phases[1]) * frame[2])
        index = np.rint([(p - c[0]) / s for p, c, s in zip(points.T, coords, spacing)]).astype(int)
        inside = np.all((index >= 0) & (index < np.array(out.shape)[:, None]), axis=0)
        np.add.at(density, tuple(index[:, inside]), 0.5 * 2 * np.pi * radius ** 2 / voxel_volume)
    if density.any():
        sigma = [max(0.8 / s, 0.3) for s in spacing]  # the tube's cross-section
        density = ndimage.gaussian_filter(density, sigma, truncate=2.5)
    np.maximum(out, np.clip(density, 0, 1), out=out)


def _draw_enhancing_mimics(rng, reference, deformation, coords, spacing, brain, width):
    """T1ce enhancement outside the tumor: vessels, choroid plexus in the ventricles' atria,
    and patches of dura along the brain's edge that skull stripping left. Returns the extra
    T1ce intensity (in units of the contrast tables)."""
    enhancement = np.zeros(brain.shape, np.float32)
    vessels = np.zeros(brain.shape, np.float32)
    _draw_vessels(rng, reference, deformation, coords, spacing, vessels)
    enhancement += rng.uniform(0.8, 1.3) * vessels
    choroid = np.zeros(brain.shape, np.float32)
    sites = reference["choroid_sites"]
    for side in (-1, 1):  # one glomus in the atrium of each lateral ventricle
        candidates = sites[(sites[:, 0] - reference["midline_mm"]) * side > 0]
        centre = deformation.inverse(candidates[rng.integers(len(candidates))])[0]
        _paint_blob(choroid, coords, centre, rng.uniform(2.0, 4.0, 3), np.eye(3), width)
    enhancement += rng.uniform(0.5, 0.9) * choroid
    edge = brain & ~ndimage.binary_erosion(brain)
    patches = _SmoothField(rng, (0, 0, 0), FULL_GRID_MM, 25.0).on_grid(coords)[0] > 0.8
    enhancement += rng.uniform(0.2, 0.5) * (edge & patches)
    return enhancement


# ----------------------------------------------------------------------------------------
# Rendering


def _contrasts(rng, modality, phenomena):
    """This case's relative intensity of every compartment on `modality`: the table, jittered,
    with the lesions pulled part of the way towards normal grey/white matter."""
    contrast = np.array(CONTRAST[modality], np.float32)
    normal, lesions = list(NORMAL_TISSUES), list(LESIONS)
    contrast[normal] *= rng.uniform(0.95, 1.05, len(normal))
    contrast[lesions] *= rng.uniform(0.9, 1.1, len(lesions))
    pull = phenomena.intensity_overlap * rng.uniform(0, 1, len(lesions))
    contrast[lesions] += pull * (0.5 * (contrast[GREY] + contrast[WHITE]) - contrast[lesions])
    return contrast


def _thick_slices(image, slice_spacing_mm, thickness_mm, phase):
    """A 2-D acquisition of `thickness_mm` slices resampled to the grid: each slice averages
    its slab along z (partial volume), and the grid is linearly interpolated between slices."""
    step = thickness_mm / slice_spacing_mm  # in grid voxels
    if step < 1.5:  # the grid is already about as coarse as the slices
        return image
    slab = ndimage.uniform_filter1d(image, size=int(round(step)), axis=2, mode="nearest")
    n = image.shape[2]
    centres = np.arange((phase - 1) * step, n + step, step)
    samples = slab[:, :, np.clip(np.rint(centres).astype(int), 0, n - 1)]
    position = np.arange(n)
    lower = np.searchsorted(centres, position, side="right") - 1
    upper_weight = ((position - centres[lower]) / step).astype(np.float32)
    return samples[:, :, lower] * (1 - upper_weight) + samples[:, :, lower + 1] * upper_weight


def _render(rng, noise_rng, modality, phenomena, tissue, lesions, mimics, coords, spacing):
    """One modality (int16, 0 outside the brain) and its slice thickness (0: a 3-D scan)."""
    contrast = _contrasts(rng, modality, phenomena)
    gain = SCANNER_UNITS[modality] * np.exp(rng.uniform(-0.35, 0.35))  # normalization matters
    bias_field = _SmoothField(rng, (0, 0, 0), FULL_GRID_MM, BIAS_LATTICE_MM)
    noise_sigma = phenomena.noise_level * rng.uniform(0.6, 1.4)
    share = T1CE_THICK_SLICE_SHARE if modality == "t1ce" else 1.0
    thick = rng.random() < phenomena.thick_slice_probability * share
    thickness, phase = rng.uniform(*phenomena.thick_slice_mm), rng.random()

    grey, white, csf, brain_fraction = tissue
    image = grey * contrast[GREY] + white * contrast[WHITE] + csf * contrast[CSF]
    image += mimics["flair"] * (brain_fraction * contrast[WM_LESION] - image)
    box = lesions["box"]
    if box is not None:
        total = sum(lesions[name][box] for name in TUMOR_COMPARTMENTS)
        overfull = np.maximum(total, 1)  # overlapping tumors: fractions still add up to <= 1
        texture = np.clip(lesions["texture"][box], -2.5, 2.5)
        tumor = sum(lesions[name][box] / overfull * contrast[c] * (1 + HETEROGENEITY[c] * texture)
                    for name, c in TUMOR_COMPARTMENTS.items())
        image[box] = image[box] * (1 - total / overfull) + brain_fraction[box] * tumor
    if modality == "t1ce":
        image += mimics["t1ce"]
    image *= np.exp(phenomena.bias_field_strength * bias_field.on_grid(coords)[0])
    # Rician-like noise: magnitude images are the modulus of signal plus noise, so dark tissue
    # gets a positive noise floor (one Gaussian draw and its modulus: half the cost of two).
    image += noise_sigma * noise_rng.standard_normal(image.shape, dtype=np.float32)
    image = np.abs(image, out=image)
    if thick:
        image = _thick_slices(image, spacing[2], thickness, phase)
    image *= gain
    np.clip(image, 1, np.iinfo(np.int16).max, out=image)  # 0 is kept for the background
    image[brain_fraction < 0.5] = 0  # skull-stripped, as BraTS
    return np.rint(image).astype(np.int16), thickness if thick else 0.0


# ----------------------------------------------------------------------------------------
# Cases


def voxel_spacing_mm(shape):
    """Voxel size (mm) of a grid of `shape` voxels spanning the BraTS field of view."""
    return FULL_GRID_MM / np.asarray(shape, float)


def _brain_crop(reference, deformation, coords):
    """Index ranges of the case grid that hold the deformed brain, with a small margin: where
    points of the template's brain surface land."""
    points = deformation.inverse(reference["surface_points"])
    low, high = points.min(axis=0) - 4, points.max(axis=0) + 4
    return tuple(slice(np.searchsorted(c, lo), np.searchsorted(c, hi))
                 for c, lo, hi in zip(coords, low, high))


def _union(box, other):
    """Smallest box holding both (either may be None: no box)."""
    if box is None or other is None:
        return other if box is None else box
    return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box, other))


def _individual_tissue(grey, white, csf, sulcal_widening):
    """One person's tissue fractions from the template's population average: a sharper
    grey/white border (the average of 152 brains blurs it) and sulci widened by atrophy (CSF
    taken from the grey matter around it). The brain fraction stays the same."""
    parenchyma = grey + white
    ratio = white / np.maximum(parenchyma, 1e-6)
    white = parenchyma * ratio * ratio * (3 - 2 * ratio)  # smoothstep steepens the border
    grey = parenchyma - white
    extra = np.minimum(csf * (sulcal_widening - 1), grey)
    return grey - extra, white, csf + extra


def _uncrop(volume, crop, shape):
    """Put the brain box back into the full grid, zero (background) around it."""
    full = np.zeros(shape, volume.dtype)
    full[crop] = volume
    return full


def _simulate(seed, shape, phenomena):
    """Everything about one case on the brain box of its grid: volumes, labels and the truth."""
    rng_anatomy, rng_tumor, rng_mimic, rng_render, rng_noise = (
        np.random.default_rng(seed).spawn(5))  # the noise stream alone depends on the grid
    reference = _reference()
    spacing = voxel_spacing_mm(shape)
    coords = [(np.arange(n) + 0.5) * s - 0.5 for n, s in zip(shape, spacing)]

    deformation = _Deformation(rng_anatomy, phenomena)
    for centre in reference["ventricle_centres"]:
        deformation.add_bump(deformation.inverse(centre)[0],
                             rng_anatomy.uniform(*phenomena.ventricle_enlargement_mm), 15.0)
    plans = _plan_tumors(rng_tumor, reference, deformation, phenomena)

    crop = _brain_crop(reference, deformation, coords)
    coords = [c[s] for c, s in zip(coords, crop)]
    source = deformation.on_grid(coords)
    source -= reference["origin"][:, None, None, None]
    maps = _template_maps(tuple(np.round(spacing, 4)))
    grey, white, csf = (ndimage.map_coordinates(m, source, order=1, output=np.float32,
                                                prefilter=False) for m in maps)
    midline_mm = source[0] + (reference["origin"][0] - reference["midline_mm"])  # template x
    del source
    grey, white, csf = _individual_tissue(grey, white, csf,
                                          rng_anatomy.uniform(*phenomena.sulcal_widening))
    brain_fraction = grey + white + csf
    brain = brain_fraction >= 0.5
    tissue = (grey, white, csf, brain_fraction, midline_mm)

    width = max(1.0, float(np.mean(spacing)))
    lesions = {name: np.zeros(brain.shape, np.float32)
               for name in ("edema", "non_enhancing", "enhancing", "necrosis", "texture")}
    lesions["rank"] = np.zeros(brain.shape, np.uint8)
    lesions["box"] = None  # where the tumors are: the only place their fractions are used
    for plan in plans:
        lesions["box"] = _union(lesions["box"], _draw_tumor(rng_tumor, plan, phenomena, coords,
                                                            tissue, lesions, spacing))
    seg = RANK_TO_LABEL[lesions.pop("rank")]
    seg[~brain] = 0

    flair_mimic = np.zeros(brain.shape, np.float32)
    _draw_white_matter_lesions(rng_mimic, reference, deformation, phenomena, coords, width,
                               flair_mimic)
    flair_mimic *= np.clip(white / 0.5, 0, 1)  # they are white-matter lesions
    if lesions["box"] is not None:
        box = lesions["box"]
        tumor_fraction = sum(lesions[n][box] for n in TUMOR_COMPARTMENTS)
        flair_mimic[box] *= np.clip(1 - tumor_fraction, 0, 1)
    flair_mimic[seg > 0] = 0
    if rng_mimic.random() < phenomena.enhancing_mimic_probability:
        t1ce_mimic = _draw_enhancing_mimics(rng_mimic, reference, deformation, coords, spacing,
                                            brain, width)
    else:
        t1ce_mimic = np.zeros(brain.shape, np.float32)
    mimics = {"flair": flair_mimic, "t1ce": t1ce_mimic}

    volumes, thickness = {}, {}
    for modality in MODALITIES:
        volumes[modality], thickness[modality] = _render(
            rng_render, rng_noise, modality, phenomena, tissue[:4], lesions, mimics, coords,
            spacing)
    volumes["seg"] = seg
    truth = {"grey": grey, "white": white, "csf": csf, "brain": brain,
             "flair_mimic": flair_mimic, "t1ce_mimic": t1ce_mimic}
    facts = {"high_grade": plans[0].high_grade, "num_tumors": len(plans),
             "thick_slice_mm": thickness, "spacing_mm": spacing}
    return crop, volumes, truth, facts


def _checked_shape(shape):
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes of at least 8 voxels, not {shape}")
    return shape


def make_case(seed, shape=BRATS_SHAPE, phenomena=TumorPhenomena()):
    """Arrays "flair", "t1", "t1ce", "t2" (int16, 0 outside the brain) and "seg" (uint8, labels
    0, 1, 2, 4) of one case, the same for the same seed. A `shape` other than the BraTS grid
    samples the same case with larger voxels (voxel_spacing_mm)."""
    shape = _checked_shape(shape)
    crop, volumes, _, _ = _simulate(seed, shape, phenomena)
    return {name: _uncrop(volume, crop, shape) for name, volume in volumes.items()}


def make_case_with_truth(seed, shape=BRATS_SHAPE, phenomena=TumorPhenomena()):
    """make_case() and what the case was made from, for tests and figures: "grey", "white",
    "csf" (tissue fractions, float32), "brain" (bool mask), "flair_mimic" (fraction of FLAIR-
    bright non-tumor lesion), "t1ce_mimic" (extra T1ce intensity of enhancing non-tumor
    structures), all on the full grid, and "high_grade", "num_tumors", "thick_slice_mm" (per
    modality, 0 for a 3-D scan), "spacing_mm"."""
    shape = _checked_shape(shape)
    crop, volumes, truth, facts = _simulate(seed, shape, phenomena)
    case = {name: _uncrop(volume, crop, shape) for name, volume in volumes.items()}
    truth = {name: _uncrop(volume, crop, shape) for name, volume in truth.items()}
    return case, {**truth, **facts}
