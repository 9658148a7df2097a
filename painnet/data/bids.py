"""Discovery: find every functional run of a BIDS dataset with fMRIPrep-style derivatives.

A run is identified by (subject, session, task, run). For each preprocessed BOLD file we pair its
JSON sidecar, the fMRIPrep confounds table and the raw-side continuous pain ratings
(``*_recording-pain_physio.tsv.gz`` + ``.json``). Anything missing, unmatched or inconsistent is a
:class:`BIDSError` that names the file.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib

from painnet.data.types import RunFiles, RunKey

# TR in the NIfTI header and the sidecar must agree to this many seconds.
TR_TOLERANCE_S = 1e-3
# A JSON sidecar holds a few fields: anything bigger is not a sidecar (and is not read).
MAX_SIDECAR_BYTES = 1 << 20
# Decompressed size limit of a ratings file: a 600-s run at 1 kHz with a few columns is ~10 MB,
# so this only stops gzip bombs and wrong files, never real recordings.
MAX_RATINGS_BYTES = 256 << 20
# A ratings file holding more than this many times the samples the run needs (plus slack) has a
# wrong SamplingFrequency or belongs to another recording.
MAX_RATINGS_OVERSHOOT = 10.0
# A run with fewer frames has no time course (e.g. a single volume saved as a 4-D image).
MIN_FRAMES = 2
# Order of the entities painnet pairs files by, as BIDS prescribes them in a file name.
ENTITY_ORDER = ("sub", "ses", "task", "acq", "run")

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
    ratings=None,
    require_ratings: bool = True,
) -> list[RunFiles]:
    """Every run under ``root`` matching the filters, sorted by (subject, session, task, run).

    bold_kind: ``nifti`` (``*_desc-preproc_bold.nii[.gz]``), ``cifti`` (``*.dtseries.nii``) or
    ``tsv`` (already parcellated ``*_timeseries.tsv``, as XCP-D writes).
    confounds_dir: where ``*_desc-confounds_timeseries.tsv`` live (default: ``derivatives``).
    strict: a ratings file with no matching BOLD is an error (otherwise ignored).
    validate: check TR agreement and that the ratings cover the run (reads headers and ratings).
    ratings: a :class:`painnet.data.targets.RatingSpec`; with ``validate``, every ratings file is
        also read with it (column by name, scale), so bad ratings stop the run before any
        extraction or caching.
    require_ratings: False for runs that need no ratings (rest runs read for self-supervised
        pretraining): a run without a ratings file then has ``ratings=None``.
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
        check_bids_name(bold, ent, deriv)
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
            _pair_files(
                root, conf_root, bold, key, ent, bold_kind, recording, require_confounds,
                require_ratings,
            )
        )  # fmt: skip

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
            validate_run(files, ratings)
    return sorted(found, key=lambda f: f.key)


def check_bids_name(path: Path, ent: dict[str, str], base: Path) -> None:
    """Entities in BIDS order, agreeing with the sub-/ses- folders, and the file readable."""
    if path.is_symlink() and not path.exists():
        raise BIDSError(f"{path}: dangling symbolic link (points to {path.readlink()})")
    order = [k for k in _entity_keys(path.name) if k in ENTITY_ORDER]
    expected = [k for k in ENTITY_ORDER if k in order]
    if order != expected:
        raise BIDSError(
            f"{path}: entities out of BIDS order ({'_'.join(order)}); expected"
            f" {'_'.join(expected)}, e.g. {_run_prefix(ent)}_..."
        )
    folders = {
        p.split("-", 1)[0]: p.split("-", 1)[1]
        for p in path.relative_to(base).parts[:-1]
        if "-" in p and p.split("-", 1)[0] in ("sub", "ses")
    }
    for key, value in folders.items():
        if ent.get(key) != value:
            raise BIDSError(
                f"{path}: file name says {key}-{ent.get(key)} but it lies in folder {key}-{value}"
            )


def _entity_keys(filename: str) -> list[str]:
    stem = Path(filename).name.split(".")[0]
    return [m["key"] for part in stem.split("_") if (m := _ENTITY.fullmatch(part))]


