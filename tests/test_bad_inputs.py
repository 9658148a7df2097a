"""Nothing silent: every bad input stops the run with an error naming the file or config key.

Each dataset case damages a private copy of the tiny simulated dataset, builds the real
DataModule from the composed ``data=tiny`` config and runs ``prepare_data`` + ``setup``. It must
raise the stated error, name the file or key, and leave nothing behind: no cache entry (the
checks run before any extraction), no temporary file. Inputs that are odd but unambiguous
(Windows line endings, symlinks, integral float labels …) are accepted with the same result as
the clean dataset: those are the explicit decisions listed at the end.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from painnet.config_checks import ConfigError, check_config, unchecked_numbers
from painnet.data import bids
from painnet.data.atlas import load_atlas
from painnet.data.bids import BIDSError, discover_runs
from painnet.data.cache import HOST, ArrayCache
from painnet.data.targets import RatingSpec, run_targets

PREP = "derivatives/fmriprep/sub-01/ses-01/func"
RAW = "sub-01/ses-01/func"
RUN1 = "sub-01_ses-01_task-rating_run-1"
SPACE = "space-MNI152NLin2009cAsym"
ATLAS = "derivatives/atlas/atlas-Sim_space-MNI152NLin2009cAsym_dseg.nii.gz"


# ------------------------------------------------------------------------------------------
# helpers: read and write the files of one run
# ------------------------------------------------------------------------------------------
def ratings(root: Path, run: str = RUN1) -> Path:
    return root / RAW / f"{run}_recording-pain_physio.tsv.gz"


def ratings_json(root: Path, run: str = RUN1) -> Path:
    return root / RAW / f"{run}_recording-pain_physio.json"


def bold(root: Path, run: str = RUN1) -> Path:
    return root / PREP / f"{run}_{SPACE}_desc-preproc_bold.nii.gz"


def read_samples(path: Path) -> np.ndarray:
    with gzip.open(path, "rt") as fh:
        return np.array([float(line) for line in fh if line.strip()])


def write_text_gz(path: Path, text: str) -> None:
    path.write_bytes(gzip.compress(text.encode(), mtime=0))


def edit_json(path: Path, **fields) -> None:
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps(meta))


def set_columns(root: Path, columns: list[str], extra: Callable[[np.ndarray], list]) -> None:
    """Rewrite run 1's ratings with columns built by ``extra`` from the pain samples."""
    pain = read_samples(ratings(root))
    rows = zip(*extra(pain))
    write_text_gz(ratings(root), "".join("\t".join(f"{v}" for v in r) + "\n" for r in rows))
    edit_json(ratings_json(root), Columns=columns)


def rewrite_image(path: Path, fn: Callable[[np.ndarray], np.ndarray], **header) -> None:
    img = nib.load(path)
    data = fn(np.asarray(img.dataobj))
    new = nib.Nifti1Image(data, img.affine, img.header)
    new.set_data_dtype(data.dtype)
    if "zooms" in header:
        new.header.set_zooms(header["zooms"])
    nib.save(new, path)


def rename_run(root: Path, old: str, new: str, folder: str = PREP) -> None:
    for path in sorted((root / folder).glob(f"{old}_*")):
        path.rename(path.with_name(path.name.replace(old, new)))


def files_under(path: Path) -> list[Path]:
    return (
        sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink()) if path.exists() else []
    )


# ------------------------------------------------------------------------------------------
# the damage catalogue
# ------------------------------------------------------------------------------------------
@dataclass
class Case:
    damage: Callable[[Path], None]
    error: type[Exception]
    names: Callable[[Path], str]  # what the message must contain (a file path or a key)
    match: str  # and this regular expression
    overrides: list[str] = field(default_factory=list)


def _scale_100(root):
    values = read_samples(ratings(root)) * 100
    write_text_gz(ratings(root), "".join(f"{v:.3f}\n" for v in values))


def _misnamed_atlas(root):
    src = root / ATLAS
    src.rename(root / "derivatives/atlas/tpl-MNI152NLin6Asym_atlas-Sim_dseg.nii.gz")


