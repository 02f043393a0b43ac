"""v2m_models: reference networks, trainers and predictions for voice -> 3D face.

- :func:`train_voice_encoder`, :func:`train_supervised` (:mod:`v2m_models.supervised`): the voice
  encoder pretrained as a speaker classifier, and the supervised voice -> 3DMM model;
- :func:`train_teacher` (:mod:`v2m_models.teacher`): the image -> 3DMM teacher;
- :func:`train_unsupervised` (:mod:`v2m_models.unsupervised`): voice -> image GAN with a 3DMM
  student distilled from the teacher (eight distillation losses, :mod:`v2m_models.kd`);
- :func:`predict` (:mod:`v2m_models.predict`) and :func:`predict_cascade`
  (:mod:`v2m_models.cascade`): benchmark predictions (predictions.h5) from a checkpoint, or from
  the cascaded baseline;
- :func:`load_checkpoint` (:mod:`v2m_models.training`): read any checkpoint safely.

The names are loaded on first use, so ``import v2m_models`` does not import torch.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "VoiceEncoderConfig": "supervised",
    "SupervisedConfig": "supervised",
    "train_voice_encoder": "supervised",
    "train_supervised": "supervised",
    "TeacherConfig": "teacher",
    "train_teacher": "teacher",
    "UnsupervisedConfig": "unsupervised",
    "train_unsupervised": "unsupervised",
    "predict": "predict",
    "predict_cascade": "cascade",
    "load_checkpoint": "training",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