def _func_dir(base: Path, ent: dict[str, str]) -> Path:
    d = base / f"sub-{ent['sub']}"
    if "ses" in ent:
        d = d / f"ses-{ent['ses']}"
    return d / "func"


def _run_prefix(ent: dict[str, str]) -> str:
    parts = [f"sub-{ent['sub']}"]
    parts += [f"{k}-{ent[k]}" for k in ("ses", "task", "acq", "run") if k in ent]
    return "_".join(parts)


def _pair_files(
    root, conf_root, bold, key, ent, bold_kind, recording, require_confounds, require_ratings=True
):
    prefix = _run_prefix(ent)
    ratings = _func_dir(root, ent) / f"{prefix}_recording-{recording}_physio.tsv.gz"
    ratings_json = ratings.with_name(ratings.name.replace(".tsv.gz", ".json"))
    if not require_ratings and not ratings.exists() and not ratings.is_symlink():
        ratings = ratings_json = None  # an unlabelled run (e.g. rest), read for pretraining
    for path in (ratings, ratings_json) if ratings is not None else ():
        if path.is_symlink() and not path.exists():
            raise BIDSError(f"{path}: dangling symbolic link (points to {path.readlink()})")
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
    tr, source = _repetition_time(bold, bold_json, bold_kind)
    return RunFiles(
        key, bold, bold_json, confounds, ratings, ratings_json, bold_kind, tr, tr_source=source
    )


def _repetition_time(bold: Path, bold_json: Path | None, bold_kind: str) -> tuple[float, str]:
    """(TR, where it came from): the sidecar, checked against the image header if it has one."""
    sidecar_tr = None
    if bold_json is not None:
        meta = read_json(bold_json)
        if "RepetitionTime" in meta:
            sidecar_tr = _number(meta["RepetitionTime"], bold_json, "RepetitionTime")
    header_tr = None
    if bold_kind in ("nifti", "cifti"):
        header_tr = header_repetition_time(bold)
    both = sidecar_tr is not None and header_tr is not None
    if both and abs(sidecar_tr - header_tr) > TR_TOLERANCE_S:
        raise BIDSError(
            f"{bold}: TR disagrees between image header ({header_tr:g} s) "
            f"and sidecar {bold_json.name} ({sidecar_tr:g} s)"
        )
    if sidecar_tr is not None:
        tr, source = sidecar_tr, f"RepetitionTime in {bold_json}"
    else:
        tr = header_tr
        sidecar = f"sidecar {bold_json.name} has no RepetitionTime" if bold_json else "no sidecar"
        source = f"image header of {bold.name} ({sidecar})"
    if tr is None or tr <= 0:
        raise BIDSError(f"{bold}: no valid RepetitionTime in the sidecar or the image header")
    return tr, source


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
    """A JSON sidecar as a dict; size, encoding, syntax and top-level type checked."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise BIDSError(
                f"{path}: {size} bytes, too large for a JSON sidecar (limit {MAX_SIDECAR_BYTES})"
            )
        with open(path, encoding="utf-8-sig") as fh:
            meta = json.load(fh)
    except FileNotFoundError as err:
        raise BIDSError(f"{path}: sidecar not found ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise BIDSError(f"{path}: not UTF-8 text ({err})") from err
    except json.JSONDecodeError as err:
        raise BIDSError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise BIDSError(f"{path}: a sidecar must hold a JSON object, got {type(meta).__name__}")
    return meta


def _number(value, path: Path, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BIDSError(f"{path}: {field} must be a number (seconds/Hz), got {value!r}")
    if not math.isfinite(value):
        raise BIDSError(f"{path}: {field} must be finite, got {value!r}")
    return float(value)


def ratings_meta(files: RunFiles) -> tuple[float, float]:
    """(SamplingFrequency in Hz, StartTime in s) of a run's ratings, validated."""
    meta = read_json(files.ratings_json)
    for field in ("SamplingFrequency", "StartTime"):
        if field not in meta:
            raise BIDSError(f"{files.ratings_json}: required field {field!r} missing")
    fs = _number(meta["SamplingFrequency"], files.ratings_json, "SamplingFrequency")
    if fs <= 0:
        raise BIDSError(f"{files.ratings_json}: SamplingFrequency must be > 0, got {fs}")
    return fs, _number(meta["StartTime"], files.ratings_json, "StartTime")


