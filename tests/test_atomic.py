"""painnet.atomic: a file is replaced whole or not at all, and a failed write leaves no trace."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pandas as pd
import pytest

from painnet.atomic import (
    atomic_path,
    write_bytes_atomic,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from painnet.experiments import jobdir


class Boom(Exception):
    pass


def entries(folder):
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- whole or nothing


def test_a_write_creates_the_target_with_its_whole_content_and_nothing_else(tmp_path):
    target = tmp_path / "model.pkl"
    assert write_bytes_atomic(target, b"x" * 100_000) == target
    assert target.read_bytes() == b"x" * 100_000
    assert entries(tmp_path) == ["model.pkl"]


def test_the_target_keeps_its_old_content_until_the_write_has_finished(tmp_path):
    target = tmp_path / "DONE.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        assert target.read_text() == "old"
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert entries(tmp_path) == ["DONE.json"]


def test_a_reader_sees_the_old_or_the_new_file_never_a_part(tmp_path):
    target = tmp_path / "table.tsv"
    versions = [b"a" * 1_000_000, b"b" * 1_000_000]
    write_bytes_atomic(target, versions[0])
    seen, done = set(), threading.Event()

    def read():
        while not done.is_set():
            seen.add(target.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            write_bytes_atomic(target, versions[i % 2])
    finally:
        done.set()
        reader.join()
    assert seen <= set(versions)


# --------------------------------------------------------------------------- failed writes


def test_an_exception_mid_write_keeps_the_previous_content_and_removes_the_temporary(tmp_path):
    target = tmp_path / "predictions.csv"
    target.write_text("previous")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise Boom
    assert target.read_text() == "previous"
    assert entries(tmp_path) == ["predictions.csv"]


def test_an_interrupt_mid_write_is_cleaned_up_too(tmp_path):
    target = tmp_path / "best.yaml"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert entries(tmp_path) == []


def test_a_failed_first_write_creates_no_target(tmp_path):
    class Table:  # a table whose rows fail half-way through
        def to_csv(self, path, **kwargs):
            path.write_text("half a row")
            raise Boom

    with pytest.raises(Boom):
        write_csv_atomic(tmp_path / "qc.tsv", Table(), sep="\t")
    assert entries(tmp_path) == []


def test_json_that_cannot_be_written_leaves_the_old_file(tmp_path):
    target = tmp_path / "DONE.json"
    target.write_text("{}")
    with pytest.raises(ValueError):
        write_json_atomic(target, {"r": float("nan")})
    assert target.read_text() == "{}"
    assert entries(tmp_path) == ["DONE.json"]


# --------------------------------------------------------------------------- the temporary


@pytest.mark.parametrize(
    ("name", "suffixes"),
    [("map.nii.gz", ".nii.gz"), ("plot.png", ".png"), ("report", ""), (".lock", "")],
)
def test_the_temporary_is_hidden_next_to_the_target_and_keeps_its_suffixes(
    tmp_path, name, suffixes
):
    target = tmp_path / name
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(f".{name}.tmp-{os.getpid()}-")
        assert tmp.name.endswith(suffixes)
        assert "".join(tmp.suffixes).endswith(suffixes)
        assert tmp.is_file() and tmp.stat().st_size == 0  # created, empty, ours alone
        tmp.write_text("x")


def test_suffix_aware_writers_write_the_targets_format(tmp_path):
    """nibabel picks gzip from ``.gz``: the temporary must carry it."""
    nib = pytest.importorskip("nibabel")
    target = tmp_path / "map.nii.gz"
    with atomic_path(target) as tmp:
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp)
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    assert nib.load(target).shape == (2, 2, 2)


def test_two_writers_of_one_target_get_different_temporaries(tmp_path):
    target = tmp_path / "DONE.json"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the last to finish wins, whole


def test_the_file_gets_the_permissions_open_would_give(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    target = write_text_atomic(tmp_path / "job.yaml", "a: 1\n")
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_missing_folder_is_an_error_unless_mkdir_is_asked(tmp_path):
    target = tmp_path / "new" / "sub" / "summary.json"
    with pytest.raises(FileNotFoundError):
        write_text_atomic(target, "{}")
    assert not (tmp_path / "new").exists()
    write_text_atomic(target, "{}", mkdir=True)
    assert target.read_text() == "{}"


# --------------------------------------------------------------------------- formats


def test_text_is_written_as_utf8_exactly(tmp_path):
    target = write_text_atomic(tmp_path / "runs.tsv", "subject\tlabel\n01\tInsula ñ\n")
    assert target.read_bytes() == "subject\tlabel\n01\tInsula ñ\n".encode()


def test_json_is_one_space_indented_without_a_trailing_newline(tmp_path):
    target = write_json_atomic(tmp_path / "DONE.json", {"model": "ridge", "r": [0.5, 1]})
    assert target.read_text() == '{\n "model": "ridge",\n "r": [\n  0.5,\n  1\n ]\n}'


def test_jobdir_json_keeps_its_format_and_converts_numpy_and_nan(tmp_path):
    target = tmp_path / "DONE.json"
    record = {"r": np.float32(0.5), "folds": np.arange(2), "missing": float("nan"), 3: (1,)}
    jobdir.write_json_atomic(target, record)
    text = target.read_text()
    expected = '{\n "r": 0.5,\n "folds": [\n  0,\n  1\n ],\n "missing": null,\n "3": [\n  1\n ]\n}'
    assert text == expected
    assert json.loads(text) == {"r": 0.5, "folds": [0, 1], "missing": None, "3": [1]}
    assert entries(tmp_path) == ["DONE.json"]


def test_a_table_is_written_without_its_index_unless_asked(tmp_path):
    table = pd.DataFrame({"run": ["01", "02"], "kept": [10, 12]})
    target = write_csv_atomic(tmp_path / "qc.tsv", table, sep="\t")
    assert target.read_text() == "run\tkept\n01\t10\n02\t12\n"
    write_csv_atomic(target, table, index=True)
    assert target.read_text() == ",run,kept\n0,01,10\n1,02,12\n"
