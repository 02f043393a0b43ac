"""Toy benchmark files: made-up references and predictions to try scoring without any dataset.

:func:`make_toy_files` (the command ``v2m-bench toy --out DIR``) writes, from the morphable model's
statistics alone:

- ``references.h5``: ``identities`` made-up test identities (names starting A–E), each with BFM
  coefficients drawn from the model's statistics;
- ``good.h5``: three predictions per identity, its shape plus noise of 0.3 standard deviations;
- ``noisy.h5``: the same with noise of 1.0 standard deviation (a worse "model" to compare with).

The same seed gives the same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ValidationError
from .formats import write_predictions, write_references

__all__ = ["ToyFiles", "make_toy_files"]


@dataclass(frozen=True)
class ToyFiles:
    """Paths written by :func:`make_toy_files`."""

    references: Path
    good: Path
    noisy: Path


def make_toy_files(out: str | os.PathLike, model, *, identities: int = 20, seed: int = 0) -> ToyFiles:
    """Write toy ``references.h5``, ``good.h5`` and ``noisy.h5`` into folder ``out``.

    Parameters
    ----------
    out : path
        Folder (created when missing). Existing files of the same names are replaced atomically.
    model : MorphableModel
        Gives the coefficient statistics (40 shape, 10 expression).
    identities : int
        Number of made-up test identities (>= 1).
    seed : int

    Returns
    -------
    ToyFiles

    Examples
    --------
    >>> import tempfile
    >>> from v2m_bench import load_bfm
    >>> files = make_toy_files(tempfile.mkdtemp(), load_bfm(), identities=3)  # doctest: +SKIP
    """
    if int(identities) < 1:
        raise ValidationError(f"must be >= 1, got {identities}", key="identities")
    out = Path(out)
    rng = np.random.default_rng(seed)
    n = int(identities)
    names = [f"{chr(ord('A') + i % 5)}toy_Person_{i:03d}" for i in range(n)]
    shape = rng.normal(size=(n, model.n_shape)) * model.shape_std * 0.7
    expr = model.expression_mean + rng.normal(size=(n, model.n_expression)) * model.expression_std * 0.2
    out.mkdir(parents=True, exist_ok=True)
    refs = write_references(out / "references.h5", names, rng.choice(["m", "f"], size=n), shape=shape,
                            expression=expr, selection_rule="toy: coefficients drawn from the BFM statistics")
    ids = np.repeat(names, 3)
    utts = np.array([f"toyvideo{k}/0000{k}" for k in range(3)] * n)
    paths = {}
    for name, noise in (("good", 0.3), ("noisy", 1.0)):
        s = np.repeat(shape, 3, axis=0) + rng.normal(size=(3 * n, model.n_shape)) * model.shape_std * noise
        e = np.repeat(expr, 3, axis=0)
        paths[name] = write_predictions(out / f"{name}.h5", ids, utts, shape=s, expression=e, model=f"toy-{name}")
    return ToyFiles(Path(refs), Path(paths["good"]), Path(paths["noisy"]))
