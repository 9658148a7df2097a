"""The simulator writes the data contract of DESIGN.md, deterministically, with a planted signal
of the strength each preset promises, and never rewrites a finished dataset."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from painnet.data.simulate import PRESETS, main, simulate_dataset

SPACE = "MNI152NLin2009cAsym"
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
CONFOUNDS = (
    MOTION
    + [
        f"{m}_{suffix}"
        for m in MOTION
        for suffix in ("derivative1", "power2", "derivative1_power2")
    ]
    + ["framewise_displacement", "csf", "white_matter", "global_signal"]
    + [f"a_comp_cor_{i:02d}" for i in range(6)]
)
LAG_S = 5.0  # peak of the canonical HRF


# ------------------------------------------------------------------------------------------
# Reading helpers (plain nibabel/pandas, independent of painnet's own readers)
# ------------------------------------------------------------------------------------------
def bold_files(root: Path) -> list[Path]:
    return sorted(
        (root / "derivatives/fmriprep").glob(
            f"sub-*/ses-*/func/*_space-{SPACE}_desc-preproc_bold.nii*"
        )
    )


def run_files(bold: Path) -> dict[str, Path]:
    """Every contract file of the run that ``bold`` belongs to."""
    prefix = bold.name.split(f"_space-{SPACE}")[0]
    sub, ses = prefix.split("_")[:2]
    root = bold.parents[5]
    func = root / sub / ses / "func"
    return {
        "bold": bold,
        "bold_json": bold.with_name(bold.name.split(".")[0] + ".json"),
        "confounds": bold.with_name(f"{prefix}_desc-confounds_timeseries.tsv"),
        "ratings": func / f"{prefix}_recording-pain_physio.tsv.gz",
        "ratings_json": func / f"{prefix}_recording-pain_physio.json",
        "latent": root / "derivatives/simulation" / sub / ses / f"{prefix}_latent.tsv.gz",
        "subject": sub.removeprefix("sub-"),
    }


def atlas_path(root: Path) -> Path:
    return root / f"derivatives/atlas/atlas-Sim_space-{SPACE}_dseg.nii.gz"


def parcel_means(bold: Path, atlas: Path) -> np.ndarray:
    """(T, P) mean BOLD of each atlas label."""
    data = np.asarray(nib.load(bold).dataobj, dtype=np.float64)
    labels = np.asarray(nib.load(atlas).dataobj).ravel()
    flat = data.reshape(-1, data.shape[-1])
    return np.stack([flat[labels == p].mean(0) for p in range(1, labels.max() + 1)], axis=1)


def read_confounds(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values="n/a")


def cleaned_parcels(files: dict) -> np.ndarray:
    """(T, P) parcel means with intercept, linear trend, 6 motion, WM and CSF regressed out."""
    x = parcel_means(files["bold"], atlas_path(files["bold"].parents[5]))
    conf = read_confounds(files["confounds"])
    n = x.shape[0]
    design = np.column_stack([np.ones(n), np.arange(n), conf[MOTION + ["white_matter", "csf"]]])
    return x - design @ np.linalg.lstsq(design, x, rcond=None)[0]


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def rolling_corr(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    """(T - width + 1,) Pearson correlation of a and b in sliding windows."""
    wa = np.lib.stride_tricks.sliding_window_view(a, width)
    wb = np.lib.stride_tricks.sliding_window_view(b, width)
    wa = wa - wa.mean(1, keepdims=True)
    wb = wb - wb.mean(1, keepdims=True)
    return (wa * wb).sum(1) / np.sqrt((wa**2).sum(1) * (wb**2).sum(1))


def coupling_tracking(x, parcels, loadings, pain_hrf: np.ndarray, width: int) -> float:
    """Correlation between the mean sign-corrected rolling correlation of ``parcels`` (columns
    of the (T, P) ``x``) and HRF-convolved pain averaged over the same windows."""
    pairs = [(i, j) for i in range(len(parcels)) for j in range(i + 1, len(parcels))]
    rolling = [
        np.sign(loadings[i] * loadings[j]) * rolling_corr(x[:, parcels[i]], x[:, parcels[j]], width)
        for i, j in pairs
    ]
    window_pain = np.lib.stride_tricks.sliding_window_view(pain_hrf, width).mean(1)
    return corr(np.mean(rolling, axis=0), window_pain)


def signal_summary(root: Path) -> dict[str, float]:
    """Run-averaged evidence of the planted pain code.

    activation: mean correlation of sign-corrected activation parcels with HRF-lagged latent pain;
    other: the largest |correlation| among parcels outside both pain sets;
    coupling: :func:`coupling_tracking` of the coupled set (15-s windows); coupling_control: the
    same for three parcels outside both sets.
    """
    truth = json.loads((root / "derivatives/simulation/ground_truth.json").read_text())["subjects"]
    tr = json.loads((root / "derivatives/simulation/params.json").read_text())["params"]["tr"]
    lag, width = int(round(LAG_S / tr)), int(round(15.0 / tr))
    act, other, coup, control = [], [], [], []
    for bold in bold_files(root):
        files = run_files(bold)
        gt = truth[files["subject"]]
        x = cleaned_parcels(files)
        latent = pd.read_csv(files["latent"], sep="\t")
        pain, pain_hrf = latent["pain"].to_numpy(), latent["pain_hrf"].to_numpy()
        lagged = x[lag:]
        act_idx = np.array(gt["activation_parcels"]) - 1
        coup_idx = np.array(gt["coupled_parcels"]) - 1
        signs = np.sign(gt["activation_weights"])
        act.append(np.mean([s * corr(lagged[:, p], pain[:-lag]) for p, s in zip(act_idx, signs)]))
        rest = sorted(set(range(x.shape[1])) - set(act_idx) - set(coup_idx))
        other.append([corr(lagged[:, p], pain[:-lag]) for p in rest])
        coup.append(coupling_tracking(x, coup_idx, gt["coupling_loadings"], pain_hrf, width))
        control.append(coupling_tracking(x, rest[:3], [1.0, 1.0, 1.0], pain_hrf, width))
    return {
        "activation": float(np.mean(act)),
        "other": float(np.max(np.abs(np.mean(other, axis=0)))),
        "coupling": float(np.mean(coup)),
        "coupling_control": float(np.mean(control)),
    }


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_root) -> Path:
    """The session's shared tiny dataset (seed 0); read only here."""
    return tiny_root


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("simulate")