def read_ratings_text(path: Path, max_bytes: int | None = None) -> str:
    """The decompressed text of a ``*_physio.tsv.gz`` (CRLF → LF, no trailing newlines).

    Not gzip-compressed, corrupt, larger than ``max_bytes`` once decompressed (default
    ``MAX_RATINGS_BYTES``; stops gzip bombs without reading them whole) or not text: an error
    naming the file.
    """
    limit = MAX_RATINGS_BYTES if max_bytes is None else max_bytes
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic != b"\x1f\x8b":
        raise BIDSError(f"{path}: named .gz but not gzip-compressed (compress it with gzip)")
    chunks, total = [], 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise BIDSError(
                        f"{path}: decompresses to more than {limit} bytes; not a ratings"
                        " recording (or a gzip bomb)"
                    )
                chunks.append(chunk)
    except (OSError, EOFError, zlib.error) as err:
        raise BIDSError(f"{path}: corrupt gzip stream ({err})") from err
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as err:
        raise BIDSError(f"{path}: ratings are not UTF-8 text ({err})") from err
    # Blank lines inside the file are missing samples (they keep the clock); trailing ones are not.
    return text.replace("\r\n", "\n").rstrip("\n")


def count_rating_samples(path: Path) -> int:
    """Samples (lines) of a ratings file; a blank line inside it is a missing sample."""
    text = read_ratings_text(path)
    return text.count("\n") + 1 if text else 0


def validate_run(files: RunFiles, ratings=None) -> None:
    """Check that the ratings cover the whole run (to within one frame), and not absurdly more.

    With a ``ratings`` spec (:class:`painnet.data.targets.RatingSpec`) the values are read too.
    A run without ratings (``files.ratings`` None) only gets its frame count checked.
    """
    frames = n_frames(files)
    if frames < MIN_FRAMES:
        raise BIDSError(f"{files.bold}: the run has {frames} frame(s); a run needs at least 2")
    if files.ratings is None:
        return
    fs, start = ratings_meta(files)
    n_samples = count_rating_samples(files.ratings)
    duration = frames * files.tr
    tr_note = f"{frames} frames × TR {files.tr:g} s, TR from the {files.tr_source or 'sidecar'}"
    if start > files.tr:
        raise BIDSError(
            f"{files.ratings}: ratings start {start:g} s after the first volume (StartTime);"
            " the run's first frames have no rating"
        )
    rating_end = start + n_samples / fs
    if rating_end < duration - files.tr:
        raise BIDSError(
            f"{files.ratings}: ratings are shorter than the run: they end at {rating_end:.2f} s"
            f" ({n_samples} samples at {fs:g} Hz from StartTime {start:g} s) but the run lasts"
            f" {duration:.2f} s ({tr_note}); check the TR and {files.ratings_json.name}"
        )
    needed = (duration - start) * fs
    if n_samples > MAX_RATINGS_OVERSHOOT * needed + 1000:
        raise BIDSError(
            f"{files.ratings}: {n_samples} samples, but the run needs about {needed:.0f} at"
            f" {fs:g} Hz ({tr_note}); check SamplingFrequency in {files.ratings_json.name}"
        )
    if ratings is not None:
        from painnet.data.targets import read_ratings  # targets imports this module

        read_ratings(files, ratings)


def _check_unique(found: list[RunFiles]) -> None:
    """One file per run; ``run-1`` and ``run-01`` (same BIDS index) are the same run."""
    seen: dict[tuple, Path] = {}
    for files in found:
        k = files.key
        ident = (k.subject, k.session, k.task, int(k.run) if k.run.isdigit() else k.run)
        if ident in seen:
            raise BIDSError(
                f"{files.bold}: run {k} matched twice (also {seen[ident]}); one run per"
                " (sub, ses, task, run index): remove one, or narrow data.space / data.bold_kind"
            )
        seen[ident] = files.bold


def _check_unmatched_ratings(
    root, found, recording, task, subject_set, session_set, run_set
) -> None:
    matched = {f.ratings.resolve() for f in found if f.ratings is not None}
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
