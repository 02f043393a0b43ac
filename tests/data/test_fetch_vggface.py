"""fetch_vggface / `v2m-build-dataset fetch-vggface` against a local HTTP server on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from v2m_bench.errors import ValidationError
from v2m_data.building import BuildLockedError
from v2m_data.vggface_fetch import FetchConfig, fetch_vggface, validate_image_bytes
from v2m_cli.build import main as build_main

from tests.conftest import start_http_server, stop_http_server

ROOT = Path(__file__).resolve().parents[2]
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


# ---------------------------------------------------------------------------------------- server
class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers from ``server.routes``: path -> (kind, *args); counts requests per path."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code, data=b"", ctype="image/jpeg", headers=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        srv = self.server
        path = self.path.split("?")[0]
        with srv.lock:
            srv.requests[path] = srv.requests.get(path, 0) + 1
            n = srv.requests[path]
        route = srv.routes.get(path)
        if route is None:
            if srv.default is not None:
                route = srv.default(path)
        if route is None:
            return self._send(404, b"not found", "text/plain")
        kind, *args = route
        if srv.delay:
            time.sleep(srv.delay)
        if kind == "bytes":
            data, ctype = args[0], (args[1] if len(args) > 1 else "image/jpeg")
            return self._send(200, data, ctype)
        if kind == "status":
            return self._send(args[0], b"no", "text/plain", args[1] if len(args) > 1 else ())
        if kind == "flaky":  # status for the first k requests, then the data
            k, code, headers, data = args
            if n <= k:
                return self._send(code, b"later", "text/plain", headers)
            return self._send(200, data)
        if kind == "sleep":
            time.sleep(args[0])
            try:
                return self._send(200, args[1])
            except OSError:
                return None
        if kind == "redirect":
            return self._send(args[1] if len(args) > 1 else 302, b"", "text/plain", [("Location", args[0])])
        if kind == "drop":  # announce the whole body, send half, hang up
            data = args[0]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return None
        if kind == "stream":  # no length, n bytes in 64 kB chunks
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            left = args[0]
            try:
                while left > 0:
                    self.wfile.write(b"\xff" * min(left, 65536))
                    left -= 65536
            except OSError:
                pass
            return None
        raise AssertionError(kind)


@pytest.fixture
def server(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = start_http_server(_Handler)
    srv.routes, srv.requests, srv.lock, srv.delay, srv.default = {}, {}, threading.Lock(), 0.0, None
    try:
        yield srv
    finally:
        stop_http_server(srv)


# ---------------------------------------------------------------------------------------- data
def jpeg(seed: int, w: int = 160, h: int = 140) -> bytes:
    """A distinct, decodable JPEG (smooth random colours)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


BOX = (20.0, 15.0, 120.0, 110.0)


