"""Feature importance (painnet.analysis): the study's region test for the edge model, input
permutation and integrated gradients for deep models, maps, and the command line."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from painnet.analysis import maps
from painnet.analysis.deep import input_permutation_drops, integrated_gradients, source_frames
from painnet.analysis.importance import FittedJob, analyse_jobs, main, simulated_truth
from painnet.analysis.permutation import (
    hierarchical_permutations,
    permutation_p,
    term_permutation_drops,
)
from painnet.analysis.terms import edge_region_terms
from painnet.data.atlas import load_atlas
from painnet.models.classical import EdgePCR, edge_vector_to_matrix, quadratic_predict

# --------------------------------------------------------------------------- edge terms


def test_region_terms_count_each_edge_for_both_regions_and_add_up_to_the_prediction():
    rng = np.random.default_rng(0)
    n_parcels = 6
    w = rng.standard_normal(n_parcels * (n_parcels - 1) // 2)
    weights = edge_vector_to_matrix(w, n_parcels)
    z = rng.standard_normal((40, n_parcels))
    terms = edge_region_terms(z, weights)

    # region j's term = every edge (i, j) touching it, contribution w_e z_i z_j, in full
    expected = np.zeros_like(terms)
    for e, (i, j) in enumerate(itertools.combinations(range(n_parcels), 2)):
        expected[:, i] += w[e] * z[:, i] * z[:, j]
        expected[:, j] += w[e] * z[:, i] * z[:, j]
    np.testing.assert_allclose(terms, expected, rtol=1e-12, atol=1e-12)
    # so all regions together hold every edge twice: 2 × (prediction − intercept)
    prediction = quadratic_predict(z, weights, 0.3)
    np.testing.assert_allclose(terms.sum(1), 2 * (prediction - 0.3), rtol=1e-12, atol=1e-12)


def test_region_terms_refuse_weights_that_are_not_an_edge_matrix():
    with pytest.raises(ValueError, match="symmetric"):
        edge_region_terms(np.ones((3, 2)), np.array([[0.0, 1.0], [2.0, 0.0]]))


# --------------------------------------------------------------------------- permutations


def _design():
    """Sessions 0 and 1: two runs of 3 bins; session 2: runs of 3 and 2 bins (another shape)."""
    runs = [(0, 3), (0, 3), (1, 3), (1, 3), (2, 3), (2, 2)]
    session = np.concatenate([[s] * n for s, n in runs])
    run = np.concatenate([[r] * n for r, (_, n) in enumerate(runs)])
    return session, run


def test_hierarchical_permutation_moves_whole_runs_and_sessions():
    session, run = _design()
    src = hierarchical_permutations(session, run, 500, np.random.default_rng(1))
    assert src.shape == (500, session.size)
    assert (np.sort(src, axis=1) == np.arange(session.size)).all()  # a permutation of the bins
    for row in src:
        for r in np.unique(run):
            # a run's bins all come from one source run, of the same length
            sources = np.unique(run[row[run == r]])
            assert sources.size == 1
            assert (run == sources[0]).sum() == (run == r).sum()
        for s in np.unique(session):
            assert np.unique(session[row[session == s]]).size == 1  # one source session
    # sessions 0 and 1 trade places; session 2 (its own shape) only shuffles inside
    assert set(session[src[:, 0]]) == {0, 1}
    assert set(session[src[:, session == 2].ravel()]) == {2}
    # bins inside a run are shuffled, not only moved as a block
    assert len({tuple(row[:3] - row[:3].min()) for row in src}) == 6


def test_hierarchical_permutation_rejects_bins_out_of_order():
    with pytest.raises(ValueError, match="contiguous"):
        hierarchical_permutations(
            np.array([0, 1, 0]), np.array([0, 1, 2]), 3, np.random.default_rng()
        )


def test_term_permutation_drop_is_the_study_statistic():
    rng = np.random.default_rng(2)
    session, run = _design()
    n = session.size
    rating = rng.random(n)
    terms = np.column_stack([rating + 0.1 * rng.standard_normal(n), np.zeros(n), rng.random(n)])
    total = terms.sum(1) + 0.5
    src = hierarchical_permutations(session, run, 50, rng)
    r0, drops = term_permutation_drops(total, terms, rating, src)

    assert r0 == pytest.approx(np.corrcoef(total, rating)[0, 1])
    for j in range(3):
        for k in range(0, 50, 7):
            permuted = total - terms[:, j] + terms[src[k], j]
            assert drops[j, k] == pytest.approx(r0 - np.corrcoef(permuted, rating)[0, 1])
    # a region with no share of the prediction loses nothing and is not significant
    assert np.all(drops[1] == 0)
    assert permutation_p(drops)[1] == 1.0
    assert drops[0].mean() > drops[2].mean()


def test_permutation_p_counts_both_tails():
    drops = np.array([[1.0] * 99, [-1.0] * 99, [1.0, -1.0] * 49 + [0.0]])
    np.testing.assert_allclose(permutation_p(drops), [2 / 100, 2 / 100, 1.0])


def test_region_terms_are_averaged_over_the_evaluation_protocols_bins():
    from painnet.analysis.terms import bin_terms
    from painnet.evaluation.protocol import EvalProtocol

    n = 304  # the study's example: 304 frames in 5 bins by discretize are 69/70/70/70/25
    table = pd.DataFrame(
        {
            "subject": "01",
            "session": "01",
            "run": "1",
            "frame": np.arange(n),
            "time_s": np.arange(n) * 0.46,
            "rating": np.linspace(0, 1, n),
            "prediction": np.cos(np.arange(n)),
            "fold": "f0",
            "run_duration_s": 600.0,
        }
    )
    terms = np.column_stack([np.arange(n), -np.arange(n)]).astype(float)
    binned = bin_terms(table, terms, "2min", protocol=EvalProtocol.lee2026())
    counts = binned.bins["n_frames"].tolist()
    assert counts == [69, 70, 70, 70, 25]
    edges = np.cumsum([0, *counts])
    expected = [np.arange(a, b).mean() for a, b in zip(edges[:-1], edges[1:])]
    np.testing.assert_allclose(binned.terms[:, 0], expected)
    np.testing.assert_allclose(binned.terms[:, 1], -np.asarray(expected))
    equal = bin_terms(table, terms, "2min")  # painnet's default: equal counts
    assert equal.bins["n_frames"].tolist() == [61, 61, 61, 61, 60]


# --------------------------------------------------------------------------- the simulator


# The tiny dataset with pain only in co-fluctuation (3 of 12 parcels), in its own folder.
COFLUCT = (
    "data=tiny",
    "data.root=${paths.data_dir}/sim-tiny-importance-cofluct",
    "+data.simulate.activation_gain=0.0",
    "+data.simulate.coupling_gain=8.0",
)


def _fit_edge_folds(make_cfg, subject: str) -> list[FittedJob]:
    """Every leave-one-session-out fold of one participant of ``COFLUCT``, fitted in memory."""
    from painnet.evaluation.table import table_from_frame_predictions

    cfg = make_cfg(*COFLUCT, f"split.subject='{subject}'")
    jobs = []
    for fold in range(3):
        split = dict(cfg.split)
        split["fold"] = fold
        dm = instantiate(cfg.data, split=split, _recursive_=False)
        dm.prepare_data()
        dm.setup("fit")
        model = EdgePCR().fit([dm.runs[i] for i in dm.runs_in("train") + dm.runs_in("val")])
        test = [dm.runs[i] for i in dm.runs_in("test")]
        predictions = {r.key: model.predict_run(r) for r in test}
        table = table_from_frame_predictions(
            test, predictions, dm.window_frames, dm.split.name, "edge_pcr"
        )
        index = {name: i for i, name in enumerate(dm.atlas.names)}
        names = test[0].parcel_names
        jobs.append(
            FittedJob(
                directory=Path(dm.split.name),
                table=table,
                runs={(r.key.subject, r.key.session, r.key.run): r for r in test},
                model=model,
                deep=False,
                regions=[int(dm.atlas.label_ids[index[n]]) for n in names],
                labels=list(names),
                atlas=dm.atlas,
                window=dm.window_frames,
                data_root=Path(dm.root),
            )
        )
    return jobs


def test_simulated_co_fluctuation_parcels_rank_top_for_the_edge_model(make_cfg):
    jobs = _fit_edge_folds(make_cfg, "01")
    results, _ = analyse_jobs(jobs, n_perm=1000, seed=0)
    res = results["edge_terms"]
    assert res.r_original > 0.3  # the pooled 1-min r of the three held-out sessions
    truth = simulated_truth(jobs[0].data_root, "01")
    coupled = {region for region, kind in truth.items() if kind == "coupled"}
    k = len(coupled)
    assert k == 3 and len(jobs[0].regions) == 12
    ranking = np.asarray(jobs[0].regions)[np.argsort(-res.importance)].tolist()
    # a random ranking puts a coupled parcel first with probability 1/4 and 0.75 of them in
    # the top 3 on average
    assert ranking[0] in coupled
    assert len(coupled & set(ranking[:k])) >= 2
    assert coupled <= set(ranking[: 2 * k])


# --------------------------------------------------------------------------- maps


def test_nifti_map_has_the_atlas_grid_and_one_value_per_parcel(tiny_root, tmp_path):
    atlas = load_atlas(
        {
            "kind": "dseg",
            "path": tiny_root / "derivatives/atlas/atlas-Sim_space-MNI152NLin2009cAsym_dseg.nii.gz",
            "labels_tsv": tiny_root / "derivatives/atlas/atlas-Sim_dseg.tsv",
        }
    )
    regions = atlas.label_ids[::-1]  # any order
    values = np.linspace(-1, 1, regions.size)
    path = maps.write_image(maps.importance_image(atlas, regions, values), tmp_path / "m.nii.gz")
    img = nib.load(path)
    assert img.shape == atlas.labels.shape
    np.testing.assert_allclose(img.affine, atlas.affine)
    data = np.asarray(img.dataobj)
    for region, value in zip(regions, values):
        np.testing.assert_allclose(data[atlas.labels == region], value, rtol=1e-6)
    assert np.all(data[atlas.labels == 0] == 0)


def test_grayordinate_map_is_a_dscalar_on_the_reference_brain_models(tmp_path):
    labels = np.repeat([0, 1, 2, 3], 5)  # 20 grayordinates, 3 parcels
    np.save(tmp_path / "labels.npy", labels)
    atlas = load_atlas({"kind": "label_vector", "path": tmp_path / "labels.npy"})
    models = nib.cifti2.BrainModelAxis.from_surface(np.arange(20), 20, "CortexLeft")
    series = nib.cifti2.SeriesAxis(0, 0.46, 3)
    nib.save(
        nib.Cifti2Image(np.zeros((3, 20), np.float32), (series, models)),
        tmp_path / "b.dtseries.nii",
    )
    with pytest.raises(ValueError, match="reference CIFTI"):
        maps.importance_image(atlas, [1, 2, 3], [0.1, 0.2, 0.3])

    img = maps.importance_image(atlas, [3, 1], [0.3, 0.1], reference=tmp_path / "b.dtseries.nii")
    path = maps.write_image(img, tmp_path / "m.dscalar.nii")
    back = nib.load(path)
    assert back.header.get_axis(1) == models
    data = np.asarray(back.dataobj)[0]
    np.testing.assert_allclose(data, np.where(labels == 3, 0.3, np.where(labels == 1, 0.1, 0.0)))


# --------------------------------------------------------------------------- deep models


class _OneRegion(torch.nn.Module):
    """A decoder that reads only the window mean of region 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x[:, 2, :].mean(-1)


