"""Download the 3DDFA Basel Face Model files (``v2m-bench fetch-bfm``).

The files come from the public 3DDFA (v1) repository, github.com/cleardusk/3DDFA: the six files
of its ``train.configs`` folder and ``visualize/tri.mat`` (see :data:`BFM_URLS`). They are checked
against the md5 of that release (:data:`v2m_bench.bfm.GENUINE_MD5`) and written into the folder that
:func:`v2m_bench.find_bfm_dir` looks at, ``<cache>/bfm/train.configs``, unless told otherwise.

The BFM-derived files are for academic use under the Basel Face Model licence.

Only the standard library is used for the transfer (``urllib.request``; proxies from the
environment are honoured). ``tqdm`` draws the progress bars when it can be imported.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from .bfm import BFM_FILES, GENUINE_MD5, default_cache_dir
from .errors import DownloadError, ValidationError
from .fileio import atomic_path, md5_file
from .fileio import progress as progress_bar

__all__ = ["fetch_bfm", "BFM_URLS", "MAX_BYTES", "ChecksumError", "NotGenuineWarning", "default_bfm_dest", "bfm_urls"]

_REPO = "https://github.com/cleardusk/3DDFA/blob/master"

#: Public address of each file of the 3DDFA release (GitHub serves the raw bytes via ``?raw=true``).
BFM_URLS = {
    name: f"{_REPO}/{'visualize' if name == 'tri.mat' else 'train.configs'}/{name}?raw=true" for name in BFM_FILES
}

_CHUNK = 1 << 16
#: Largest BFM file :func:`fetch_bfm` accepts by default (the largest genuine one is 25.5 MB).
MAX_BYTES = 64 << 20
# HTTP statuses worth another try; every other HTTP error (404, 403, ...) fails at once.
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class ChecksumError(DownloadError):
    """A downloaded file's md5 differs from the expected one.

    Attributes ``name``, ``url``, ``expected``, ``got`` and ``mirror`` (True when the file came from
    a ``base_url`` rather than the public release) let a caller phrase its own advice.
    """

    def __init__(self, name: str, url: str, expected: str, got: str, mirror: bool):
        self.name, self.url, self.expected, self.got, self.mirror = name, url, expected, got, mirror
        if mirror:
            advice = "the mirror's file is not the genuine 3DDFA one; pass verify=False to accept it anyway"
        else:
            advice = "the download was corrupted or the upstream file changed; try again"
        super().__init__(f"{name}: md5 mismatch for {url}: expected {expected}, got {got} ({advice})")


class NotGenuineWarning(UserWarning):
    """Files accepted with ``verify=False`` differ from the genuine 3DDFA release."""


class _Transient(Exception):
    """A failure worth retrying; carries the one-line message for the final DownloadError."""


def default_bfm_dest() -> Path:
    """Where ``fetch_bfm`` writes by default: ``default_cache_dir()/bfm/train.configs``."""
    return default_cache_dir() / "bfm" / "train.configs"


def bfm_urls(base_url: str | None = None) -> dict[str, str]:
    """Address of each BFM file: the public 3DDFA ones, or ``base_url/NAME`` (flat) for a mirror."""
    if base_url is None:
        return dict(BFM_URLS)
    base = base_url.rstrip("/")
    return {name: f"{base}/{name}" for name in BFM_FILES}


def _progress_bar(name: str, total: int | None, enabled: bool):
    """A byte progress bar (:func:`v2m_bench.fileio.progress`), or None when disabled."""
    if not enabled:
        return None
    return progress_bar(total=total, desc=name, unit="B", enabled=True, unit_scale=True, unit_divisor=1024, leave=True)


def _download_once(url: str, part: Path, name: str, timeout: float, progress: bool, max_bytes: int,
                   need_length: bool) -> str:
    """Stream ``url`` into ``part`` (an existing, exclusively created file); return the md5 of it.

    Raises _Transient for errors worth retrying, DownloadError for the others.
    """
    req = urllib.request.Request(url, headers={"User-Agent": "voice2mesh-fetch-bfm"})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        msg = f"{name}: HTTP {e.code} {_one_line(e.reason)} for {url}"
        e.close()
        if e.code in _TRANSIENT_HTTP:
            raise _Transient(msg) from None
        raise DownloadError(msg) from None
    except urllib.error.URLError as e:
        raise _Transient(f"{name}: cannot reach {url}: {_one_line(e.reason)}") from None
    except (OSError, http.client.HTTPException) as e:
        raise _Transient(f"{name}: cannot reach {url}: {_one_line(e)}") from None

    h = hashlib.md5()
    got = 0
    with resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.strip().isdigit() else None
        chunked = "chunked" in (resp.headers.get("Transfer-Encoding") or "").lower()
        if total is not None and total > max_bytes:
            raise DownloadError(f"{name}: {url} announces {total} bytes, more than the limit of {max_bytes}")
        if total is None and not chunked and need_length:
            raise DownloadError(
                f"{name}: {url} sent no Content-Length, so a truncated transfer cannot be told from a complete "
                "one and the md5 is not checked; serve the length or verify the files"
            )
        try:
            f = open(part, "wb")
        except OSError as e:
            raise DownloadError(f"{name}: cannot write {part}: {e.strerror}") from None
        bar = _progress_bar(name, total, progress)
        try:
            with f:
                while True:
                    try:
                        chunk = resp.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                        raise _Transient(f"{name}: transfer from {url} failed after {got} bytes: {_one_line(e)}") from None
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > max_bytes:
                        raise DownloadError(f"{name}: {url} sent more than the limit of {max_bytes} bytes")
                    try:
                        f.write(chunk)
                    except OSError as e:  # disk full, ...: not worth retrying
                        raise DownloadError(f"{name}: cannot write {part}: {e.strerror}") from None
                    h.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                try:
                    f.flush()
                except OSError as e:
                    raise DownloadError(f"{name}: cannot write {part}: {e.strerror}") from None
        finally:
            if bar is not None:
                bar.close()
    if total is not None and got != total:
        raise _Transient(f"{name}: incomplete transfer from {url}: got {got} of {total} bytes")
    return h.hexdigest()


def _one_line(e) -> str:
    text = repr(e) if isinstance(e, BaseException) else str(e)
    return " ".join(text.split())


def fetch_bfm(
    dest: str | os.PathLike | None = None,
    base_url: str | None = None,
    verify: bool = True,
    force: bool = False,
    progress: bool = True,
    timeout: float = 60,
    *,
    expected_md5: Mapping[str, str] | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    log: Callable[[str], None] | None = None,
    max_bytes: int = MAX_BYTES,
) -> Path:
    """Download the seven 3DDFA BFM files into a ``train.configs`` folder.

    Each file is streamed to a temporary file with an unpredictable name, created exclusively in
    ``dest`` (:func:`v2m_bench.fileio.atomic_path`: no planted link is followed), its length and
    md5 checked, then moved over ``NAME`` (atomic): a failed or refused download leaves no
    partial file and never removes or overwrites a file already there. Files already present with the expected md5 are not downloaded
    again (so an interrupted fetch resumes where it stopped) unless ``force``.

    Parameters
    ----------
    dest : str or path-like, optional
        Target folder (created if needed). Default ``default_cache_dir()/bfm/train.configs``, where
        :func:`v2m_bench.load_bfm` finds the model with no further setting.
    base_url : str, optional
        A mirror: every file is fetched as ``base_url/NAME`` (a flat folder; ``tri.mat`` included,
        although upstream it lives in ``visualize/``). ``file://`` URLs work too. Default: the
        public 3DDFA addresses (:data:`BFM_URLS`).
    verify : bool, default True
        Refuse files whose md5 differs from ``expected_md5`` (:class:`ChecksumError`). ``False``
        accepts them with a :class:`NotGenuineWarning`; only allowed with ``base_url`` (files from
        the public addresses are always verified).
    force : bool, default False
        Download every file even when a copy with the expected md5 is already there.
    progress : bool, default True
        Show a byte progress bar per file (needs tqdm; silently none without it).
    timeout : float, default 60
        Socket timeout in seconds for connecting and for each read.
    expected_md5 : mapping, optional
        md5 per file name; default :data:`v2m_bench.bfm.GENUINE_MD5`.
    retries : int, default 3
        Further attempts per file after a transient failure (connection error, timeout, HTTP
        408/429/5xx, truncated transfer), waiting ``backoff * 2**k`` seconds before attempt k+1.
        HTTP 4xx errors and md5 mismatches are not retried.
    backoff : float, default 1.0
        Base delay in seconds between attempts.
    log : callable, optional
        Called with one line per file saying what was done (downloaded, already present).
    max_bytes : int, default :data:`MAX_BYTES`
        Largest file accepted; a server announcing or sending more is refused.

    Returns
    -------
    Path
        The folder holding the seven files; ``load_bfm(path)`` loads it.

    Raises
    ------
    DownloadError
        One line naming the file and URL: HTTP error, unreachable host, truncated transfer after
        the retries, a file over ``max_bytes``, no Content-Length with ``verify=False``, or
        (:class:`ChecksumError`) md5 mismatch with expected and actual values.
    ValidationError
        ``verify=False`` without ``base_url``, or ``expected_md5`` lacking a file.
    """
    mirror = base_url is not None
    if not verify and not mirror:
        raise ValidationError(
            "verification of the public 3DDFA files cannot be turned off; verify=False needs base_url (a mirror)",
            key="verify",
        )
    expected = dict(GENUINE_MD5 if expected_md5 is None else expected_md5)
    missing = [n for n in BFM_FILES if n not in expected]
    if missing:
        raise ValidationError(f"no md5 given for {', '.join(missing)}", key="expected_md5")
    if retries < 0:
        raise ValidationError(f"must be >= 0, got {retries}", key="retries")
    if mirror and urllib.parse.urlsplit(base_url).scheme not in ("http", "https", "file"):
        raise ValidationError(f"expected an http://, https:// or file:// URL, got {base_url!r}", key="base_url")
    urls = bfm_urls(base_url)
    dest = default_bfm_dest() if dest is None else Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{dest}: cannot create the folder: {e.strerror}") from None
    say = log or (lambda _msg: None)

    not_genuine = []
    for name in BFM_FILES:
        target, url = dest / name, urls[name]
        if not force and target.is_file() and not target.is_symlink() and md5_file(target) == expected[name]:
            say(f"{name}: already present (md5 ok)")
            continue
        with atomic_path(target) as part:
            got = _fetch_with_retries(url, part, name, timeout, progress, retries, backoff, max_bytes, not verify)
            if got != expected[name]:
                if verify:
                    raise ChecksumError(name, url, expected[name], got, mirror)
                not_genuine.append(name)
        say(f"{name}: downloaded from {url}" + ("" if got == expected[name] else " (md5 differs from the genuine file)"))

    if not_genuine:
        warnings.warn(
            f"{', '.join(not_genuine)} from {base_url} differ from the genuine 3DDFA release (md5): this model "
            "is not genuine and scores computed with it are not comparable to published ones",
            NotGenuineWarning,
            stacklevel=2,
        )
    return dest


def _fetch_with_retries(
    url: str, part: Path, name: str, timeout: float, progress: bool, retries: int, backoff: float,
    max_bytes: int, need_length: bool,
) -> str:
    """Download into ``part`` with bounded retries; return the md5 of what arrived."""
    for attempt in range(retries + 1):
        try:
            return _download_once(url, part, name, timeout, progress, max_bytes, need_length)
        except _Transient as e:
            if attempt == retries:
                tries = f" (after {retries + 1} attempts)" if retries else ""
                raise DownloadError(f"{e}{tries}") from None
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover
