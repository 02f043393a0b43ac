"""Identities of the build: metadata x VGGFace, the A–E split, name validation, shard plans."""

from __future__ import annotations

import pytest

from v2m_bench.errors import ValidationError
from v2m_data.identities import (
    job_shards,
    plan_shards,
    safe_key,
    select_identities,
    validate_component,
    vggface_names,
)


def test_shared_metadata_counts(shared_dir):
    meta = shared_dir / "data" / "vox1_meta.csv"
    table = select_identities(meta)
    c = table.counts
    assert (c["meta"], c["candidates"], c["test"], c["train"]) == (1251, 1251, 309, 942)
    assert table.check.ok, table.check.differences
    test = table.by_split("test")
    assert test[0].vox_id == "id10001" and test[-1].vox_id == "id10309"
    assert all(i.split == "train" for i in table.identities if i.vox_id > "id10309")
    assert "matches the frozen A–E split" in table.summary()


def test_shared_metadata_intersected_with_vggface_files(shared_dir):
    names = vggface_names(shared_dir / "data" / "vggface" / "files")
    assert len(names) == 6
    table = select_identities(shared_dir / "data" / "vox1_meta.csv", names)
    assert table.counts["candidates"] == 6
    assert len(table.not_in_vggface) == 1245
    assert {i.name for i in table.identities} == names
    assert not table.check.ok and "1245 without VGGFace data" in table.summary()


@pytest.mark.parametrize(
    "bad",
    ["..", ".", "../etc", "a/b", "a\\b", "/abs", "x\x00y", "tab\there", ".hidden", " lead", "trail ", "", "é" * 200],
)
def test_validate_component_refuses_traversal_and_odd_names(bad):
    with pytest.raises(ValidationError, match="refusing to use it as a file name"):
        validate_component(bad)


@pytest.mark.parametrize("good", ["A.J._Buckley", "Zoë_Kravitz", "id10001", "Jean-Claude_Van_Damme", "O'Brien"])
def test_validate_component_accepts_real_names(good):
    assert validate_component(good) == good


def test_safe_key_is_ascii_unique_and_stable():
    assert safe_key("A.J._Buckley") == "A.J._Buckley"
    k1, k2 = safe_key("Zoë_Kravitz"), safe_key("Zoe_Kravitz")
    assert k2 == "Zoe_Kravitz" and k1 != k2
    assert k1.startswith("Zoe_Kravitz-") and k1.isascii()
    assert safe_key("O'Brien") != safe_key("O_Brien")
    assert safe_key("Zoë_Kravitz") == k1  # deterministic
    with pytest.raises(ValidationError):
        safe_key("../x")


def _write_meta(path, rows, sep="\t", quote=False):
    q = (lambda s: f'"{s}"') if quote else (lambda s: s)
    lines = [sep.join(q(c) for c in ("VoxCeleb1 ID", "VGGFace1 ID", "Gender", "Nationality", "Set"))]
    lines += [sep.join(q(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


ROWS = [
    ("id10003", "Carla_Gugino", "f", "USA", "dev"),
    ("id10001", "Abe_Vigoda", "m", "USA", "dev"),
    ("id10002", "../../etc", "m", "USA", "dev"),
    ("id10004", "Gina/Evil", "f", "USA", "dev"),
    ("id10005", "Hugh_Laurie", "m", "UK", "dev"),
    ("../id10006", "Ian_Holm", "m", "UK", "dev"),
    ("id10007", "Zed_Missing", "m", "UK", "dev"),
]


@pytest.mark.parametrize("sep,quote", [("\t", False), (",", True), (",", False)])
def test_select_identities_rejects_unsafe_rows_and_intersects(tmp_path, sep, quote):
    meta = tmp_path / "meta.csv"
    _write_meta(meta, ROWS, sep, quote)
    vgg = tmp_path / "vgg"
    (vgg / "files").mkdir(parents=True)
    for n in ("Carla_Gugino", "Abe_Vigoda"):
        (vgg / "files" / f"{n}.txt").write_text("")
    (vgg / "images" / "Hugh_Laurie").mkdir(parents=True)
    (vgg / "images" / "Ian_Holm").mkdir(parents=True)
    names = vggface_names(vgg / "files", vgg / "images")
    assert names == {"Carla_Gugino", "Abe_Vigoda", "Hugh_Laurie", "Ian_Holm"}
    table = select_identities(meta, names)
    assert [i.vox_id for i in table.identities] == ["id10001", "id10003", "id10005"]
    assert [i.split for i in table.identities] == ["test", "test", "train"]
    assert table.identities[0].gender == "m"
    rejected = {r["vox_id"]: r["reason"] for r in table.rejected}
    assert set(rejected) == {"id10002", "id10004", "../id10006"}
    assert "path separator" in rejected["id10004"] and "VGGFace1 ID" in rejected["id10002"]
    assert "VoxCeleb1 ID" in rejected["../id10006"]
    assert table.not_in_vggface == ["Zed_Missing"]
    limited = select_identities(meta, names, limit=2)
    assert [i.vox_id for i in limited.identities] == ["id10001", "id10003"] and limited.limited
    assert limited.check.n_total == 3  # the check sees the candidates before the limit


def test_select_identities_missing_or_bad_metadata(tmp_path):
    with pytest.raises(ValidationError, match="no such metadata file"):
        select_identities(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,whatever\nx,y\n")
    with pytest.raises(ValidationError, match="missing column"):
        select_identities(bad)


def test_plan_shards_and_job_partition(tmp_path):
    meta = tmp_path / "meta.csv"
    rows = [(f"id{10001 + i}", f"{'ABF'[i % 3]}name_{i:02d}", "m", "X", "dev") for i in range(11)]
    _write_meta(meta, rows)
    ids = select_identities(meta).identities
    plan = plan_shards(ids, 2)
    test = [s for s in plan if s.split == "test"]
    train = [s for s in plan if s.split == "train"]
    assert [s.name for s in test] == ["test-00000", "test-00001", "test-00002", "test-00003"]
    assert [len(s.identities) for s in test] == [2, 2, 2, 2]
    assert [len(s.identities) for s in train] == [2, 1]
    assert [s.number for s in plan] == list(range(6))
    flat = [i.vox_id for s in test for i in s.identities]
    assert flat == sorted(flat)
    assert plan_shards(list(reversed(ids)), 2) == plan  # order of the input does not matter
    parts = [job_shards(plan, j, 4) for j in range(4)]
    assert sorted(s.number for p in parts for s in p) == list(range(6))
    assert [s.number for s in parts[1]] == [1, 5]
    with pytest.raises(ValidationError):
        job_shards(plan, 4, 4)