def _no_sidecar_wrong_header_tr(root):
    bold(root).with_name(bold(root).name.replace(".nii.gz", ".json")).unlink()
    rewrite_image(bold(root), lambda d: d, zooms=(3.0, 3.0, 3.0, 2.0))


def _not_gzipped(root):
    ratings(root).write_text("".join(f"{v}\n" for v in read_samples(ratings(root))))


def _entities_out_of_order(root):
    rename_run(root, RUN1, "sub-01_task-rating_ses-01_run-1")


def _gzip_bomb(root):
    write_text_gz(ratings(root), "0.5\n" * 600_000)  # 2.4 MB of text in a ~3 KB file


def _huge_sidecar(root):
    edit_json(ratings_json(root), Padding="x" * (2 << 20))


def _dangling_symlink(root):
    ratings(root).unlink()
    ratings(root).symlink_to(root / "nowhere" / "ratings.tsv.gz")


def _float_labels(root):
    rewrite_image(root / ATLAS, lambda d: np.where(d == 3, 2.5, d).astype(np.float32))


def _duplicate_run_number(root):
    for folder in (PREP, RAW):
        for path in sorted((root / folder).glob(f"{RUN1}_*")):
            shutil.copy(path, path.with_name(path.name.replace("run-1", "run-01")))


def _start_time_in_ms(root):
    edit_json(ratings_json(root), StartTime=-2000.0)


def _sampling_frequency_in_khz(root):
    edit_json(ratings_json(root), SamplingFrequency=0.06)


def _start_time_text(root):
    edit_json(ratings_json(root), StartTime="-2.0 s")


def _one_frame_run(root):
    rewrite_image(bold(root), lambda d: d[..., :1])


def _one_parcel_atlas(root):
    rewrite_image(root / ATLAS, lambda d: (d > 0).astype(np.int16))


def _wrong_subject_folder(root):
    rename_run(root, RUN1, "sub-02_ses-01_task-rating_run-1")


def _header_row(root):
    values = read_samples(ratings(root))
    write_text_gz(ratings(root), "pain\n" + "".join(f"{v}\n" for v in values))


def _sidecar_not_an_object(root):
    ratings_json(root).write_text("[60, -2]")


def _empty_ratings(root):
    write_text_gz(ratings(root), "")


def _ratings_json_path(root):
    return str(ratings_json(root))


def confounds(root: Path, run: str = RUN1) -> Path:
    return root / PREP / f"{run}_desc-confounds_timeseries.tsv"


def _gap_in_a_confound(root):
    """``n/a`` in the middle of the csf column (fMRIPrep writes n/a only in leading rows)."""
    lines = confounds(root).read_text().splitlines()
    header = lines[0].split("\t")
    cells = lines[51].split("\t")  # data row 50
    cells[header.index("csf")] = "n/a"
    lines[51] = "\t".join(cells)
    confounds(root).write_text("\n".join(lines) + "\n")


