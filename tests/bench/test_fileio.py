"""The shared file plumbing: atomic, link-safe writes and hashes."""

import hashlib
import os
import stat

import pytest

from v2m_bench import fileio
from v2m_bench.errors import ValidationError


def test_write_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    fileio.write_text(target, "first")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary left


def test_temp_names_are_unpredictable_and_exclusive(tmp_path):
    names = set()
    for _ in range(3):
        with fileio.atomic_path(tmp_path / "a.h5") as tmp:
            names.add(tmp.name)
            assert tmp.exists() and tmp.parent == tmp_path
    assert len(names) == 3


def test_a_link_at_the_destination_is_refused_and_its_target_untouched(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "report.html"
    link.symlink_to(outside)
    with pytest.raises(ValidationError, match="symbolic link"):
        fileio.write_text(link, "overwrite")
    assert outside.read_text() == "precious"
    assert link.is_symlink()
    with pytest.raises(ValidationError, match="symbolic link"):
        fileio.open_exclusive(link)
    assert outside.read_text() == "precious"


def test_permissions_follow_the_umask(tmp_path):
    p = fileio.write_bytes(tmp_path / "x.bin", b"1")
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode & 0o600 == 0o600 and not mode & 0o002


def test_hashes_match_hashlib(tmp_path):
    data = os.urandom(3 << 20)
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    assert fileio.sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert fileio.md5_file(p) == hashlib.md5(data).hexdigest()


def test_progress_is_silent_when_disabled():
    bar = fileio.progress(range(3), enabled=False)
    assert list(bar) == [0, 1, 2]
    bar.update(1)
    bar.close()


def test_a_silent_bar_still_prints_lines_like_tqdm_write(capsys):
    fileio.progress(total=3, enabled=False).write("[supervised 2] loss 0.5")
    assert capsys.readouterr().out == "[supervised 2] loss 0.5\n"


def test_temp_names_of_long_non_ascii_names_fit_in_255_bytes(tmp_path):
    name = "😀" * 60 + ".obj"  # 244 bytes: a valid name, whose temporary name must be valid too
    fileio.write_text(tmp_path / name, "x")
    assert (tmp_path / name).read_text() == "x" and len(list(tmp_path.iterdir())) == 1
