"""What a score was computed on: content fingerprints of the files, the model and the metric.

Two groups' scores are comparable only on the same references, the same model and the same
metric definition. :func:`provenance` collects what identifies them; ``v2m-bench score`` writes
it into the JSON (``provenance``), the CSV header and the report. The fingerprints are over the
arrays a file holds, not its bytes, so rewriting a file (other compression, other HDF5 version)
keeps its fingerprint:

- :func:`fingerprint`: SHA-256 over the kind (coefficients or vertices), the identities (and
  utterances of predictions) and the geometry: coefficients as little-endian float32, vertices
  as little-endian float32 in BFM units (files in mm or m are converted first, as for scoring).
- :func:`model_fingerprint`: SHA-256 over the model's arrays (mean, bases, triangles, keypoints).

Pure functions on the loaded objects; nothing is written.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

__all__ = ["METRIC_DEFINITION_VERSION", "fingerprint", "model_fingerprint", "provenance"]

#: Version of the metric definitions (ARE, NME, the frozen ICP RMSE and its regions, RMSE_v2v,
#: the identity macro average). Scores are comparable only between equal versions.
METRIC_DEFINITION_VERSION = 1

_ROWS = 256  # vertex rows hashed at a time (bounds memory)


def _update_strings(h, values) -> None:
    arr = np.asarray(values).astype(str)
    h.update(np.int64(arr.size).tobytes())
    for s in arr.tolist():
        b = s.encode("utf-8")
        h.update(np.int64(len(b)).tobytes())
        h.update(b)


def _update_array(h, a, dtype="<f4") -> None:
    a = np.ascontiguousarray(np.asarray(a), dtype=dtype)
    h.update(json.dumps([a.dtype.str, list(a.shape)]).encode())
    h.update(a.tobytes())


def fingerprint(rows) -> str:
    """SHA-256 hex digest of the content of a predictions or references object.

    Parameters
    ----------
    rows : Predictions or References
        From :func:`~v2m_bench.formats.read_predictions` / :func:`~v2m_bench.formats.read_references`
        (or made in memory).

    Returns
    -------
    str
        64 hex characters. Equal for two objects with the same rows in the same order (identities,
        utterances of predictions, coefficients or vertices in BFM units), whatever the file bytes.
    """
    h = hashlib.sha256()
    kind = "predictions" if hasattr(rows, "utterance") else "references"
    h.update(f"voice2mesh {kind} {rows.kind}\n".encode())
    _update_strings(h, rows.identity)
    if kind == "predictions":
        _update_strings(h, rows.utterance)
    if rows.kind == "coefficients":
        _update_array(h, rows.shape)
        _update_array(h, rows.expression)
    else:
        n = len(rows)
        h.update(np.int64(n).tobytes())
        for lo in range(0, n, _ROWS):
            _update_array(h, rows.to_vertices(None, np.arange(lo, min(n, lo + _ROWS))))
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """SHA-256 hex digest of a morphable model's arrays (mean, bases, triangles, keypoints).

    Parameters
    ----------
    model : MorphableModel

    Returns
    -------
    str
        64 hex characters.
    """
    h = hashlib.sha256(b"voice2mesh model\n")
    for a in (model.mean, model.shape_basis, model.expression_basis):
        _update_array(h, a)
    for a in (model.triangles, model.keypoints):
        _update_array(h, a, "<i8")
    return h.hexdigest()


def provenance(predictions, references, model, *, references_fingerprint: str | None = None) -> dict:
    """The provenance record of a score.

    Parameters
    ----------
    predictions : Predictions
    references : References
    model : MorphableModel
    references_fingerprint : str, optional
        :func:`fingerprint` of ``references`` when already computed.

    Returns
    -------
    dict
        ``references_sha256``, ``predictions_sha256`` (:func:`fingerprint`), ``bfm_md5`` (md5 of
        each model file; empty for a model made in memory), ``bfm_genuine`` (whether they are the
        public 3DDFA release), ``metric_definition`` (:data:`METRIC_DEFINITION_VERSION`) and
        ``voice2mesh`` (the package version).
    """
    from . import __version__

    return {
        "references_sha256": references_fingerprint or fingerprint(references),
        "predictions_sha256": fingerprint(predictions),
        "bfm_md5": {str(k): str(v) for k, v in sorted(model.md5.items())},
        "bfm_genuine": bool(model.is_genuine),
        "metric_definition": METRIC_DEFINITION_VERSION,
        "voice2mesh": __version__,
    }