def write_annotations(folder: Path, rows: dict) -> None:
    """rows: name -> list of (id, url[, box[, curation]])."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in rows.items():
        text = ""
        for row in lines:
            rid, url = row[0], row[1]
            box = row[2] if len(row) > 2 else BOX
            cur = row[3] if len(row) > 3 else 1
            text += f"{rid} {url} {box[0]:.2f} {box[1]:.2f} {box[2]:.2f} {box[3]:.2f} 3.00 4.00 {cur}\n"
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")


def manifest_items(out: Path) -> dict:
    data = json.loads((out / "fetch-manifest.json").read_text())
    return {(it["identity"], it["id"]): it for it in data["items"]}


def tree(out: Path, sub: str = "images") -> dict:
    root = out / sub
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temps(out: Path) -> list:
    return [p for p in out.rglob("*.tmp")]


def cfg(ann, out, **kw) -> FetchConfig:
    base = dict(annotations=str(ann), out=str(out), identities_from="all", workers=4, per_host=2, timeout=2.0,
                retries=1, backoff=0.01, progress=False)
    base.update(kw)
    return FetchConfig(**base)


# ---------------------------------------------------------------------------------------- tests
def test_every_outcome_is_recognised_and_good_images_are_kept_byte_identical(server, tmp_path):
    u = server.url
    good = {i: jpeg(i) for i in range(1, 5)}
    placeholder = jpeg(99)
    r = server.routes
    r["/a/1.jpg"] = ("bytes", good[1])
    r["/a/2.jpg"] = ("bytes", good[2])
    r["/a/moved.jpg"] = ("redirect", "/a/target.jpg", 301)
    r["/a/target.jpg"] = ("redirect", f"{u}/a/3.jpg", 302)
    r["/a/3.jpg"] = ("bytes", good[3])
    r["/a/gone.jpg"] = ("status", 404)
    r["/a/gone410.jpg"] = ("status", 410)
    r["/a/forbidden.jpg"] = ("status", 403)
    r["/a/slow.jpg"] = ("sleep", 3.0, good[4])
    r["/a/huge.jpg"] = ("stream", 3_000_000)
    r["/a/huge-announced.jpg"] = ("bytes", b"\xff" * 1_500_000)
    r["/a/page.jpg"] = ("bytes", b"<!DOCTYPE html><html><body>Photo not found</body></html>", "text/html")
    r["/a/drop.jpg"] = ("drop", jpeg(7))
    r["/a/ftp.jpg"] = ("redirect", "ftp://127.0.0.1/x.jpg")
    r["/a/loop.jpg"] = ("redirect", "/a/loop.jpg")
    r["/a/tiny.jpg"] = ("bytes", jpeg(8, 16, 16))
    r["/a/thumb.jpg"] = ("bytes", jpeg(9, 60, 50))
    r["/a/busy.jpg"] = ("flaky", 1, 503, [], jpeg(10))
    r["/a/limited.jpg"] = ("flaky", 1, 429, [("Retry-After", "0")], jpeg(11))
    for k in range(4):
        r[f"/p/{k}.jpg"] = ("bytes", placeholder)
    ann = tmp_path / "files"
    write_annotations(ann, {
        "Anna_A": [
            ("00000001", f"{u}/a/1.jpg"), ("00000002", f"{u}/a/2.jpg"), ("00000003", f"{u}/a/moved.jpg"),
            ("00000004", f"{u}/a/gone.jpg"), ("00000005", f"{u}/a/gone410.jpg"), ("00000006", f"{u}/a/forbidden.jpg"),
            ("00000007", f"{u}/a/slow.jpg"), ("00000008", f"{u}/a/huge.jpg"), ("00000009", f"{u}/a/huge-announced.jpg"),
            ("00000010", f"{u}/a/page.jpg"), ("00000011", f"{u}/a/drop.jpg"), ("00000012", f"{u}/a/ftp.jpg"),
            ("00000013", f"{u}/a/loop.jpg"), ("00000014", f"{u}/a/tiny.jpg"), ("00000015", f"{u}/a/thumb.jpg"),
            ("00000016", f"{u}/a/busy.jpg"), ("00000017", f"{u}/a/limited.jpg"), ("00000018", "ftp://127.0.0.1/a.jpg"),
            ("00000019", f"{u}/p/0.jpg"), ("00000020", f"{u}/p/1.jpg"),
        ],
        "Bob_B": [("00000001", f"{u}/p/2.jpg"), ("00000002", f"{u}/p/3.jpg"), ("00000003", f"{u}/a/1.jpg")],
    })
    out = tmp_path / "out"
    res = fetch_vggface(cfg(ann, out, timeout=0.5, max_bytes=1_000_000, max_redirects=3))
    items = manifest_items(out)
    want = {
        ("Anna_A", "00000001"): ("ok", None), ("Anna_A", "00000002"): ("ok", None), ("Anna_A", "00000003"): ("ok", None),
        ("Anna_A", "00000004"): ("failed", "not-found"), ("Anna_A", "00000005"): ("failed", "not-found"),
        ("Anna_A", "00000006"): ("failed", "http-error"), ("Anna_A", "00000007"): ("failed", "timeout"),
        ("Anna_A", "00000008"): ("failed", "too-large"), ("Anna_A", "00000009"): ("failed", "too-large"),
        ("Anna_A", "00000010"): ("failed", "not-an-image"), ("Anna_A", "00000011"): ("failed", "truncated"),
        ("Anna_A", "00000012"): ("failed", "redirect"), ("Anna_A", "00000013"): ("failed", "redirect"),
        ("Anna_A", "00000014"): ("failed", "too-small"), ("Anna_A", "00000015"): ("failed", "box-outside"),
        ("Anna_A", "00000016"): ("ok", None), ("Anna_A", "00000017"): ("ok", None),
        ("Anna_A", "00000018"): ("failed", "bad-url"),
        ("Anna_A", "00000019"): ("failed", "placeholder"), ("Anna_A", "00000020"): ("failed", "placeholder"),
        ("Bob_B", "00000001"): ("failed", "placeholder"), ("Bob_B", "00000002"): ("failed", "placeholder"),
        ("Bob_B", "00000003"): ("ok", None),
    }
    assert {k: (v["status"], v["reason"]) for k, v in items.items()} == want
    # kept byte-identical (the redirected one too), nothing else under images/
    kept = tree(out)
    assert kept == {
        "Anna_A/00000001.jpg": good[1], "Anna_A/00000002.jpg": good[2], "Anna_A/00000003.jpg": good[3],
        "Anna_A/00000016.jpg": jpeg(10), "Anna_A/00000017.jpg": jpeg(11), "Bob_B/00000003.jpg": good[1],
    }
    for (name, rid), it in items.items():
        if it["status"] == "ok":
            assert it["bytes"] == len(kept[f"{name}/{rid}.jpg"])
            assert it["sha256"] == hashlib.sha256(kept[f"{name}/{rid}.jpg"]).hexdigest()
    sha_p = hashlib.sha256(placeholder).hexdigest()
    assert tree(out, "placeholders") == {f"{sha_p}.jpg": placeholder}
    assert items[("Bob_B", "00000002")]["detail"] == "the same bytes were served for 4 different URLs"
    assert "HTML" in items[("Anna_A", "00000010")]["detail"]
    assert "non-http" in items[("Anna_A", "00000012")]["detail"]
    data = json.loads((out / "fetch-manifest.json").read_text())
    assert data["totals"]["by_reason"] == {
        "bad-url": 1, "box-outside": 1, "http-error": 1, "not-an-image": 1, "not-found": 2, "placeholder": 4,
        "redirect": 2, "timeout": 1, "too-large": 2, "too-small": 1, "truncated": 1,
    }
    assert (data["totals"]["ok"], data["totals"]["failed"], data["totals"]["urls"]) == (6, 17, 23)
    assert data["placeholders"] == [sha_p]
    assert res.totals == data["totals"]
    assert "not-found 2" in res.summary() and "6 of 23 URLs ok" in res.summary()
    # retry policy: 404 asked once, 503/429 retried once, timeout and truncation retried once
    q = server.requests
    assert q["/a/gone.jpg"] == 1 and q["/a/forbidden.jpg"] == 1
    assert q["/a/busy.jpg"] == 2 and q["/a/limited.jpg"] == 2
    assert q["/a/slow.jpg"] == 2 and q["/a/drop.jpg"] == 2
    assert q["/a/loop.jpg"] == 4  # the first request and 3 redirects
    # the annotation files are copied; no temporary files and no journal are left
    assert (out / "files" / "Anna_A.txt").read_bytes() == (ann / "Anna_A.txt").read_bytes()
    assert temps(out) == [] and not (out / ".fetch-journal.jsonl").exists()
    # each line of the manifest is one item
    lines = (out / "fetch-manifest.json").read_text().splitlines()
    assert sum(1 for ln in lines if ln.lstrip().startswith('{"identity"')) == 23


def test_rerun_asks_only_for_transient_failures(server, tmp_path):
    u = server.url
    r = server.routes
    r["/1.jpg"] = ("bytes", jpeg(1))
    r["/2.jpg"] = ("status", 404)
    r["/3.jpg"] = ("bytes", b"<html>no</html>", "text/html")
    r["/4.jpg"] = ("status", 503)
    ann = tmp_path / "files"
    write_annotations(ann, {"Cara_C": [("00000001", f"{u}/1.jpg"), ("00000002", f"{u}/2.jpg"), ("00000003", f"{u}/3.jpg"),
                                      ("00000004", f"{u}/4.jpg")]})
    out = tmp_path / "out"
    fetch_vggface(cfg(ann, out, retries=0))
    first = manifest_items(out)
    assert first[("Cara_C", "00000004")]["reason"] == "server-error"
    assert server.requests == {"/1.jpg": 1, "/2.jpg": 1, "/3.jpg": 1, "/4.jpg": 1}
    r["/4.jpg"] = ("bytes", jpeg(4))
    res = fetch_vggface(cfg(ann, out, retries=0))
    assert server.requests == {"/1.jpg": 1, "/2.jpg": 1, "/3.jpg": 1, "/4.jpg": 2}
    assert res.requested == 1
    second = manifest_items(out)
    assert second[("Cara_C", "00000004")]["status"] == "ok"
    assert {k: v for k, v in second.items() if k[1] != "00000004"} == {k: v for k, v in first.items() if k[1] != "00000004"}
    # a third run asks nothing at all
    res = fetch_vggface(cfg(ann, out, retries=0))
    assert res.requested == 0 and sum(server.requests.values()) == 5
    # a deleted image is fetched again; one put in place by hand is validated, kept, not asked
    (out / "images" / "Cara_C" / "00000001.jpg").unlink()
    fetch_vggface(cfg(ann, out, retries=0))
    assert server.requests["/1.jpg"] == 2
    assert (out / "images" / "Cara_C" / "00000001.jpg").read_bytes() == jpeg(1)


def test_limits_curation_and_vox_meta_selection(server, tmp_path):
    u = server.url
    server.default = lambda path: ("bytes", jpeg(int(hashlib.md5(path.encode()).hexdigest()[:6], 16)))
    ann = tmp_path / "files"
    rows = [(f"{i:08d}", f"{u}/{name}/{i}.jpg", BOX, i % 2) for name in ("x",) for i in range(1, 7)]
    write_annotations(ann, {
        "Anna_A": [(a, b.replace("/x/", "/Anna_A/"), c, d) for a, b, c, d in rows],
        "Zed_Z": [(a, b.replace("/x/", "/Zed_Z/"), c, d) for a, b, c, d in rows],
        "Not_In_Meta": [(a, b.replace("/x/", "/Not/"), c, d) for a, b, c, d in rows],
    })
    meta = tmp_path / "vox1_meta.csv"
    meta.write_text("VoxCeleb1 ID\tVGGFace1 ID\tGender\tNationality\tSet\nid10001\tAnna_A\tf\tX\tdev\n"
                    "id10002\tZed_Z\tm\tX\tdev\nid10003\tNo_File\tm\tX\ttest\n")
    out = tmp_path / "out"
    res = fetch_vggface(cfg(ann, out, identities_from="vox1_meta", vox_meta=str(meta), curated_only=True, limit_per_identity=2))
    items = manifest_items(out)
    assert sorted(items) == [("Anna_A", "00000001"), ("Anna_A", "00000003"), ("Zed_Z", "00000001"), ("Zed_Z", "00000003")]
    assert res.n_identities == 2
    assert sorted(p.name for p in (out / "files").iterdir()) == ["Anna_A.txt", "Zed_Z.txt"]
    sel = json.loads((out / "fetch-manifest.json").read_text())["identities"]
    assert sel["without_annotation_file"] == ["No_File"] and sel["selected"] == 2
    assert not any("/Not/" in p for p in server.requests)


def test_real_annotation_files_through_the_local_server(server, tmp_path, shared_dir):
    """The released annotation files, URLs pointed at the local server, vox1_meta selection."""
    src = shared_dir / "data" / "vggface" / "files"
    meta = shared_dir / "data" / "vox1_meta.csv"
    from v2m_data.images import read_vggface_annotations

    ann = tmp_path / "files"
    ann.mkdir()
    expected = {}
    for f in sorted(src.glob("*.txt")):
        lines = f.read_text().splitlines()[:3]
        new = []
        for ln in lines:
            p = ln.split()
            path = f"/real/{f.stem}/{p[0]}.jpg"
            w, h = int(float(p[4])) + 20, int(float(p[5])) + 20
            data = jpeg(len(expected), w, h)
            server.routes[path] = ("bytes", data)
            expected[f"{f.stem}/{p[0]}.jpg"] = data
            p[1] = server.url + path
            new.append(" ".join(p))
        (ann / f.name).write_text("\n".join(new) + "\n")
        assert len(read_vggface_annotations(ann / f.name)) == 3
    out = tmp_path / "out"
    res = fetch_vggface(cfg(ann, out, identities_from="vox1_meta", vox_meta=str(meta)))
    assert res.n_identities == len(list(src.glob("*.txt"))) == 6
    assert res.totals["ok"] == 18 and res.totals["failed"] == 0
    assert tree(out) == expected
    sel = json.loads((out / "fetch-manifest.json").read_text())["identities"]
    assert sel["in_vox_meta"] == 1251 and len(sel["without_annotation_file"]) == 1245


def _env():
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _cli(ann, out, *extra):
    return [str(ROOT / ".venv" / "bin" / "v2m-build-dataset") if (ROOT / ".venv/bin/v2m-build-dataset").exists() else "v2m-build-dataset",
            "fetch-vggface", "--annotations", str(ann), "--out", str(out), "--identities-from", "all",
            "--workers", "3", "--per-host", "3", "--timeout", "5", "--no-progress", *extra]


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run_and_a_second_run_is_refused(server, tmp_path):
    u = server.url
    rows = {}
    for n, name in enumerate(("Anna_A", "Bob_B", "Cara_C")):
        lines = []
        for i in range(1, 31):
            path = f"/{name}/{i}.jpg"
            if i % 10 == 3:
                server.routes[path] = ("status", 404)
            elif i % 10 == 5:
                server.routes[path] = ("bytes", b"<html>moved</html>", "text/html")
            elif i % 10 == 7:
                server.routes[path] = ("bytes", jpeg(999))  # a placeholder: 9 URLs
            else:
                server.routes[path] = ("bytes", jpeg(100 * n + i, 400, 300))
            lines.append((f"{i:08d}", u + path))
        rows[name] = lines
    ann = tmp_path / "files"
    write_annotations(ann, rows)
    server.delay = 0.08
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(ann, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = out / ".fetch-journal.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if journal.exists() and journal.read_text().count("\n") >= 15:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("the fetch did not start: " + proc.communicate()[1].decode())
    # a second run on the same OUT while the first one runs is refused
    with pytest.raises(BuildLockedError, match="another"):
        fetch_vggface(cfg(ann, out))
    cli = CliRunner().invoke(build_main, _cli(ann, out)[1:])
    assert cli.exit_code == 2 and "error:" in cli.output and "another build is running" in cli.output
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n_before = sum(server.requests.values())
    assert 15 <= n_before < 90, n_before
    settled = set()
    for line in journal.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # the line being written when the run was killed
            continue
        settled.add(f"/{rec['identity']}/{int(rec['id'])}.jpg")
    on_disk = {f"/{p.parent.name}/{int(p.stem)}.jpg" for p in (out / "images").rglob("*.jpg") if not p.name.startswith(".")}
    assert len(settled) >= 15
    asked_before = dict(server.requests)
    for p in (out / "images").rglob("*"):  # whatever is there is whole
        if p.is_file() and not p.name.startswith("."):
            assert p.read_bytes() == server.routes[f"/{p.parent.name}/{int(p.stem)}.jpg"][1]
    rerun = subprocess.run(_cli(ann, out), env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "ok" in rerun.stdout and "manifest:" in rerun.stdout
    # the rerun did not ask again what the killed run settled or wrote
    assert all(server.requests[p] == asked_before[p] for p in settled | on_disk)
    assert all(server.requests.get(f"/{n}/{i}.jpg", 0) >= 1 for n in rows for i in range(1, 31))
    server.delay = 0.0
    ref = tmp_path / "ref"
    done = subprocess.run(_cli(ann, ref), env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert manifest_items(out) == manifest_items(ref)
    a, b = json.loads((out / "fetch-manifest.json").read_text()), json.loads((ref / "fetch-manifest.json").read_text())
    assert a["totals"] == b["totals"]
    assert a["totals"]["by_reason"] == {"not-an-image": 9, "not-found": 9, "placeholder": 9}
    assert (a["totals"]["ok"], a["totals"]["failed"]) == (63, 27)
    assert tree(out) == tree(ref) and len(tree(out)) == 63
    assert tree(out, "placeholders") == tree(ref, "placeholders")
    assert temps(out) == [] and not journal.exists()


def test_refusals_and_validation(server, tmp_path):
    u = server.url
    server.routes["/1.jpg"] = ("bytes", jpeg(1))
    ann = tmp_path / "files"
    write_annotations(ann, {"Anna_A": [("00000001", f"{u}/1.jpg"), ("../evil", f"{u}/1.jpg"), ("00000001", f"{u}/1.jpg")]})
    # config validation
    with pytest.raises(ValidationError, match="vox_meta"):
        FetchConfig(annotations=str(ann), out=str(tmp_path / "o"))
    for bad in ({"workers": 0}, {"per_host": 0}, {"timeout": 0}, {"retries": -1}, {"max_bytes": 0},
                {"limit_per_identity": 0}, {"identities_from": "some"}):
        with pytest.raises(ValidationError):
            cfg(ann, tmp_path / "o", **bad)
    # unsafe and repeated ids are recorded, never used as paths
    out = tmp_path / "out"
    fetch_vggface(cfg(ann, out))
    items = manifest_items(out)
    assert items[("Anna_A", "../evil")]["reason"] == "bad-id"
    assert items[("Anna_A", "00000001#2")]["reason"] == "bad-id"
    assert tree(out) == {"Anna_A/00000001.jpg": jpeg(1)}
    assert not (tmp_path / "evil.jpg").exists()
    # a different annotation file already in OUT/files is not overwritten
    out2 = tmp_path / "out2"
    (out2 / "files").mkdir(parents=True)
    (out2 / "files" / "Anna_A.txt").write_text("mine\n")
    with pytest.raises(ValidationError, match="refusing to overwrite"):
        fetch_vggface(cfg(ann, out2))
    assert (out2 / "files" / "Anna_A.txt").read_text() == "mine\n"
    # images/ as a symbolic link is refused
    out3 = tmp_path / "out3"
    out3.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out3 / "images").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValidationError, match="symbolic link"):
        fetch_vggface(cfg(ann, out3))
    assert list((tmp_path / "elsewhere").iterdir()) == []
    # the command line: one-line errors, exit status 2
    runner = CliRunner()
    res = runner.invoke(build_main, ["fetch-vggface", "--annotations", str(ann), "--out", str(tmp_path / "o4")])
    assert res.exit_code == 2 and "--vox-meta" in res.output
    res = runner.invoke(build_main, ["fetch-vggface", "--annotations", str(tmp_path / "nope"), "--out", str(tmp_path / "o4"),
                                     "--identities-from", "all"])
    assert res.exit_code == 2 and "no such VGGFace annotation folder" in res.output


def test_validate_image_bytes():
    good = jpeg(3, 160, 140)
    assert validate_image_bytes(good, BOX) == (None, "160x140")
    assert validate_image_bytes(good, (-30, 0, 100, 100))[0] is None  # 30 % overshoot is allowed
    assert validate_image_bytes(good, (-50, 0, 50, 100))[0] == "box-outside"
    assert validate_image_bytes(good, (0, 0, 300, 100))[0] == "box-outside"
    assert validate_image_bytes(b"GIF89a junk", BOX)[0] == "not-an-image"
    assert validate_image_bytes(jpeg(3, 20, 20), (1, 1, 10, 10), min_side=32)[0] == "too-small"


def test_the_build_takes_the_fetched_folder_as_it_is(server, tmp_path):
    """Serve a synthetic world's VGGFace images, fetch them, build from the fetched folder: same faces."""
    import shutil

    from tests.conftest import make_small_model
    from v2m_data.building import BuildConfig, build
    from v2m_data.shards import open_dataset
    from v2m_data.synth import make_world

    world = tmp_path / "world"
    model = make_small_model(0)
    make_world(world, 3, 0, model, images_per_identity=2, videos_per_identity=1, utterances_per_video=1,
               duration=(1.0, 1.0), image_size=96, progress=False)
    bfm = tmp_path / "model.npz"
    model.save(bfm)
    src_images = world / "vggface" / "images"
    server.default = lambda path: ("bytes", (src_images / path[len("/vggface/"):]).read_bytes()) if path.startswith("/vggface/") else None
    ann = tmp_path / "annotations"
    ann.mkdir()
    for f in sorted((world / "vggface" / "files").glob("*.txt")):
        (ann / f.name).write_text(f.read_text().replace("http://example.invalid", server.url))
    fetched = tmp_path / "VGGFace"
    res = fetch_vggface(cfg(ann, fetched, identities_from="vox1_meta", vox_meta=str(world / "vox1_meta.csv")))
    assert res.totals["ok"] == 6 and res.totals["failed"] == 0
    originals = {p.relative_to(src_images).as_posix(): p.read_bytes() for p in src_images.rglob("*.jpg")}
    assert tree(fetched) == originals
    for p in src_images.rglob("*.pts"):  # landmarks computed elsewhere (--detector precomputed)
        shutil.copy(p, fetched / "images" / p.relative_to(src_images))

    def run(vggface, out):
        build(BuildConfig(voxceleb=str(world), vggface=str(vggface), out=str(out), bfm=str(bfm), detector="precomputed",
                          identities_per_shard=2, progress=False), log=lambda s: None)
        return open_dataset(out)

    a, b = run(world / "vggface", tmp_path / "build-a"), run(fetched, tmp_path / "build-b")
    for split in ("test", "train"):
        sa, sb = a.split(split), b.split(split)
        assert sa.n_images == sb.n_images > 0
        idx = list(range(sa.n_images))
        np.testing.assert_array_equal(sa.crops(idx, 64), sb.crops(idx, 64))
    ma, mb = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("build-a", "build-b"))
    assert mb["failures"] == ma["failures"]
    assert not [f for f in mb["failures"] if f["stage"] in ("identity", "image", "landmarks")]
    assert mb["counts"] == ma["counts"]


