"""Real-time decoding: a held-out tiny run, volume by volume through a watch folder, gives the
offline causal predictions of the same model; gaps, bad grids and Ctrl-C are handled."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from painnet.experiments.single import run_single
from painnet.realtime import SessionOptions, load_trained, run_session
from painnet.realtime.cli import parse_args
from painnet.realtime.replay import write_volume
from painnet.realtime.volumes import GridError
from tests.conftest import CONF_DIR

TR = 0.46
ATLAS = "atlas-Sim_space-MNI152NLin2009cAsym_dseg.nii.gz"
REPO = Path(__file__).resolve().parents[1]


def _train(model: str, data_dir: Path, cache_dir: Path, out: Path) -> Path:
    """A causally cleaned tiny model, trained by the real training entry (fold 0: ses-01 held out)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                f"paths.data_dir={data_dir}",
                f"paths.cache_dir={cache_dir}",
                f"paths.output_dir={out}",
                "data=tiny",
                "data.clean.causal=true",
                f"model={model}",
                "logger=none",
                "trainer.max_epochs=1",
                "trainer.enable_progress_bar=false",
                "eval.n_boot=100",
                "eval.plots=false",
            ],
        )
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    run_single(cfg, out)
    return out


@pytest.fixture(scope="module")
def edge_run(tiny_root, data_dir, cache_dir, tmp_path_factory) -> Path:
    return _train("edge_pcr", data_dir, cache_dir, tmp_path_factory.mktemp("edge"))


def _held_out_bold(root: Path, run: str = "1") -> Path:
    func = root / "derivatives" / "fmriprep" / "sub-01" / "ses-01" / "func"
    return next(func.glob(f"*run-{run}_*desc-preproc_bold.nii.gz"))


def _estimates(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)


def _offline(run_dir: Path, run: str = "1") -> pd.DataFrame:
    table = pd.read_csv(run_dir / "predictions.csv", dtype={"session": str, "run": str})
    return table[(table.session == "01") & (table.run == run)]


def _options(tmp_path: Path, **kw) -> SessionOptions:
    base = {"out": tmp_path / "estimates.tsv", "port": None, "late_s": 0.1, "idle_s": 2.0}
    return SessionOptions(**{**base, **kw})


@pytest.mark.parametrize("model", ["edge_pcr", "convattn"])
def test_replayed_run_equals_the_offline_causal_predictions(
    model, edge_run, tiny_root, data_dir, cache_dir, tmp_path
):
    run_dir = edge_run if model == "edge_pcr" else _train(model, data_dir, cache_dir, tmp_path)
    watch = tmp_path / "watch"
    result = run_session(
        run_dir, _options(tmp_path, replay=_held_out_bold(tiny_root), watch=watch, speed=0)
    )
    est = _estimates(result.tsv).set_index("volume")
    offline = _offline(run_dir)
    assert len(list(watch.glob("vol-*.nii"))) == len(est) == result.n_volumes
    assert list(est.index) == list(range(len(est)))
    streamed = est.loc[offline.frame.to_numpy(), "estimate"].to_numpy()
    np.testing.assert_allclose(streamed, offline.prediction.to_numpy(), atol=1e-5, rtol=0)
    # Frames before the first full window have no estimate; every offline frame has one here.
    assert est.loc[: offline.frame.min() - 1, "estimate"].isna().all()
    assert set(est.status) <= {"ok", "dropped", "warmup", "censored"}
    assert result.n_gaps == 0


def _copy_volumes(bold: Path, folder: Path, numbers: range, skip=(), corrupt=()) -> None:
    img = nib.load(bold)
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        path = folder / f"vol-{n:05d}.nii"
        if n in skip:
            continue
        if n in corrupt:
            path.write_bytes(b"not a nifti volume")
            continue
        write_volume(img, n - 1, path)
        row = pd.read_csv(
            str(bold).replace("_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz", "")
            + "_desc-confounds_timeseries.tsv",
            sep="\t",
        ).iloc[n - 1]
        values = {k: (None if pd.isna(v) else float(v)) for k, v in row.items()}
        (folder / f"vol-{n:05d}_confounds.json").write_text(json.dumps(values))


