"""benchmarks/decoders.py's report and the results it is rendered from
(benchmarks/decoder_results.py): every loop time says where it ran, a run updates only its own
rows, and rows of runs on different frames are never mixed."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from benchmarks import decoder_results as results
from benchmarks import decoders


def test_a_loop_without_a_gpu_trainer_is_timed_on_this_machines_cpu_cores():
    expected = f"{os.cpu_count()} CPU cores"
    assert decoders.where_it_ran([]) == expected
    assert decoders.where_it_ran(["model.n_jobs=2", "trainer.max_epochs=3"]) == expected


def test_a_gpu_loop_names_the_gpu_or_says_none_was_found(monkeypatch):
    monkeypatch.setattr(decoders, "gpu_name", lambda: None)  # as nvidia-smi answers without one
    assert decoders.where_it_ran(["trainer=gpu"]) == f"no GPU found, {os.cpu_count()} CPU cores"
    monkeypatch.setattr(decoders, "gpu_name", lambda: "NVIDIA H200")
    for override in ("trainer=gpu", "trainer.accelerator=gpu"):
        assert decoders.where_it_ran([override]).startswith("NVIDIA H200, ")


def _run_folder(tmp_path, variant, models, edge_r=0.4, timings=None):
    """An ``--out`` folder as a loop leaves it: the variant's aggregate and timings.json."""
    aggregate = tmp_path / variant / "aggregate"
    aggregate.mkdir(parents=True)
    r = {"edge_pcr": edge_r, "convattn": 0.1, "stack": 0.5, "convattn_ft-all": 0.2}
    pd.DataFrame(
        [
            {"subject": s, "model": m, **{k: r[m] for k in results.METRICS}}
            for s in ("01", "02")
            for m in models
        ]
    ).to_csv(aggregate / "within_subject.csv", index=False)
    pd.DataFrame(
        [
            {
                "subject": s,
                "bin_size": "1min",
                "metric": "r",
                "model_a": "edge_pcr",
                "model_b": m,
                "diff": edge_r - r[m],
                "p": 0.0001 if m == "stack" else 0.2,
            }
            for s in ("01", "02")
            for m in models
            if m != "edge_pcr"
        ]
    ).to_csv(aggregate / "comparison.csv", index=False)
    (tmp_path / "timings.json").write_text(json.dumps({variant: timings or {}}))
    return tmp_path


def test_the_report_shows_each_row_with_its_difference_from_edge_pcr_and_where_loops_ran(
    tmp_path,
):
    timings = {
        "edge_pcr": {"wall_s": 65.3, "cpu_s": 49.8, "jobs": 16},  # recorded before "where"
        "convattn": {"wall_s": 197.0, "cpu_s": 195.0, "jobs": 16, "where": "NVIDIA H200"},
    }
    out = _run_folder(tmp_path / "out", "demo", ["edge_pcr", "convattn"], timings=timings)
    metrics, timing_rows = results.update(
        *decoders.collect(out, ["demo"]), "edge_pcr", tmp_path / "store"
    )
    report = decoders.render(metrics, timing_rows)
    assert "| model | loop wall (s) | loop CPU (s) | jobs | where |" in report
    assert "| convattn | 197 | 195 | 16 | NVIDIA H200 |" in report
    assert "| edge_pcr | 65 | 50 | 16 | – |" in report
    # Δ = convattn − edge_pcr, read off the comparison whichever way round it was written
    assert "| 01 | convattn | 0.10 | 0.10 | 0.10 | 0.10 | 0.10 | 0.10 | 0.10 | -0.30 | 0.200 |" in (
        report
    )
    assert "| 01 | edge_pcr | 0.40 |" in report and "| – | – |" in report
    assert "--variants demo --models edge_pcr convattn`" in report


def test_a_p_below_the_bootstraps_resolution_reads_as_below_one_in_a_thousand(tmp_path):
    out = _run_folder(tmp_path / "out", "demo", ["edge_pcr", "stack"])
    metrics, timings = results.update(
        *decoders.collect(out, ["demo"]), "edge_pcr", tmp_path / "store"
    )
    assert "| 0.10 | < 0.001 |" in decoders.render(metrics, timings)