DATASET_CASES = {
    # issue 13, silent 1: the rating column is chosen by name
    "rating column absent": Case(
        lambda r: set_columns(r, ["time", "rating"], lambda p: [np.arange(p.size) / 60, p]),
        BIDSError,
        _ratings_json_path,
        r"no column named 'pain' \(data.rating_column\) among the columns \['time', 'rating'\]",
    ),
    "rating column ambiguous": Case(
        lambda r: set_columns(r, ["pain", "pain"], lambda p: [p, p]),
        BIDSError,
        _ratings_json_path,
        r"2 columns named 'pain'",
    ),
    # silent 3: a 0-100 scale in one session only
    "ratings on a 0-100 scale": Case(
        _scale_100,
        BIDSError,
        lambda r: str(ratings(r)),
        r"ratings span \[\d.*\], outside data.rating_range=\[0.0, 1.0\].*data.rating_rescale",
    ),
    # silent 4: an atlas whose file name names another space than the config / the BOLD
    "atlas from another space": Case(
        _misnamed_atlas,
        ValueError,
        lambda r: "tpl-MNI152NLin6Asym_atlas-Sim_dseg.nii.gz",
        r"file name says space 'MNI152NLin6Asym' but data.atlas.space is 'MNI152NLin2009cAsym'",
        [
            "data.atlas.path=${data.root}/derivatives/atlas/"
            "tpl-MNI152NLin6Asym_atlas-Sim_dseg.nii.gz"
        ],
    ),
    "atlas from another space, no configured space": Case(
        _misnamed_atlas,
        ValueError,
        lambda r: "desc-preproc_bold",
        r"atlas 'Sim' is in space 'MNI152NLin6Asym' but the BOLD is in 'MNI152NLin2009cAsym'",
        [
            "data.atlas.path=${data.root}/derivatives/atlas/"
            "tpl-MNI152NLin6Asym_atlas-Sim_dseg.nii.gz",
            "data.atlas.space=null",
        ],
    ),
    # unclear 2: say which TR was used and where it came from
    "no sidecar and a wrong header TR": Case(
        _no_sidecar_wrong_header_tr,
        BIDSError,
        lambda r: str(ratings(r)),
        r"TR 2 s, TR from the image header of .*run-1.*\(no sidecar\)",
    ),
    # unclear 3
    ".tsv.gz that is not gzipped": Case(
        _not_gzipped, BIDSError, lambda r: str(ratings(r)), r"not gzip-compressed"
    ),
    # new cases
    "BIDS entities in the wrong order": Case(
        _entities_out_of_order,
        BIDSError,
        lambda r: "sub-01_task-rating_ses-01_run-1_",
        r"entities out of BIDS order \(sub_task_ses_run\); expected sub_ses_task_run",
    ),
    "gzip bomb in the ratings": Case(
        _gzip_bomb, BIDSError, lambda r: str(ratings(r)), r"decompresses to more than 1000000"
    ),
    "2 MB JSON sidecar": Case(
        _huge_sidecar, BIDSError, _ratings_json_path, r"too large for a JSON sidecar"
    ),
    "dangling symlink": Case(
        _dangling_symlink, BIDSError, lambda r: str(ratings(r)), r"dangling symbolic link"
    ),
    "dseg with non-integer float labels": Case(
        _float_labels, ValueError, lambda r: str(r / ATLAS), r"non-integer values"
    ),
    "two runs with the same run number": Case(
        _duplicate_run_number,
        BIDSError,
        lambda r: "run-01_",
        r"matched twice \(also .*_run-0?1_.*\); one run per \(sub, ses, task, run index\)",
    ),
    "StartTime in ms (clock skew)": Case(
        _start_time_in_ms,
        BIDSError,
        lambda r: str(ratings(r)),
        r"shorter than the run.*StartTime -2000 s",
    ),
    "SamplingFrequency in kHz": Case(
        _sampling_frequency_in_khz,
        BIDSError,
        lambda r: str(ratings(r)),
        r"check SamplingFrequency",
    ),
    "StartTime as text": Case(
        _start_time_text, BIDSError, _ratings_json_path, r"StartTime must be a number"
    ),
    "1-frame run": Case(_one_frame_run, BIDSError, lambda r: str(bold(r)), r"has 1 frame"),
    "atlas with 1 parcel": Case(
        _one_parcel_atlas, ValueError, lambda r: str(r / ATLAS), r"atlas has 1 parcel"
    ),
    "file in another subject's folder": Case(
        _wrong_subject_folder,
        BIDSError,
        lambda r: "sub-01/ses-01/func/sub-02_ses-01",
        r"file name says sub-02 but it lies in folder sub-01",
    ),
    "header row in a physio TSV": Case(
        _header_row, BIDSError, lambda r: str(ratings(r)), r"first row repeats the column names"
    ),
    "sidecar that is not an object": Case(
        _sidecar_not_an_object, BIDSError, _ratings_json_path, r"must hold a JSON object"
    ),
    # a gap inside a used confounds column is not filled with 0
    "n/a in the middle of a confounds column": Case(
        _gap_in_a_confound,
        ValueError,
        lambda r: str(confounds(r)),
        r"column 'csf' has a missing or non-numeric value .* at row 50 \(frame 50, line 52",
    ),
    "empty ratings file": Case(
        _empty_ratings, BIDSError, lambda r: str(ratings(r)), r"shorter than the run"
    ),
}


