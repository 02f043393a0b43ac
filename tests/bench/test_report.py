"""The HTML report (v2m_bench.report, v2m-bench report): numbers, assets, escaping, a real browser.

Small toy data (5 identities x 2 utterances, 128-pixel renders, 100 bootstrap resamples) on the
BFM from V2M_BFM_DIR (skipped without it). Two reports are written once per module: "good"
(with the "bad" predictions as its baseline file) and "bad" alone. The browser tests drive
headless Chromium (Debian package ``chromium``) over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: no extra Python package) and are skipped when it is absent.
"""

from __future__ import annotations

import base64
import functools
import html
import html.parser
import http.server
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from v2m_bench import ScoreConfig, score, write_predictions, write_references
from v2m_bench.scoring import METRIC_NAMES, PAPER_RESULTS

from tests.conftest import start_http_server, stop_http_server

#: Identity names that would break the page (or run script) if they were not escaped.
NASTY = [
    'Ann <img src=x onerror="console.error(\'xss\')">',
    'Bo "quoted" & <b>bold</b>',
]
NAMES = NASTY + ["Carl_Cox", "Dee.Dee", "Eve_Example"]
CONFIG = ScoreConfig(bootstrap=100, seed=3)
IMAGE_SIZE = 128


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def toy(bfm, tmp_path_factory):
    """references.h5, good.h5 and bad.h5 (coefficients), 5 identities x 2 utterances."""
    d = tmp_path_factory.mktemp("report-toy")
    rng = np.random.default_rng(7)
    n = len(NAMES)
    shape = rng.normal(size=(n, 40)) * bfm.shape_std * 0.7
    expr = bfm.expression_mean + rng.normal(size=(n, 10)) * bfm.expression_std * 0.2
    write_references(d / "references.h5", NAMES, ["m", "f", "m", "f", "m"], shape=shape, expression=expr)
    ids = np.repeat(NAMES, 2)
    utts = np.array(["v1_00001", "v2_00002"] * n)
    for name, noise in (("good", 0.2), ("bad", 1.2)):
        s = np.repeat(shape, 2, axis=0) + rng.normal(size=(2 * n, 40)) * bfm.shape_std * noise
        write_predictions(d / f"{name}.h5", ids, utts, shape=s, expression=np.repeat(expr, 2, axis=0), model=f"toy-{name}")
    return d


@pytest.fixture(scope="module")
def reports(toy, bfm, tmp_path_factory):
    from v2m_bench.report import write_report

    out = tmp_path_factory.mktemp("reports")
    good = write_report(toy / "good.h5", toy / "references.h5", out / "good", bfm, baseline=toy / "bad.h5", config=CONFIG,
                        image_size=IMAGE_SIZE)
    bad = write_report(toy / "bad.h5", toy / "references.h5", out / "bad", bfm, config=CONFIG, image_size=IMAGE_SIZE)
    return {"good": good, "bad": bad}


@pytest.fixture(scope="module")
def expected(toy, bfm):
    """The numbers straight from score(), as `v2m-bench score --baseline` computes them."""
    return score(toy / "good.h5", toy / "references.h5", bfm, baseline=toy / "bad.h5", config=CONFIG)