# ------------------------------------------------------------------------------------------
# The data contract
# ------------------------------------------------------------------------------------------
def test_presets_define_every_parameter():
    keys = set(PRESETS["tiny"])
    assert {"n_subjects", "n_sessions", "n_runs", "run_s", "tr", "n_parcels", "voxels_per_parcel",
            "rating_hz", "rating_start_s", "activation_gain", "coupling_gain", "n_pain_parcels",
            "n_coupled_parcels", "noise_sd", "ar_coef", "n_network_components", "drift_sd",
            "motion_spike_rate", "bold_format", "task"} <= keys  # fmt: skip
    for name in ("demo", "paper"):
        assert set(PRESETS[name]) == keys, name
    assert PRESETS["paper"]["n_sessions"] == [23, 28]


def test_tiny_dataset_has_every_contract_file(tiny):
    p = PRESETS["tiny"]
    assert json.loads((tiny / "dataset_description.json").read_text())["BIDSVersion"]
    assert (
        json.loads((tiny / "derivatives/fmriprep/dataset_description.json").read_text())[
            "DatasetType"
        ]
        == "derivative"
    )
    participants = pd.read_csv(tiny / "participants.tsv", sep="\t")
    assert participants["participant_id"].tolist() == ["sub-01", "sub-02"]

    atlas = nib.load(atlas_path(tiny))
    labels = np.asarray(atlas.dataobj)
    assert labels.dtype == np.int16
    assert set(np.unique(labels)) == set(range(p["n_parcels"] + 1))
    table = pd.read_csv(tiny / "derivatives/atlas/atlas-Sim_dseg.tsv", sep="\t")
    assert table["index"].tolist() == list(range(1, p["n_parcels"] + 1))
    assert table["name"].is_unique

    bolds = bold_files(tiny)
    assert len(bolds) == p["n_subjects"] * p["n_sessions"] * p["n_runs"]
    for bold in bolds:
        files = run_files(bold)
        img = nib.load(bold)
        data = np.asarray(img.dataobj)
        n = data.shape[3]
        assert data.ndim == 4 and data.dtype == np.float32
        assert n == round(p["run_s"] / p["tr"])
        assert img.header.get_xyzt_units() == ("mm", "sec")
        sidecar = json.loads(files["bold_json"].read_text())
        assert sidecar == {"RepetitionTime": p["tr"], "TaskName": "rating"}
        assert img.header.get_zooms()[3] == pytest.approx(sidecar["RepetitionTime"])
        np.testing.assert_allclose(img.affine, atlas.affine)
        assert data.shape[:3] == labels.shape
        assert np.all(data[labels == 0] == 0)  # background
        assert 100 < data[labels > 0].mean() < 1000  # BOLD-like intensities

        conf = read_confounds(files["confounds"])
        assert set(CONFOUNDS) <= set(conf.columns)
        assert len(conf) == n
        assert np.isnan(conf["framewise_displacement"][0])
        assert np.isnan(conf["trans_x_derivative1"][0])
        assert (
            conf.drop(
                columns=[c for c in conf if "derivative1" in c or c == "framewise_displacement"]
            )
            .notna()
            .all()
            .all()
        )
        # Power FD: summed absolute frame-to-frame change, rotations as arcs on a 50-mm sphere.
        step = conf[MOTION].diff().abs().to_numpy()[1:]
        power_fd = step[:, :3].sum(1) + 50.0 * step[:, 3:].sum(1)
        np.testing.assert_allclose(
            conf["framewise_displacement"][1:], power_fd, rtol=1e-4, atol=1e-5
        )

        meta = json.loads(files["ratings_json"].read_text())
        assert meta == {"SamplingFrequency": 60.0, "StartTime": -2.0, "Columns": ["pain"]}
        with gzip.open(files["ratings"], "rt") as fh:
            ratings = np.loadtxt(fh)
        assert ratings.ndim == 1  # one column, no header
        assert ratings.min() >= 0 and ratings.max() <= 1 and ratings.std() > 0.01
        assert meta["StartTime"] + ratings.size / meta["SamplingFrequency"] >= n * p["tr"]

        latent = pd.read_csv(files["latent"], sep="\t")
        assert len(latent) == n and {"pain", "pain_hrf"} <= set(latent.columns)