@pytest.fixture
def damaged(tiny_root, tmp_path):
    """A private copy of the tiny dataset that a test may damage."""
    return shutil.copytree(tiny_root, tmp_path / "ds", symlinks=True)


def build_datamodule(make_cfg, root: Path, cache: Path, *overrides: str):
    cfg = make_cfg(
        "data=tiny",
        f"data.root={root}",
        "data.simulate=null",
        f"data.cache_dir={cache}",
        *overrides,
    )
    return instantiate(cfg.data, split=cfg.split, _recursive_=False)


@pytest.mark.parametrize("case", list(DATASET_CASES.values()), ids=list(DATASET_CASES))
def test_bad_dataset_stops_before_anything_is_cached(
    case, damaged, make_cfg, tmp_path, monkeypatch
):
    monkeypatch.setattr(bids, "MAX_RATINGS_BYTES", 1_000_000)
    case.damage(damaged)
    cache = tmp_path / "cache"
    with pytest.raises(case.error, match=case.match) as info:
        dm = build_datamodule(make_cfg, damaged, cache, *case.overrides)
        dm.prepare_data()
        dm.setup("fit")
    assert case.names(damaged) in str(info.value)
    assert files_under(cache) == []  # no cache entry, no temporary
    assert not (tmp_path / "out").exists()  # no run output


# ------------------------------------------------------------------------------------------
# config values: checked at composition (check_config) and by the DataModule constructor
# ------------------------------------------------------------------------------------------
CONFIG_CASES = {
    "negative window": ("data.window_s=-5", r"data.window_s=-5: must be > 0"),
    "window typed as text": ("data.window_s=ten", r"data.window_s='ten': must be a number"),
    "negative lag": ("data.lag_s=-2", r"data.lag_s=-2: must be >= 0"),
    "zero batch size": ("data.batch_size=0", r"data.batch_size=0: must be >= 1"),
    "fractional batch size": ("data.batch_size=1.5", r"data.batch_size=1.5: must be an integer"),
    "negative workers": ("data.num_workers=-1", r"data.num_workers=-1: must be >= 0"),
    "unknown alignment": (
        "data.rating_alignment=nearest",
        r"data.rating_alignment='nearest': must be one of \['interval_mean', 'midpoint'\]",
    ),
    "reversed rating range": ("data.rating_range=[1,0]", r"data.rating_range=\[1, 0\]: must be"),
    "negative gap": ("data.max_rating_gap_s=-1", r"data.max_rating_gap_s=-1: must be >= 0"),
    "empty pass band": (
        "data.clean.low_pass_hz=0.001",
        r"data.clean.low_pass_hz=0.001: must be above data.clean.high_pass_hz=0.005",
    ),
    "zero FD threshold": ("data.clean.fd_threshold=0", r"data.clean.fd_threshold=0: must be > 0"),
    "bad simulation parameter": (
        "+data.simulate.n_parcels=1",
        r"data.simulate.n_parcels=1: .*n_parcels must be in 2..32767",
    ),
}
NON_DATA_CASES = {
    "zero epochs": ("trainer.max_epochs=0", r"trainer.max_epochs=0: must be >= 1 \(or -1\)"),
    "min epochs above max": (
        "trainer.min_epochs=20",
        r"trainer.min_epochs=20: must be <= trainer.max_epochs=10",
    ),
    "dropout above 1": ("model.net.dropout=1.5", r"model.net.dropout=1.5: must be >= 0 and < 1"),
    "negative fold": ("split.fold=-1", r"split.fold=-1: must be >= 0"),
    "zero learning rate": ("model.optimizer.lr=0", r"model.optimizer.lr=0: must be > 0"),
    "no bootstrap draws": ("eval.n_boot=0", r"eval.n_boot=0: must be >= 1"),
}