def test_a_dead_host_is_given_up_after_a_few_failures_and_retried_by_a_rerun(server, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    server.routes["/1.jpg"] = ("bytes", jpeg(1))
    ann = tmp_path / "files"
    write_annotations(ann, {"Anna_A": [(f"{i:08d}", f"{dead}/{i}.jpg") for i in range(1, 9)] + [("00000009", f"{server.url}/1.jpg")]})
    out = tmp_path / "out"
    res = fetch_vggface(cfg(ann, out, workers=1, retries=0, host_failures=3))
    reasons = [manifest_items(out)[("Anna_A", f"{i:08d}")]["reason"] for i in range(1, 10)]
    assert reasons == ["connection"] * 3 + ["host-down"] * 5 + [None]
    assert res.requested == 4
    res = fetch_vggface(cfg(ann, out, workers=1, retries=0, host_failures=3))
    assert res.requested == 3 and res.totals["by_reason"] == {"connection": 3, "host-down": 5}


def test_command_line_prints_the_summary_and_a_progress_bar(server, tmp_path):
    server.routes["/1.jpg"] = ("bytes", jpeg(1))
    server.routes["/2.jpg"] = ("status", 404)
    ann = tmp_path / "files"
    write_annotations(ann, {"Anna_A": [("00000001", f"{server.url}/1.jpg"), ("00000002", f"{server.url}/2.jpg")]})
    out = tmp_path / "out"
    res = CliRunner().invoke(build_main, ["fetch-vggface", "--annotations", str(ann), "--out", str(out),
                                          "--identities-from", "all", "--progress"])
    assert res.exit_code == 0, res.output
    assert "1 of 2 URLs ok" in res.stdout and "failures: not-found 1" in res.stdout
    assert "2/2" in res.stderr and "1 failed" in res.stderr  # the bar: URLs done, failures
    assert tree(out) == {"Anna_A/00000001.jpg": jpeg(1)}
