"""The numpy path's nearest-vertex walk: per-reference tables, array backends (numpy, torch), walk.

The walk (see :mod:`v2m_bench.metrics.icp`): from a start vertex, move to the closest candidate of
the walk graph while one is strictly closer. The tables are flattened over (reference, local
vertex) for one chunk of references, so a point's row is ``base + vertex`` with ``base = g * n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .plan import Graph

__all__ = ["Rows", "NumpyBackend", "TorchBackend", "backend", "RefTables", "normals32", "edge_table", "walk"]

_POINT_CHUNK = 16384  # points per vectorised walk call (cache-sized temporaries; no effect on results)


class Rows:
    """A row table prepared for fast row gathers."""

    __slots__ = ("data", "width", "void")

    def __init__(self, data, width, void):
        self.data, self.width, self.void = data, width, void


class NumpyBackend:
    """Host arrays (the default)."""

    name = "numpy"

    def put(self, a, dtype=None):
        return np.ascontiguousarray(a, dtype=dtype)

    def host(self, a):
        return np.asarray(a)

    def rows(self, table):
        table = np.ascontiguousarray(table, dtype=np.float32)
        w = table.shape[1]
        return Rows(table, w, table.view(np.dtype((np.void, 4 * w))).reshape(-1))

    def gather(self, rows: Rows, idx):
        # a 1-D take of whole rows viewed as one void item: several times faster than take(axis=0)
        return np.take(rows.void, idx).view(np.float32).reshape(-1, rows.width)

    def int_index(self, a):
        return np.asarray(a, dtype=np.int64)


class TorchBackend:
    """Tables and the walk on a torch device (e.g. "cuda"); the small algebra stays on the host."""

    name = "torch"

    def __init__(self, device):
        import torch

        self.t = torch
        self.device = torch.device(device)

    def put(self, a, dtype=None):
        t = self.t
        out = a.to(self.device) if isinstance(a, t.Tensor) else t.from_numpy(np.ascontiguousarray(a)).to(self.device)
        if dtype is not None:
            out = out.to({np.float32: t.float32, np.float64: t.float64, np.int64: t.int64}[dtype])
        return out

    def host(self, a):
        return a.detach().cpu().numpy() if isinstance(a, self.t.Tensor) else np.asarray(a)

    def rows(self, table):
        table = self.put(table, np.float32).contiguous()
        return Rows(table, table.shape[1], None)

    def gather(self, rows: Rows, idx):
        return rows.data.index_select(0, idx.reshape(-1))

    def int_index(self, a):
        if isinstance(a, self.t.Tensor):
            return a.to(device=self.device, dtype=self.t.int64)
        return self.t.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)


def backend(device):
    """The array backend of a ``device`` argument: None / "numpy" -> numpy, else torch."""
    if device is None or (isinstance(device, str) and device == "numpy"):
        return NumpyBackend()
    return TorchBackend(device)


@dataclass(eq=False)
class RefTables:
    """Per-reference data for one chunk of references, flattened over (reference, local vertex)."""

    n: int  # local vertices per reference
    k: int
    positions_normals: Rows  # (G*n, 6): centred float32 position, unit normal
    edges: Rows | None  # (G*n, 4*K): edge vectors x, y, z to each candidate, then half squared length
    nbr_flat: Any  # (n*K,) local candidate ids


def normals32(positions: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals in float32 of one reference (n, 3) float32 (the definition
    of geometry.vertex_normals)."""
    n = positions.shape[0]
    t0, t1, t2 = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    x, y, z = positions[:, 0], positions[:, 1], positions[:, 2]
    ax, ay, az = x[t0], y[t0], z[t0]
    ux, uy, uz = x[t1] - ax, y[t1] - ay, z[t1] - az
    vx, vy, vz = x[t2] - ax, y[t2] - ay, z[t2] - az
    fn = (uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx)
    flat = triangles.reshape(-1)
    out = np.empty((n, 3), np.float64)
    for c in range(3):
        out[:, c] = np.bincount(flat, weights=np.repeat(fn[c], 3), minlength=n)
    norm = np.sqrt(np.einsum("ij,ij->i", out, out))
    out /= np.maximum(norm, 1e-30)[:, None]
    return out.astype(np.float32)