@pytest.mark.parametrize(
    "override, message",
    list(CONFIG_CASES.values()) + list(NON_DATA_CASES.values()),
    ids=list(CONFIG_CASES) + list(NON_DATA_CASES),
)
def test_config_values_are_range_checked_at_composition(override, message, make_cfg):
    cfg = make_cfg("data=tiny", override)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


@pytest.mark.parametrize(
    "override, message",
    [v for k, v in CONFIG_CASES.items() if k != "bad simulation parameter"],
    ids=[k for k in CONFIG_CASES if k != "bad simulation parameter"],
)
def test_the_datamodule_checks_its_own_arguments(override, message, make_cfg, tmp_path):
    cfg = make_cfg("data=tiny", override)
    with pytest.raises(InstantiationException) as info:  # Hydra wraps the constructor's error
        instantiate(cfg.data, split=cfg.split, _recursive_=False)
    assert isinstance(info.value.__cause__, ConfigError)
    assert re.search(message, str(info.value.__cause__))
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "model, key", [("ridge", "model.target"), ("stack", "model.members.ridge.target")]
)
def test_an_unknown_ridge_target_names_its_key(model, key, make_cfg):
    cfg = make_cfg("data=tiny", f"model={model}", f"{key}=session")
    with pytest.raises(
        ConfigError, match=rf"{key}='session': must be one of \['rating', 'within_run'\]"
    ):
        check_config(cfg)


def test_every_error_is_reported_at_once(make_cfg):
    cfg = make_cfg("data=tiny", "data.lag_s=-1", "data.batch_size=0")
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert "data.lag_s=-1" in str(info.value) and "data.batch_size=0" in str(info.value)


def test_a_window_longer_than_a_run_names_the_key_and_the_run(make_cfg, tiny_root, cache_dir):
    # Checked once the runs are known (setup); cached series do not depend on the window,
    # so the entries prepare_data wrote stay valid and are reused by the next, fixed run.
    dm = build_datamodule(make_cfg, tiny_root, cache_dir, "data.window_s=200")
    dm.prepare_data()
    with pytest.raises(ConfigError, match=r"data.window_s=200: the window \(435 frames.*") as info:
        dm.setup("fit")
    assert "longer than run sub-01_ses-01_task-rating_run-1" in str(info.value)
    assert "usable frames" in str(info.value)
    assert not [p for p in files_under(cache_dir) if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------
# unclear 9: temporaries of killed processes are cleaned, those of live ones never
# ------------------------------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_cache_temporaries_are_removed_and_live_ones_kept(tmp_path):
    folder = tmp_path / "cache" / "ab"
    folder.mkdir(parents=True)
    stale = folder / f"abkey.tmp-{HOST}-{dead_pid()}-x1y2.npz"
    live = folder / f"abkey.tmp-{HOST}-{os.getppid()}-x1y2.npz"  # pytest's parent is running
    remote = folder / f"abkey.tmp-otherhost-{dead_pid()}-x1y2.npz"  # cannot tell: kept
    ancient = folder / "abkey.tmp-k2j3h4.npz"  # older painnet, no owner in the name
    for path in (stale, live, remote, ancient):
        path.write_bytes(b"partial")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(ancient, (day_ago, day_ago))

    ArrayCache(tmp_path / "cache").save("cdkey", {"x": np.zeros(3)})

    assert not stale.exists() and not ancient.exists()
    assert live.exists() and remote.exists()
    assert ArrayCache(tmp_path / "cache").load("cdkey")["x"].shape == (3,)


def test_stale_simulation_folders_are_removed(tmp_path):
    from painnet.data.simulate import simulate_dataset

    stale = tmp_path / f"sim-tiny-seed7.tmp-{HOST}-{dead_pid()}"
    legacy = tmp_path / f"sim-demo-seed0.tmp-{dead_pid()}"  # the old name: <root>.tmp-<pid>
    live = tmp_path / f"sim-tiny-seed7.tmp-{HOST}-{os.getppid()}"
    for folder in (stale, legacy, live):
        (folder / "sub-01").mkdir(parents=True)

    simulate_dataset(tmp_path / "sim-tiny-seed7", "tiny", 7, n_subjects=1, n_sessions=1, n_runs=1)

    assert not stale.exists() and not legacy.exists()
    assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["sim-tiny-seed7", live.name])