# ------------------------------------------------------------------------------- HTML parsing
class _Page(html.parser.HTMLParser):
    """Tables (by id) as lists of rows of (tag, attrs, text) cells, plus every src/href."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list] = {}
        self.refs: list[tuple[str, str, str]] = []
        self.imgs: list[dict] = []
        self.scripts: list[dict] = []
        self.text: list[str] = []
        self._table = None
        self._row = None
        self._cell = None
        self._row_attrs = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if k in a:
                self.refs.append((tag, k, a[k]))
        if tag == "img":
            self.imgs.append(a)
        if tag == "script":
            self.scripts.append(a)
        if tag == "table":
            self._table = a.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._row_attrs = a
        elif tag in ("td", "th") and self._row is not None:
            self._cell = [tag, a, ""]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._cell[2] = self._cell[2].strip()
            self._row.append(tuple(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append((self._row_attrs, self._row))
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[2] += data


def parse(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def _cells(page: _Page, table: str) -> dict:
    """{metric: {data-col: text}} of the score table."""
    out = {}
    for attrs, row in page.tables[table]:
        if "data-metric" in attrs:
            out[attrs["data-metric"]] = {c[1]["data-col"]: c[2] for c in row if "data-col" in c[1]}
    return out


def _read_png(path_or_bytes) -> np.ndarray:
    import matplotlib.image

    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return np.asarray(matplotlib.image.imread(src, format="png"), dtype=np.float64)


# ------------------------------------------------------------------------------------- numbers
def test_score_table_has_the_scores_numbers(reports, expected):
    page = parse(reports["good"])
    cells = _cells(page, "scores")
    assert list(cells) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        m = expected.metrics[name]
        row = cells[name]
        assert row["model"] == f"{m.value:.4f}", name
        assert row["model_ci"] == f"[{m.ci_low:.4f}, {m.ci_high:.4f}]", name
        c = expected.chance[name]
        assert row["chance"] == f"{c.value:.4f}" and row["chance_ci"] == f"[{c.ci_low:.4f}, {c.ci_high:.4f}]", name
        b = expected.baseline[name]
        assert row["baseline"] == f"{b['value']:.4f}", name
        assert row["change"] == f"{100 * b['relative_change']:+.1f}%", name
        p = b["p_value"]
        at_limit = p <= b["p_value_floor"] * (1 + 1e-9)
        assert row["p"] == (f"< 1/{round(1 / b['p_value_floor'])}" if at_limit else f"{p:.3f}"), name
        for k in ("baseline", "supervised", "unsupervised"):
            paper = f"{PAPER_RESULTS[k][name]:.4f}" if name in PAPER_RESULTS[k] else "n/a"  # RMSE_v2v: not in the paper
            assert row[f"paper_{k}"] == paper, (name, k)


def test_provenance_and_caveat_on_the_page(reports, toy):
    from v2m_bench.formats import read_references
    from v2m_bench.provenance import fingerprint

    text = reports["good"].read_text(encoding="utf-8")
    fp = fingerprint(read_references(toy / "references.h5"))
    m = re.search(r'<td data-key="references_sha256"><code>([0-9a-f]+)</code>', text)
    assert m is not None and m.group(1) == fp
    assert 'data-key="predictions_sha256"' in text and 'data-key="metric_definition"' in text
    assert re.search(r'class="note caveat">Note: only 5 identities', text)
    js = json.loads((reports["good"].parent / "scores.json").read_text())
    assert js["provenance"]["references_sha256"] == fp


def test_baseline_file_interval_is_its_own_score(reports, toy, bfm):
    bad = score(toy / "bad.h5", toy / "references.h5", bfm, config=ScoreConfig(bootstrap=100, seed=3, chance=False))
    cells = _cells(parse(reports["good"]), "scores")
    for name in METRIC_NAMES:
        m = bad.metrics[name]
        assert cells[name]["baseline_ci"] == f"[{m.ci_low:.4f}, {m.ci_high:.4f}]", name


def test_per_identity_table_matches_score(reports, expected):
    page = parse(reports["good"])
    rows = page.tables["per-identity"]
    head = [c[2] for c in rows[0][1]]
    assert head[0] == "identity" and head[2:2 + len(METRIC_NAMES)] == list(METRIC_NAMES)
    body = rows[1:]
    assert len(body) == len(NAMES)
    table = expected.per_identity
    seen = set()
    for _, cells in body:
        ident = cells[0][1]["data-value"]
        seen.add(ident)
        vals = {c[1]["data-col"]: float(c[1]["data-value"]) for c in cells[1:]}
        assert vals["n_predictions"] == 2
        for name in METRIC_NAMES:
            assert vals[name] == pytest.approx(float(table.loc[ident, name]), rel=1e-12, abs=1e-15), (ident, name)
    assert seen == set(NAMES)


def test_cases_are_best_median_worst_by_rmse(reports, expected):
    text = reports["good"].read_text(encoding="utf-8")
    order = expected.per_identity["RMSE"].sort_values(kind="stable").index.tolist()
    want = {"best": order[0], "median": order[(len(order) - 1) // 2], "worst": order[-1]}
    for key, ident in want.items():
        m = re.search(rf'data-case="{key}".*?<span class="identity">(.*?)</span>', text, re.S)
        assert m is not None, key
        assert html.unescape(m.group(1)) == ident, key


def test_vertex_errors_agree_with_the_rmse(toy, bfm, expected):
    from v2m_bench.formats import read_predictions, read_references
    from v2m_bench.report import vertex_errors

    preds = read_predictions(toy / "good.h5")
    refs = read_references(toy / "references.h5")
    ve = vertex_errors(preds, refs, bfm, config=CONFIG, keep=[0])
    per_id = {n: ve.rmse[preds.identity == n].mean() for n in NAMES}
    for n in NAMES:
        assert per_id[n] == pytest.approx(float(expected.per_identity.loc[n, "RMSE"]), rel=1e-6)
    assert ve.hist.sum() == pytest.approx(1.0, abs=1e-9)
    # the histogram's mean agrees with the exact mean to within a bin
    centres = (np.arange(ve.hist.size) + 0.5) * ve.bin_mm
    assert float(ve.hist @ centres) == pytest.approx(ve.mean, abs=ve.bin_mm)
    kept = ve.kept[0]
    d = kept["distances"].astype(np.float64)
    assert np.sqrt(np.mean(d ** 2)) == pytest.approx(ve.rmse[0], rel=1e-5)
    # the registered prediction lies close to the reference (a few mm at most for this noise)
    assert np.median(np.linalg.norm(kept["aligned"] - kept["reference"], axis=1)) < 5_000


# -------------------------------------------------------------------------------------- assets
def test_every_asset_exists_and_nothing_is_remote(reports):
    for path in reports.values():
        page = parse(path)
        assert page.refs, "no references at all"
        for tag, attr, ref in page.refs:
            assert not re.match(r"^[a-z][a-z0-9+.-]*:", ref, re.I) or ref.startswith("data:"), (tag, ref)
            assert not ref.startswith("//"), ref
            if ref.startswith(("data:", "#")):
                continue
            target = (path.parent / ref).resolve()
            assert target.is_file(), ref
            assert path.parent.resolve() in target.parents
        assert all("src" not in s for s in page.scripts), "no external scripts"
        assert len(page.imgs) >= len(METRIC_NAMES) + 1 + 1 + 1 + 3


def test_images_are_not_blank(reports):
    for path in reports.values():
        for img in parse(path).imgs:
            a = _read_png(path.parent / img["src"])
            assert a.ndim == 3 and a.shape[0] > 50 and a.shape[1] > 50, img["src"]
            rgb = a[..., :3]
            assert rgb.std() > 0.02, f"{img['src']} looks blank"
            assert (rgb.min(axis=2) < 0.9).mean() > 0.01, f"{img['src']} is almost all white"


def test_heat_map_differs_between_good_and_bad_model(reports):
    g = _read_png(reports["good"].parent / "img" / "heatmap_model.png")
    b = _read_png(reports["bad"].parent / "img" / "heatmap_model.png")
    assert g.shape == b.shape
    diff = np.abs(g[..., :3] - b[..., :3]).sum(axis=2)
    assert (diff > 0.1).mean() > 0.05, "the heat maps of a good and a bad model look alike"
    # same colour scale (anchored on the mean face, identical in both reports): the bad model
    # drawn as the good report's baseline is exactly the bad report's own heat map
    b_as_baseline = _read_png(reports["good"].parent / "img" / "heatmap_baseline.png")
    np.testing.assert_array_equal(b_as_baseline, b)
    # and the bad model is hotter: inferno gets brighter with the error
    face = diff > 0.1
    assert b[..., :3].sum(axis=2)[face].mean() > g[..., :3].sum(axis=2)[face].mean()


def test_identity_names_are_escaped(reports):
    text = reports["good"].read_text(encoding="utf-8")
    for name in NASTY:
        assert name not in text
    page = parse(reports["good"])
    idents = [cells[0][1]["data-value"] for _, cells in page.tables["per-identity"][1:]]
    assert set(NASTY) <= set(idents)  # the parser gives the original names back
    assert all(i.get("src", "").startswith("img/") for i in page.imgs)  # no injected <img>
    assert "<b>bold</b>" not in text


def test_report_refuses_a_file_as_out(toy, bfm, tmp_path):
    from v2m_bench.errors import ValidationError
    from v2m_bench.report import write_report

    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(ValidationError, match="not a folder"):
        write_report(toy / "good.h5", toy / "references.h5", f, bfm, config=CONFIG)


def test_cli_report(toy, bfm_dir, tmp_path):
    from click.testing import CliRunner

    from v2m_cli.bench import main

    res = CliRunner().invoke(main, ["report", str(toy / "good.h5"), "--references", str(toy / "references.h5"),
                                    "--bfm", str(bfm_dir), "--bootstrap", "0", "--image-size", "64",
                                    "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    page = parse(tmp_path / "rep" / "index.html")
    assert _cells(page, "scores")["RMSE"]["model_ci"] == "n/a"  # no bootstrap, no interval
    res = CliRunner().invoke(main, ["report", str(toy / "missing.h5"), "--references", str(toy / "references.h5"),
                                    "--bfm", str(bfm_dir), "--out", str(tmp_path / "rep2")])
    assert res.exit_code == 2 and "error:" in res.output


# ------------------------------------------------------------------------------------ browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


class _Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, exe: str, size=(1200, 1400)):
        self.profile = tempfile.mkdtemp(prefix="v2m-chromium-")
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()

        def fds():
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
                f"--user-data-dir={self.profile}", f"--window-size={size[0]},{size[1]}", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=fds, pass_fds=(3, 4))
        os.close(to_r)
        os.close(from_w)
        self._w = os.fdopen(to_w, "wb", buffering=0)
        self._r = from_r
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for m in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.send(m, session=True)

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            if select.select([self._r], [], [], left)[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params=None, session: bool = False, timeout: float = 60.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self._w.write(json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._message(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def load(self, url: str, timeout: float = 60.0) -> list[str]:
        """Open ``url``, wait for the load event and a moment more; return the errors seen."""
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=True)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._message(deadline))
        self.eval("new Promise(r => setTimeout(r, 200))", await_promise=True)
        return self.errors()

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def eval(self, expression: str, await_promise: bool = False):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": await_promise}, session=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"}, session=True)["data"])

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._w.close()
        os.close(self._r)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("needs headless Chromium (Debian: apt-get install chromium) for the browser test")
    b = _Browser(exe)
    yield b
    b.close()


@pytest.fixture
def http_root():
    """Serve a folder on 127.0.0.1; yields a function folder -> base URL."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        srv = start_http_server(handler)
        servers.append(srv)
        return srv.url + "/"

    yield serve
    for s in servers:
        stop_http_server(s)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_browser_notices_errors(browser, tmp_path):
    """The error capture works: a page with a script error and a missing image is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                   '<img src="missing.png"><script>console.error("boom"); undefinedFunction();</script></body></html>')
    errors = browser.load(bad.as_uri())
    assert any("boom" in e for e in errors), errors
    assert any("undefinedFunction" in e for e in errors), errors


@pytest.mark.parametrize("via", ["file", "http"])
def test_report_in_a_browser(browser, reports, http_root, via, tmp_path):
    index = reports["good"]
    url = index.as_uri() if via == "file" else http_root(index.parent) + "index.html"
    errors = browser.load(url)
    assert errors == [], errors
    assert browser.eval("document.body.getAttribute('data-sort-ready')") == "1"
    n_img = browser.eval("document.images.length")
    assert n_img >= len(METRIC_NAMES) + 6
    assert browser.eval("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)") is True
    # the injected markup in identity names stayed text
    assert browser.eval("document.querySelectorAll('#per-identity img, #per-identity b').length") == 0
    # clicking the RMSE header sorts the identities by RMSE, a second click reverses
    col = 2 + list(METRIC_NAMES).index("RMSE")
    get = f"Array.from(document.querySelectorAll('#per-identity tbody tr')).map(r => parseFloat(r.cells[{col}].getAttribute('data-value')))"
    browser.eval(f"document.querySelectorAll('#per-identity thead th')[{col}].click()")
    asc = browser.eval(get)
    assert asc == sorted(asc) and len(asc) == len(NAMES)
    browser.eval(f"document.querySelectorAll('#per-identity thead th')[{col}].click()")
    assert browser.eval(get) == sorted(asc, reverse=True)
    assert browser.errors() == []
    # a non-blank screenshot
    shot = _read_png(browser.screenshot())
    (tmp_path / "shot.png").write_bytes(browser.screenshot())
    rgb = shot[..., :3]
    assert rgb.std() > 0.05
    assert (rgb.min(axis=2) < 0.5).mean() > 0.005  # some dark text and figures
