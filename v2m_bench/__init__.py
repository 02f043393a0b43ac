"""v2m_bench: the frozen A–E Voice2Mesh benchmark.

The morphable model (:func:`load_bfm`), named points and part regions (:mod:`v2m_bench.topology`),
the metric functions (:mod:`v2m_bench.metrics`), the file formats (:func:`read_predictions`,
:func:`write_predictions`, ...), the A–E split (:mod:`v2m_bench.split`) and scoring (:func:`score`).

Imports with numpy, scipy and h5py alone; torch, pandas and tqdm are imported where needed.
"""

from .bfm import MorphableModel, find_bfm_dir, load_bfm
from .errors import BFMNotFoundError, DownloadError, V2MError, ValidationError
from .formats import (
    Predictions,
    References,
    check_coverage,
    read_predictions,
    read_references,
    write_predictions,
    write_references,
)
from .scoring import METRIC_NAMES, Report, ScoreConfig, score

__version__ = "0.1.0"

__all__ = [
    "MorphableModel",
    "load_bfm",
    "find_bfm_dir",
    "Predictions",
    "References",
    "read_predictions",
    "read_references",
    "write_predictions",
    "write_references",
    "check_coverage",
    "score",
    "ScoreConfig",
    "Report",
    "METRIC_NAMES",
    "V2MError",
    "ValidationError",
    "BFMNotFoundError",
    "DownloadError",
    "__version__",
]