def test_missing_and_corrupt_volumes_are_logged_gaps_and_the_stream_goes_on(
    edge_run, tiny_root, tmp_path, caplog
):
    watch = tmp_path / "watch"
    _copy_volumes(_held_out_bold(tiny_root), watch, range(1, 61), skip={41}, corrupt={45})
    with caplog.at_level(logging.WARNING, logger="painnet.realtime"):
        result = run_session(edge_run, _options(tmp_path, watch=watch, idle_s=0.5))
    est = _estimates(result.tsv).set_index("volume")
    assert list(est.index) == list(range(60))
    assert est.loc[40, "status"] == "missing" and est.loc[44, "status"] == "corrupt"
    assert np.isnan(est.loc[[40, 44], "estimate"]).all() and est.loc[[40, 44], "censored"].all()
    after = est.loc[46:]
    assert after.estimate[after.status == "ok"].notna().all() and (after.status == "ok").any()
    assert result.n_gaps == 2
    assert "volume 40: missing" in caplog.text and "volume 44" in caplog.text


def test_a_volume_arriving_after_its_gap_is_skipped(edge_run, tiny_root, tmp_path, caplog):
    watch = tmp_path / "watch"
    bold = _held_out_bold(tiny_root)
    _copy_volumes(bold, watch, range(1, 31), skip={20})
    stop = threading.Event()

    def write_late():
        while not (tmp_path / "estimates.tsv").is_file() or len(_estimates_lines(tmp_path)) < 25:
            time.sleep(0.02)
        _copy_volumes(bold, watch, range(20, 21))

    writer = threading.Thread(target=write_late, daemon=True)
    writer.start()
    with caplog.at_level(logging.WARNING, logger="painnet.realtime"):
        result = run_session(edge_run, _options(tmp_path, watch=watch, idle_s=1.0), stop=stop)
    writer.join(timeout=5)
    est = _estimates(result.tsv)
    assert len(est) == 30 and est.loc[19, "status"] == "missing"
    assert "vol-00020.nii arrived after volume 19 was declared missing" in caplog.text


def _estimates_lines(tmp_path: Path) -> list[str]:
    return (tmp_path / "estimates.tsv").read_text().splitlines()[1:]


def test_a_volume_with_non_finite_voxels_is_censored(edge_run, tiny_root, tmp_path):
    watch = tmp_path / "watch"
    _copy_volumes(_held_out_bold(tiny_root), watch, range(1, 51))
    img = nib.load(watch / "vol-00040.nii")
    data = np.asarray(img.dataobj).copy()
    data[nib.load(tiny_root / "derivatives" / "atlas" / ATLAS).get_fdata() > 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), watch / "vol-00040.nii")
    est = _estimates(run_session(edge_run, _options(tmp_path, watch=watch, idle_s=0.5)).tsv)
    assert est.loc[39, "status"] == "censored" and est.loc[39, "censored"] == 1
    assert np.isnan(est.loc[39, "estimate"])  # the edge model gives none on censored frames
    assert (est.loc[40:, "status"] == "ok").any()


def test_fd_from_motion_parameters_matches_the_offline_computation(tmp_path):
    from painnet.data.clean import CleanConfig, framewise_displacement
    from painnet.realtime.volumes import ConfoundReader

    rng = np.random.default_rng(0)
    motion = rng.normal(0, 0.1, (20, 6)).cumsum(0)
    reader = ConfoundReader(CleanConfig(causal=True, fd_source="motion", fd_threshold=0.3))
    names = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    fds = []
    for t in range(20):
        row = {**dict(zip(names, motion[t].tolist())), "white_matter": 1.0, "csf": 2.0}
        (tmp_path / f"vol-{t + 1:05d}_confounds.json").write_text(json.dumps(row))
        fds.append(reader.read(tmp_path / f"vol-{t + 1:05d}.nii")[1])
    np.testing.assert_allclose(fds, framewise_displacement(motion, head_radius_mm=50.0))
    assert reader.n_confounds == 8


def test_a_first_volume_on_another_grid_is_a_clear_error(edge_run, tmp_path):
    watch = tmp_path / "watch"
    watch.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), np.eye(4)), watch / "vol-00001.nii")
    with pytest.raises(
        GridError, match=r"(?s)vol-00001.nii: volume grid \(5, 6, 7\).*training grid"
    ):
        run_session(edge_run, _options(tmp_path, watch=watch))


