"""The fit stage: one batched 3DMM fit of a shard's landmarks, and the head pose of each fit."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..fitting import FitConfig
from ..threads import one_blas_thread

__all__ = ["fit_images", "rotation_to_angles"]


def rotation_to_angles(rotation) -> np.ndarray:
    """``(yaw, pitch, roll)`` in degrees of rotations ``R = Rz(roll) Rx(pitch) Ry(yaw)``.

    The convention of :func:`v2m_bench.render.view_rotation`: ``yaw > 0`` turns the face towards the
    image right, ``pitch > 0`` tilts it up, ``roll > 0`` turns its image counter-clockwise.

    Parameters
    ----------
    rotation : (..., 3, 3) array
        BFM frame -> camera frame (x right, y up, z to the viewer), as
        :class:`~v2m_data.fitting.FitResult` gives it.

    Returns
    -------
    (..., 3) float64
        ``yaw = atan2(-R[2, 0], R[2, 2])``, ``pitch = asin(-R[2, 1])``, ``roll = atan2(-R[0, 1], R[1, 1])``.
    """
    r = np.asarray(rotation, np.float64)
    yaw = np.arctan2(-r[..., 2, 0], r[..., 2, 2])
    pitch = np.arcsin(np.clip(-r[..., 2, 1], -1.0, 1.0))
    roll = np.arctan2(-r[..., 0, 1], r[..., 1, 1])
    return np.degrees(np.stack([yaw, pitch, roll], axis=-1))


def fit_images(landmarks: np.ndarray, system, config: FitConfig):
    """One batched fit of all landmarks: :func:`v2m_data.fitting.fit_landmarks` on one thread, with
    BLAS on one thread (:func:`v2m_data.threads.one_blas_thread`; the fit's bytes depend on the BLAS
    thread count).

    Parameters
    ----------
    landmarks : (N, 68, 2) float64
        Image landmarks in pixels.
    system : v2m_data.fitting.KeypointSystem
    config : FitConfig

    Returns
    -------
    v2m_data.fitting.FitResult
    """
    from ..fitting import fit_landmarks

    # the fit's own BLAS guard is not entered a second time: the one here holds for the whole fit
    cfg = dataclasses.replace(config, n_threads=1, single_thread_blas=False)
    with one_blas_thread():
        return fit_landmarks(landmarks, system, cfg)
