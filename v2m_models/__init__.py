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

"""

from .cascade import predict_cascade
from .predict import predict
from .supervised import SupervisedConfig, VoiceEncoderConfig, train_supervised, train_voice_encoder
from .teacher import TeacherConfig, train_teacher
from .training import load_checkpoint
from .unsupervised import UnsupervisedConfig, train_unsupervised

__all__ = [
    "VoiceEncoderConfig",
    "SupervisedConfig",
    "train_voice_encoder",
    "train_supervised",
    "TeacherConfig",
    "train_teacher",
    "UnsupervisedConfig",
    "train_unsupervised",
    "predict",
    "predict_cascade",
    "load_checkpoint",
]