def test_live_page_and_udp_get_every_estimate(edge_run, tiny_root, tmp_path):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(0.2)
    port = receiver.getsockname()[1]
    watch = tmp_path / "watch"
    _copy_volumes(_held_out_bold(tiny_root), watch, range(1, 41))
    stop = threading.Event()
    box = {}
    options = _options(
        tmp_path, watch=watch, port=0, udp=f"127.0.0.1:{port}", linger=True, idle_s=0.3
    )
    session = threading.Thread(
        target=lambda: box.update(
            result=run_session(edge_run, options, stop=stop, on_ready=lambda u: box.update(url=u))
        )
    )
    session.start()
    messages = []
    deadline = time.time() + 60
    while len(messages) < 40 and time.time() < deadline:
        with contextlib.suppress(TimeoutError):
            messages.append(json.loads(receiver.recv(4096)))
    receiver.close()
    # The page is served until stop: read it while the session lingers.
    url = box["url"]
    page = urllib.request.urlopen(url, timeout=5).read().decode()
    data = {"finished": False}
    while not data["finished"] and time.time() < deadline:  # the stream ends after idle_s
        data = json.loads(urllib.request.urlopen(url + "estimates.json?since=0", timeout=5).read())
        time.sleep(0.05)
    stop.set()
    session.join(timeout=30)
    assert [m["volume"] for m in messages] == list(range(40))
    assert "<svg" in page and "estimates.json" in page
    assert data["next"] == 40 and len(data["rows"]) == 40 and data["finished"]
    assert data["columns"] == ["volume", "time_s", "estimate", "censored", "status"]
    assert box["result"].n_volumes == 40


def _wait_for_rows(out: Path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and (not out.is_file() or out.read_text().count("\n") <= n):
        time.sleep(0.02)


def _assert_complete(out: Path, at_least: int) -> None:
    text = out.read_text()
    assert text.endswith("\n")
    est = _estimates(out)
    assert at_least <= len(est) < 261
    assert list(est.volume) == list(range(len(est)))
    assert est[["volume", "time_s", "censored", "status", "file"]].notna().all().all()


def test_ctrl_c_leaves_a_complete_tsv(edge_run, tiny_root, tmp_path):
    out = tmp_path / "estimates.tsv"
    interrupt = threading.Thread(
        target=lambda: (_wait_for_rows(out, 30), os.kill(os.getpid(), signal.SIGINT)),
        daemon=True,
    )
    interrupt.start()
    options = _options(tmp_path, replay=_held_out_bold(tiny_root), watch=tmp_path / "w", speed=8)
    result = run_session(edge_run, options)
    interrupt.join(timeout=10)
    assert result.interrupted
    _assert_complete(out, 30)


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_exits_130_with_a_complete_tsv(edge_run, tiny_root, tmp_path):
    out = tmp_path / "estimates.tsv"
    cmd = [
        sys.executable, "-m", "painnet.realtime", str(edge_run),
        "--replay", str(_held_out_bold(tiny_root)), "--tr", str(TR), "--speed", "8",
        "--no-web", "--out", str(out), "--watch", str(tmp_path / "watch"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for_rows(out, 30)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, output[-2000:]
    _assert_complete(out, 30)


def test_a_model_trained_on_standard_cleaning_is_refused(edge_run, tmp_path):
    run_dir = tmp_path / "standard"
    shutil.copytree(edge_run, run_dir)
    for name in ("job.yaml", ".hydra/config.yaml"):
        path = run_dir / name
        if path.is_file():
            cfg = OmegaConf.load(path)
            cfg.data.clean.causal = False
            OmegaConf.save(cfg, path)
    with pytest.raises(ValueError, match="data.clean.causal=false"):
        load_trained(run_dir)
    assert load_trained(run_dir, allow_standard=True).clean.causal


def test_cli_needs_a_source_and_a_tr_for_replay(tmp_path):
    with pytest.raises(SystemExit):
        parse_args([str(tmp_path)])
    with pytest.raises(SystemExit):
        parse_args([str(tmp_path), "--replay", "run.nii.gz"])
    args = parse_args([str(tmp_path), "--replay", "run.nii.gz", "--tr", "0.46", "--fast"])
    assert args.fast and args.tr == 0.46
