"""The image stage: face gate, landmarks and face crops of every image of a shard."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from v2m_bench.errors import V2MError, ValidationError
from v2m_bench.fileio import progress as progress_bar

from ..facegate import FACE_STAGE, FaceGateConfig
from .failures import failure, short_reason

__all__ = ["process_images"]


def _confirmer(detector, gate: FaceGateConfig):
    """``(image, box) -> overlap or None``: the face detector that confirms annotated boxes."""
    if gate.confirm == "none":
        return lambda image, box: None
    if gate.confirm == "auto" or detector.name == "dlib":
        return lambda image, box: detector.face_overlap(image, box, gate)
    try:
        import dlib
    except ImportError:
        raise V2MError("face_gate.confirm='dlib' needs dlib: pip install dlib-bin") from None
    from ..facegate import dlib_face_overlap

    hog = dlib.get_frontal_face_detector()
    return lambda image, box: dlib_face_overlap(hog, image, box, gate)


def process_images(
    ident_files: Sequence,
    images_root: Path,
    detector,
    crop_sizes: Sequence[int],
    crop_scale: float,
    *,
    gate: FaceGateConfig | None = None,
    progress: bool = False,
) -> tuple:
    """Face gate, landmarks and crops of every image (images are decoded one identity at a time).

    Every image passes the face gate (:mod:`v2m_data.facegate`, ``gate``; default thresholds when
    None); an image that fails it is a failure of stage ``"face"`` and is not returned.

    Returns
    -------
    (records, failures)
        ``records``: dicts ``row, path, image_id, box, pose, landmarks ((68, 2|3) float32),
        crop_box, crops {size: (S, S, 3) uint8}``.
    """
    from ..facegate import check_box, check_crop, check_image_size
    from ..images import ImageTooLargeError, crop_face, load_image
    from ..landmarks import detector_box_from_landmarks

    gate = gate or FaceGateConfig()
    confirm = _confirmer(detector, gate)
    records, failures = [], []
    total = sum(len(f.images) for _, f, _ in ident_files)
    with progress_bar(total=total, desc=f"landmarks ({detector.name})", unit="img", enabled=bool(progress), leave=False) as bar:
        for ident, files, row in ident_files:
            pixels, items = [], []
            for rel, image_id, _size, box, pose in files.images:
                path = images_root / rel
                try:
                    px = load_image(path, max_pixels=int(gate.max_pixels))
                except ImageTooLargeError as e:
                    failures.append(failure(FACE_STAGE, ident, rel, short_reason(e, path, images_root)))
                    bar.update(1)
                    continue
                except ValidationError as e:
                    failures.append(failure("image", ident, rel, short_reason(e, path, images_root)))
                    bar.update(1)
                    continue
                why = check_image_size(px.shape[0], px.shape[1], gate)
                if why is None and box is not None:
                    why = check_box(box, px.shape[0], px.shape[1], gate)
                    if why is None:
                        overlap = confirm(px, box)
                        if overlap is not None and overlap < float(gate.min_overlap):
                            why = (
                                f"no face in the annotated box (face detector: best overlap {overlap:.2f} < "
                                f"{float(gate.min_overlap):g})"
                            )
                if why is not None:
                    failures.append(failure(FACE_STAGE, ident, rel, why))
                    bar.update(1)
                    continue
                pixels.append(px)
                items.append((rel, image_id, box, pose, path))
            dets = _detect(detector, pixels, items)
            for img, (rel, image_id, box, pose, path), det in zip(pixels, items, dets):
                bar.update(1)
                if isinstance(det, str):
                    failures.append(failure("landmarks", ident, rel, short_reason(det, path, images_root)))
                    continue
                pts = np.asarray(det.points, np.float32)
                if not np.all(np.isfinite(pts)):
                    failures.append(failure("landmarks", ident, rel, "non-finite landmarks"))
                    continue
                if det.confidence is not None and det.confidence < float(gate.min_confidence) and gate.confirm != "none":
                    failures.append(failure(
                        FACE_STAGE, ident, rel,
                        f"no face in the annotated box (landmark confidence {det.confidence:.2f} < {float(gate.min_confidence):g})",
                    ))
                    continue
                try:
                    cbox = detector_box_from_landmarks(pts, crop_scale)
                    crops = {int(s): crop_face(img, cbox, int(s)) for s in crop_sizes}
                except ValidationError as e:
                    failures.append(failure("crop", ident, rel, f"cannot crop the face: {short_reason(e, path, images_root)}"))
                    continue
                why = check_crop(crops[max(crops)], gate)
                if why is not None:
                    failures.append(failure(FACE_STAGE, ident, rel, why))
                    continue
                used_box = box if box is not None else (None if det.box is None else tuple(float(v) for v in det.box))
                records.append(
                    {
                        "row": row,
                        "path": rel,
                        "image_id": image_id,
                        "box": used_box,
                        "pose": pose,
                        "landmarks": pts,
                        "crop_box": cbox,
                        "crops": crops,
                    }
                )
            del pixels
    return records, failures


def _detect(detector, pixels: list, items: list) -> list:
    """Detections (or a reason string) per image; one batch, per image when the batch raises."""
    if not items:
        return []
    inputs = [it[4] if not detector.needs_pixels else px for px, it in zip(pixels, items)]
    boxes = [it[2] for it in items]

    def one(inp, box, path):
        try:
            d = detector.detect_with_reasons([inp], [box], progress=False)[0]
        except ValidationError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - any detector failure is this image's
            return f"unexpected {type(e).__name__}: {e}"
        return d if d.points is not None else (d.reason or "no landmarks found")

    try:
        dets = detector.detect_with_reasons(inputs, boxes, progress=False)
    except Exception:  # noqa: BLE001 - isolate the item that raised
        return [one(i, b, it[4]) for i, b, it in zip(inputs, boxes, items)]
    return [d if d.points is not None else (d.reason or "no landmarks found") for d in dets]

