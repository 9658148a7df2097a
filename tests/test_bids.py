"""Discovery pairs every run's files; anything missing or inconsistent names the file."""

import gzip
import json
import shutil

import nibabel as nib
import pytest

from painnet.data.bids import BIDSError, discover_runs, parse_entities


@pytest.fixture
def dataset(tiny_root, tmp_path):
    """A private copy of the tiny simulated dataset that a test may damage."""
    return shutil.copytree(tiny_root, tmp_path / "ds")


def test_every_simulated_run_is_found_and_paired(tiny_root):
    params = json.loads((tiny_root / "derivatives/simulation/params.json").read_text())["params"]
    runs = discover_runs(tiny_root)
    n_sessions = params["n_sessions"]
    total = sum(n_sessions) if isinstance(n_sessions, list) else n_sessions * params["n_subjects"]
    assert len(runs) == total * params["n_runs"]
    for files in runs:
        ent = parse_entities(files.bold.name)
        assert (ent["sub"], ent["ses"], ent["run"]) == (
            files.key.subject,
            files.key.session,
            files.key.run,
        )
        assert files.confounds.name.startswith(files.key.bids_prefix())
        assert files.ratings.name == f"{files.key.bids_prefix()}_recording-pain_physio.tsv.gz"
        assert files.tr == pytest.approx(params["tr"])
    assert runs == sorted(runs, key=lambda f: f.key)


def test_filters_select_subjects_sessions_and_runs(tiny_root):
    runs = discover_runs(tiny_root, subjects=["sub-02"], sessions="01", runs=["1"])
    assert [(f.key.subject, f.key.session, f.key.run) for f in runs] == [("02", "01", "1")]
    with pytest.raises(BIDSError, match="no nifti BOLD"):
        discover_runs(tiny_root, task="rest")


def test_missing_confounds_names_the_expected_file(dataset):
    victim = next(
        dataset.glob("derivatives/fmriprep/sub-01/ses-01/func/*run-1_desc-confounds_timeseries.tsv")
    )
    victim.unlink()
    with pytest.raises(BIDSError, match=f"confounds file missing: expected .*{victim.name}"):
        discover_runs(dataset)


def test_missing_ratings_names_the_expected_file(dataset):
    victim = next(dataset.glob("sub-01/ses-01/func/*run-1_recording-pain_physio.tsv.gz"))
    victim.unlink()
    with pytest.raises(BIDSError, match=f"ratings file missing: expected .*{victim.name}"):
        discover_runs(dataset)


def test_ratings_without_bold_are_unmatched(dataset):
    bold = next(
        dataset.glob("derivatives/fmriprep/sub-01/ses-01/func/*run-1_*desc-preproc_bold.nii*")
    )
    bold.unlink()
    with pytest.raises(BIDSError, match="no matching preprocessed BOLD"):
        discover_runs(dataset)
    assert len(discover_runs(dataset, strict=False)) == len(discover_runs(dataset, strict=False))


def test_tr_disagreement_between_header_and_sidecar(dataset):
    sidecar = next(
        dataset.glob("derivatives/fmriprep/sub-02/ses-01/func/*run-1_*desc-preproc_bold.json")
    )
    meta = json.loads(sidecar.read_text())
    meta["RepetitionTime"] = meta["RepetitionTime"] * 2
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(BIDSError, match="TR disagrees.*sidecar"):
        discover_runs(dataset)


def test_ratings_shorter_than_the_run(dataset):
    ratings = next(dataset.glob("sub-01/ses-02/func/*run-1_recording-pain_physio.tsv.gz"))
    with gzip.open(ratings, "rt") as fh:
        lines = fh.read().splitlines()
    with gzip.open(ratings, "wt") as fh:
        fh.write("\n".join(lines[: len(lines) // 2]) + "\n")
    with pytest.raises(BIDSError, match=f"{ratings.name}: ratings are shorter than the run"):
        discover_runs(dataset)


def test_a_tree_this_project_did_not_write(tmp_path, tiny_root):
    """Contract files only (no simulation ground truth), sessions without ses- entity folders kept."""
    root = tmp_path / "other"
    for src in tiny_root.rglob("*"):
        rel = src.relative_to(tiny_root)
        if src.is_dir() or "simulation" in rel.parts or "atlas" in rel.parts:
            continue
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    runs = discover_runs(root, subjects="01")
    assert runs and all(isinstance(nib.load(str(f.bold)), nib.Nifti1Image) for f in runs)
