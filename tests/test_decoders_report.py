"""benchmarks/decoders.py's report: every loop time says where it ran."""

from __future__ import annotations

import json
import os

import pandas as pd

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


def test_the_timing_table_shows_where_each_loop_ran_and_a_dash_when_it_was_not_recorded(
    tmp_path,
):
    aggregate = tmp_path / "demo" / "aggregate"
    aggregate.mkdir(parents=True)
    pd.DataFrame(
        {"subject": ["01", "01"], "model": ["edge_pcr", "convattn"], "r_1min": [0.4, 0.1]}
    ).to_csv(aggregate / "within_subject.csv", index=False)
    timings = {
        "demo": {
            "edge_pcr": {"wall_s": 65.3, "cpu_s": 49.8, "jobs": 16},  # recorded before "where"
            "convattn": {"wall_s": 197.0, "cpu_s": 195.0, "jobs": 16, "where": "NVIDIA H200"},
        }
    }
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    report = decoders.render(tmp_path, "python -m benchmarks.decoders --variants demo")
    assert "| model | loop wall (s) | loop CPU (s) | jobs | where |" in report
    assert "| convattn | 197 | 195 | 16 | NVIDIA H200 |" in report
    assert "| edge_pcr | 65 | 50 | 16 | – |" in report
    assert "| 01 | convattn | 0.10 |" in report
