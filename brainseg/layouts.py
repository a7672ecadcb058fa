"""The folder layouts of the BraTS releases, and reading one case of any of them.

Every release holds the same four MRI contrasts and a label map, under different names:

    brats2017  BraTS 2017-2019: HGG/ and LGG/ folders of cases, <case>_{flair,t1,t1ce,t2,seg}
    brats2020  BraTS 2020-2021: flat case folders, same file names as 2017-2019
    brats2023  BraTS 2023 glioma: <case>-{t2f,t1n,t1c,t2w,seg}, enhancing tumor is label 3
    msd        Medical Segmentation Decathlon Task01_BrainTumour: imagesTr/<case>.nii.gz, one
               4-D file (FLAIR, T1w, T1gd, T2w), labelsTr/ with 1 edema, 2 non-enhancing
               tumor, 3 enhancing tumor, and dataset.json

Whatever the release, a case is read as volumes in MODALITIES order (flair, t1, t1ce, t2) and
labels in the BraTS 2017-2020 convention used everywhere else in this project: 1 necrotic and
non-enhancing core, 2 edema, 4 enhancing tumor (to_internal_labels); segmentations are
written back in the release's own convention (to_release_labels), on the grid of the case's
reference image (like_reference). Each file may be .nii.gz or .nii; brainseg/nifti.py checks
its header before reading it and reads it in one orientation, whatever the file's.
"""
import concurrent.futures
import dataclasses
import glob
import os

import nibabel as nib
import numpy as np

from brainseg import messages, nifti, preprocessing

MODALITIES = ("flair", "t1", "t1ce", "t2")  # channel order of every image array
MSD_CHANNELS = ("flair", "t1", "t1ce", "t2")  # FLAIR, T1w, T1gd, T2w in the 4-D files
INTERNAL_LABELS = {0: "background", 1: "necrotic and non-enhancing core", 2: "edema",
                   4: "enhancing tumor"}


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    description: str
    file_names: dict  # modality or "seg" -> name suffix after the case id (not for msd)
    separator: str  # between the case id and the suffix
    label_map: dict  # label in the release -> internal label