def test_a_later_run_replaces_only_its_own_rows_and_keeps_the_others(tmp_path):
    store = tmp_path / "store"
    first = _run_folder(tmp_path / "a", "demo", ["edge_pcr", "convattn"])
    results.update(*decoders.collect(first, ["demo"]), "edge_pcr", store)
    later = _run_folder(
        tmp_path / "b",
        "demo",
        ["edge_pcr", "convattn_ft-all"],
        timings={"convattn_ft": {"wall_s": 10.0, "cpu_s": 9.0, "jobs": 16, "where": "x"}},
    )
    metrics, timings = results.update(*decoders.collect(later, ["demo"]), "edge_pcr", store)
    assert sorted(metrics["model"].unique()) == ["convattn", "convattn_ft-all", "edge_pcr"]
    assert len(metrics) == 6  # 3 models x 2 participants, edge_pcr not duplicated
    assert list(timings["model"]) == ["convattn_ft"]
    # and the files on disk say the same
    assert len(results.load_metrics(store)) == 6


def test_rows_scored_on_other_frames_are_refused_and_nothing_is_written(tmp_path):
    store = tmp_path / "store"
    first = _run_folder(tmp_path / "a", "demo", ["edge_pcr", "convattn"])
    results.update(*decoders.collect(first, ["demo"]), "edge_pcr", store)
    before = (store / "metrics.csv").read_text()
    other = _run_folder(tmp_path / "b", "demo", ["edge_pcr", "stack"], edge_r=0.3)
    with pytest.raises(results.ResultsMismatch, match="variant demo, participant 01: edge_pcr"):
        results.update(*decoders.collect(other, ["demo"]), "edge_pcr", store)
    assert (store / "metrics.csv").read_text() == before


def test_a_run_without_the_reference_cannot_join_a_stored_variant_but_can_start_a_new_one(
    tmp_path,
):
    store = tmp_path / "store"
    first = _run_folder(tmp_path / "a", "demo", ["edge_pcr", "convattn"])
    results.update(*decoders.collect(first, ["demo"]), "edge_pcr", store)
    alone = _run_folder(tmp_path / "b", "demo", ["stack"])
    with pytest.raises(results.ResultsMismatch, match="run it with --models edge_pcr"):
        results.update(*decoders.collect(alone, ["demo"]), "edge_pcr", store)
    fresh = _run_folder(tmp_path / "c", "var_both", ["stack"])
    metrics, _ = results.update(*decoders.collect(fresh, ["var_both"]), "edge_pcr", store)
    assert set(metrics["variant"]) == {"demo", "var_both"}


def test_the_committed_results_render_every_variant_of_the_report():
    metrics, timings = results.load_metrics(), results.load_timings()
    report = decoders.render(metrics, timings)
    for variant in set(metrics["variant"]):
        assert variant in decoders.VARIANTS
        assert f"## {variant}\n" in report
    for _, row in metrics.iterrows():
        assert f"| {row['subject']} | {row['model']} | " in report


def test_the_command_line_keeps_a_runs_rows_and_renders_the_report_from_them(tmp_path):
    out = _run_folder(tmp_path / "out", "demo", ["edge_pcr", "convattn"])
    store, report = tmp_path / "store", tmp_path / "decoders.md"
    args = ["--report-only", "--variants", "demo", "--out", str(out)]
    assert decoders.main([*args, "--results", str(store), "--markdown", str(report)]) == 0
    assert len(results.load_metrics(store)) == 4
    assert "| 02 | convattn | 0.10 |" in report.read_text()


