"""The A–E split: rule, hashing, metadata reading and the frozen counts/hashes."""

from __future__ import annotations

import hashlib

import pytest

from v2m_bench.errors import ValidationError
from v2m_bench.split import (
    EXPECTED_TEST_COUNT,
    EXPECTED_TRAIN_COUNT,
    TEST_NAMES_SHA256,
    TRAIN_NAMES_SHA256,
    check_metadata,
    names_hash,
    read_vox1_meta,
    split_names,
    split_of,
)


@pytest.mark.parametrize(
    "name,split",
    [
        ("A.J._Buckley", "test"),
        ("Eva_Longoria", "test"),
        ("eve", "test"),  # case-insensitive
        ("Élodie_Bouchez", "test"),  # accented E is E
        ("_Dee", "test"),  # first alphabetic character
        ("Fred", "train"),
        ("f", "train"),
        ("Zoe_Saldana", "train"),
    ],
)
def test_split_of(name, split):
    assert split_of(name) == split


def test_split_of_refuses_names_without_letters():
    with pytest.raises(ValidationError, match="has no letter"):
        split_of("2 3")


def test_split_names_partitions_and_sorts():
    test, train = split_names(["Zed", "Bea", "abe", "Fay", "Eli", "Moe"])
    assert test == ["Bea", "Eli", "abe"]  # Python sort: upper case before lower case
    assert train == ["Fay", "Moe", "Zed"]


def test_names_hash_definition():
    expected = hashlib.sha256(b"Abe\nBea\n").hexdigest()
    assert names_hash(["Bea", "Abe"]) == expected == names_hash(("Abe", "Bea"))
    assert names_hash(["Abe", "Bea", "Cid"]) != expected


def test_read_comma_separated_quoted_variant(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text(
        '"VoxCeleb1 ID", "VGGFace1  ID" ,"gender","Nationality","Set"\n'
        '"id10001", "A.J._Buckley", "m", "Ireland", "dev"\n'
        'id10002,"Smith, Jr._Will",m,USA,test\n'
        "\n"
        'id10003 , Fay ,f,UK,dev\n'
    )
    df = read_vox1_meta(path)
    assert list(df.columns) == ["VoxCeleb1 ID", "VGGFace1 ID", "Gender", "Nationality", "Set"]
    assert df["VGGFace1 ID"].tolist() == ["A.J._Buckley", "Smith, Jr._Will", "Fay"]
    assert df["VoxCeleb1 ID"].tolist() == ["id10001", "id10002", "id10003"]
    assert df["Gender"].tolist() == ["m", "m", "f"]


def test_read_tab_separated_and_errors(tmp_path):
    path = tmp_path / "meta.tsv"
    path.write_text("VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet\nid10001\tAbe\tm\tX\tdev\nid10002\tFay\tf\tY\tdev\n")
    df = read_vox1_meta(path)
    assert df.shape == (2, 5) and df["VGGFace1 ID"].tolist() == ["Abe", "Fay"]
    bad = tmp_path / "bad.csv"
    bad.write_text("VoxCeleb1 ID,Name,Gender\nid10001,Abe,m\n")
    with pytest.raises(ValidationError, match=r"bad\.csv: VGGFace1 ID: missing column \(found 'VoxCeleb1 ID', 'Name', 'Gender'"):
        read_vox1_meta(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text("VoxCeleb1 ID,VGGFace1 ID,Gender\nid10001,Abe,m\nid10002,Abe,m\n")
    with pytest.raises(ValidationError, match=r"dup\.csv: VGGFace1 ID: repeated value 'Abe'"):
        read_vox1_meta(dup)
    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    with pytest.raises(ValidationError, match="empty file"):
        read_vox1_meta(empty)


def test_check_metadata_reports_differences():
    check = check_metadata(["Abe", "Bea", "Fay"])
    assert (check.n_total, check.n_test, check.n_train) == (3, 2, 1)
    assert not check.ok and not check.counts_ok and not check.test_hash_ok
    assert check.test_hash == names_hash(["Abe", "Bea"])
    assert "2 A–E (test) identities, expected 309 (-307)" in check.differences
    assert any(d.startswith("A–E name list differs") for d in check.differences)


# --------------------------------------------------------------------------- the real metadata
def test_real_metadata_matches_frozen_split(shared_dir):
    path = shared_dir / "data" / "vox1_meta.csv"
    df = read_vox1_meta(path)
    assert len(df) == 1251
    check = check_metadata(path)
    assert (check.n_test, check.n_train) == (EXPECTED_TEST_COUNT, EXPECTED_TRAIN_COUNT) == (309, 942)
    assert check.test_hash == TEST_NAMES_SHA256 and check.train_hash == TRAIN_NAMES_SHA256
    assert check.ok and check.differences == [] and "matches the frozen A–E split" in str(check)
    test_ids = sorted(df.loc[[split_of(n) == "test" for n in df["VGGFace1 ID"]], "VoxCeleb1 ID"])
    assert test_ids[0] == "id10001" and test_ids[-1] == "id10309" and len(test_ids) == 309


def test_real_metadata_with_a_row_dropped_is_flagged(shared_dir):
    df = read_vox1_meta(shared_dir / "data" / "vox1_meta.csv")
    check = check_metadata(df.drop(index=5))
    assert not check.ok and check.n_test == 308 and check.train_hash_ok and not check.test_hash_ok
    assert "308 A–E (test) identities, expected 309 (-1)" in check.differences
