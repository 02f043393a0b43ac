"""v2m_data: build the paired Voxceleb-3D dataset from your own VoxCeleb1 and VGGFace copies.

The build (``v2m-build-dataset``) pairs VoxCeleb1 voices with VGGFace images by name, splits the
identities A–E / F–Z, extracts the voice features, finds 68 landmarks per image, fits the BFM to
them, writes HDF5 shards, one reference per test identity and a manifest. Its parts:

- :func:`build`, :func:`merge`, :class:`BuildConfig` (:mod:`v2m_data.building`): the resumable,
  parallel build and the merge of array jobs;
- :func:`open_dataset` (:mod:`v2m_data.shards`): read a finished build;
- :func:`make_world`, :class:`SynthConfig` (:mod:`v2m_data.synth`): a synthetic world in the real
  layouts whose true faces are known;
- :func:`extract_features` (:mod:`v2m_data.audio`), :func:`make_detector`
  (:mod:`v2m_data.landmarks`), :func:`fit_landmarks` (:mod:`v2m_data.fitting`): the per-item steps.

The names are loaded on first use, so ``import v2m_data`` stays cheap.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "BuildConfig": "building",
    "BuildResult": "building",
    "build": "building",
    "merge": "building",
    "open_dataset": "shards",
    "BuildDataset": "shards",
    "make_world": "synth",
    "SynthConfig": "synth",
    "AudioConfig": "audio",
    "extract_features": "audio",
    "make_detector": "landmarks",
    "FitConfig": "fitting",
    "fit_landmarks": "fitting",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
