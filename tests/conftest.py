"""Shared fixtures.

``bfm`` / ``shared_dir`` give the ../shared material when the environment points at it
(``V2M_BFM_DIR``, ``V2M_SHARED_DIR``) and skip otherwise. ``small_model`` is a random morphable
model that needs nothing outside the repository. ``start_http_server`` / ``stop_http_server``
run the local 127.0.0.1 servers that the download tests use instead of the internet.
"""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from v2m_bench.bfm import MorphableModel


def start_http_server(handler) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP server for ``handler`` on 127.0.0.1 (a free port), serving in a daemon
    thread; ``url`` is its base address (no trailing slash). Stop it with :func:`stop_http_server`."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    srv.thread.start()
    return srv


def stop_http_server(srv) -> None:
    """Stop a server of :func:`start_http_server` and close its socket."""
    srv.shutdown()
    srv.server_close()
    srv.thread.join(5)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's model cache out of the user's home."""
    monkeypatch.setenv("V2M_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "v2m-cache"))


@pytest.fixture(scope="session")
def bfm_dir() -> Path:
    d = os.environ.get("V2M_BFM_DIR")
    if not d or not Path(d).is_dir():
        pytest.skip("needs the BFM: set V2M_BFM_DIR to a 3DDFA train.configs folder (e.g. ../shared/bfm/train.configs)")
    return Path(d)


@pytest.fixture(scope="session")
def bfm(bfm_dir, tmp_path_factory):
    from v2m_bench import load_bfm

    return load_bfm(bfm_dir, cache=False)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    d = os.environ.get("V2M_SHARED_DIR")
    if not d or not Path(d).is_dir():
        pytest.skip("needs the shared material: set V2M_SHARED_DIR to the ../shared folder")
    return Path(d)


def make_small_model(seed: int = 0, n_side: int = 24) -> MorphableModel:
    """A random morphable model on a face-sized curved grid (n_side**2 vertices, 40 + 10 components).

    The mean is a smooth dome about 160,000 units wide (like the BFM); bases are smooth random
    fields; keypoints are 68 distinct vertices spread over the front; statistics are BFM-like.
    """
    rng = np.random.default_rng(seed)
    u = np.linspace(-1.0, 1.0, n_side)
    gx, gy = np.meshgrid(u, u)
    x, y = 80_000.0 * gx, 90_000.0 * gy
    z = 60_000.0 * np.sqrt(np.clip(1.2 - 0.6 * gx**2 - 0.4 * gy**2, 0.0, None))
    mean = np.stack([x, y, z], -1).reshape(-1, 3).astype(np.float32)
    n = mean.shape[0]
    idx = np.arange(n).reshape(n_side, n_side)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    tri = np.concatenate([np.stack([a, b, d], -1).reshape(-1, 3), np.stack([a, d, c], -1).reshape(-1, 3)])
    # smooth random bases: low-order polynomials of the grid coordinates times random 3-vectors
    feats = np.stack([np.ones_like(gx), gx, gy, gx * gy, gx**2, gy**2, gx**3, gy**3], -1).reshape(n, -1)
    def basis(k, scale):
        w = rng.normal(size=(feats.shape[1], 3, k))
        return (np.einsum("nf,fck->nck", feats, w).reshape(n * 3, k) * scale).astype(np.float32)
    shape_std = np.geomspace(5.9e5, 1.4e4, 40).astype(np.float32)
    expression_std = np.linspace(1.5, 0.3, 10).astype(np.float32)
    shape_basis = basis(40, 2_000.0 / shape_std.reshape(1, -1))
    expression_basis = basis(10, 1_000.0 / expression_std.reshape(1, -1))
    keypoints = np.sort(rng.choice(n, size=68, replace=False)).astype(np.int64)
    return MorphableModel(
        mean=mean,
        shape_basis=shape_basis,
        expression_basis=expression_basis,
        triangles=tri.astype(np.int64),
        keypoints=keypoints,
        shape_mean=np.zeros(40, np.float32),
        shape_std=shape_std,
        expression_mean=np.zeros(10, np.float32),
        expression_std=expression_std,
        pose_mean=np.zeros(12, np.float32),
        pose_std=np.ones(12, np.float32),
        source="tests.conftest.make_small_model",
    )


@pytest.fixture
def small_model() -> MorphableModel:
    return make_small_model(0)


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch intra-op thread for a test module of tiny convnets (on a 2-core machine two
    threads made them ~10x slower); the previous count is restored afterwards."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
