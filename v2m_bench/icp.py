"""The ICP metrics under their short module name: :mod:`v2m_bench.metrics.icp`, re-exported."""

from .metrics.icp import (  # noqa: F401
    DEFAULT_ICP_CONFIG,
    IcpConfig,
    IcpPlan,
    IcpResult,
    __all__,
    icp_plan,
    icp_rmse,
    icp_scores,
    iteration_vertices,
    nearest_vertices,
    part_rmse,
)
