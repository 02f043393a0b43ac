"""fetch_bfm / `v2m-bench fetch-bfm`, against a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from v2m_bench import DownloadError, ValidationError, load_bfm
from v2m_bench.bfm import BFM_FILES, GENUINE_MD5, find_bfm_dir
from v2m_bench.download import BFM_URLS, ChecksumError, NotGenuineWarning, bfm_urls, default_bfm_dest, fetch_bfm
from v2m_cli import bench_fetch

from tests.conftest import start_http_server, stop_http_server


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``server.root``; ``server.truncate`` names are cut short, ``server.fail`` names get 503 n times."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        srv = self.server
        name = self.path.lstrip("/").split("?")[0]
        with srv.lock:
            srv.requests.append(name)
            failing = srv.fail.get(name, 0)
            if failing:
                srv.fail[name] = failing - 1
        if failing:
            self.send_error(503, "try later")
            return
        if name in getattr(srv, "redirect", ()):
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if name in getattr(srv, "nolength", ()) and (srv.root / name).is_file():
            data = (srv.root / name).read_bytes()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])  # no Content-Length: EOF looks like the end
            self.wfile.flush()
            self.close_connection = True
            return
        if name in srv.truncate and (srv.root / name).is_file():
            data = (srv.root / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True  # the client sees EOF before Content-Length bytes
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A ThreadingHTTPServer on 127.0.0.1 (port 0) serving ``server.root``; yields it with ``.url``."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    root = tmp_path / "served"
    root.mkdir()

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(srv.root), **kwargs)

    srv = start_http_server(handler)
    srv.root, srv.requests, srv.truncate, srv.fail, srv.lock = root, [], set(), {}, threading.Lock()
    try:
        yield srv
    finally:
        stop_http_server(srv)


def _fake_files(root: Path) -> dict[str, str]:
    """Write small distinct files under the BFM names; return their md5."""
    md5 = {}
    for i, name in enumerate(BFM_FILES):
        data = (f"fake {name} ".encode() * (200 + 50 * i)) + bytes(range(256)) * (i + 1)
        (root / name).write_bytes(data)
        md5[name] = hashlib.md5(data).hexdigest()
    return md5


def _fetch(server, dest, md5, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.0)
    return fetch_bfm(dest, base_url=server.url, expected_md5=md5, timeout=10, **kw)


# ------------------------------------------------------------------ URL table


def test_default_urls_are_the_public_3ddfa_addresses():
    assert set(BFM_URLS) == set(BFM_FILES) and len(BFM_URLS) == 7
    base = "https://github.com/cleardusk/3DDFA/blob/master/"
    for name in BFM_FILES:
        folder = "visualize" if name == "tri.mat" else "train.configs"
        assert BFM_URLS[name] == f"{base}{folder}/{name}?raw=true"
    assert set(GENUINE_MD5) == set(BFM_FILES)
    # a mirror is one flat folder, trailing slash or not
    assert bfm_urls("http://m.example/x/")["tri.mat"] == "http://m.example/x/tri.mat"
    assert bfm_urls(None) == BFM_URLS


def test_default_dest_is_where_find_bfm_dir_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("V2M_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("V2M_BFM_DIR", raising=False)
    dest = default_bfm_dest()
    assert dest == tmp_path / "cache" / "bfm" / "train.configs"
    dest.mkdir(parents=True)
    for name in BFM_FILES:
        (dest / name).write_bytes(b"x")
    assert find_bfm_dir() == dest


# ------------------------------------------------------------------ core behaviour


def test_downloads_land_with_the_right_bytes(server, tmp_path):
    md5 = _fake_files(server.root)
    lines = []
    out = _fetch(server, tmp_path / "dest", md5, log=lines.append)
    assert out == tmp_path / "dest"
    for name in BFM_FILES:
        assert (out / name).read_bytes() == (server.root / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(BFM_FILES)  # no .part left over
    assert sorted(server.requests) == sorted(BFM_FILES)
    assert len(lines) == 7 and all("downloaded" in line for line in lines)


def test_default_dest_is_used_when_none(server, tmp_path, monkeypatch):
    monkeypatch.setenv("V2M_CACHE_DIR", str(tmp_path / "cache"))
    md5 = _fake_files(server.root)
    out = _fetch(server, None, md5)
    assert out == tmp_path / "cache" / "bfm" / "train.configs"
    assert all((out / n).is_file() for n in BFM_FILES)


def test_md5_mismatch_is_refused_and_leaves_no_file(server, tmp_path):
    md5 = _fake_files(server.root)
    md5["w_shp_sim.npy"] = "0" * 32
    dest = tmp_path / "dest"
    with pytest.raises(ChecksumError) as info:
        _fetch(server, dest, md5)
    msg = str(info.value)
    assert isinstance(info.value, DownloadError) and "\n" not in msg
    assert "w_shp_sim.npy" in msg and f"{server.url}/w_shp_sim.npy" in msg
    assert "0" * 32 in msg and hashlib.md5((server.root / "w_shp_sim.npy").read_bytes()).hexdigest() in msg
    assert not (dest / "w_shp_sim.npy").exists() and not (dest / "w_shp_sim.npy.part").exists()
    # mismatches are not retried
    assert server.requests.count("w_shp_sim.npy") == 1


def test_mismatch_never_replaces_an_existing_file(server, tmp_path):
    md5 = _fake_files(server.root)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "u_shp.npy").write_bytes(b"the user's own file")
    md5["u_shp.npy"] = "f" * 32
    with pytest.raises(ChecksumError):
        _fetch(server, dest, md5)
    assert (dest / "u_shp.npy").read_bytes() == b"the user's own file"


def test_no_verify_accepts_with_a_not_genuine_warning(server, tmp_path):
    md5 = _fake_files(server.root)
    md5["w_exp_sim.npy"] = "0" * 32
    with pytest.warns(NotGenuineWarning, match="w_exp_sim.npy.*not genuine"):
        out = _fetch(server, tmp_path / "dest", md5, verify=False)
    assert (out / "w_exp_sim.npy").read_bytes() == (server.root / "w_exp_sim.npy").read_bytes()


def test_no_warning_when_everything_matches_without_verify(server, tmp_path):
    md5 = _fake_files(server.root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fetch(server, tmp_path / "dest", md5, verify=False)
    assert not [w for w in caught if issubclass(w.category, NotGenuineWarning)]


def test_verification_of_the_public_urls_cannot_be_turned_off(tmp_path):
    with pytest.raises(ValidationError, match="verify"):
        fetch_bfm(tmp_path, verify=False, progress=False)
    assert not any(tmp_path.iterdir())


def test_present_good_files_are_not_downloaded_again(server, tmp_path):
    md5 = _fake_files(server.root)
    dest = tmp_path / "dest"
    dest.mkdir()
    for name in ("u_shp.npy", "tri.mat"):
        shutil.copy(server.root / name, dest / name)
    (dest / "u_exp.npy").write_bytes(b"stale")  # present but wrong: fetched again
    lines = []
    _fetch(server, dest, md5, log=lines.append)
    assert sorted(server.requests) == sorted(set(BFM_FILES) - {"u_shp.npy", "tri.mat"})
    assert (dest / "u_exp.npy").read_bytes() == (server.root / "u_exp.npy").read_bytes()
    assert sum("already present" in line for line in lines) == 2
    # a second run fetches nothing; --force fetches everything
    server.requests.clear()
    _fetch(server, dest, md5)
    assert server.requests == []
    _fetch(server, dest, md5, force=True)
    assert sorted(server.requests) == sorted(BFM_FILES)


def test_404_names_the_url(server, tmp_path):
    md5 = _fake_files(server.root)
    (server.root / "keypoints_sim.npy").unlink()
    with pytest.raises(DownloadError) as info:
        _fetch(server, tmp_path / "dest", md5)
    msg = str(info.value)
    assert "404" in msg and f"{server.url}/keypoints_sim.npy" in msg and "\n" not in msg
    assert server.requests.count("keypoints_sim.npy") == 1  # a 404 is not retried
    assert not (tmp_path / "dest" / "keypoints_sim.npy.part").exists()


def test_unreachable_host_names_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=rf"u_shp.npy: cannot reach http://127.0.0.1:{port}/u_shp.npy"):
        fetch_bfm(tmp_path, base_url=f"http://127.0.0.1:{port}", progress=False, retries=1, backoff=0.0, timeout=5)


def test_truncated_transfer_is_not_promoted(server, tmp_path):
    md5 = _fake_files(server.root)
    server.truncate.add("w_shp_sim.npy")
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match=r"w_shp_sim.npy: incomplete transfer .*got \d+ of \d+ bytes.*3 attempts"):
        _fetch(server, dest, md5, retries=2, verify=False)  # even unverified, a short file is refused
    assert server.requests.count("w_shp_sim.npy") == 3
    assert not (dest / "w_shp_sim.npy").exists() and not (dest / "w_shp_sim.npy.part").exists()


def test_truncated_transfer_keeps_the_existing_file(server, tmp_path):
    md5 = _fake_files(server.root)
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copy(server.root / "u_exp.npy", dest / "u_exp.npy")
    server.truncate.add("u_exp.npy")
    with pytest.raises(DownloadError, match="incomplete"):
        _fetch(server, dest, md5, force=True, retries=0)
    assert (dest / "u_exp.npy").read_bytes() == (server.root / "u_exp.npy").read_bytes()


def test_transient_errors_are_retried(server, tmp_path):
    md5 = _fake_files(server.root)
    server.fail["tri.mat"] = 2
    out = _fetch(server, tmp_path / "dest", md5, retries=2)
    assert server.requests.count("tri.mat") == 3
    assert (out / "tri.mat").read_bytes() == (server.root / "tri.mat").read_bytes()
    server.fail["u_shp.npy"] = 5
    with pytest.raises(DownloadError, match=r"u_shp.npy: HTTP 503 .*u_shp.npy \(after 2 attempts\)"):
        _fetch(server, tmp_path / "dest2", md5, retries=1)


def test_retries_back_off_exponentially(server, tmp_path, monkeypatch):
    import v2m_bench.download as dl

    slept = []
    monkeypatch.setattr(dl.time, "sleep", slept.append)
    md5 = _fake_files(server.root)
    server.fail["u_exp.npy"] = 3
    _fetch(server, tmp_path / "dest", md5, retries=3, backoff=0.5)
    assert slept == [0.5, 1.0, 2.0]
    assert server.requests.count("u_exp.npy") == 4


def test_progress_bar_without_tqdm(server, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm...` now raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    md5 = _fake_files(server.root)
    out = _fetch(server, tmp_path / "dest", md5, progress=True)
    assert all((out / n).is_file() for n in BFM_FILES)


def test_progress_bar_counts_the_bytes(server, tmp_path, capsys):
    pytest.importorskip("tqdm")
    md5 = _fake_files(server.root)
    _fetch(server, tmp_path / "dest", md5, progress=True)
    err = capsys.readouterr().err
    assert all(name in err for name in BFM_FILES)


def test_module_imports_without_tqdm():
    code = "import sys; sys.modules['tqdm'] = None; import v2m_bench.download, v2m_bench; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "tqdm" not in subprocess.run(
        [sys.executable, "-c", "import sys, v2m_bench.download; print(sorted(sys.modules))"],
        capture_output=True, text=True, timeout=120,
    ).stdout


def test_file_url_mirror(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    md5 = _fake_files(src)
    out = fetch_bfm(tmp_path / "dest", base_url=src.as_uri(), expected_md5=md5, progress=False)
    assert all((out / n).read_bytes() == (src / n).read_bytes() for n in BFM_FILES)


def test_dest_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DownloadError, match="cannot create the folder"):
        fetch_bfm(tmp_path / "f", progress=False)


def test_bad_base_url_is_a_validation_error(tmp_path):
    with pytest.raises(ValidationError, match="base_url"):
        fetch_bfm(tmp_path, base_url="mirror.example/bfm", progress=False)


# ------------------------------------------------------------------ command line


def test_cli_mirror_downloads_and_says_where(server, tmp_path):
    _fake_files(server.root)
    dest = tmp_path / "dest"
    runner = CliRunner()
    # fake files are not genuine: refused without --no-verify
    res = runner.invoke(bench_fetch.command, ["--base-url", server.url, "--dest", str(dest), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "--no-verify" in res.stderr
    res = runner.invoke(
        bench_fetch.command, ["--base-url", server.url, "--dest", str(dest), "--no-verify", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert all((dest / n).read_bytes() == (server.root / n).read_bytes() for n in BFM_FILES)
    assert f"export V2M_BFM_DIR={dest.resolve()}" in res.stdout
    assert "warning:" in res.stderr and "not genuine" in res.stderr


def test_cli_no_verify_needs_a_mirror(tmp_path):
    res = CliRunner().invoke(bench_fetch.command, ["--dest", str(tmp_path), "--no-verify"])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and "--base-url" in res.stderr
    assert not any(tmp_path.iterdir())


def test_cli_404_is_one_line_exit_2(server, tmp_path):
    res = CliRunner().invoke(
        bench_fetch.command, ["--base-url", server.url, "--dest", str(tmp_path / "d"), "--no-progress"]
    )
    assert res.exit_code == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "404" in last and f"{server.url}/u_shp.npy" in last
    assert "Traceback" not in res.output
    assert "V2M_BFM_DIR" in last and "--base-url" in last  # says what else works offline


# ------------------------------------------------------------------ with the shared BFM stand-in


@pytest.mark.shared
def test_cli_fetches_the_shared_bfm_through_a_mirror(bfm_dir, server, tmp_path):
    for name in BFM_FILES:
        shutil.copy(bfm_dir / name, server.root / name)
    dest = tmp_path / "dest"
    runner = CliRunner()
    args = ["--base-url", server.url, "--dest", str(dest), "--no-progress"]

    # the stand-in's bases differ from the genuine release: refused, one line naming md5 and --no-verify
    res = runner.invoke(bench_fetch.command, args)
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "md5" in err[-1] and "--no-verify" in err[-1]
    assert not any(p.name.endswith(".part") for p in dest.iterdir())
    assert not all((dest / n).exists() for n in BFM_FILES)

    res = runner.invoke(bench_fetch.command, args + ["--no-verify"])
    assert res.exit_code == 0, res.output
    assert "not genuine" in res.stderr
    model = load_bfm(dest, cache=False)
    assert model.n_vertices == 53215 and model.is_genuine is False
    # the files that are byte-identical to the public release are recognised as such
    for name in ("u_shp.npy", "u_exp.npy", "keypoints_sim.npy", "param_whitening.pkl", "tri.mat"):
        assert model.md5[name] == GENUINE_MD5[name]


# ------------------------------------------------------------------ hostile servers and folders


def test_planted_link_at_the_temporary_name_is_never_written_through(server, tmp_path):
    md5 = _fake_files(server.root)
    md5["u_exp.npy"] = "0" * 32  # refused
    dest = tmp_path / "dest"
    dest.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in BFM_FILES:  # the names an attacker could predict
        (dest / (name + ".part")).symlink_to(victim)
    with pytest.raises(ChecksumError):
        _fetch(server, dest, md5)
    assert victim.read_text() == "precious"
    assert not list(dest.glob(".*.tmp"))


def test_link_at_the_destination_is_refused_not_replaced(server, tmp_path):
    md5 = _fake_files(server.root)
    dest = tmp_path / "dest"
    dest.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (dest / "u_shp.npy").symlink_to(victim)
    with pytest.raises(ValidationError, match="u_shp.npy.*symbolic link"):
        _fetch(server, dest, md5)
    assert victim.read_text() == "precious" and (dest / "u_shp.npy").is_symlink()


def test_md5_refusal_keeps_the_existing_file(server, tmp_path):
    md5 = _fake_files(server.root)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "u_exp.npy").write_bytes(b"mine")
    md5["u_exp.npy"] = "0" * 32
    with pytest.raises(ChecksumError):
        _fetch(server, dest, md5, force=True)
    assert (dest / "u_exp.npy").read_bytes() == b"mine"
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]


def test_no_verify_refuses_a_transfer_without_content_length(server, tmp_path):
    md5 = _fake_files(server.root)
    server.nolength = {"w_exp_sim.npy"}
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="w_exp_sim.npy.*no Content-Length") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fetch(server, dest, {n: "0" * 32 for n in md5}, verify=False)
    assert "\n" not in str(info.value)
    assert not (dest / "w_exp_sim.npy").exists()


def test_files_over_the_size_limit_are_refused(server, tmp_path):
    md5 = _fake_files(server.root)
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match=r"u_shp.npy: .* more than the limit of 100"):
        _fetch(server, dest, md5, max_bytes=100)
    assert not (dest / "u_shp.npy").exists()
    server.nolength = {"u_shp.npy"}  # no announced length: counted while it arrives
    with pytest.raises(DownloadError, match=r"u_shp.npy: .*sent more than the limit of 100 bytes"):
        _fetch(server, dest, md5, max_bytes=100)
    assert not dest.exists() or not list(dest.iterdir())


def test_redirect_loop_is_one_line(server, tmp_path):
    md5 = _fake_files(server.root)
    server.redirect = {"u_shp.npy"}
    runner = CliRunner()
    res = runner.invoke(bench_fetch.command, ["--base-url", server.url, "--dest", str(tmp_path / "d"), "--no-progress",
                                              "--timeout", "5"])
    assert res.exit_code == 2, res.output
    last = res.output.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: u_shp.npy: HTTP 302") and "redirect" in last, res.output