_CLASSIC_NAMES = {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2", "seg": "seg"}
_IDENTITY = {0: 0, 1: 1, 2: 2, 4: 4}
LAYOUTS = {layout.name: layout for layout in (
    Layout("brats2017", "BraTS 2017-2019: HGG/ and LGG/ folders of <case>/<case>_flair.nii.gz ...",
           _CLASSIC_NAMES, "_", _IDENTITY),
    Layout("brats2020", "BraTS 2020-2021: case folders <case>/<case>_flair.nii.gz ...",
           _CLASSIC_NAMES, "_", _IDENTITY),
    Layout("brats2023", "BraTS 2023 glioma: case folders <case>/<case>-t2f.nii.gz ...",
           {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}, "-",
           {0: 0, 1: 1, 2: 2, 3: 4}),
    Layout("msd", "Decathlon Task01_BrainTumour: dataset.json, imagesTr/<case>.nii.gz (4-D), "
           "labelsTr/<case>.nii.gz", {}, "", {0: 0, 1: 2, 2: 1, 3: 4}),
)}


class CaseError(Exception):
    """A case that cannot be read; the message names the file and the problem."""


class LayoutError(Exception):
    """A folder that matches no known layout."""


@dataclasses.dataclass
class Case:
    case_id: str
    layout: str
    images: dict  # modality -> path; for msd, every modality maps to the one 4-D file
    label: str = None  # None: no label map (validation data)
    problem: str = None  # set when the case is known to be unusable before reading it


def _nifti(folder, stem):
    """The path of stem.nii.gz or stem.nii in folder, or None."""
    for extension in (".nii.gz", ".nii"):
        path = os.path.join(folder, stem + extension)
        if os.path.exists(path):
            return path
    return None


def _case_folders(root, layout):
    if layout == "brats2017":
        return sorted(glob.glob(os.path.join(root, "[HL]GG", "*", "")))
    return sorted(glob.glob(os.path.join(root, "*", "")))


def detect_layout(root):
    """The layout of a release folder, from the names in it."""
    if not os.path.isdir(root):
        raise LayoutError(f"{root}: not a folder")
    entries = sorted(os.listdir(root))
    if "imagesTr" in entries or ("dataset.json" in entries and "imagesTs" in entries):
        return "msd"
    if "HGG" in entries or "LGG" in entries:
        return "brats2017"
    for name in ("brats2023", "brats2020"):
        layout = LAYOUTS[name]
        for folder in _case_folders(root, name):
            case_id = os.path.basename(os.path.normpath(folder))
            if _nifti(folder, case_id + layout.separator + layout.file_names["flair"]):
                return name
    expected = "\n".join(f"  {layout.name}: {layout.description}" for layout in LAYOUTS.values())
    found = messages.first_few(entries, 8) if entries else "nothing"
    raise LayoutError(f"{root}: no BraTS layout recognized.\nExpected one of:\n{expected}\n"
                      f"Found: {found}")


def _label_file(folder, case_id, layout):
    """The label map of a case folder. BraTS 2020 case 355 names it W39_1998.09.19_Segm.nii,
    so a lone *Segm* file is accepted too."""
    path = _nifti(folder, case_id + layout.separator + layout.file_names["seg"])
    if path is None:
        quirks = glob.glob(os.path.join(folder, "*[Ss]egm.nii*"))
        path = quirks[0] if len(quirks) == 1 else None
    return path


def _folder_cases(root, layout):
    cases = []
    for folder in _case_folders(root, layout.name):
        case_id = os.path.basename(os.path.normpath(folder))
        images = {}
        for modality in MODALITIES:
            stem = case_id + layout.separator + layout.file_names[modality]
            images[modality] = _nifti(folder, stem) or os.path.join(folder, stem + ".nii.gz")
        cases.append(Case(case_id, layout.name, images, _label_file(folder, case_id, layout)))
    return cases


def _msd_cases(root):
    cases = []
    for path in sorted(glob.glob(os.path.join(root, "imagesTr", "*.nii*"))):
        name = os.path.basename(path)
        if name.startswith("."):  # macOS resource forks ship inside the Decathlon tarball
            continue
        case_id = name.split(".nii")[0]
        label = _nifti(os.path.join(root, "labelsTr"), case_id)
        cases.append(Case(case_id, "msd", {modality: path for modality in MODALITIES}, label))
    return cases


def find_cases(root, layout="auto"):
    """(layout name, [Case]) for a release folder. Cases sharing an ID are all marked with a
    problem: which of them is the right one cannot be known. In a release where some cases
    have label maps, a case without one is marked too; a release where none has labels is
    validation data and converts without."""
    name = detect_layout(root) if layout == "auto" else layout
    if name not in LAYOUTS:
        raise LayoutError(f"unknown layout {name!r}; known: auto, {', '.join(LAYOUTS)}")
    cases = _msd_cases(root) if name == "msd" else _folder_cases(root, LAYOUTS[name])
    by_id = {}
    for case in cases:
        by_id.setdefault(case.case_id, []).append(case)
    for duplicates in (group for group in by_id.values() if len(group) > 1):
        folders = [os.path.dirname(case.images[MODALITIES[0]]) for case in duplicates]
        for case in duplicates:
            case.problem = (f"case ID {case.case_id} appears {len(duplicates)} times: "
                            f"{', '.join(folders)}")
    if any(case.label for case in cases):
        for case in cases:
            if not case.label and not case.problem:
                folder = os.path.dirname(case.images[MODALITIES[0]])
                case.problem = f"{folder}: label map missing (other cases of this release have one)"
    return name, cases


def read_volume(path, ndim=3):
    """(float32 volume in the canonical orientation, its nifti.Grid), the header checked
    before any voxel is read; CaseError naming the file and the problem (brainseg/nifti.py)."""
    try:
        return nifti.read(path, ndim)
    except nifti.NiftiError as error:
        raise CaseError(str(error)) from error


def check_same_grid(path, grid, reference_path, reference):
    """CaseError unless a file's voxels are those of the case's reference file: a label map
    or a modality on another grid would pair voxels of different places."""
    if grid.shape != reference.shape:
        raise CaseError(f"{path}: shape {grid.shape} differs from {reference_path} "
                        f"{reference.shape}")
    distance = reference.distance(grid)
    if distance > nifti.GRID_TOLERANCE_VOXELS:
        raise CaseError(f"{path}: its voxels lie up to {distance:.3g} voxels from those of "
                        f"{reference_path} (the modalities and label map of a case must "
                        f"share one grid)")


def check_scan(where, volume):
    """CaseError for a scan the normalization cannot use: all zeros (no scan in the file: a
    blank channel, or with the others a case without brain), or values so large that its
    float32 statistics would overflow into NaN (preprocessing.max_intensity)."""
    if not volume.any():
        raise CaseError(f"{where}: every voxel is zero (an empty scan)")
    peak = float(max(volume.max(), -volume.min()))
    limit = preprocessing.max_intensity(volume.size)
    if peak > limit:
        raise CaseError(f"{where}: values up to {peak:.3g} would overflow the float32 "
                        f"normalization (at most {limit:.3g} for {volume.size:,} voxels)")


def read_images(case, map_files=map):
    """([X, Y, Z, len(MODALITIES)] float32, channels in MODALITIES order, and their grid).
    The files are read by map_files(read_volume, paths): one after the other by default,
    a thread pool's map from read_case. Each channel is a plane of its own in memory
    (preprocessing.planar_channels)."""
    if case.layout == "msd":
        path = case.images[MODALITIES[0]]
        volumes, grid = read_volume(path, ndim=4)
        if volumes.shape[3] != len(MSD_CHANNELS):
            raise CaseError(f"{path}: expected {len(MSD_CHANNELS)} channels "
                            f"(FLAIR, T1w, T1gd, T2w), got {volumes.shape[3]}")
        image = preprocessing.planar_channels(volumes.shape[:3], len(MODALITIES))
        for channel, modality in enumerate(MODALITIES):
            image[..., channel] = volumes[..., MSD_CHANNELS.index(modality)]
            check_scan(f"{path} ({modality} channel)", image[..., channel])
        return image, grid
    paths = [case.images[modality] for modality in MODALITIES]
    image, grid = None, None
    for k, (path, (channel, channel_grid)) in enumerate(zip(paths, map_files(read_volume,
                                                                             paths))):
        if grid is None:
            grid = channel_grid
            image = preprocessing.planar_channels(channel.shape, len(paths))
        else:
            check_same_grid(path, channel_grid, paths[0], grid)
        check_scan(path, channel)
        image[..., k] = channel
    return image, grid


def read_labels(case, grid, read=None):
    """The label map in the internal convention, on the images' grid; CaseError for
    another grid or unknown values. read: the label file's read_volume already under way
    (a future), if any."""
    labels, label_grid = read.result() if read else read_volume(case.label)
    check_same_grid(case.label, label_grid, case.images[MODALITIES[0]], grid)
    label_map = LAYOUTS[case.layout].label_map
    values = distinct_values(labels)
    fractional = values[values != np.round(values)].tolist()
    if fractional:
        raise CaseError(f"{case.label}: not a label map: non-integer values "
                        f"{_few(fractional, 3)}")
    unknown = [value for value in values.tolist() if value not in label_map]
    if unknown:
        raise CaseError(f"{case.label}: label values {_few(unknown)} outside the "
                        f"{case.layout} set {sorted(label_map)}")
    return to_internal_labels(labels, case.layout)


def distinct_values(volume):
    """np.unique(volume), sorting only the non-zero voxels: a label map is mostly 0, and
    sorting all of its 8.9 million voxels took longer than reading the file."""
    nonzero = volume != 0
    values = np.unique(volume[nonzero])
    return values if nonzero.all() else np.union1d(values, np.zeros(1, volume.dtype))


def _few(values, limit=5):
    """The first values of a list, and how many there are, for a message of one line:
    "[10, 11, 12, 13, 14, ...] (240 values)"."""
    shown = messages.first_few((f"{value:g}" for value in values), limit)
    return f"[{shown}]" if len(values) <= limit else f"[{shown}] ({len(values)} values)"


def to_internal_labels(labels, layout):
    """A label map in the release's convention -> the internal one (values must be known)."""
    label_map = LAYOUTS[layout].label_map
    lookup = np.zeros(max(label_map) + 1, np.uint8)
    for release_label, internal_label in label_map.items():
        lookup[release_label] = internal_label
    return lookup[np.asarray(labels).astype(np.int64)]


def to_release_labels(labels, layout):
    """The inverse of to_internal_labels: internal labels -> the release's convention."""
    lookup = np.zeros(max(INTERNAL_LABELS) + 1, np.uint8)
    for release_label, internal_label in LAYOUTS[layout].label_map.items():
        lookup[internal_label] = release_label
    return lookup[labels]


def read_case(case, threads=1):
    """(image [X, Y, Z, 4] float32, labels [X, Y, Z] uint8 or None), both in the canonical
    orientation (nifti.CANONICAL_AXES: axis 2 axial); CaseError if unusable. With threads
    > 1 its files are read that many at a time (gzip decoding releases the GIL): inference
    reads a full-size case in 0.19 s instead of 0.24 with 2 (the converter's workers are
    processes, one file at a time each). The checks, and which problem is reported first,
    are the same either way."""
    if case.problem:
        raise CaseError(case.problem)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        label_read = pool.submit(read_volume, case.label) if case.label else None
        image, grid = read_images(case, pool.map)
        return image, read_labels(case, grid, label_read) if label_read else None


def reference_image(case):
    """The NIfTI whose grid (shape, affine, header) a segmentation of this case must match
    (loaded lazily: the header alone is read until the voxels are asked for)."""
    return nib.load(case.images[MODALITIES[0]])


def case_grid(case):
    """Shape and voxel spacing (mm) of a case's volumes as read_case returns them (in the
    canonical orientation), from the reference image's header alone."""
    grid = nifti.canonical_grid(reference_image(case))
    return {"shape": [int(n) for n in grid.shape], "spacing": [float(mm) for mm in grid.zooms]}


def like_reference(volume, reference):
    """A NIfTI of `volume`, given in the canonical orientation as read_case returns a case,
    on the reference scan's grid: in its voxel order, with its affine and header fields."""
    volume = nifti.from_canonical(volume, reference)
    header = reference.header.copy()
    header.set_data_shape(volume.shape)
    header.set_data_dtype(volume.dtype)
    image = nib.Nifti1Image(volume, reference.affine, header)
    image.set_qform(*reference.get_qform(coded=True))
    image.set_sform(*reference.get_sform(coded=True))
    return image
