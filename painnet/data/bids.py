"""Discovery: find every functional run of a BIDS dataset with fMRIPrep-style derivatives.

A run is identified by (subject, session, task, run). For each preprocessed BOLD file we pair its
JSON sidecar, the fMRIPrep confounds table and the raw-side continuous pain ratings
(``*_recording-pain_physio.tsv.gz`` + ``.json``). Anything missing, unmatched or inconsistent is a
:class:`BIDSError` that names the file.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib

from painnet.data.types import RunFiles, RunKey

# TR in the NIfTI header and the sidecar must agree to this many seconds.
TR_TOLERANCE_S = 1e-3

_ENTITY = re.compile(r"(?P<key>[a-zA-Z]+)-(?P<value>[a-zA-Z0-9]+)")

BOLD_PATTERNS = {
    "nifti": "*_space-{space}*_desc-preproc_bold.nii*",
    "cifti": "*_space-{space}*_bold.dtseries.nii",
    "tsv": "*_space-{space}*_timeseries.tsv",
}


class BIDSError(ValueError):
    """A dataset does not follow the painnet data contract."""


def parse_entities(filename: str) -> dict[str, str]:
    """BIDS entities of a file name (``sub-01_ses-02_task-rating_run-1_bold.nii.gz`` → dict)."""
    stem = Path(filename).name.split(".")[0]
    entities: dict[str, str] = {}
    for part in stem.split("_"):
        match = _ENTITY.fullmatch(part)
        if match:
            entities[match["key"]] = match["value"]
    return entities


def _as_filter(values: str | int | Iterable | None) -> set[str] | None:
    if values is None:
        return None
    if isinstance(values, str | int):
        values = [values]
    return {str(v).removeprefix("sub-").removeprefix("ses-").removeprefix("run-") for v in values}


def discover_runs(
    root: str | Path,
    *,
    subjects: Sequence[str] | str | None = None,
    sessions: Sequence[str] | str | None = None,
    task: str | None = "rating",
    runs: Sequence[str] | str | None = None,
    space: str = "MNI152NLin2009cAsym",
    bold_kind: str = "nifti",
    derivatives: str = "derivatives/fmriprep",
    confounds_dir: str | None = None,
    recording: str = "pain",
    require_confounds: bool = True,
    strict: bool = True,
    validate: bool = True,
) -> list[RunFiles]:
    """Every run under ``root`` matching the filters, sorted by (subject, session, task, run).

    bold_kind: ``nifti`` (``*_desc-preproc_bold.nii[.gz]``), ``cifti`` (``*.dtseries.nii``) or
    ``tsv`` (already parcellated ``*_timeseries.tsv``, as XCP-D writes).
    confounds_dir: where ``*_desc-confounds_timeseries.tsv`` live (default: ``derivatives``).
    strict: a ratings file with no matching BOLD is an error (otherwise ignored).
    validate: check TR agreement and that the ratings cover the run (reads headers and ratings).
    """
    root = Path(root)
    if not root.is_dir():
        raise BIDSError(f"{root}: dataset root does not exist or is not a directory")
    if bold_kind not in BOLD_PATTERNS:
        raise BIDSError(f"unknown bold_kind {bold_kind!r}; expected one of {sorted(BOLD_PATTERNS)}")
    deriv = root / derivatives
    if not deriv.is_dir():
        raise BIDSError(f"{deriv}: derivatives folder not found (set data.derivatives)")
    conf_root = root / (confounds_dir or derivatives)

    subject_set, session_set, run_set = _as_filter(subjects), _as_filter(sessions), _as_filter(runs)
    pattern = BOLD_PATTERNS[bold_kind].format(space=space)
    found: list[RunFiles] = []
    for bold in sorted(deriv.glob(f"sub-*/**/func/{pattern}")):
        ent = parse_entities(bold.name)
        if "sub" not in ent or "task" not in ent:
            raise BIDSError(f"{bold}: file name lacks sub-/task- entities")
        key = RunKey(ent["sub"], ent.get("ses", "1"), ent["task"], ent.get("run", "1"))
        if subject_set is not None and key.subject not in subject_set:
            continue
        if session_set is not None and key.session not in session_set:
            continue
        if task is not None and key.task != task:
            continue
        if run_set is not None and key.run not in run_set:
            continue
        found.append(
            _pair_files(root, conf_root, bold, key, ent, bold_kind, recording, require_confounds)
        )

    if not found:
        raise BIDSError(
            f"{deriv}: no {bold_kind} BOLD files matching '{pattern}'"
            f" (subjects={subjects}, sessions={sessions}, task={task}, runs={runs})"
        )
    _check_unique(found)
    if strict:
        _check_unmatched_ratings(root, found, recording, task, subject_set, session_set, run_set)
    if validate:
        for files in found:
            validate_run(files)
    return sorted(found, key=lambda f: f.key)


def _func_dir(base: Path, ent: dict[str, str]) -> Path:
    d = base / f"sub-{ent['sub']}"
    if "ses" in ent:
        d = d / f"ses-{ent['ses']}"
    return d / "func"


def _run_prefix(ent: dict[str, str]) -> str:
    parts = [f"sub-{ent['sub']}"]
    parts += [f"{k}-{ent[k]}" for k in ("ses", "task", "acq", "run") if k in ent]
    return "_".join(parts)


def _pair_files(root, conf_root, bold, key, ent, bold_kind, recording, require_confounds):
    prefix = _run_prefix(ent)
    ratings = _func_dir(root, ent) / f"{prefix}_recording-{recording}_physio.tsv.gz"
    ratings_json = ratings.with_name(ratings.name.replace(".tsv.gz", ".json"))
    for path in (ratings, ratings_json):
        if not path.is_file():
            raise BIDSError(f"{bold}: matching ratings file missing: expected {path}")

    confounds = _func_dir(conf_root, ent) / f"{prefix}_desc-confounds_timeseries.tsv"
    if not confounds.is_file():
        if require_confounds:
            raise BIDSError(f"{bold}: matching confounds file missing: expected {confounds}")
        confounds = None

    bold_json = bold.with_name(bold.name.split(".")[0] + ".json")
    if not bold_json.is_file():
        bold_json = None
    tr = _repetition_time(bold, bold_json, bold_kind)
    return RunFiles(key, bold, bold_json, confounds, ratings, ratings_json, bold_kind, tr)


def _repetition_time(bold: Path, bold_json: Path | None, bold_kind: str) -> float:
    """TR from the sidecar, checked against the image header where the header has one."""
    sidecar_tr = None
    if bold_json is not None:
        meta = read_json(bold_json)
        if "RepetitionTime" in meta:
            sidecar_tr = float(meta["RepetitionTime"])
    header_tr = None
    if bold_kind in ("nifti", "cifti"):
        header_tr = header_repetition_time(bold)
    both = sidecar_tr is not None and header_tr is not None
    if both and abs(sidecar_tr - header_tr) > TR_TOLERANCE_S:
        raise BIDSError(
            f"{bold}: TR disagrees between image header ({header_tr:g} s) "
            f"and sidecar {bold_json.name} ({sidecar_tr:g} s)"
        )
    tr = sidecar_tr if sidecar_tr is not None else header_tr
    if tr is None or tr <= 0:
        raise BIDSError(f"{bold}: no valid RepetitionTime in the sidecar or the image header")
    return tr


def header_repetition_time(bold: Path) -> float | None:
    """TR in seconds from a NIfTI (pixdim[4] with its time unit) or CIFTI series axis."""
    img = nib.load(str(bold))
    if isinstance(img, nib.Cifti2Image):
        axis = img.header.get_axis(0)
        step = float(getattr(axis, "step", 0.0))
        unit = getattr(axis, "unit", "SECOND")
        return step if unit == "SECOND" and step > 0 else None
    zooms = img.header.get_zooms()
    if len(zooms) < 4 or zooms[3] <= 0:
        return None
    unit = img.header.get_xyzt_units()[1]
    scale = {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    return float(zooms[3]) * scale


def n_frames(files: RunFiles) -> int:
    """Number of stored frames of a run (reads only the header for images)."""
    if files.kind == "tsv":
        with open(files.bold) as fh:
            return max(sum(1 for _ in fh) - 1, 0)
    img = nib.load(str(files.bold))
    if isinstance(img, nib.Cifti2Image):
        return int(img.shape[0])
    if len(img.shape) != 4:
        raise BIDSError(f"{files.bold}: expected a 4-D image, got shape {img.shape}")
    return int(img.shape[3])


def read_json(path: Path) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise BIDSError(f"{path}: invalid JSON ({err})") from err


def ratings_meta(files: RunFiles) -> tuple[float, float]:
    """(SamplingFrequency in Hz, StartTime in s) of a run's ratings, validated."""
    meta = read_json(files.ratings_json)
    for field in ("SamplingFrequency", "StartTime"):
        if field not in meta:
            raise BIDSError(f"{files.ratings_json}: required field {field!r} missing")
    fs = float(meta["SamplingFrequency"])
    if fs <= 0:
        raise BIDSError(f"{files.ratings_json}: SamplingFrequency must be > 0, got {fs}")
    return fs, float(meta["StartTime"])


