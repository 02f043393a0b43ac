"""Download the VGGFace (v1) images from the URLs of the annotation files, politely and resumably.

VGGFace ships URLs, not images: each ``files/<Name>.txt`` line is
``id url left top right bottom pose detection_score curation``. :func:`fetch_vggface` (the
``v2m-build-dataset fetch-vggface`` command) fetches them into the layout the build reads::

    OUT/images/<Name>/<id>.jpg       every image that passed the checks, bytes as served
    OUT/files/<Name>.txt             copies of the annotation files of the selected identities
    OUT/fetch-manifest.json          one line per URL: status, reason, bytes, sha256; totals
    OUT/placeholders/<sha256>.jpg    one copy of each placeholder picture that was recognised
    OUT/.lock                        held while a fetch runs (the build's lock, fcntl.flock)
    OUT/.fetch-journal.jsonl         settled items of the running fetch (merged into the manifest)

so ``v2m-build-dataset --vggface OUT`` takes the folder as it is. Names and ids are checked with
:func:`v2m_data.identities.validate_component` before any path is made from them.

Network
-------
``requests`` sessions (one per worker thread, pooled connections) with at most ``per_host``
requests in flight per host. Timeouts, connection errors, 408, 429 and 5xx are retried
``retries`` times with exponential backoff (``backoff * 2**attempt`` seconds, or the server's
``Retry-After`` when it gives one, up to ``max_wait``); a 404 or 410 is final. Redirects are
followed by hand, at most ``max_redirects``, and only to ``http``/``https`` URLs. A body larger
than ``max_bytes`` is abandoned; ``timeout`` bounds each request (connect, each read and the
whole body).

Validation
----------
A response is kept only when it decodes as an image (the build's decoder,
:func:`v2m_data.images.decode_image`: HTML or text served as ``.jpg`` fails), its shorter side is
at least ``min_side`` pixels, the annotated box fits inside it (overshooting by at most
``box_margin`` of the box's width/height, as some annotation boxes do), and it is not a
placeholder: the same bytes served for ``placeholder_urls`` (3) or more different URLs are a
host's "photo unavailable" picture. Placeholders are recognised while fetching (later copies are
never written) and once more over all items at the end of a run: the earlier copies are then
marked failed and moved out of ``images/`` (one copy kept as ``placeholders/<sha256>.jpg``).

Resume
------
Images are written atomically (:func:`v2m_bench.fileio.write_bytes`), so ``images/`` never holds
a partial file; each settled item is appended to the journal at once and the manifest is
rewritten atomically at the start and the end of a run. A rerun asks nothing again for items
already fetched (the file is there with its recorded size) or failed for good (404/410, not an
image, too small or large, box outside, placeholder, bad redirect or URL); it retries transient
failures (timeouts, connection errors, 408/429/5xx, truncated bodies). An image found at its path
without a record (a run killed between the write and the journal line, or a file you put there)
is validated from disk and kept, never fetched again or overwritten. A second fetch on the same
OUT while one runs is refused (:class:`v2m_data.building.BuildLockedError`).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import queue
import re
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from v2m_bench.errors import ValidationError
from v2m_bench.fileio import open_exclusive, progress, refuse_link, sha256_file, write_bytes, write_text

from .identities import select_identities, validate_component

__all__ = [
    "FetchConfig",
    "FetchResult",
    "fetch_vggface",
    "validate_image_bytes",
    "FETCH_MANIFEST_FORMAT",
    "FETCH_MANIFEST_VERSION",
    "PERMANENT_REASONS",
    "TRANSIENT_REASONS",
]

FETCH_MANIFEST_FORMAT = "v2m-vggface-fetch"
FETCH_MANIFEST_VERSION = 1
MANIFEST_NAME = "fetch-manifest.json"
JOURNAL_NAME = ".fetch-journal.jsonl"

#: Failure reasons that are final: a rerun does not ask these URLs again.
PERMANENT_REASONS = (
    "not-found",  # 404 or 410
    "http-error",  # another 4xx
    "too-large",  # body over max_bytes
    "not-an-image",  # does not decode as an image (HTML, text, truncated file)
    "too-small",  # shorter side under min_side
    "box-outside",  # the annotated box does not fit in the image
    "placeholder",  # the same bytes for placeholder_urls or more different URLs
    "redirect",  # too many redirects, or one to a non-http(s) URL
    "bad-url",  # not an http(s) URL
    "bad-id",  # the id is not a safe file name, or repeats an earlier line's id
    "existing-file",  # a file already at the path does not pass the checks (left alone)
)
#: Failure reasons a rerun retries.
TRANSIENT_REASONS = ("timeout", "connection", "dns", "host-down", "truncated", "rate-limited", "server-error", "error")

_REDIRECTS = (301, 302, 303, 307, 308)
_TMP = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class FetchConfig:
    """What :func:`fetch_vggface` fetches and how (validated on creation).

    Parameters
    ----------
    annotations : str
        Folder of VGGFace ``<Name>.txt`` annotation files.
    out : str
        Output folder (created; resumed when it holds a previous fetch).
    vox_meta : str, optional
        VoxCeleb1 ``vox1_meta.csv``; required when ``identities_from == "vox1_meta"``.
    identities_from : {"vox1_meta", "all"}
        Fetch the identities named in ``vox_meta`` (1,251 in the release) or every annotation file.
    workers : int
        Requests in flight at once (threads).
    per_host : int
        Requests in flight at once to one host.
    timeout : float
        Seconds allowed for one request: to connect, for each read, and for the whole body.
    retries : int
        Extra attempts after a transient failure within a run.
    max_bytes : int
        Largest body accepted, in bytes.
    curated_only : bool
        Only the lines whose ``curation`` field is 1.
    limit_per_identity : int, optional
        Only the first K lines (after ``curated_only``) of each identity's file.
    max_redirects : int
        Redirects followed per request.
    host_failures : int
        After this many connection failures or timeouts in a row on one host (or one failed name
        lookup), its remaining URLs are not asked in this run (reason ``host-down``, retried by a
        rerun): a dead host costs seconds, not ``timeout x (retries + 1)`` per URL.
    min_side : int
        Smallest accepted shorter image side, in pixels.
    box_margin : float
        How far the annotated box may overshoot the image, as a fraction of the box's width
        (left/right) or height (top/bottom). The released annotations overshoot by up to 0.33.
    placeholder_urls : int
        The same bytes served for this many different URLs are a placeholder.
    backoff : float
        First retry delay in seconds (doubled at each attempt) when the server gives no Retry-After.
    max_wait : float
        Longest delay before a retry, seconds; a longer Retry-After gives the item up for this run.
    user_agent : str
        The User-Agent header sent.
    progress : bool
        Show a progress bar (items, bytes, failures).
    """

    annotations: str
    out: str
    vox_meta: str | None = None
    identities_from: str = "vox1_meta"
    workers: int = 32
    per_host: int = 2
    timeout: float = 15.0
    retries: int = 2
    max_bytes: int = 20_000_000
    curated_only: bool = False
    limit_per_identity: int | None = None
    max_redirects: int = 5
    host_failures: int = 5
    min_side: int = 32
    box_margin: float = 0.4
    placeholder_urls: int = 3
    backoff: float = 1.0
    max_wait: float = 60.0
    user_agent: str = "voice2mesh-fetch-vggface/0.1 (research dataset rebuild; python-requests)"
    progress: bool = False

    def __post_init__(self):
        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise ValidationError(msg, key=key)

        if self.identities_from not in ("vox1_meta", "all"):
            raise ValidationError(f"must be 'vox1_meta' or 'all', got {self.identities_from!r}", key="identities_from")
        if self.identities_from == "vox1_meta" and not self.vox_meta:
            raise ValidationError(
                "identities are taken from vox1_meta.csv: give --vox-meta CSV (or --identities-from all)", key="vox_meta"
            )
        for key in ("workers", "per_host", "max_bytes", "min_side", "placeholder_urls", "host_failures"):
            v = getattr(self, key)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, key, f"must be an integer >= 1, got {v!r}")
        for key in ("retries", "max_redirects"):
            v = getattr(self, key)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, key, f"must be an integer >= 0, got {v!r}")
        if self.limit_per_identity is not None:
            v = self.limit_per_identity
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, "limit_per_identity", f"must be an integer >= 1, got {v!r}")
        for key in ("timeout", "max_wait"):
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and v > 0, key, f"must be > 0 seconds, got {v!r}")
        for key in ("backoff", "box_margin"):
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and v >= 0, key, f"must be >= 0, got {v!r}")
        need(bool(str(self.annotations)), "annotations", "is empty")
        need(bool(str(self.out)), "out", "is empty")


# ------------------------------------------------------------------------------------------ result
@dataclass
class FetchResult:
    """What :func:`fetch_vggface` did.

    Attributes
    ----------
    out : str
        The output folder.
    manifest : str
        ``OUT/fetch-manifest.json``.
    n_identities : int
        Identities selected.
    totals : dict
        ``{"urls", "ok", "failed", "pending", "bytes", "by_reason"}`` over every URL (the manifest's).
    requested : int
        URLs asked this run (items whose fate was settled before are not asked again).
    adopted : int
        Images found on disk without a record and kept after validation.
    bytes_downloaded : int
        Bytes received this run (kept or not).
    seconds : float
        Wall time of the fetching stage.
    interrupted : bool
        True when the run was stopped before every URL was tried.
    """

    out: str
    manifest: str
    n_identities: int
    totals: dict
    requested: int = 0
    adopted: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    def summary(self) -> str:
        """Totals by reason, this run's requests, where the manifest is."""
        t = self.totals
        lines = [
            f"fetch-vggface: {t['ok']} of {t['urls']} URLs ok ({t['bytes'] / 1e6:.1f} MB), {t['failed']} failed"
            + (f", {t['pending']} not tried" if t.get("pending") else "")
            + f"; {self.n_identities} identities"
        ]
        if t["by_reason"]:
            lines.append("failures: " + ", ".join(f"{k} {v}" for k, v in sorted(t["by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))))
        lines.append(
            f"this run: {self.requested} URLs requested, {self.bytes_downloaded / 1e6:.1f} MB received in {self.seconds:.1f} s"
            + (f", {self.adopted} images already on disk kept" if self.adopted else "")
            + (" (interrupted)" if self.interrupted else "")
        )
        lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ items
class _Item:
    """One annotation line and its fate (the manifest's item)."""

    __slots__ = ("identity", "id", "url", "box", "status", "reason", "detail", "bytes", "sha256")

    def __init__(self, identity: str, id: str, url: str, box: tuple):
        self.identity, self.id, self.url, self.box = identity, id, url, box
        self.status = self.reason = self.detail = self.sha256 = None
        self.bytes = None

    @property
    def key(self) -> tuple:
        return (self.identity, self.id)

    def settle(self, status, reason=None, detail=None, nbytes=None, sha256=None):
        self.status, self.reason, self.detail, self.bytes, self.sha256 = status, reason, detail, nbytes, sha256

    def to_dict(self) -> dict:
        return {
            "identity": self.identity,
            "id": self.id,
            "url": self.url,
            "status": self.status,
            "reason": self.reason,
            "detail": self.detail,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }

    @property
    def settled_for_good(self) -> bool:
        return self.status == "ok" or (self.status == "failed" and self.reason in PERMANENT_REASONS)


class _Outcome:
    __slots__ = ("status", "reason", "detail", "nbytes", "sha256", "received", "requested")

    def __init__(self, status, reason=None, detail=None, nbytes=None, sha256=None, received=0, requested=True):
        self.status, self.reason, self.detail, self.nbytes, self.sha256 = status, reason, detail, nbytes, sha256
        self.received, self.requested = received, requested


class _Fail(Exception):
    def __init__(self, reason: str, detail: str, retry_after: float | None = None, received: int = 0):
        super().__init__(detail)
        self.reason, self.detail, self.retry_after, self.received = reason, detail, retry_after, received

    @property
    def transient(self) -> bool:
        return self.reason in TRANSIENT_REASONS


# ------------------------------------------------------------------------------------------ validation
def validate_image_bytes(data: bytes, box, *, min_side: int = 32, box_margin: float = 0.4, source: str = "<bytes>") -> tuple:
    """Check that ``data`` is an image the build can use for the annotated ``box``.

    Parameters
    ----------
    data : bytes
        The encoded file.
    box : sequence of 4 float
        ``(left, top, right, bottom)`` from the annotation line, pixels.
    min_side : int
        Smallest accepted shorter side, pixels.
    box_margin : float
        Allowed overshoot of the box past the image border, as a fraction of its width/height.
    source : str
        Named in messages.

    Returns
    -------
    (reason, detail) : tuple of str, or (None, "WxH") when the image is good.
    """
    from .images import decode_image

    try:
        img = decode_image(data, source=source)
    except ValidationError:
        head = bytes(data[:64]).lstrip().lower()
        kind = "HTML" if head.startswith((b"<!doctype html", b"<html")) else "text" if head[:1] in (b"<", b"{") else "undecodable bytes"
        return "not-an-image", f"{kind} ({len(data)} bytes), not an image"
    h, w = img.shape[:2]
    if min(h, w) < min_side:
        return "too-small", f"{w}x{h} px, shorter side under {min_side}"
    l, t, r, b = (float(v) for v in box)
    mx, my = box_margin * max(r - l, 0.0), box_margin * max(b - t, 0.0)
    if l < -mx or t < -my or r > w + mx or b > h + my:
        return "box-outside", f"box ({l:g}, {t:g}, {r:g}, {b:g}) does not fit in {w}x{h} px"
    return None, f"{w}x{h}"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


# ------------------------------------------------------------------------------------------ the fetcher
class _Fetcher:
    """The network side: per-thread sessions, per-host slots, retries, redirects, size/time caps."""

    def __init__(self, config: FetchConfig, stop: threading.Event):
        self.config = config
        self.stop = stop
        self._local = threading.local()
        self._hosts: dict = {}
        self._hosts_lock = threading.Lock()
        self._host_failures: Counter = Counter()

    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            import requests
            from requests.adapters import HTTPAdapter

            s = requests.Session()
            adapter = HTTPAdapter(pool_connections=32, pool_maxsize=self.config.per_host, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            s.headers["User-Agent"] = self.config.user_agent
            s.headers["Accept"] = "image/*,*/*;q=0.5"
            self._local.session = s
        return s

    def close(self):
        pass  # sessions die with their threads

    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._hosts_lock:
            sem = self._hosts.get(host)
            if sem is None:
                sem = self._hosts[host] = threading.BoundedSemaphore(self.config.per_host)
            return sem

    def _failed(self, host: str, reason: str) -> None:
        with self._hosts_lock:
            if reason == "dns":
                self._host_failures[host] = max(self._host_failures[host], self.config.host_failures)
            else:
                self._host_failures[host] += 1

    def _answered(self, host: str) -> None:
        with self._hosts_lock:
            self._host_failures.pop(host, None)

    def _down(self, host: str) -> bool:
        with self._hosts_lock:
            return self._host_failures.get(host, 0) >= self.config.host_failures

    def get(self, url: str) -> tuple:
        """Fetch ``url`` with retries; return ``(body, received)`` or raise :class:`_Fail`."""
        cfg = self.config
        received = 0
        for attempt in range(cfg.retries + 1):
            try:
                body = self._get_once(url)
                return body, received + len(body)
            except _Fail as f:
                received += f.received
                f.received = received
                if not f.transient or f.reason in ("dns", "host-down") or attempt == cfg.retries:
                    raise
                wait = f.retry_after if f.retry_after is not None else cfg.backoff * 2**attempt
                if wait > cfg.max_wait:
                    f.detail += f" (asked to wait {wait:.0f} s, more than {cfg.max_wait:g})"
                    raise
                if self.stop.wait(wait):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _get_once(self, url: str) -> bytes:
        import requests
        from urllib3.exceptions import NameResolutionError, ReadTimeoutError

        cfg = self.config
        session = self._session()
        for _hop in range(cfg.max_redirects + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                raise _Fail("bad-url", "not an http(s) URL")
            host = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
            with self._slot(host):
                if self._down(host):
                    raise _Fail("host-down", f"not asked: {cfg.host_failures} failures in a row on this host")
                start = time.monotonic()
                try:
                    try:
                        r = session.get(url, stream=True, timeout=(cfg.timeout, cfg.timeout), allow_redirects=False)
                    except requests.Timeout:
                        raise _Fail("timeout", f"no answer within {cfg.timeout:g} s") from None
                    except requests.exceptions.InvalidURL:
                        raise _Fail("bad-url", "malformed URL") from None
                    except requests.ConnectionError as e:
                        if _caused_by(e, NameResolutionError):
                            raise _Fail("dns", "host name does not resolve") from None
                        raise _Fail("connection", f"cannot connect ({_short_exc(e)})") from None
                    except requests.RequestException as e:
                        raise _Fail("connection", f"request failed ({type(e).__name__})") from None
                except _Fail as f:
                    if f.reason in ("timeout", "connection", "dns"):
                        self._failed(host, f.reason)
                    raise
                self._answered(host)
                with r:
                    status = r.status_code
                    if status in _REDIRECTS and "location" in r.headers:
                        nxt = urllib.parse.urljoin(url, r.headers["location"])
                        if urllib.parse.urlsplit(nxt).scheme.lower() not in ("http", "https"):
                            raise _Fail("redirect", f"redirected to a non-http(s) URL ({urllib.parse.urlsplit(nxt).scheme}:)")
                        url = nxt
                        continue
                    if status in (404, 410):
                        raise _Fail("not-found", f"http {status}")
                    if status == 429:
                        raise _Fail("rate-limited", "http 429", _retry_after(r.headers.get("retry-after")))
                    if status == 408:
                        raise _Fail("timeout", "http 408")
                    if 500 <= status <= 599:
                        raise _Fail("server-error", f"http {status}", _retry_after(r.headers.get("retry-after")))
                    if not 200 <= status <= 299:
                        raise _Fail("http-error", f"http {status}")
                    length = r.headers.get("content-length")
                    if length is not None and length.strip().isdigit() and int(length) > cfg.max_bytes:
                        raise _Fail("too-large", f"{int(length)} bytes announced, more than {cfg.max_bytes}")
                    buf = bytearray()
                    try:
                        for chunk in r.iter_content(1 << 16):
                            buf += chunk
                            if len(buf) > cfg.max_bytes:
                                raise _Fail("too-large", f"more than {cfg.max_bytes} bytes", received=len(buf))
                            if time.monotonic() - start > cfg.timeout:
                                raise _Fail("timeout", f"body not complete within {cfg.timeout:g} s", received=len(buf))
                            if self.stop.is_set():
                                raise _Fail("connection", "interrupted", received=len(buf))
                    except requests.exceptions.ChunkedEncodingError:
                        raise _Fail("truncated", "connection dropped before the end of the body", received=len(buf)) from None
                    except requests.ConnectionError as e:
                        if _caused_by(e, ReadTimeoutError):
                            raise _Fail("timeout", f"body stalled for {cfg.timeout:g} s", received=len(buf)) from None
                        raise _Fail("truncated", f"connection lost during the body ({_short_exc(e)})", received=len(buf)) from None
                    except requests.RequestException as e:
                        raise _Fail("truncated", f"body unreadable ({type(e).__name__})", received=len(buf)) from None
                    return bytes(buf)
        raise _Fail("redirect", f"more than {cfg.max_redirects} redirects")


def _caused_by(exc: BaseException, kind: type) -> bool:
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return True
        stack.extend([e.__cause__, e.__context__, *[a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]])
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
    return False


def _short_exc(e: BaseException) -> str:
    text = str(e)
    for key in ("Connection refused", "Connection reset", "Connection aborted", "Remote end closed", "timed out", "No route"):
        if key.lower() in text.lower():
            return key.lower()
    return type(e).__name__


# ------------------------------------------------------------------------------------------ state
class _State:
    """Items, the placeholder index, the journal and the manifest of one OUT folder."""

    def __init__(self, config: FetchConfig, out: Path, items: list, header: dict):
        self.config = config
        self.out = out
        self.items = items
        self.header = header
        self.by_key = {it.key: it for it in items}
        self._urls_by_sha: dict = {}
        self._sha_lock = threading.Lock()
        self._journal_fd: int | None = None

    # placeholder index: sha256 -> the distinct URLs that served it
    def note_sha(self, sha: str, url: str) -> int:
        """Record that ``url`` served bytes ``sha``; return how many different URLs did."""
        with self._sha_lock:
            cur = self._urls_by_sha.get(sha)
            if cur is None:
                self._urls_by_sha[sha] = url
                return 1
            if isinstance(cur, str):
                if cur == url:
                    return 1
                cur = self._urls_by_sha[sha] = {cur, url}
            cur.add(url)
            return len(cur)

    def sha_count(self, sha: str) -> int:
        with self._sha_lock:
            cur = self._urls_by_sha.get(sha)
            return 0 if cur is None else 1 if isinstance(cur, str) else len(cur)

    # records
    def load_previous(self) -> None:
        """Apply the manifest and the journal of a previous run to items with the same URL."""
        records: dict = {}
        mpath = self.out / MANIFEST_NAME
        if mpath.exists():
            refuse_link(mpath)
            try:
                data = json.loads(mpath.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValidationError(f"unreadable fetch manifest ({type(e).__name__}); move it away to start afresh", path=str(mpath)) from None
            if not isinstance(data, dict) or data.get("format") != FETCH_MANIFEST_FORMAT:
                raise ValidationError(f"not a fetch manifest (format is not {FETCH_MANIFEST_FORMAT!r})", path=str(mpath))
            for rec in data.get("items", []):
                if isinstance(rec, dict):
                    records[(rec.get("identity"), rec.get("id"))] = rec
        jpath = self.out / JOURNAL_NAME
        if jpath.exists():
            refuse_link(jpath)
            for line in jpath.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # the line a killed run was writing
                if isinstance(rec, dict):
                    records[(rec.get("identity"), rec.get("id"))] = rec
        for key, rec in records.items():
            it = self.by_key.get(key)
            if it is None or rec.get("url") != it.url or rec.get("status") not in ("ok", "failed"):
                continue
            it.settle(rec["status"], rec.get("reason"), rec.get("detail"), rec.get("bytes"), rec.get("sha256"))

    def open_journal(self) -> None:
        path = self.out / JOURNAL_NAME
        fd = open_exclusive(path)
        os.ftruncate(fd, 0)
        self._journal_fd = fd

    def journal(self, it: _Item) -> None:
        line = (json.dumps(it.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
        os.write(self._journal_fd, line)

    def close_journal(self, remove: bool) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        if remove:
            try:
                (self.out / JOURNAL_NAME).unlink()
            except FileNotFoundError:
                pass

    def totals(self) -> dict:
        by_reason = Counter(it.reason for it in self.items if it.status == "failed")
        ok = [it for it in self.items if it.status == "ok"]
        return {
            "urls": len(self.items),
            "ok": len(ok),
            "failed": sum(by_reason.values()),
            "pending": sum(1 for it in self.items if it.status is None),
            "bytes": int(sum(it.bytes or 0 for it in ok)),
            "by_reason": dict(sorted(by_reason.items())),
        }

    def write_manifest(self) -> Path:
        head = dict(self.header)
        head["totals"] = self.totals()
        head["placeholders"] = sorted({it.sha256 for it in self.items if it.reason == "placeholder" and it.sha256})
        text = json.dumps(head, indent=1, ensure_ascii=False)
        lines = ",\n".join("  " + json.dumps(it.to_dict(), ensure_ascii=False) for it in self.items if it.status is not None)
        text = text[:-2] + ',\n "items": [\n' + lines + ("\n" if lines else "") + " ]\n}\n"
        return write_text(self.out / MANIFEST_NAME, text)


# ------------------------------------------------------------------------------------------ planning
def _annotation_names(folder: Path) -> list:
    return sorted(p.stem for p in folder.iterdir() if p.suffix == ".txt" and not p.name.startswith(".") and p.is_file())


def _select(config: FetchConfig, ann: Path) -> tuple:
    names = _annotation_names(ann)
    if not names:
        raise ValidationError("no <Name>.txt annotation files in the folder", path=str(ann))
    info: dict = {"from": config.identities_from}
    if config.identities_from == "vox1_meta":
        table = select_identities(config.vox_meta, names)
        chosen = sorted(i.name for i in table.identities)
        info.update(
            vox_meta=str(Path(config.vox_meta).resolve()),
            in_vox_meta=table.n_meta,
            without_annotation_file=table.not_in_vggface,
            rejected=table.rejected,
        )
    else:
        chosen, rejected = [], []
        for n in names:
            try:
                chosen.append(validate_component(n, "VGGFace name"))
            except ValidationError as e:
                rejected.append({"name": n, "reason": str(e)})
        info.update(rejected=rejected)
    info["selected"] = len(chosen)
    if not chosen:
        raise ValidationError("no identity to fetch (none of the metadata's names has an annotation file)", path=str(ann))
    return chosen, info


def _read_items(config: FetchConfig, ann: Path, names: list) -> list:
    from .images import read_vggface_annotations

    items = []
    for name in names:
        df = read_vggface_annotations(ann / f"{name}.txt")
        if config.curated_only:
            df = df[df["curation"] == 1]
        if config.limit_per_identity is not None:
            df = df.iloc[: config.limit_per_identity]
        seen: Counter = Counter()
        for rid, url, l, t, r, b in zip(df["id"], df["url"], df["left"], df["top"], df["right"], df["bottom"]):
            rid = str(rid)
            seen[rid] += 1
            it = _Item(name, rid if seen[rid] == 1 else f"{rid}#{seen[rid]}", str(url), (float(l), float(t), float(r), float(b)))
            if seen[rid] > 1:
                it.settle("failed", "bad-id", f"repeats the id {rid} of an earlier line")
            else:
                try:
                    validate_component(rid, "image id")
                except ValidationError as e:
                    it.settle("failed", "bad-id", str(e))
            items.append(it)
    return items


def _by_host(items: list) -> list:
    """Interleave items host by host so that per-host limits do not idle the workers."""
    groups: dict = defaultdict(list)
    for it in items:
        groups[urllib.parse.urlsplit(it.url).netloc.lower()].append(it)
    queues = [groups[h] for h in sorted(groups)]
    out = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out


def _copy_annotations(ann: Path, files: Path, names: list) -> int:
    refuse_link(files)
    files.mkdir(parents=True, exist_ok=True)
    copied = 0
    for name in names:
        src, dst = ann / f"{name}.txt", files / f"{name}.txt"
        data = src.read_bytes()
        if dst.exists() or dst.is_symlink():
            refuse_link(dst)
            if dst.resolve() == src.resolve() or dst.read_bytes() == data:
                continue
            raise ValidationError(f"already holds a different {name}.txt; refusing to overwrite it (move it away)", path=str(dst))
        write_bytes(dst, data)
        copied += 1
    return copied


def _remove_stale_temps(folder: Path) -> None:
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if _TMP.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()


# ------------------------------------------------------------------------------------------ main
def fetch_vggface(config: FetchConfig, *, log: Callable[[str], None] | None = None) -> FetchResult:
    """Fetch the VGGFace images of the selected identities into ``config.out`` (see the module docs).

    Parameters
    ----------
    config : FetchConfig
    log : callable, optional
        Receives one-line progress messages (e.g. ``print`` to stderr).

    Returns
    -------
    FetchResult

    Raises
    ------
    ValidationError
        Missing or unreadable annotation folder, file or metadata; a symbolic link or a foreign
        file in the way; a different annotation file already in ``OUT/files``.
    v2m_data.building.BuildLockedError
        Another fetch (or build) holds ``OUT/.lock``.
    """
    from .building import BuildLock

    log = log or (lambda s: None)
    ann = Path(config.annotations)
    if not ann.is_dir():
        raise ValidationError("no such VGGFace annotation folder", path=str(ann))
    out = refuse_link(Path(config.out))
    if out.exists() and not out.is_dir():
        raise ValidationError("exists and is not a folder", path=str(out))
    names, selection = _select(config, ann)
    images = out / "images"
    with BuildLock(out):
        refuse_link(images)
        for name in names:
            refuse_link(images / name)
        items = _read_items(config, ann, names)
        copied = _copy_annotations(ann, out / "files", names)
        header = {
            "format": FETCH_MANIFEST_FORMAT,
            "version": FETCH_MANIFEST_VERSION,
            "annotations": str(ann.resolve()),
            "identities": selection,
            "parameters": {
                k: v
                for k, v in asdict(config).items()
                if k in ("curated_only", "limit_per_identity", "max_bytes", "min_side", "box_margin", "placeholder_urls", "max_redirects")
            },
        }
        state = _State(config, out, items, header)
        state.load_previous()
        for name in names:
            _remove_stale_temps(images / name)
        # settle what is on disk; index the bytes already seen
        adopted = 0
        pending = []
        for it in items:
            path = images / it.identity / f"{it.id}.jpg"
            if it.status == "ok" and path.is_file() and not path.is_symlink() and path.stat().st_size == it.bytes:
                pass
            elif it.settled_for_good and it.status == "failed":
                pass
            elif it.reason == "bad-id":
                pass
            elif path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                reason, detail = validate_image_bytes(data, it.box, min_side=config.min_side, box_margin=config.box_margin, source=str(path))
                sha = hashlib.sha256(data).hexdigest()
                if reason is None:
                    it.settle("ok", None, None, len(data), sha)
                    adopted += 1
                else:
                    it.settle("failed", "existing-file", f"a file already at the path fails the checks: {detail}")
            elif path.is_symlink() or path.exists():
                it.settle("failed", "existing-file", "something that is not a regular file is at the path")
            else:
                it.status = it.reason = it.detail = it.bytes = it.sha256 = None
                pending.append(it)
            if it.sha256 and (it.status == "ok" or it.reason == "placeholder"):
                state.note_sha(it.sha256, it.url)
        n_before = len(items) - len(pending)
        log(
            f"fetch-vggface: {len(names)} identities ({_selection_line(selection)}), {len(items)} URLs; "
            f"{n_before} settled before (kept as they are), {len(pending)} to fetch"
            + (f"; {copied} annotation files copied to {out / 'files'}" if copied else "")
        )
        state.write_manifest()
        state.open_journal()
        stop = threading.Event()
        fetcher = _Fetcher(config, stop)
        t0 = time.monotonic()
        requested = received = 0
        interrupted = False
        clean = False
        try:
            requested, received = _run(state, fetcher, _by_host(pending), images, stop)
            clean = True
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
            raise
        finally:
            seconds = time.monotonic() - t0
            if clean:
                _final_placeholder_pass(state, images, out)
            state.write_manifest()
            state.close_journal(remove=True)
        totals = state.totals()
    return FetchResult(
        out=str(out),
        manifest=str(out / MANIFEST_NAME),
        n_identities=len(names),
        totals=totals,
        requested=requested,
        adopted=adopted,
        bytes_downloaded=received,
        seconds=seconds,
        interrupted=interrupted or totals["pending"] > 0,
    )


def _selection_line(sel: dict) -> str:
    if sel["from"] == "vox1_meta":
        s = f"named in {Path(sel['vox_meta']).name}"
        if sel.get("without_annotation_file"):
            s += f"; {len(sel['without_annotation_file'])} metadata names without an annotation file"
    else:
        s = "every annotation file"
    if sel.get("rejected"):
        s += f"; {len(sel['rejected'])} unsafe names skipped"
    return s


def _run(state: _State, fetcher: _Fetcher, todo: list, images: Path, stop: threading.Event) -> tuple:
    """Fetch ``todo`` on ``workers`` threads; record each outcome as it comes. Returns (requested, bytes)."""
    cfg = state.config
    if not todo:
        return 0, 0
    results: queue.Queue = queue.Queue()
    source = iter(todo)
    source_lock = threading.Lock()

    def work():
        try:
            while not stop.is_set():
                with source_lock:
                    it = next(source, None)
                if it is None:
                    break
                try:
                    res = _fetch_one(it, state, fetcher, images)
                except Exception as e:  # noqa: BLE001 - one strange URL must not end a day-long run
                    res = _Outcome("failed", "error", f"unexpected {type(e).__name__}: {str(e)[:200]}")
                results.put((it, res))
        finally:
            results.put(None)

    n_threads = min(cfg.workers, len(todo))
    threads = [threading.Thread(target=work, name=f"fetch-{i}", daemon=True) for i in range(n_threads)]
    for t in threads:
        t.start()
    requested = received = failed = 0
    bar = progress(total=len(todo), desc="fetch-vggface", unit="url", enabled=cfg.progress)
    try:
        running = n_threads
        while running:
            msg = results.get()
            if msg is None:
                running -= 1
                continue
            it, res = msg
            it.settle(res.status, res.reason, res.detail, res.nbytes, res.sha256)
            state.journal(it)
            requested += int(res.requested)
            received += res.received
            failed += res.status != "ok"
            bar.update(1)
            bar.set_postfix_str(f"{received / 1e6:.1f} MB, {failed} failed", refresh=False)
    finally:
        stop.set()
        bar.close()
    return requested, received


def _fetch_one(it: _Item, state: _State, fetcher: _Fetcher, images: Path) -> _Outcome:
    cfg = state.config
    try:
        body, received = fetcher.get(it.url)
    except _Fail as f:
        return _Outcome("failed", f.reason, f.detail, received=f.received, requested=f.reason != "host-down")
    reason, detail = validate_image_bytes(body, it.box, min_side=cfg.min_side, box_margin=cfg.box_margin, source=it.url)
    if reason is not None:
        return _Outcome("failed", reason, detail, received=received)
    sha = hashlib.sha256(body).hexdigest()
    n = state.note_sha(sha, it.url)
    if n >= cfg.placeholder_urls:
        return _Outcome("failed", "placeholder", f"the same bytes were served for {n} different URLs", sha256=sha, received=received)
    path = images / it.identity / f"{it.id}.jpg"
    if path.exists() or path.is_symlink():  # appeared while we fetched: never overwrite
        return _Outcome("failed", "existing-file", "a file appeared at the path during the fetch; left alone", received=received)
    write_bytes(path, body)
    return _Outcome("ok", None, None, len(body), sha, received=received)


def _final_placeholder_pass(state: _State, images: Path, out: Path) -> None:
    """Fail every kept image whose bytes were served for placeholder_urls or more URLs; move it out."""
    cfg = state.config
    for it in state.items:
        if not it.sha256 or not (it.status == "ok" or it.reason == "placeholder"):
            continue
        n = state.sha_count(it.sha256)
        if n < cfg.placeholder_urls:
            continue
        detail = f"the same bytes were served for {n} different URLs"
        if it.status == "ok":
            path = images / it.identity / f"{it.id}.jpg"
            keep = out / "placeholders" / f"{it.sha256}.jpg"
            if path.is_file() and not path.is_symlink():
                refuse_link(keep.parent)
                if not keep.exists() and not keep.is_symlink():
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, keep)
                elif sha256_file(path) == it.sha256:
                    path.unlink()  # a byte-identical copy is already kept
            it.settle("failed", "placeholder", detail, None, it.sha256)
            state.journal(it)
        else:
            it.detail = detail