# ------------------------------------------------------------------------------------------
# explicit decisions: odd but unambiguous inputs give exactly the clean dataset's targets
# ------------------------------------------------------------------------------------------
def targets_of(root: Path, spec: RatingSpec | None = None) -> np.ndarray:
    """Lag-paired targets of sub-01 ses-01 run-1 (discovered and validated with ``spec``)."""
    files = discover_runs(root, sessions="01", subjects="01", runs="1", ratings=spec)[0]
    return run_targets(files, bids.n_frames(files), 6.0, spec)


def _crlf(root):
    for path in root.glob("sub-*/ses-*/func/*_physio.tsv.gz"):
        text = gzip.decompress(path.read_bytes()).decode()
        write_text_gz(path, text.replace("\n", "\r\n"))
    for path in root.glob("sub-*/ses-*/func/*_physio.json"):
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n") + b"\r\n")


def _symlinked(root):
    target = root.parent / "elsewhere.tsv.gz"
    shutil.move(ratings(root), target)
    ratings(root).symlink_to(target)


def _pain_second(root):
    set_columns(root, ["time", "pain"], lambda p: [np.arange(p.size) / 60, p])


def _rating_named_rating(root):
    set_columns(root, ["time", "rating"], lambda p: [np.arange(p.size) / 60, p])


def _all_scale_100(root):
    for path in root.glob("sub-*/ses-*/func/*_physio.tsv.gz"):
        write_text_gz(path, "".join(f"{v * 100:.6f}\n" for v in read_samples(path)))


ACCEPTED = {
    "Windows line endings": (_crlf, None),
    "symlinked ratings file": (_symlinked, None),
    "rating column found by name": (_pain_second, None),
    "data.rating_column=rating": (_rating_named_rating, RatingSpec(column="rating")),
    "0-100 files with data.rating_rescale": (_all_scale_100, RatingSpec(rescale=(0, 100))),
}


