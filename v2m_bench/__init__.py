"""v2m_bench: the frozen A–E Voice2Mesh benchmark (model, topology, metrics, files, scoring).

Imports with numpy, scipy and h5py alone; torch is used only when given torch tensors.
"""

from .bfm import MorphableModel, load_bfm, find_bfm_dir
from .errors import BFMNotFoundError, DownloadError, V2MError, ValidationError

__version__ = "0.1.0"

__all__ = [
    "MorphableModel",
    "load_bfm",
    "find_bfm_dir",
    "V2MError",
    "ValidationError",
    "BFMNotFoundError",
    "DownloadError",
    "__version__",
]