def test_ground_truth_gives_each_participant_their_own_network(tiny):
    truth = json.loads((tiny / "derivatives/simulation/ground_truth.json").read_text())["subjects"]
    assert sorted(truth) == ["01", "02"]
    for gt in truth.values():
        assert len(gt["activation_parcels"]) == PRESETS["tiny"]["n_pain_parcels"]
        assert len(gt["activation_weights"]) == len(gt["activation_parcels"])
        assert not set(gt["activation_parcels"]) & set(gt["coupled_parcels"])
        assert len(gt["sessions"]) == PRESETS["tiny"]["n_sessions"]
    a, b = truth["01"], truth["02"]
    assert (a["activation_parcels"], a["coupled_parcels"]) != (
        b["activation_parcels"],
        b["coupled_parcels"],
    )


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_bytes_and_another_seed_differs(tiny, sim_dir):
    again = simulate_dataset(sim_dir / "again", "tiny", seed=0)
    assert file_hashes(again) == file_hashes(tiny)
    other = file_hashes(simulate_dataset(sim_dir / "seed1", "tiny", seed=1))
    reference = file_hashes(tiny)
    assert other.keys() == reference.keys()
    bolds = [k for k in reference if k.endswith("_bold.nii.gz")]
    assert all(other[k] != reference[k] for k in bolds)


# ------------------------------------------------------------------------------------------
# The planted signal
# ------------------------------------------------------------------------------------------
def test_activation_parcels_track_pain_and_others_do_not(tiny):
    s = signal_summary(tiny)
    assert s["activation"] > 0.4, s
    assert s["activation"] > s["other"] + 0.25, s
    assert s["coupling"] > 0.3, s


def test_without_activation_gain_pain_lives_in_co_fluctuation_only(sim_dir):
    root = simulate_dataset(sim_dir / "act0", "tiny", seed=0, activation_gain=0)
    s = signal_summary(root)
    assert abs(s["activation"]) < 0.15, s
    assert s["coupling"] > 0.3, s
    assert s["coupling"] > s["coupling_control"] + 0.2, s


def test_without_coupling_gain_pain_lives_in_activation_only(sim_dir):
    root = simulate_dataset(sim_dir / "coup0", "tiny", seed=0, coupling_gain=0.0)
    s = signal_summary(root)
    assert s["activation"] > 0.4, s
    assert abs(s["coupling"]) < 0.2, s


def test_head_motion_spikes_while_pain_rises(sim_dir):
    # Long runs of slow pain with frequent spikes, on a minimal brain: enough spikes to compare.
    root = simulate_dataset(
        sim_dir / "motion", "tiny", seed=0, n_subjects=1, n_sessions=2, n_runs=2, run_s=600.0,
        n_parcels=2, voxels_per_parcel=2, n_pain_parcels=1, n_coupled_parcels=1,
        motion_spike_rate=4.0, pain_tau_s=20.0,
    )  # fmt: skip
    rising_fd, falling_fd = [], []
    for bold in bold_files(root):
        files = run_files(bold)
        fd = read_confounds(files["confounds"])["framewise_displacement"].to_numpy()[1:]
        slope = np.gradient(pd.read_csv(files["latent"], sep="\t")["pain"].to_numpy())[1:]
        rising_fd.append(fd[slope > 0])
        falling_fd.append(fd[slope < 0])
    rising, falling = np.concatenate(rising_fd), np.concatenate(falling_fd)
    assert rising.mean() > 1.15 * falling.mean()
    assert np.mean(rising > 0.3) > 2 * np.mean(falling > 0.3)  # spikes, not just drift