def count_rating_samples(path: Path) -> int:
    with gzip.open(path, "rt") as fh:
        return sum(1 for line in fh if line.strip())


def validate_run(files: RunFiles) -> None:
    """Check that the ratings cover the whole run (to within one frame)."""
    fs, start = ratings_meta(files)
    n_samples = count_rating_samples(files.ratings)
    duration = n_frames(files) * files.tr
    if start > files.tr:
        raise BIDSError(
            f"{files.ratings}: ratings start {start:g} s after the first volume (StartTime);"
            " the run's first frames have no rating"
        )
    rating_end = start + n_samples / fs
    if rating_end < duration - files.tr:
        raise BIDSError(
            f"{files.ratings}: ratings are shorter than the run: they end at {rating_end:.2f} s"
            f" but the run lasts {duration:.2f} s ({n_samples} samples at {fs:g} Hz)"
        )


def _check_unique(found: list[RunFiles]) -> None:
    seen: dict[RunKey, Path] = {}
    for files in found:
        if files.key in seen:
            raise BIDSError(
                f"{files.bold}: run {files.key} matched twice (also {seen[files.key]});"
                " narrow data.space or data.bold_kind"
            )
        seen[files.key] = files.bold


def _check_unmatched_ratings(
    root, found, recording, task, subject_set, session_set, run_set
) -> None:
    matched = {f.ratings.resolve() for f in found}
    for ratings in sorted(root.glob(f"sub-*/**/func/*_recording-{recording}_physio.tsv.gz")):
        ent = parse_entities(ratings.name)
        if subject_set is not None and ent.get("sub") not in subject_set:
            continue
        if session_set is not None and ent.get("ses") not in session_set:
            continue
        if task is not None and ent.get("task") != task:
            continue
        if run_set is not None and ent.get("run") not in run_set:
            continue
        if ratings.resolve() not in matched:
            raise BIDSError(
                f"{ratings}: ratings file has no matching preprocessed BOLD in the derivatives"
                " (set data.strict=false to ignore unmatched ratings)"
            )
