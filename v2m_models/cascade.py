"""The paper's baseline: the pretrained voice -> image GAN cascaded with the pretrained image -> 3DMM
teacher, no joint training (``v2m-predict cascade``).

Each test utterance (whole) goes through the generator checkpoint's frozen voice encoder
(L2-normalised embedding) and generator (a 64x64 RGB face in [-1, 1]), the face is bilinearly
upsampled to the teacher's input size (120x120, ``align_corners=True``), and the teacher's
de-normalised 40 shape + 10 expression coefficients are the prediction::

    coefficients = teacher(upsample(generator(encoder(voice))))

The generator comes from a ``v2m-train unsupervised`` checkpoint (kind ``unsupervised``: its GAN
was trained alongside a student, which the gradient of the distillation never reaches, so the
generator is the same kind of model) or from a GAN-only run (``v2m-train unsupervised --kd none``,
kind ``gan``; with the same options and seed both train exactly the same generator, which
tests/models/test_train_unsupervised.py checks). The teacher is a ``v2m-train teacher`` checkpoint or a state dict of the same
architecture (:func:`v2m_models.teacher.load_teacher`).
"""

from __future__ import annotations

from pathlib import Path

from .predict import PredictResult, predict_with
from .teacher import load_teacher
from .training import load_checkpoint, resolve_device
from .unsupervised import VoiceFacePredictor, load_generator

__all__ = ["load_cascade", "predict_cascade"]


def load_cascade(generator, teacher, device="cpu", *, batch_size: int = 16, bfm=None, teacher_format: str = "rgb"):
    """The cascade predictor.

    Parameters
    ----------
    generator : path
        ``unsupervised`` or ``gan`` checkpoint.
    teacher : path
        ``teacher`` checkpoint or a state dict of the same architecture.
    device : str or torch.device
    batch_size : int
        Whole utterances per forward pass.
    bfm : path, optional
        Morphable model de-whitening a plain state-dict teacher.
    teacher_format : {"rgb", "bgr"}
        Input convention of a plain state-dict teacher.

    Returns
    -------
    predictor : VoiceFacePredictor
    info : dict
        ``generator`` (path, kind, iteration), ``teacher`` (:func:`load_teacher`'s info).
    """
    dev = resolve_device(str(device)) if not hasattr(device, "type") else device
    gpath = Path(generator)
    ck = load_checkpoint(gpath)
    enc, gen = load_generator(ck, gpath)
    reg, tinfo = load_teacher(teacher, dev, bfm=bfm, input_format=teacher_format)
    info = {"generator": {"source": str(gpath), "kind": str(ck["kind"]), "iteration": int(ck["iteration"])}, "teacher": tinfo}
    return VoiceFacePredictor(enc, gen, reg, dev, batch_size), info


def predict_cascade(generator, teacher, data, out, *, device: str = "auto", per_identity: int = 3, batch_size: int = 16,
                    identities=None, model_name: str | None = None, bfm=None, teacher_format: str = "rgb") -> PredictResult:
    """Write predictions.h5 of the cascade baseline for the test utterances of build ``data``.

    Parameters
    ----------
    generator, teacher : path
        See :func:`load_cascade`.
    data : path
        Build folder.
    out : path
        predictions.h5 to write (atomically).
    device : str
    per_identity : int
        Utterances per identity (3, the benchmark's selection).
    batch_size : int
    identities : sequence of str, optional
        Default: the identities of the build's references.h5.
    model_name : str, optional
        The ``model`` attribute (default ``cascade:<generator file>+<teacher file>``).
    bfm, teacher_format
        See :func:`load_cascade`.

    Returns
    -------
    PredictResult
    """
    from v2m_data.shards import open_dataset

    predictor, info = load_cascade(generator, teacher, resolve_device(device), batch_size=batch_size, bfm=bfm,
                                   teacher_format=teacher_format)
    ds = open_dataset(data)
    attrs = {
        "checkpoint_kind": "cascade",
        "generator_checkpoint": info["generator"]["source"],
        "generator_kind": info["generator"]["kind"],
        "generator_iteration": info["generator"]["iteration"],
        "teacher_checkpoint": info["teacher"]["source"],
        "teacher_kind": info["teacher"]["kind"],
        "teacher_iteration": info["teacher"]["iteration"],
        "build": str(Path(data).resolve()),
        "utterances_per_identity": int(per_identity),
    }
    name = model_name or f"cascade:{Path(generator).name}+{Path(teacher).name}"
    return predict_with(predictor, ds, out, model=name, per_identity=per_identity, identities=identities, attrs=attrs)