def test_rows_read_off_a_stack_job_replace_the_variants_older_derived_rows_as_a_set(tmp_path):
    store = tmp_path / "store"
    old = _run_folder(tmp_path / "a", "demo", ["edge_pcr", "stack"])
    metrics, timings = decoders.collect(old, ["demo"])
    retired = metrics[metrics["model"] == "stack"].assign(model="stack_retired_mode")
    results.update(pd.concat([metrics, retired]), timings, "edge_pcr", store)
    again = _run_folder(tmp_path / "b", "demo", ["edge_pcr", "stack"])
    rerun = decoders.collect(again, ["demo"])[0]
    derived = rerun[rerun["model"] == "stack"].assign(model="stack_centered")
    kept, _ = results.update(
        pd.concat([rerun, derived]),
        timings,
        "edge_pcr",
        store,
        superseded=lambda t: t["model"].map(decoders.is_derived),
    )
    assert "stack_retired_mode" not in set(kept["model"])  # no longer a derived row
    assert {"stack", "stack_centered", "edge_pcr"} <= set(kept["model"])


def test_a_reference_metric_undefined_in_one_run_only_is_a_mismatch(tmp_path):
    store = tmp_path / "store"
    first = _run_folder(tmp_path / "a", "demo", ["edge_pcr", "convattn"])
    metrics, timings = decoders.collect(first, ["demo"])
    metrics.loc[metrics["model"] == "edge_pcr", "r_session"] = float("nan")
    results.update(metrics, timings, "edge_pcr", store)
    again = _run_folder(tmp_path / "b", "demo", ["edge_pcr", "stack"])
    with pytest.raises(results.ResultsMismatch, match="edge_pcr r_session is 0.4000 in this run"):
        results.update(*decoders.collect(again, ["demo"]), "edge_pcr", store)


def test_a_shard_of_participants_passes_its_labels_to_the_loop_as_strings(make_cfg):
    override = decoders.subjects_override(["01", "02"])
    cfg = make_cfg("experiment=within_subject", "data=demo", override)
    assert list(cfg.study.subjects) == ["01", "02"]


def test_shards_of_a_loop_keep_a_time_each_and_a_whole_loop_replaces_them(tmp_path):
    store = tmp_path / "store"
    whole = _run_folder(
        tmp_path / "a",
        "demo",
        ["edge_pcr", "convattn"],
        timings={"convattn": {"wall_s": 100.0, "cpu_s": 90.0, "jobs": 16, "where": "x"}},
    )
    results.update(*decoders.collect(whole, ["demo"]), "edge_pcr", store)
    for subject, wall in (("01", 40.0), ("02", 50.0)):
        shard = _run_folder(
            tmp_path / f"shard{subject}",
            "demo",
            ["edge_pcr", "convattn"],
            timings={
                "convattn": {
                    "wall_s": wall,
                    "cpu_s": wall,
                    "jobs": 8,
                    "where": "x",
                    "subjects": subject,
                }
            },
        )
        metrics, timings = results.update(*decoders.collect(shard, ["demo"]), "edge_pcr", store)
    # the whole loop's time went with the first shard that re-ran part of it
    assert list(timings["subjects"]) == ["01", "02"]
    report = decoders.render(metrics, timings)
    assert "| convattn (participant 01) | 40 | 40 | 8 | x |" in report
    assert "| convattn (participant 02) | 50 | 50 | 8 | x |" in report
    again = _run_folder(
        tmp_path / "b",
        "demo",
        ["edge_pcr", "convattn"],
        timings={"convattn": {"wall_s": 80.0, "cpu_s": 80.0, "jobs": 16, "where": "x"}},
    )
    _, timings = results.update(*decoders.collect(again, ["demo"]), "edge_pcr", store)
    assert list(timings["subjects"]) == [results.ALL]


def test_timings_kept_before_loops_could_be_sharded_read_as_whole_loops(tmp_path):
    (tmp_path / "timings.csv").write_text(
        "variant,model,wall_s,cpu_s,jobs,where\ndemo,ridge,1,1,16,x\n"
    )
    assert list(results.load_timings(tmp_path)["subjects"]) == [results.ALL]


def test_participants_given_twice_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        decoders.main(["--subjects", "01", "--out", str(tmp_path), "study.subjects=[02]"])
