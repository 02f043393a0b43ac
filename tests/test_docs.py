"""Every command and Python example in README.md and docs/*.md runs as written; the docs site builds.

Convention for fenced blocks (```bash and ```python; other languages are not run):

- Files run in a fixed order (README.md, then the pages in mkdocs.yml's nav order, then any other
  docs/*.md) in ONE fresh temporary working folder outside the repository (examples run from any
  folder), so a page may use what an earlier one made (the toy files of the Quickstart). Nothing is
  prepared there beforehand: every file an example reads was made by an example shown before it.
  V2M_BFM_DIR comes from the environment; without it the test is skipped.
- Bash blocks run line by line (``\\`` continuations joined) with ``bash -e``; the same line is
  run once even when several pages show it. Exceptions:
  ``pip install ...`` is checked, not run (the options parse, every requirement is valid, every
  ``.[extra]`` exists in pyproject.toml); ``python -m pytest`` / ``pytest`` is not run again from
  inside the tests; ``v2m-bench fetch-bfm`` runs against a local 127.0.0.1 server that serves the
  V2M_BFM_DIR files, with ``--base-url URL --no-verify --dest DIR`` appended.
- Python blocks of one file run in one namespace, in order, in the working folder. No code is run
  that the reader does not see.
- ``<!-- test: skip REASON -->`` right before a block (blank lines between are allowed) skips it (a
  reason is required): for what needs data or hardware a test cannot have.
- A ``<!-- test: ... -->`` comment that is not attached to a block (text between it and the next
  fence) fails ``test_every_marker_belongs_to_a_block``; any other kind of marker fails
  ``test_parser_and_markers``.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import start_http_server, stop_http_server

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)[^\n]*$")
_MARKER = re.compile(r"<!--\s*test:\s*(\w+)\b(.*?)-->", re.S)


@dataclass
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: tuple[str, str] | None = None  # ("skip", reason)


def parse_blocks(text: str, path: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the test marker written just before each."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(2), m.group(3).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        indent = len(m.group(1))
        code = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[i + 1:j])
        # the marker: an HTML comment ending on the last non-blank line before the fence
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = None
        if k >= 0 and lines[k].rstrip().endswith("-->"):
            start = k
            while start >= 0 and "<!--" not in lines[start]:
                start -= 1
            mm = _MARKER.search("\n".join(lines[max(start, 0):k + 1]))
            if mm:
                kind, body = mm.group(1), mm.group(2).strip()
                if kind != "skip":
                    raise ValueError(f"{path}:{k + 1}: unknown marker '<!-- test: {kind} -->' (only 'skip REASON')")
                if not body:
                    raise ValueError(f"{path}:{k + 1}: '<!-- test: {kind} -->' needs a reason or code")
                marker = (kind, body)
        blocks.append(Block(path, i + 1, lang, code, marker))
        i = j + 1
    return blocks


def doc_files() -> list[str]:
    """README.md, the nav pages of mkdocs.yml in order, then the other docs/*.md."""
    out = ["README.md"]
    nav = re.findall(r"^\s*-\s*[^:\n]+:\s*([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    for page in nav:
        if (ROOT / "docs" / page).is_file():
            out.append(f"docs/{page}")
    for p in sorted((ROOT / "docs").glob("*.md")):
        rel = f"docs/{p.name}"
        if rel not in out:
            out.append(rel)
    return out


def all_blocks(files=None) -> list[Block]:
    blocks = []
    for rel in files or doc_files():
        blocks.extend(parse_blocks((ROOT / rel).read_text(encoding="utf-8"), rel))
    return blocks


def logical_lines(code: str) -> list[str]:
    out, cur = [], ""
    for raw in code.splitlines():
        if raw.rstrip().endswith("\\"):
            cur += raw.rstrip()[:-1] + " "
            continue
        cur += raw
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


# --------------------------------------------------------------------------- pip install check
_PIP_FLAGS = {"-e", "--editable", "-r", "--requirement", "-c", "--constraint", "-U", "--upgrade", "--pre", "--user",
              "--no-deps", "--no-build-isolation", "-q", "--quiet", "-v", "--verbose", "--no-cache-dir"}
_PIP_TAKES_VALUE = {"-e", "--editable", "-r", "--requirement", "-c", "--constraint"}


def check_pip_install(line: str) -> None:
    """Raise AssertionError unless ``pip install ...`` is well-formed for this repository."""
    from packaging.requirements import Requirement

    args = shlex.split(line)
    if args[:2] == ["python", "-m"]:
        args = args[2:]
    assert args[:2] == ["pip", "install"], line
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="needs tomllib (Python 3.11) or tomli to read pyproject.toml")
    extras_known = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    rest = args[2:]
    assert rest, f"nothing to install: {line}"
    i = 0
    while i < len(rest):
        a = rest[i]
        if a.startswith("-"):
            assert a in _PIP_FLAGS, f"unknown pip option {a!r} in: {line}"
            if a in _PIP_TAKES_VALUE:
                i += 1
                assert i < len(rest), f"{a} needs a value: {line}"
                a = rest[i]
                if a.startswith((".", "/")):
                    _check_local(a, extras_known, line)
                else:
                    assert (ROOT / a).is_file(), f"no such file {a!r}: {line}"
            i += 1
            continue
        if a.startswith((".", "/")):
            _check_local(a, extras_known, line)
        else:
            Requirement(a)  # raises InvalidRequirement
        i += 1


def _check_local(spec: str, extras_known: set, line: str) -> None:
    m = re.fullmatch(r"(\.[^\[]*)(?:\[([^\]]*)\])?", spec)
    assert m, f"cannot read the local install {spec!r}: {line}"
    assert (ROOT / m.group(1) / "pyproject.toml").is_file(), f"{m.group(1)} is not the project root: {line}"
    for extra in filter(None, (e.strip() for e in (m.group(2) or "").split(","))):
        assert extra in extras_known, f"unknown extra {extra!r} (pyproject.toml has {sorted(extras_known)}): {line}"


# ------------------------------------------------------------------------------- the runner
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class DocRunner:
    """Runs the blocks of the documentation files in order in one working folder."""

    def __init__(self, work: Path, bfm_dir: Path):
        self.work = work
        self.bfm_dir = bfm_dir
        self.notes: dict[str, list[str]] = {}
        self.done_commands: set[str] = set()
        self.done_python: set[str] = set()
        self.server = None
        env = dict(os.environ)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["V2M_BFM_DIR"] = str(bfm_dir)
        env["V2M_CACHE_DIR"] = str(work / ".cache")
        env["MPLBACKEND"] = "Agg"
        self.env = env

    def base_url(self) -> str:
        if self.server is None:
            handler = functools.partial(_Quiet, directory=str(self.bfm_dir))
            self.server = start_http_server(handler)
        return self.server.url + "/"

    def close(self):
        if self.server is not None:
            stop_http_server(self.server)

    def run_until(self, rel: str) -> list[str]:
        """Run every file up to and including ``rel`` (once each); return ``rel``'s notes, one per
        bash line and per python block."""
        for f in doc_files():
            if f not in self.notes:
                self.notes[f] = []  # a failed file is not run again by a later test
                self.notes[f] = self.run_file(f)
            if f == rel:
                return self.notes[f]
        raise AssertionError(f"{rel} is not a documentation file")

    def run_file(self, rel: str) -> list[str]:
        notes = []
        ns: dict = {"__name__": "__docs__"}
        for b in all_blocks([rel]):
            if b.lang not in ("bash", "sh", "shell", "python", "py"):
                continue
            where = f"{b.path}:{b.line}"
            if b.marker and b.marker[0] == "skip":
                notes.append(f"{where}: skipped ({b.marker[1]})")
                continue
            if b.lang in ("python", "py"):
                notes.append(self.run_python(b, ns, where))
            else:
                for line in logical_lines(b.code):
                    notes.append(self.run_command(line, where))
        return notes

    def run_python(self, b: Block, ns: dict, where: str) -> str:
        key = hashlib.sha256(b.code.encode()).hexdigest()
        if key in self.done_python:
            return f"{where}: python already run"
        old = os.getcwd()
        os.chdir(self.work)
        try:
            exec(compile(b.code, where, "exec"), ns)
        except Exception as e:  # noqa: BLE001 - reported with the block's place
            raise AssertionError(f"{where}: the python example failed: {type(e).__name__}: {e}") from e
        finally:
            os.chdir(old)
        self.done_python.add(key)
        return f"{where}: python ran"

    def run_command(self, line: str, where: str) -> str:
        words = shlex.split(line)
        if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
            for part in line.split(" && "):
                check_pip_install(part)
            return f"{where}: checked {line!r}"
        if words[:3] == ["python", "-m", "pytest"] or words[:1] == ["pytest"]:
            return f"{where}: not run from inside the tests: {line!r}"
        if line in self.done_commands:
            return f"{where}: already run: {line!r}"
        check_fetch = None
        run = line
        if words[:2] == ["v2m-bench", "fetch-bfm"] and "--base-url" not in words:
            dest = self.work / "fetched-bfm"
            run = f"{line} --base-url {self.base_url()} --no-verify --dest {shlex.quote(str(dest))}"
            check_fetch = dest
        res = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", run], cwd=self.work, env=self.env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{where}: {run!r} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        if check_fetch is not None:
            for f in sorted(p.name for p in self.bfm_dir.iterdir() if p.is_file()):
                assert (check_fetch / f).read_bytes() == (self.bfm_dir / f).read_bytes(), f"{where}: {f} not fetched"
        self.done_commands.add(line)
        return f"{where}: ran {run!r}"


@pytest.fixture(scope="module")
def runner(bfm_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("docs-work")
    r = DocRunner(work, bfm_dir)
    yield r
    r.close()


# ------------------------------------------------------------------------------------- tests
def test_parser_and_markers():
    text = (
        "Intro\n\n<!-- test: skip needs the real data -->\n\n```bash\nv2m-bench score a.h5 \\\n  --references b.h5\n```\n\n"
        "```python\nprint(41 + 1)\n```\n\n```text\nnot run\n```\n"
        "<!-- an ordinary comment -->\n```bash\necho hi\n# a comment\n```\n"
    )
    b = parse_blocks(text, "t.md")
    assert [x.lang for x in b] == ["bash", "python", "text", "bash"]
    assert b[0].marker == ("skip", "needs the real data")
    assert logical_lines(b[0].code) == ["v2m-bench score a.h5    --references b.h5"]
    assert b[1].marker is None and b[1].code == "print(41 + 1)"
    assert b[2].marker is None and b[3].marker is None
    assert logical_lines(b[3].code) == ["echo hi"]
    with pytest.raises(ValueError, match="needs a reason"):
        parse_blocks("<!-- test: skip -->\n```bash\nls\n```\n", "t.md")
    # hidden set-up code is not a thing: what a reader sees is what runs
    with pytest.raises(ValueError, match="unknown marker"):
        parse_blocks("<!-- test: setup\nx = 41\n-->\n```python\nprint(x + 1)\n```\n", "t.md")


def test_pip_install_check():
    check_pip_install('pip install torch==2.13.0 -e ".[test]"')
    check_pip_install('pip install --no-deps "face-alignment>=1.4"')
    check_pip_install('pip install -e ".[docs]"')
    with pytest.raises(AssertionError, match="unknown extra"):
        check_pip_install('pip install -e ".[nosuchextra]"')
    from packaging.requirements import InvalidRequirement

    with pytest.raises(InvalidRequirement):
        check_pip_install("pip install torch==>2")
    with pytest.raises(AssertionError, match="unknown pip option"):
        check_pip_install("pip install --frobnicate torch")


def test_docs_have_runnable_blocks():
    blocks = all_blocks()
    files = {b.path for b in blocks}
    assert {"README.md", "docs/quickstart.md", "docs/reproducing.md"} <= files
    cmds = [line for b in blocks if b.lang == "bash" and not b.marker for line in logical_lines(b.code)]
    assert any(c.startswith("v2m-bench score") for c in cmds)
    assert any(c.startswith("v2m-bench report") for c in cmds)
    assert any(c.startswith("v2m-bench export") for c in cmds)
    # the synthetic world end to end, as the Quickstart, building and training pages show it
    for prefix in ("v2m-build-dataset synth", "v2m-build-dataset --voxceleb", "v2m-build-dataset merge",
                   "v2m-train voice-encoder", "v2m-train supervised", "v2m-predict"):
        assert any(c.startswith(prefix) for c in cmds), prefix
    assert {"docs/building.md", "docs/training.md"} <= files
    assert sum(b.lang == "python" for b in blocks) >= 4


def test_every_marker_belongs_to_a_block():
    """A marker separated from its block (text in between) would silently stop applying."""
    for rel in doc_files():
        text = (ROOT / rel).read_text(encoding="utf-8")
        written = len(_MARKER.findall(text))
        attached = sum(b.marker is not None for b in parse_blocks(text, rel))
        assert written == attached, f"{rel}: {written} test markers, {attached} attached to a fenced block"


@pytest.mark.slow
@pytest.mark.parametrize("rel", doc_files())
def test_doc_examples_run(runner, rel):
    notes = runner.run_until(rel)
    print("\n".join(notes))
    blocks = [b for b in all_blocks([rel]) if b.lang in ("bash", "sh", "shell", "python", "py")]
    want = sum(1 if b.lang.startswith("py") or b.marker else len(logical_lines(b.code)) for b in blocks)
    assert len(notes) == want, f"{rel}: {want} blocks/lines to run, {len(notes)} accounted for"


def test_mkdocs_build_strict(tmp_path):
    missing = [m for m in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material")
               if importlib.util.find_spec(m.split(".")[0]) is None
               or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec("mkdocstrings_handlers") is None)]
    # the test extra installs them (pyproject.toml), so CI always builds the site: missing is a failure
    assert not missing, f"the docs packages are part of the test extra (pip install -e \".[test]\"): missing {', '.join(missing)}"
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("write_report", "icp_scores", "read_predictions", "split_of", "bfm_regions", "score", "BuildConfig"):
        assert name in api, name
    for page in ("building", "training", "quickstart"):
        assert (site / page / "index.html").is_file(), page
    # the site works offline: no resource (script, style, font, image) is loaded from elsewhere
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"<(script|img|iframe)\b[^>]*\bsrc=\"(https?:)?//", text), page
        assert not re.search(r"<link\b[^>]*\bhref=\"(https?:)?//", text), page
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, page


def test_every_docstring_example_runs(tmp_path, monkeypatch):
    """The ``>>>`` examples in the packages' docstrings run as written (``doctest``; an example
    that needs data or hardware a test cannot have is marked ``# doctest: +SKIP``), from a fresh
    working folder."""
    import doctest
    import importlib
    import pkgutil

    monkeypatch.chdir(tmp_path)
    ran, failed = [], []
    for pkg in ("v2m_bench", "v2m_data", "v2m_models", "v2m_cli"):
        base = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(base.__path__, pkg + "."):
            spec = importlib.util.find_spec(info.name)
            if spec is None or spec.origin is None or ">>>" not in Path(spec.origin).read_text():
                continue
            res = doctest.testmod(importlib.import_module(info.name), optionflags=doctest.ELLIPSIS, report=False)
            ran.append((info.name, res.attempted))
            if res.failed:
                failed.append(f"{info.name}: {res.failed} of {res.attempted} failed")
    assert not failed, failed
    names = dict(ran)
    assert names.get("v2m_bench.metrics.v2v", 0) >= 6, ran  # the metric's own examples ran
