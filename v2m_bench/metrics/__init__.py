"""Mesh metrics of the Voice2Mesh benchmark (definitions: ``docs/metrics.md``).

- :func:`are`, :func:`are_ratios`, :func:`oicd` (:mod:`.are`): the absolute ratio errors of four
  facial line lengths over the outer interocular distance (ER, FR, MR, CR and their mean).
- :func:`nme_official`, :func:`nme` (:mod:`.nme`): the landmark error at 68 keypoints, as the
  official code computes it and in the standard per-landmark form.
- :func:`rmse_v2v` (:mod:`.v2v`): the vertex-to-vertex RMSE after the best rigid (or similarity)
  alignment, in millimetres.
- :func:`icp_rmse`, :func:`part_rmse`, :func:`icp_scores` (:mod:`.icp`): the ICP point-to-plane
  RMSE and the part RMSE, the paper's mesh metrics, with their frozen definition
  (:class:`IcpConfig`).

Pure functions: meshes in, per-sample scores out. A mesh is an array of shape (N, 3) (one mesh)
or (B, N, 3) (a batch) on the 53,215-vertex BFM topology, in BFM units (micrometres). Prediction
and reference broadcast over the batch axis: one reference (N, 3) can score a batch of
predictions. Results have shape (B,), or are 0-d arrays when both inputs are single meshes (the
ICP metrics always return (B,)). Only the vertices a metric reads are converted to float64, so
large float32 batches are cheap.

Imports with numpy, scipy and h5py alone; the compiled ICP engine (numba) is imported on first
use.
"""

from __future__ import annotations

from .are import ARE_KEYS, are, are_ratios, oicd
from .icp import (
    DEFAULT_ICP_CONFIG,
    IcpConfig,
    IcpPlan,
    IcpResult,
    icp_plan,
    icp_rmse,
    icp_scores,
    iteration_vertices,
    nearest_vertices,
    part_rmse,
)
from .nme import nme, nme_official
from .v2v import V2vResult, rmse_v2v

__all__ = [
    "ARE_KEYS",
    "oicd",
    "are_ratios",
    "are",
    "nme_official",
    "nme",
    "rmse_v2v",
    "V2vResult",
    "icp_rmse",
    "part_rmse",
    "icp_scores",
    "icp_plan",
    "IcpPlan",
    "IcpConfig",
    "IcpResult",
    "DEFAULT_ICP_CONFIG",
    "nearest_vertices",
    "iteration_vertices",
]
