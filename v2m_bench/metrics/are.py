"""ARE: the absolute ratio errors of four facial line lengths over the outer interocular distance.

Pure numpy: meshes (N, 3) or (B, N, 3) on the BFM topology in, per-sample values out (see
:mod:`v2m_bench.metrics` for the conventions and ``docs/metrics.md`` for the definition).
"""

from __future__ import annotations

import numpy as np

from ..topology import ARE_PAIRS, OICD
from ._checks import distance, mesh_pair, meshes, reads_vertex, squeeze

__all__ = ["ARE_KEYS", "oicd", "are_ratios", "are"]

#: Keys of the dict returned by :func:`are`: the four line metrics and their mean.
ARE_KEYS: tuple[str, ...] = ("ER", "FR", "MR", "CR", "mean")

#: The highest vertex id ARE reads.
_NEED = max(max(OICD), *(max(p) for p in ARE_PAIRS.values()))


def oicd(v) -> np.ndarray:
    """The normalising length: the 3-D distance between vertices 2217 and 14607.

    Parameters
    ----------
    v : array_like, shape (B, N, 3) or (N, 3)
        Meshes, BFM units (micrometres).

    Returns
    -------
    ndarray, shape (B,) (0-d for one mesh), float64, BFM units.
    """
    m, single = meshes(v, "v")
    reads_vertex(m, "v", max(OICD))
    return squeeze(distance(m, *OICD), single)


def are_ratios(v) -> dict[str, np.ndarray]:
    """The four line ratios D/OICD of each mesh.

    ``D_k`` is the 3-D distance between the two vertices ``ARE_PAIRS[k]`` (ER 20636-34153,
    FR 1678-42117, MR 2130-15003, CR 2294-13635) and OICD the distance 2217-14607. On the BFM
    mean shape: ER 1.4108, FR 1.1594, MR 1.1104, CR 1.0044.

    Parameters
    ----------
    v : array_like, shape (B, N, 3) or (N, 3)
        Meshes (any length unit: the ratios are unitless).

    Returns
    -------
    dict
        ``{"ER", "FR", "MR", "CR"}`` -> ndarray (B,) float64 (0-d for one mesh).
    """
    m, single = meshes(v, "v")
    reads_vertex(m, "v", _NEED)
    o = distance(m, *OICD)
    return {k: squeeze(distance(m, a, b) / o, single) for k, (a, b) in ARE_PAIRS.items()}


def are(pred, ref) -> dict[str, np.ndarray]:
    """ARE, the absolute ratio errors of the official code, per prediction.

    For each line ``k`` in ER, FR, MR, CR::

        ARE_k = | D_k(pred) / OICD(pred) - D_k(ref) / OICD(ref) |

    and ``mean`` = the mean of the four. Invariant to scaling, rotating and translating either mesh.

    Parameters
    ----------
    pred : array_like, shape (B, N, 3) or (N, 3)
        Predicted meshes (BFM topology).
    ref : array_like, shape (B, N, 3) or (N, 3)
        Reference meshes; one (N, 3) reference is used for every prediction.

    Returns
    -------
    dict
        ``{"ER", "FR", "MR", "CR", "mean"}`` -> ndarray (B,) float64, unitless (0-d arrays when
        both inputs are single meshes).
    """
    p, r, single = mesh_pair(pred, ref, _NEED)
    ratios_pred, ratios_ref = are_ratios(p), are_ratios(r)
    out = {k: np.abs(ratios_pred[k] - ratios_ref[k]) for k in ARE_PAIRS}
    out["mean"] = (out["ER"] + out["FR"] + out["MR"] + out["CR"]) / 4.0
    return {k: squeeze(x, single) for k, x in out.items()}