@pytest.mark.parametrize("damage, spec", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_unambiguous_variants_give_the_clean_targets(damage, spec, damaged, tiny_root):
    expected = targets_of(tiny_root)
    damage(damaged)
    np.testing.assert_allclose(targets_of(damaged, spec), expected, atol=1e-6, equal_nan=True)


def test_integral_float_labels_are_the_same_atlas(damaged, tiny_root):
    rewrite_image(damaged / ATLAS, lambda d: d.astype(np.float32))
    spec = {"kind": "dseg", "space": "MNI152NLin2009cAsym"}
    clean = load_atlas({**spec, "path": str(tiny_root / ATLAS)})
    floats = load_atlas({**spec, "path": str(damaged / ATLAS)})
    assert floats.identity() == clean.identity()


def test_force_space_overrides_a_misnamed_atlas_with_a_logged_warning(damaged, caplog):
    _misnamed_atlas(damaged)
    path = damaged / "derivatives/atlas/tpl-MNI152NLin6Asym_atlas-Sim_dseg.nii.gz"
    spec = {"kind": "dseg", "path": str(path), "space": "MNI152NLin2009cAsym"}
    with caplog.at_level(logging.WARNING, logger="painnet.data.atlas"):
        atlas = load_atlas({**spec, "force_space": True})
    assert atlas.space == "MNI152NLin2009cAsym"
    assert "data.atlas.force_space" in caplog.text and str(path) in caplog.text


# ------------------------------------------------------------------------------------------
# silent 2: gaps in the ratings are never filled in beyond data.max_rating_gap_s
# ------------------------------------------------------------------------------------------
def _gap(root, start_s: float, length_s: float, marker: str = "n/a") -> None:
    values = read_samples(ratings(root))
    meta = json.loads(ratings_json(root).read_text())
    fs, t0 = meta["SamplingFrequency"], meta["StartTime"]
    lo = int(round((start_s - t0) * fs))
    cells = [f"{v:.5f}" for v in values]
    cells[lo : lo + int(round(length_s * fs))] = [marker] * int(round(length_s * fs))
    write_text_gz(ratings(root), "\n".join(cells) + "\n")


def test_a_long_gap_leaves_its_frames_without_a_target(damaged, tiny_root):
    clean = targets_of(tiny_root)
    _gap(damaged, 40.0, 40.0)
    gapped = targets_of(damaged)
    tr, lag = 0.46, 13
    frames = np.arange(clean.size)
    rated = (frames - lag) * tr  # onset of the frame whose rating each target carries
    inside = (rated + tr > 40.0) & (rated < 80.0)
    assert np.isnan(gapped[inside]).all()
    outside = ~inside & np.isfinite(clean)
    np.testing.assert_allclose(gapped[outside], clean[outside], atol=1e-6)


def test_a_short_gap_is_bridged_and_a_longer_limit_is_honoured(damaged, tiny_root):
    clean = targets_of(tiny_root)
    _gap(damaged, 50.0, 0.5, marker="")
    bridged = targets_of(damaged)
    assert np.array_equal(np.isfinite(bridged), np.isfinite(clean))  # no frame lost
    rated = (np.arange(clean.size) - 13) * 0.46
    near = (rated + 0.46 > 50.0) & (rated < 50.5)
    far = ~near & np.isfinite(clean)
    np.testing.assert_allclose(bridged[far], clean[far], atol=1e-6)
    assert np.abs(bridged[near] - clean[near]).max() < 0.2  # a straight line over 0.5 s
    strict = targets_of(damaged, RatingSpec(max_gap_s=0.1))
    assert np.isfinite(strict).sum() < np.isfinite(clean).sum()


def test_garbage_samples_are_gaps_and_are_logged(damaged, caplog):
    _gap(damaged, 60.0, 5.0, marker="#REF!")
    with caplog.at_level(logging.WARNING, logger="painnet.data.targets"):
        target = targets_of(damaged)
    assert "300 non-numeric or infinite rating sample(s) treated as gaps" in caplog.text
    assert str(ratings(damaged)) in caplog.text
    assert np.isnan(target).sum() > 13 + 5 / 0.46


# ------------------------------------------------------------------------------------------
# the range table covers every number the shipped configs hold, and accepts their defaults
# ------------------------------------------------------------------------------------------
SHIPPED = [
    ["data=tiny"],
    ["data=tiny", "model=hybrid", "trainer=ddp"],
    ["data=demo", "model=edge_pcr"],
    ["data=paper", "model=ridge", "split=data_size"],
    ["data=bids", "data.root=/data", "data.atlas.path=/atlas.nii.gz", "split=cross_subject"],
    ["data=bids_cifti", "data.root=/data", "trainer=gpu"],
    ["data=bids_xcpd", "data.root=/data", "trainer=debug"],
]
CONF = Path(__file__).resolve().parents[1] / "painnet" / "conf"
SHIPPED += [[f"{group}={p.stem}"] for group in ("experiment", "model") for p in sorted((CONF / group).glob("[!_]*.yaml"))]  # fmt: skip


@pytest.mark.parametrize("overrides", SHIPPED, ids=[" ".join(o) for o in SHIPPED])
def test_shipped_configs_pass_and_every_number_has_a_rule(overrides, make_cfg):
    cfg = make_cfg(*overrides)
    check_config(cfg)
    assert unchecked_numbers(cfg) == []


@pytest.mark.slow  # a fresh interpreter importing torch + Lightning: ~10 s idle, 37 s loaded
def test_the_cli_stops_on_a_bad_value_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PAINNET_DATA_DIR": str(tmp_path / "data"), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, "-m", "painnet.train", "data=tiny", "data.window_s=-5",
         "data.batch_size=0", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "data.window_s=-5: must be > 0" in proc.stderr
    assert "data.batch_size=0: must be >= 1" in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing simulated
    assert {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}  # Hydra's own record
