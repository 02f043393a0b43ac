"""Benchmark predictions from a trained checkpoint (``v2m-predict``).

For every test identity of a build (by default those of its ``references.h5``), the first three
utterances in sorted order of video id then utterance id (the official protocol,
:func:`v2m_models.data.select_test_utterances`) are run whole through the checkpoint's predictor
and written as de-normalised BFM coefficients in the benchmark's ``predictions.h5`` format
(:func:`v2m_bench.formats.write_predictions`), with the file attribute ``model`` naming the
checkpoint and further attributes recording its kind, iteration and the build.

Predictors are chosen by the checkpoint's ``kind``: the checkpoint names a loader
(``predictor = "v2m_models.<module>:load_predictor"``, called as ``loader(checkpoint_dict, device,
batch_size=...)``) that returns an object with ``predict(features) -> {"shape": (N, 40),
"expression": (N, 10)}``, ``features`` being a list of whole normalised log-mel utterances
``(64, T_i)``. Only ``load_predictor`` functions inside the ``v2m_models`` package are used; a
checkpoint whose weights do not fit the model is one :class:`ValidationError`; a kind without a
loader (e.g. ``voice-encoder``) cannot predict faces. Other predictors (a cascade baseline that
needs no checkpoint, for example) can call :func:`predict_with` directly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from v2m_bench.errors import ValidationError

from .data import select_test_utterances, whole_utterances
from .training import load_checkpoint, resolve_device

__all__ = ["PredictResult", "resolve_predictor", "predict", "predict_with", "prediction_selection"]


@dataclass
class PredictResult:
    """What :func:`predict` wrote.

    Attributes
    ----------
    path : Path
    n_identities, n_predictions : int
    model : str
        The ``model`` attribute written.
    missing : list of str
        Requested identities that have no utterance in the build.
    """

    path: Path
    n_identities: int
    n_predictions: int
    model: str
    missing: list

    def summary(self) -> str:
        s = f"{self.path}: {self.n_predictions} predictions for {self.n_identities} identities (model {self.model})"
        if self.missing:
            s += f"; {len(self.missing)} identities without utterances: {', '.join(self.missing[:5])}"
        return s


def resolve_predictor(checkpoint: dict, device, batch_size: int = 16, path=None):
    """Load the predictor a checkpoint names (see the module docstring)."""
    kind = checkpoint.get("kind")
    ref = str(checkpoint.get("predictor") or "")
    if not ref:
        raise ValidationError(f"a {kind!r} checkpoint has no face predictor (train a face model first)",
                              path=None if path is None else str(path), key="kind")
    mod, _, fn = ref.partition(":")
    if not (mod == "v2m_models" or mod.startswith("v2m_models.")) or fn != "load_predictor":
        raise ValidationError(f"refusing predictor {ref!r}: only v2m_models.<module>:load_predictor loaders are used",
                              path=None if path is None else str(path), key="predictor")
    try:
        loader = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError):
        raise ValidationError(f"predictor {ref!r} of kind {kind!r} is not available in this version",
                              path=None if path is None else str(path), key="predictor") from None
    if not checkpoint.get("modules"):
        raise ValidationError("holds no weights", path=None if path is None else str(path), key="modules")
    try:
        return loader(checkpoint, device, batch_size=batch_size)
    except ValidationError as e:
        if path is None or str(path) in str(e):
            raise
        raise ValidationError(str(e), path=str(path)) from None
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[:3]) if lines else type(e).__name__
        raise ValidationError(f"the checkpoint does not fit the {kind!r} model ({type(e).__name__}: {detail[:300]})",
                              path=None if path is None else str(path), key="modules") from None


def prediction_selection(dataset, per_identity: int = 3, identities=None):
    """The identities and utterances to predict: (names, utterance numbers, utterance ids, missing).

    ``identities`` default: those of the build's references.h5 when it exists, else every test
    identity with utterances.
    """
    if "test" not in dataset.splits:
        raise ValidationError("the build has no test split", path=str(dataset.root))
    split = dataset.split("test")
    if identities is None and dataset.references_path.is_file():
        identities = dataset.references().identity.tolist()
    names, utts, ids = select_test_utterances(split, per_identity, names=identities)
    missing = [] if identities is None else sorted(set(map(str, identities)) - set(names))
    return split, names, utts, ids, missing


def predict_with(predictor, dataset, out, *, model: str, per_identity: int = 3, identities=None,
                 attrs=None) -> PredictResult:
    """Write predictions.h5 for the test utterances with any object having ``predict(features)``.

    Parameters
    ----------
    predictor : object
        ``predict(list of (64, T) arrays) -> {"shape": (N, 40), "expression": (N, 10)}``.
    dataset : v2m_data.shards.BuildDataset
    out : path
    model : str
        The ``model`` attribute.
    per_identity : int
    identities : sequence of str, optional
    attrs : dict, optional
        Further file attributes.
    """
    from v2m_bench.formats import write_predictions

    split, names, utts, ids, missing = prediction_selection(dataset, per_identity, identities)
    if not len(utts):
        raise ValidationError("no test utterance to predict", path=str(dataset.root))
    pred = predictor.predict(whole_utterances(split, utts))
    sh = np.asarray(pred["shape"], np.float32)
    ex = np.asarray(pred["expression"], np.float32)
    if sh.shape != (len(utts), 40) or ex.shape != (len(utts), 10):
        raise ValidationError(f"the predictor returned shapes {sh.shape} and {ex.shape}", key="predictor")
    path = write_predictions(out, names, ids, shape=sh, expression=ex, model=model, attrs=attrs or {})
    return PredictResult(path=Path(path), n_identities=len(set(names)), n_predictions=len(utts), model=model, missing=missing)


def predict(checkpoint, data, out, *, device: str = "auto", per_identity: int = 3, batch_size: int = 16,
            identities=None, model_name: str | None = None) -> PredictResult:
    """Predict the benchmark's test utterances of build ``data`` with ``checkpoint``.

    Parameters
    ----------
    checkpoint : path
        A face-model checkpoint (e.g. ``v2m-train supervised``).
    data : path
        Build folder.
    out : path
        predictions.h5 to write (atomically).
    device : str
    per_identity : int
        Utterances per identity (3).
    batch_size : int
        Whole utterances per forward pass.
    identities : sequence of str, optional
        Default: the identities of the build's references.h5 (else all test identities).
    model_name : str, optional
        The ``model`` attribute (default: the checkpoint's file name).

    Returns
    -------
    PredictResult
    """
    from v2m_data.shards import open_dataset

    checkpoint = Path(checkpoint)
    ck = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    predictor = resolve_predictor(ck, dev, batch_size=batch_size, path=checkpoint)
    ds = open_dataset(data)
    attrs = {
        "checkpoint_kind": str(ck["kind"]),
        "checkpoint_iteration": int(ck["iteration"]),
        "checkpoint_complete": int(bool(ck.get("complete", False))),
        "build": str(Path(data).resolve()),
        "utterances_per_identity": int(per_identity),
    }
    if ck.get("task", {}).get("shuffled"):
        attrs["shuffled_pairs"] = 1
    return predict_with(predictor, ds, out, model=model_name or checkpoint.name, per_identity=per_identity,
                        identities=identities, attrs=attrs)
