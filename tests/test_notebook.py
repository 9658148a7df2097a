"""notebooks/walkthrough.ipynb runs top to bottom on the tiny dataset and shows its plots."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pandas as pd
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_executes_and_writes_into_its_folder(
    tmp_path, data_dir, cache_dir, monkeypatch
):
    out = tmp_path / "walkthrough"
    # The kernel inherits this environment: data/cache are the test session's, outputs tmp_path.
    monkeypatch.setenv("PAINNET_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PAINNET_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("PAINNET_WALKTHROUGH_DIR", str(out))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # The kernel starts in tmp_path: make the repository's package importable from there.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell

    images = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 5  # rating trace, time course, comparison, scatter, learning curve
    within = pd.read_csv(out / "within" / "aggregate" / "within_subject.csv")
    assert len(within) == 4 and (within.n_sessions == 3).all()
    assert (out / "data_size" / "aggregate" / "data_size_summary.csv").is_file()
    assert not (tmp_path / "outputs").exists()  # nothing written outside the given folder