# ------------------------------------------------------------------------------------------
# Caching, errors, CLI
# ------------------------------------------------------------------------------------------
def test_a_finished_dataset_is_not_rewritten(sim_dir):
    root = simulate_dataset(sim_dir / "cached", "tiny", seed=2, n_sessions=1)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert simulate_dataset(root, "tiny", seed=2, n_sessions=1.0) == root  # 1.0 == 1
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    assert not list(sim_dir.glob("cached.tmp-*"))


def test_a_different_or_incomplete_dataset_needs_overwrite(sim_dir):
    root = simulate_dataset(sim_dir / "replace", "tiny", seed=2, n_sessions=1)
    with pytest.raises(FileExistsError, match="seed"):
        simulate_dataset(root, "tiny", seed=3, n_sessions=1)
    simulate_dataset(root, "tiny", seed=3, n_sessions=1, overwrite=True)
    assert json.loads((root / "derivatives/simulation/params.json").read_text())["seed"] == 3

    (root / "derivatives/simulation/params.json").unlink()  # as if interrupted before the end
    with pytest.raises(FileExistsError, match="incomplete"):
        simulate_dataset(root, "tiny", seed=3, n_sessions=1)
    simulate_dataset(root, "tiny", seed=3, n_sessions=1, overwrite=True)
    assert (root / "derivatives/simulation/params.json").is_file()


def test_bad_parameters_are_rejected_with_the_valid_keys(sim_dir):
    with pytest.raises(ValueError, match="valid keys:.*coupling_gain"):
        simulate_dataset(sim_dir / "bad", "tiny", n_parcel=5)
    with pytest.raises(ValueError, match="n_sessions"):
        simulate_dataset(sim_dir / "bad", "tiny", n_sessions=[2, 3, 4])
    with pytest.raises(ValueError, match="preset"):
        simulate_dataset(sim_dir / "bad", "huge")
    assert not (sim_dir / "bad").exists()


def test_cli_writes_a_dataset_with_overrides(sim_dir, capsys):
    root = sim_dir / "cli"
    argv = [str(root), "--preset", "tiny", "--seed", "4", "--set", "n_sessions=1", "--set", "coupling_gain=0",
            "--set", "bold_format=nii"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((root / "derivatives/simulation/params.json").read_text())
    assert record["seed"] == 4
    assert record["params"]["coupling_gain"] == 0.0 and record["params"]["n_sessions"] == 1
    assert (
        len(list(root.glob("derivatives/fmriprep/sub-*/ses-*/func/*_desc-preproc_bold.nii"))) == 4
    )
    assert main([str(root), "--set", "bogus=1"]) == 2
    assert "valid keys" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# The dataset folder of data=<preset> depends on every simulation parameter (issue 10, 6)
# ------------------------------------------------------------------------------------------
def test_a_simulation_override_gets_its_own_folder(make_cfg, data_dir):
    plain = make_cfg("data=tiny").data.root
    same = make_cfg("data=tiny", "+data.simulate.n_parcels=12", "+data.simulate.tr=0.46").data.root
    other = make_cfg("data=tiny", "+data.simulate.n_parcels=40").data.root
    other_float = make_cfg("data=tiny", "+data.simulate.n_parcels=40.0").data.root
    two = make_cfg("data=tiny", "+data.simulate.n_parcels=40", "+data.simulate.n_runs=3").data.root
    seeded = make_cfg("data=tiny", "data.simulate.seed=1", "+data.simulate.n_parcels=40").data.root

    assert plain == same == str(data_dir / "sim-tiny-seed0")  # the preset's own values: no hash
    assert other == other_float  # coerced as the simulator does: 40 == 40.0
    assert other.startswith(plain + "-") and len({plain, other, two}) == 3
    assert seeded.startswith(str(data_dir / "sim-tiny-seed1-"))


def test_an_unknown_simulation_override_is_an_error_naming_it(make_cfg):
    cfg = make_cfg("data=tiny", "+data.simulate.n_parcel=40")
    with pytest.raises(Exception, match="n_parcel.*valid keys"):
        _ = cfg.data.root
