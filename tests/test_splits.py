"""Splits are by session: no session ever plays two roles, and draws are reproducible."""

import itertools

import pytest

from painnet.data.splits import (
    Split,
    cross_subject_split,
    data_size_split,
    loso_split,
    make_split,
    splitter,
)

SESSIONS = {"01": [f"{i:02d}" for i in range(1, 9)], "02": [f"{i:02d}" for i in range(1, 7)]}


def roles_are_disjoint(split: Split) -> bool:
    train, val, test = set(split.train), set(split.val), set(split.test)
    return not (train & val or train & test or val & test)


def test_loso_folds_hold_out_each_session_once():
    held_out = []
    for fold in range(8):
        split = loso_split(SESSIONS, "01", fold, n_val=2, seed=3)
        assert roles_are_disjoint(split)
        assert len(split.test) == 1 and len(split.val) == 2 and len(split.train) == 5
        assert {s for s, _ in split.train + split.val + split.test} == {"01"}
        held_out.append(split.test[0])
    assert sorted(held_out) == [("01", s) for s in SESSIONS["01"]]


def test_loso_is_reproducible_and_seed_dependent():
    assert loso_split(SESSIONS, "01", 2, seed=1) == loso_split(SESSIONS, "01", 2, seed=1)
    vals = {loso_split(SESSIONS, "01", 2, seed=s).val for s in range(10)}
    assert len(vals) > 1


def test_cross_subject_tests_every_session_of_the_other_participant():
    split = cross_subject_split(SESSIONS, ["01"], ["02"])
    assert roles_are_disjoint(split)
    assert set(split.test) == {("02", s) for s in SESSIONS["02"]}
    assert {s for s, _ in split.train + split.val} == {"01"}
    with pytest.raises(ValueError, match="both train and test"):
        cross_subject_split(SESSIONS, ["01"], ["01"])


def test_data_size_subsets_stay_inside_the_fold():
    for n, rep in itertools.product(range(1, 7), range(3)):
        split = data_size_split(SESSIONS, "01", fold=0, n_train=n, repeat=rep)
        assert roles_are_disjoint(split)
        assert len(split.train) == n
        assert split.test == (("01", "01"),)
    first = data_size_split(SESSIONS, "01", fold=0, n_train=3, mode="first")
    assert first.train == (("01", "02"), ("01", "03"), ("01", "04"))
    with pytest.raises(ValueError, match="impossible"):
        data_size_split(SESSIONS, "01", fold=0, n_train=7)


def test_a_session_in_two_roles_is_rejected():
    with pytest.raises(ValueError, match="both train and test"):
        Split("bad", train=(("01", "01"),), val=(), test=(("01", "01"),))


def test_make_split_builds_the_target_object_of_a_split_config():
    loso = {"_target_": "painnet.data.splits.LeaveOneSessionOut", "subject": "sub-02", "fold": 1}
    split = make_split({**loso, "n_val": 1}, SESSIONS)
    assert split.test == (("02", "02"),)
    assert splitter(loso).kind == "loso"
    with pytest.raises(ValueError, match="_target_"):
        make_split({"kind": "loso"}, SESSIONS)


@pytest.mark.parametrize("name", ["loso", "cross_subject", "data_size"])
def test_every_split_config_composes_into_a_split(make_cfg, name):
    cfg = make_cfg(f"split={name}")
    split = make_split(cfg.split, SESSIONS)
    assert roles_are_disjoint(split) and split.train and split.test
    assert splitter(cfg.split).kind == name


def test_a_cross_subject_split_without_a_test_participant_is_an_error():
    one = {"01": SESSIONS["01"]}
    config = {"_target_": "painnet.data.splits.CrossSubject", "train_subjects": ["01"]}
    with pytest.raises(ValueError, match="split.test_subjects.*at least 2 participants"):
        make_split(config, one)