def edge_table(positions: np.ndarray, graph: Graph, off_slots: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(n, 4*K) float32 rows of one reference (positions (n, 3) float32): edge vectors to the K
    candidates as x[K], y[K], z[K], then |e|^2 / 2 [K] (+inf on padding, so a padded slot never wins)."""
    n, k = graph.nbr.shape
    tab = np.empty((n, 4, k), np.float32) if out is None else out.reshape(n, 4, k)
    h = tab[:, 3, :]
    for c in range(3):
        qc = np.ascontiguousarray(positions[:, c], dtype=np.float32)
        e = np.take(qc, graph.nbr)
        e -= qc[:, None]
        tab[:, c, :] = e
        if c == 0:
            np.multiply(e, e, out=h)
        else:
            e *= e
            h += e
    h *= 0.5
    h.reshape(-1)[off_slots] = np.inf
    return tab.reshape(n, 4 * k)


def walk(be, tab: RefTables, x, start, base, max_steps: int):
    """Greedy nearest-vertex walk.

    x (M, 3) float32 points in the centred frame of their reference; start (M,) local start ids;
    base (M,) ``g * n`` offsets into the chunk's flattened tables. Each step moves every point
    whose current vertex has a strictly closer candidate to the closest candidate (lowest index on
    ties). Returns the end ids (M,).
    """
    if be.name != "numpy":
        return _walk_torch(be, tab, x, start, base, max_steps)
    m = x.shape[0]
    out = np.array(start, dtype=np.int64)
    k = tab.k
    k4 = 4 * k
    offs = np.array([0, k, 2 * k], np.int64)
    nbr_flat = tab.nbr_flat
    for lo in range(0, m, _POINT_CHUNK):
        hi = min(m, lo + _POINT_CHUNK)
        view = out[lo:hi]
        current = view.copy()
        row = base[lo:hi] + current
        # t4 = (x - q_current, -1): one dot product with a table row scores every candidate
        t4 = np.empty((hi - lo, 4), np.float32)
        np.subtract(x[lo:hi], be.gather(tab.positions_normals, row)[:, :3], out=t4[:, :3])
        t4[:, 3] = -1.0
        active = None
        for _ in range(max_steps):
            rows = be.gather(tab.edges, row)  # (m', 4K)
            # score_k = t . e_k - |e_k|^2 / 2 > 0  <=>  candidate k is closer than the current vertex
            score = np.einsum("mck,mc->mk", rows.reshape(-1, 4, k), t4)
            slot = score.argmax(axis=1)
            pos = np.arange(slot.size) * k + slot
            moving = np.flatnonzero(np.take(score.reshape(-1), pos) > 0)
            if moving.size == 0:
                break
            slot_m = slot[moving]
            e = np.take(rows.reshape(-1), (moving * k4 + slot_m)[:, None] + offs)  # (m'', 3) chosen edge vectors
            t4 = t4[moving]
            t4[:, :3] -= e
            was = current[moving]
            current = np.take(nbr_flat, was * k + slot_m)
            row = row[moving] + (current - was)
            active = moving if active is None else active[moving]
            view[active] = current
    return out


def _walk_torch(be, tab, x, start, base, max_steps):
    torch = be.t
    out = start.clone()
    k = tab.k
    current = start.clone()
    row = base + current
    t4 = torch.empty((x.shape[0], 4), dtype=torch.float32, device=be.device)
    t4[:, :3] = x - be.gather(tab.positions_normals, row)[:, :3]
    t4[:, 3] = -1.0
    active = None
    for _ in range(max_steps):
        rows = be.gather(tab.edges, row).reshape(-1, 4, k)
        score = torch.einsum("mck,mc->mk", rows, t4)
        best, slot = score.max(dim=1)
        moving = torch.nonzero(best > 0).reshape(-1)
        if moving.numel() == 0:
            break
        slot_m = slot[moving]
        e = rows[moving, :3, :].gather(2, slot_m.view(-1, 1, 1).expand(-1, 3, 1))[:, :, 0]
        t4 = t4[moving]
        t4[:, :3] -= e
        was = current[moving]
        current = tab.nbr_flat[was * k + slot_m]
        row = row[moving] + (current - was)
        active = moving if active is None else active[moving]
        out[active] = current
    return out
