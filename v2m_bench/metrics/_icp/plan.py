"""The topology work of the ICP metrics: walk graphs, iteration vertices, breadth-first score order.

It depends on the triangles, the regions and the iteration-vertex counts only, so one plan serves
every call on a topology (see :func:`v2m_bench.metrics.icp.icp_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["hash_ids", "iteration_vertices", "Graph", "candidate_pairs", "graph_from_pairs", "bfs_layers", "Part", "Plan",
           "make_plan"]


def hash_ids(ids: np.ndarray) -> np.ndarray:
    """Frozen 32-bit integer hash of vertex ids (Wellons' "lowbias32")."""
    m = np.uint64(0xFFFFFFFF)
    x = np.asarray(ids, dtype=np.uint64) & m
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & m
    x ^= x >> np.uint64(16)
    return x


def iteration_vertices(candidates, count: int) -> np.ndarray:
    """The fixed ICP iteration vertices: the ``count`` ids of ``candidates`` with the smallest hash.

    The hash (Wellons' lowbias32 of the vertex id) is frozen, so the choice is the same on every
    machine and numpy version and looks random over the mesh.

    Parameters
    ----------
    candidates : int or array_like of int
        ``N`` (vertices ``0..N-1``) or the vertex ids of a region.
    count : int
        How many to keep (all when there are fewer).

    Returns
    -------
    ndarray, shape (min(count, len(candidates)),), int64, ascending.
    """
    ids = np.arange(int(candidates), dtype=np.int64) if np.ndim(candidates) == 0 else np.asarray(candidates, dtype=np.int64)
    if ids.size <= count:
        return np.sort(ids)
    keep = np.lexsort((ids, hash_ids(ids)))[:count]
    return np.sort(ids[keep])


@dataclass(eq=False)
class Graph:
    """A walk graph over ``n`` local vertices: padded candidate table (n, K)."""

    n: int
    k: int
    nbr: np.ndarray  # (n, K) int64 local ids, padded with the vertex itself
    valid: np.ndarray  # (n, K) bool


def _unique_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    key = np.sort(pairs[:, 0].astype(np.int64) * n + pairs[:, 1])
    key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    return np.stack([key // n, key % n], axis=1)


def candidate_pairs(triangles: np.ndarray, n: int) -> np.ndarray:
    """Directed (vertex, candidate) pairs: 1-ring, plus across-edge vertices for degree < 6."""
    tri = triangles
    e = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    e = _unique_pairs(e[e[:, 0] != e[:, 1]], n)
    deg = np.bincount(e[:, 0], minlength=n)
    # the vertex across the edge opposite each corner: corner v of triangle (v, a, b) and the
    # third vertex of the other triangle on edge (a, b)
    corner = tri.reshape(-1)
    ea = tri[:, [1, 2, 0]].reshape(-1)
    eb = tri[:, [2, 0, 1]].reshape(-1)
    key = np.minimum(ea, eb).astype(np.int64) * n + np.maximum(ea, eb)
    order = np.argsort(key, kind="stable")
    ks = key[order]
    same = np.flatnonzero(ks[1:] == ks[:-1])
    i1, i2 = order[same], order[same + 1]
    opp = np.concatenate([np.stack([corner[i1], corner[i2]], 1), np.stack([corner[i2], corner[i1]], 1)])
    opp = opp[deg[opp[:, 0]] < 6]
    pairs = _unique_pairs(np.concatenate([e, opp]), n)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def graph_from_pairs(pairs: np.ndarray, n: int) -> Graph:
    """The padded candidate table of directed pairs (candidates of a vertex in ascending id order)."""
    src, dst = pairs[:, 0], pairs[:, 1]
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    deg = np.bincount(src, minlength=n)
    k = max(int(deg.max()) if deg.size else 1, 1)
    start = np.concatenate([[0], np.cumsum(deg)[:-1]])
    slot = np.arange(src.size) - start[src]
    nbr = np.repeat(np.arange(n, dtype=np.int64)[:, None], k, axis=1)
    nbr[src, slot] = dst
    valid = np.zeros((n, k), bool)
    valid[src, slot] = True
    return Graph(n=n, k=k, nbr=nbr, valid=valid)


def bfs_layers(graph: Graph, seeds: np.ndarray):
    """Breadth-first layers from ``seeds`` over the graph: list of (vertices, parents).

    Layer 0 is ``(seeds, seeds)``; a later vertex's parent is its smallest-id neighbour in the
    previous layer. Vertices not reachable from the seeds form a last layer, their own parents.
    """
    seen = np.zeros(graph.n, bool)
    seen[seeds] = True
    layers = [(seeds, seeds)]
    frontier = seeds
    while frontier.size:
        cand = graph.nbr[frontier]
        ok = graph.valid[frontier] & ~seen[cand]
        v = cand[ok]
        if v.size == 0:
            break
        p = np.broadcast_to(frontier[:, None], cand.shape)[ok]
        order = np.lexsort((p, v))
        v, p = v[order], p[order]
        first = np.concatenate([[True], v[1:] != v[:-1]])
        v, p = v[first], p[first]
        seen[v] = True
        layers.append((v, p))
        frontier = v
    rest = np.flatnonzero(~seen)
    if rest.size:
        layers.append((rest, rest))
    return layers


@dataclass(eq=False)
class Part:
    """A scored vertex set (all vertices, or a region) with its walk graph and iteration vertices.

    A region's graph keeps the global candidate slots (so its edge table is a row subset of the
    global one) with candidates outside the region switched off.
    """

    name: str
    ids: np.ndarray  # (n,) global vertex ids, ascending
    graph: Graph  # over local ids 0..n-1
    iteration_local: np.ndarray  # (S,) local ids of the iteration vertices
    layers: list  # BFS layers (local ids) from iteration_local

    local_of: np.ndarray | None  # (N,) global -> local id, -1 outside (regions only)
    off_slots: np.ndarray | None  # flat (vertex * K + slot) indices of switched-off candidates
    order: np.ndarray | None = None  # local ids in BFS order (layer after layer)
    bounds: np.ndarray | None = None  # layer boundaries in ``order``
    parent_pos: np.ndarray | None = None  # position in ``order`` of each vertex's parent
    shift: np.ndarray | None = None  # vertex id - parent id (local), for the shifted warm start

    def __post_init__(self):
        order = np.concatenate([v for v, _ in self.layers])
        pos = np.empty(order.size, np.int64)
        pos[order] = np.arange(order.size)
        parents = np.concatenate([p for _, p in self.layers])
        self.order = order
        self.bounds = np.cumsum([0] + [v.size for v, _ in self.layers])
        self.parent_pos = pos[parents]
        self.shift = order - parents


@dataclass(eq=False)
class Plan:
    """The whole topology work: the global part, the regions' parts and the global padding slots."""

    n: int
    triangles: np.ndarray
    whole: Part
    parts: list
    off_slots: np.ndarray  # flat indices of padding slots of the global graph


def make_plan(triangles: np.ndarray, n: int, regions, cfg) -> Plan:
    """The :class:`Plan` of checked triangles (F, 3) over ``n`` vertices, regions and an IcpConfig."""
    graph = graph_from_pairs(candidate_pairs(triangles, n), n)
    ids = np.arange(n, dtype=np.int64)
    it = iteration_vertices(n, cfg.n_iteration_vertices)
    whole = Part("", ids, graph, it, bfs_layers(graph, it), None, None)
    parts = []
    for name, mask in regions.items():
        rid = np.flatnonzero(mask).astype(np.int64)
        local_of = np.full(n, -1, np.int64)
        local_of[rid] = np.arange(rid.size)
        loc = local_of[graph.nbr[rid]]
        valid = graph.valid[rid] & (loc >= 0)
        nbr = np.where(valid, loc, np.arange(rid.size)[:, None])
        region_graph = Graph(n=rid.size, k=graph.k, nbr=nbr, valid=valid)
        it_r = local_of[iteration_vertices(rid, cfg.part_iteration_vertices)]
        parts.append(Part(name, rid, region_graph, it_r, bfs_layers(region_graph, it_r), local_of,
                          np.flatnonzero(~valid.reshape(-1))))
    return Plan(n=n, triangles=triangles, whole=whole, parts=parts, off_slots=np.flatnonzero(~graph.valid.reshape(-1)))
