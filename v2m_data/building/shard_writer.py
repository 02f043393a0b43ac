"""Record-to-column packing: a shard's per-item records become the columns of its HDF5 file
(:class:`v2m_data.shards.ShardContent`), with its counts and sorted failures."""

from __future__ import annotations

import json

import numpy as np

from ..labels import identity_labels
from ..shards import ShardContent
from .config import config_dict
from .failures import STAGES, failure
from .fit_stage import rotation_to_angles

__all__ = ["pack_shard"]


def pack_shard(
    task,
    idents: list,
    files: list,
    *,
    notes: list,
    utterances: list,
    audio_failures: list,
    images: list,
    image_failures: list,
    fits,
    n_shape: int,
    n_exp: int,
) -> ShardContent:
    """The content of one shard file from the records of its stages.

    Parameters
    ----------
    task : v2m_data.building.worker.ShardTask
        The shard (name, split, index, fingerprint, audio config, crop sizes, label rule).
    idents : list of Identity
        The shard's identities, in row order.
    files : list of IdentityFiles
        Their input files.
    notes : list of dict
        Failures found while scanning.
    utterances, audio_failures : list of dict
        Records and failures of :func:`~v2m_data.building.audio_stage.process_utterances`.
    images, image_failures : list of dict
        Records and failures of :func:`~v2m_data.building.image_stage.process_images`.
    fits : v2m_data.fitting.FitResult or None
        The fits of ``images`` in order (None when there is no image).
    n_shape, n_exp : int
        Coefficients of the model (the widths of empty fit columns).

    Returns
    -------
    ShardContent
        Its ``report`` holds ``{"shard", "counts", "failures"}``: failures sorted by VoxCeleb1 id,
        stage (:data:`~v2m_data.building.failures.STAGES`) and item; a failed fit is a failure of
        stage ``"fit"``; an identity without a usable utterance or image fit one of stage
        ``"identity"``.
    """
    utt, f_audio, img, f_img, fr = utterances, audio_failures, images, image_failures, fits
    failures: list = list(notes)
    f_fit = []
    keep = []
    for k, r in enumerate(img):
        if fr.valid[k]:
            keep.append(k)
        else:
            f_fit.append(failure("fit", idents[r["row"]], r["path"], fr.reason[k] or "invalid fit"))
    failures.extend(f_audio + f_img + f_fit)
    # identity-level notes
    for i, ident in enumerate(idents):
        if not any(u["row"] == i for u in utt) and files[i].utterances:
            failures.append(failure("identity", ident, "", "no usable utterance"))
        if not any(img[k]["row"] == i for k in keep) and files[i].images:
            failures.append(failure("identity", ident, "", "no usable image fit"))
    stage_order = {s: j for j, s in enumerate(STAGES)}
    failures.sort(key=lambda f: (f["vox_id"], stage_order.get(f["stage"], 99), f["item"]))

    n_mels = int(task.audio.n_mels)
    frames = np.array([u["features"].shape[0] for u in utt], np.int64)
    offsets = np.concatenate([[0], np.cumsum(frames)[:-1]]).astype(np.int64) if len(frames) else np.zeros(0, np.int64)
    feats = np.concatenate([u["features"] for u in utt]) if utt else np.zeros((0, n_mels), np.float32)
    utterance_columns = {
        "identity": np.array([u["row"] for u in utt], np.int32),
        "path": np.array([u["path"] for u in utt], dtype=object),
        "duration": np.array([u["duration"] for u in utt], np.float32),
        "voiced_duration": np.array([u["voiced_duration"] for u in utt], np.float32),
        "n_frames": frames,
        "offset": offsets,
        "features": feats.astype(np.float32),
    }
    kr = [img[k] for k in keep]
    ki = np.array(keep, np.int64)
    dims = 3 if any(r["landmarks"].shape[1] == 3 for r in img) else 2
    nan4 = (np.nan,) * 4
    image_columns = {
        "identity": np.array([r["row"] for r in kr], np.int32),
        "image_id": np.array([r["image_id"] for r in kr], dtype=object),
        "path": np.array([r["path"] for r in kr], dtype=object),
        "box": np.array([r["box"] if r["box"] is not None else nan4 for r in kr], np.float32).reshape(-1, 4),
        "annotated_pose": np.array([np.nan if r["pose"] is None else r["pose"] for r in kr], np.float32),
        "landmarks": np.array([r["landmarks"][:, :2] for r in kr], np.float32).reshape(-1, 68, 2),
        "crop_box": np.array([r["crop_box"] for r in kr], np.float32).reshape(-1, 4),
    }
    if dims == 3:
        image_columns["landmarks_depth"] = np.array(
            [r["landmarks"][:, 2] if r["landmarks"].shape[1] == 3 else np.full(68, np.nan, np.float32) for r in kr], np.float32
        ).reshape(-1, 68)
    for s in task.crop_sizes:
        image_columns[f"crop{int(s)}"] = np.array([r["crops"][int(s)] for r in kr], np.uint8).reshape(-1, int(s), int(s), 3)
    if fr is not None and len(ki):
        fit = {
            "shape": fr.shape[ki].astype(np.float32),
            "expression": fr.expression[ki].astype(np.float32),
            "scale": fr.scale[ki].astype(np.float32),
            "rotation": fr.rotation[ki].astype(np.float32),
            "translation": fr.translation[ki].astype(np.float32),
            "pose": rotation_to_angles(fr.rotation[ki]).astype(np.float32),
            "residual": fr.residual[ki].astype(np.float32),
            "residual_normalized": fr.residual_normalized[ki].astype(np.float32),
            "converged": fr.converged[ki].astype(bool),
        }
        ident_rows = np.array([r["row"] for r in kr], np.int64)
        labels = identity_labels(
            ident_rows, fr.shape[ki], fr.expression[ki], fit["pose"], fit["residual_normalized"], len(idents), task.identity_label
        )
    else:
        fit = {
            "shape": np.zeros((0, n_shape), np.float32),
            "expression": np.zeros((0, n_exp), np.float32),
            "scale": np.zeros(0, np.float32),
            "rotation": np.zeros((0, 3, 3), np.float32),
            "translation": np.zeros((0, 2), np.float32),
            "pose": np.zeros((0, 3), np.float32),
            "residual": np.zeros(0, np.float32),
            "residual_normalized": np.zeros(0, np.float32),
            "converged": np.zeros(0, bool),
        }
        labels = identity_labels(
            np.zeros(0, np.int64), fit["shape"], fit["expression"], fit["pose"], fit["residual"], len(idents), task.identity_label
        )
    fit["in_identity_label"] = labels.pop("used").astype(bool)
    counts = {
        "identities": len(idents),
        "utterances_found": sum(len(f.utterances) for f in files),
        "utterances_ok": len(utt),
        "utterances_failed": len(f_audio),
        "frames": int(frames.sum()),
        "voiced_seconds": round(float(sum(u["voiced_duration"] for u in utt)), 3),
        "images_found": sum(len(f.images) for f in files),
        "images_annotated_missing": sum(f.annotated_missing for f in files),
        "images_ok": len(kr),
        "images_failed": len(f_img) + len(f_fit),
        "fits_failed": len(f_fit),
    }
    report = {"shard": task.name, "counts": counts, "failures": failures}
    content = ShardContent(
        split=task.split,
        index=task.index,
        fingerprint=task.fingerprint,
        identities=[{k: i.to_dict()[k] for k in ("vox_id", "name", "gender", "key")} for i in idents],
        utterances=utterance_columns,
        images=image_columns,
        fit=fit,
        report=report,
        n_mels=n_mels,
        crop_sizes=tuple(int(s) for s in task.crop_sizes),
        landmark_dims=dims,
        identity_fit=labels,
        identity_fit_attrs={
            "estimator": task.identity_label.estimator,
            "rule": json.dumps(config_dict(task.identity_label), sort_keys=True),
        },
    )
    return content