def test_input_permutation_finds_the_one_region_the_model_reads():
    rng = np.random.default_rng(3)
    n_bins, per_bin, n_regions, length = 12, 5, 4, 3
    signal = np.repeat(rng.standard_normal(n_bins), per_bin)
    x = rng.standard_normal((n_bins * per_bin, n_regions, length))
    x[:, 2, :] += 2 * signal[:, None]
    windows = torch.tensor(x, dtype=torch.float32)
    frame_bin = np.repeat(np.arange(n_bins), per_bin)
    rating = signal.reshape(n_bins, per_bin).mean(1)
    session = np.repeat([0, 1], 6)
    run = np.repeat([0, 1, 2, 3], 3)
    src = hierarchical_permutations(session, run, 20, rng)
    model = _OneRegion()

    def predict(w):
        with torch.no_grad():
            return model(w).double().numpy()

    r0, drops = input_permutation_drops(predict, windows, frame_bin, rating, src)
    assert r0 > 0.9
    assert np.all(drops[[0, 1, 3]] == 0)  # inputs the model never reads cost nothing
    assert drops[2].mean() > 0.5


def test_source_frames_keep_the_relative_position_inside_a_bin():
    frame_bin = np.array([0, 0, 0, 0, 1, 1])  # bin 0: 4 frames, bin 1: 2 frames
    np.testing.assert_array_equal(source_frames(frame_bin, 2, np.array([1, 0])), [4, 4, 5, 5, 0, 2])


def test_integrated_gradients_of_a_tiny_convattn_decompose_its_prediction():
    from painnet.models.convattn import ConvAttnDecoder

    torch.manual_seed(0)
    model = ConvAttnDecoder(n_parcels=5, n_frames=8, embed_dim=16, n_heads=2, n_layers=1).eval()
    x = torch.randn(6, 5, 8)
    x[:, 3, :] = 0.0  # region 3 sits at the baseline: it gets no attribution
    attr, delta = integrated_gradients(model, x, n_steps=64)
    assert attr.shape == (6, 5)
    assert np.all(attr[:, 3] == 0)
    with torch.no_grad():
        change = (model(x) - model(torch.zeros_like(x))).double().numpy()
    np.testing.assert_allclose(attr.sum(1), change, atol=2e-2 * np.abs(change).max())
    assert np.abs(delta).max() < 2e-2 * np.abs(change).max()


# --------------------------------------------------------------------------- command line


def test_cli_maps_a_trained_tiny_edge_pcr_job(make_cfg, tiny_root, tmp_path, capsys):
    from painnet.experiments.single import run_single

    out = tmp_path / "job"
    cfg = make_cfg(
        "data=tiny", "model=edge_pcr", "logger=none", "eval.n_boot=100", "eval.plots=false"
    )
    run_single(cfg, out)
    assert main([str(out), "--n-perm", "200"]) == 0
    folder = out / "importance" / "sub-01_edge_pcr"
    table = maps.read_tsv(folder / "importance_edge_terms.tsv")
    assert list(table.columns[:7]) == [
        "region",
        "label",
        "rank",
        "importance",
        "ci_low",
        "ci_high",
        "p",
    ]
    assert len(table) == 12 and table["importance"].is_monotonic_decreasing
    assert set(table["truth"].fillna("")) == {"coupled", "activation", ""}
    assert (folder / "importance_edge_terms.nii.gz").is_file()
    assert (folder / "importance_edge_terms.png").is_file()
    assert (folder / "importance_edge_terms_vs_truth.png").is_file()  # simulated: truth beside
    assert "importance_edge_terms" not in capsys.readouterr().err

    # the same analysis as an experiment step, built from its config
    step = instantiate(
        {"_target_": "painnet.analysis.importance.ImportanceStep", "n_perm": 50, "plots": False}
    )
    (group,) = step(out)
    assert group.results["edge_terms"].n_perm == 50
    summary = pd.read_json(folder / "summary.json", typ="series")
    assert summary["methods"]["edge_terms"]["n_perm"] == 50


def test_cli_maps_a_tiny_convattn_job_by_input_permutation_and_integrated_gradients(
    make_cfg, tiny_root, tmp_path
):
    from painnet.experiments.single import run_single

    out = tmp_path / "job"
    cfg = make_cfg(
        "data=tiny",
        "model=convattn",
        "logger=none",
        "trainer.max_epochs=1",
        "eval.n_boot=100",
        "eval.plots=false",
    )
    run_single(cfg, out)
    args = [str(out), "--n-perm", "100", "--n-perm-inputs", "2", "--ig-steps", "8"]
    assert main([*args, "--frame-stride", "3", "--device", "cpu", "--no-plots"]) == 0
    folder = out / "importance" / "sub-01_convattn"
    for method in ("input_permutation", "integrated_gradients"):
        table = maps.read_tsv(folder / f"importance_{method}.tsv")
        assert len(table) == 12 and np.isfinite(table["importance"]).all()
        assert (folder / f"importance_{method}.nii.gz").is_file()
    ig = maps.read_tsv(folder / "importance_integrated_gradients.tsv")
    assert (ig["mean_abs_attribution"] > 0).all()


def test_cli_names_a_folder_without_jobs(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
