"""The face gate: an image counts only when a face is confirmed where its annotation says.

Real VGGFace URLs often serve other pictures or placeholders today, and a landmark model handed a
box always returns 68 points, face or no face. Every image of a build therefore passes these
checks, in order, before it is fitted; the first one that fails is recorded as the image's failure
(stage ``"face"``, with the reason) in the shard report and ``manifest.json``, and the image is
never fitted and never a reference.

1. **Pixel limit** (decompression bombs): ``width x height <= max_pixels``, read from the header
   before the pixels are decoded (:func:`v2m_data.images.decode_image`).
2. **Image size**: both sides ``>= min_image_side`` pixels.
3. **Annotated box** (when the image has one): finite, ``right > left`` and ``bottom > top``
   ("degenerate box"), both sides ``>= min_box_side`` pixels, and at least ``min_box_inside`` of
   its area inside the image ("box outside the image").
4. **Crop content**: the standard deviation of the grey levels (0-255) of the square face crop
   (the crop the shards store, cut around the landmarks) is ``>= min_crop_std``; a near-uniform
   crop (a blank or placeholder image, landmarks outside the picture) is "no face in the crop".
5. **Face confirmation** (``confirm``):

   - ``"auto"``: the landmark backend's own evidence. ``dlib``: dlib's HOG frontal face detector
     run on the annotated box enlarged by ``margin`` on each side, resampled so the box is
     ``confirm_box_px`` pixels wide (three scales: the HOG detector is brittle at any one); a face
     must be found whose intersection-over-union with the box is ``>= min_overlap``. ``fan``: the mean of 3D-FAN's 68 heatmap maxima must be
     ``>= min_confidence``. ``mediapipe``: the sigmoid of the face-presence logit of MediaPipe's
     landmark model must be ``>= min_confidence``. ``precomputed``: no detector, so only checks 1-4 apply.
   - ``"dlib"``: dlib's HOG detector as above whatever the landmark backend (needs dlib).
   - ``"none"``: checks 1-4 only.

   Images without an annotated box were found by the backend's own face detector, which is the
   confirmation; ``fan``'s heatmap check still applies to them.

All checks are pure functions of the pixels, box and landmarks, so the gate keeps the build
deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from v2m_bench.errors import ValidationError

__all__ = [
    "FaceGateConfig",
    "check_image_size",
    "check_box",
    "crop_spread",
    "check_crop",
    "box_iou",
    "margin_window",
    "dlib_face_overlap",
    "FACE_STAGE",
]

#: The ``stage`` of face-gate failures in shard reports and manifest.json.
FACE_STAGE = "face"


@dataclass(frozen=True)
class FaceGateConfig:
    """Thresholds of the face gate (see the module docstring).

    Attributes
    ----------
    max_pixels : int
        Most pixels (width x height) an image may have (40 megapixels).
    min_image_side : int
        Fewest pixels on each side of an image (32).
    min_box_side : float
        Fewest pixels on each side of an annotated box (16).
    min_box_inside : float
        Fraction of the annotated box's area that must lie inside the image (0.5).
    min_crop_std : float
        Least standard deviation of the face crop's grey levels, 0-255 (4).
    confirm : {"auto", "dlib", "none"}
        How a face is confirmed (``auto``: the landmark backend's own evidence).
    margin : float
        The confirming face detector sees the box enlarged by this fraction of its side on each
        side (0.5).
    confirm_box_px : tuple of int
        The margin window is resampled so the box is each of these many pixels wide in turn
        (90, 130, 180; dlib's HOG detector finds faces from about 80 px).
    hog_threshold : float
        Detection threshold of dlib's HOG detector (0.0, its default).
    min_overlap : float
        Least intersection-over-union of a detected face with the annotated box (0.3).
    min_confidence : float
        Least landmark confidence (0.3): the mean heatmap maximum of 3D-FAN's 68 points, or the
        sigmoid of MediaPipe's face-presence logit.
    """

    max_pixels: int = 40_000_000
    min_image_side: int = 32
    min_box_side: float = 16.0
    min_box_inside: float = 0.5
    min_crop_std: float = 4.0
    confirm: str = "auto"
    margin: float = 0.5
    confirm_box_px: tuple = (90, 130, 180)
    hog_threshold: float = 0.0
    min_overlap: float = 0.3
    min_confidence: float = 0.3

    def __post_init__(self):
        if self.confirm not in ("auto", "dlib", "none"):
            raise ValidationError(f"must be auto, dlib or none, got {self.confirm!r}", key="face_gate.confirm")
        if int(self.max_pixels) < 1 or int(self.min_image_side) < 1:
            raise ValidationError("max_pixels and min_image_side must be >= 1", key="face_gate")
        if not self.confirm_box_px or any(int(v) < 40 for v in self.confirm_box_px):
            raise ValidationError(f"need sizes >= 40, got {self.confirm_box_px!r}", key="face_gate.confirm_box_px")
        for k in ("min_box_side", "min_crop_std", "margin"):
            v = float(getattr(self, k))
            if not np.isfinite(v) or v < 0:
                raise ValidationError(f"must be a finite number >= 0, got {v!r}", key=f"face_gate.{k}")
        for k in ("min_box_inside", "min_overlap", "min_confidence"):
            v = float(getattr(self, k))
            if not 0.0 <= v <= 1.0:
                raise ValidationError(f"must be in [0, 1], got {v!r}", key=f"face_gate.{k}")


def check_image_size(height: int, width: int, config: FaceGateConfig) -> str | None:
    """The reason an image of this size is refused, or None (checks 1 and 2)."""
    h, w = int(height), int(width)
    if h * w > int(config.max_pixels):
        return f"image too large: {w}x{h} = {w * h} pixels > limit {int(config.max_pixels)}"
    if min(h, w) < int(config.min_image_side):
        return f"image too small: {w}x{h} pixels (need >= {int(config.min_image_side)} on each side)"
    return None


def check_box(box, height: int, width: int, config: FaceGateConfig) -> str | None:
    """The reason an annotated box is refused, or None (check 3).

    Parameters
    ----------
    box : (4,) array_like
        ``(left, top, right, bottom)`` in pixels.
    height, width : int
        The image's size in pixels.
    """
    b = np.asarray(box, np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        return f"degenerate box: not 4 finite numbers ({np.asarray(box).tolist()!r})"
    bw, bh = b[2] - b[0], b[3] - b[1]
    if not (bw > 0 and bh > 0):
        return f"degenerate box: right <= left or bottom <= top ({', '.join(f'{v:g}' for v in b)})"
    if min(bw, bh) < float(config.min_box_side):
        return f"box too small: {bw:g}x{bh:g} pixels (need >= {float(config.min_box_side):g} on each side)"
    iw = max(0.0, min(b[2], width) - max(b[0], 0.0))
    ih = max(0.0, min(b[3], height) - max(b[1], 0.0))
    inside = iw * ih / (bw * bh)
    if inside < float(config.min_box_inside):
        where = "outside the image" if inside == 0 else "mostly outside the image"
        return f"box {where}: {100 * inside:.0f} % of its area inside (need >= {100 * float(config.min_box_inside):.0f} %)"
    return None


def crop_spread(crops) -> np.ndarray:
    """Standard deviation of the grey levels of face crops.

    Parameters
    ----------
    crops : (..., S, S, 3) uint8
        RGB crops.

    Returns
    -------
    (...) float64
        Standard deviation (0-255 grey levels) of ``0.299 R + 0.587 G + 0.114 B`` over each crop.
    """
    c = np.asarray(crops, np.float64)
    grey = c[..., 0] * 0.299 + c[..., 1] * 0.587 + c[..., 2] * 0.114
    return grey.reshape(grey.shape[:-2] + (-1,)).std(axis=-1)


def check_crop(crop, config: FaceGateConfig) -> str | None:
    """The reason a face crop is refused (near-uniform), or None (check 4)."""
    s = float(crop_spread(crop))
    if s < float(config.min_crop_std):
        return f"no face in the crop: near-uniform pixels (grey-level std {s:.2f} < {float(config.min_crop_std):g})"
    return None


def box_iou(a, b) -> np.ndarray:
    """Intersection over union of boxes.

    Parameters
    ----------
    a, b : (..., 4) array_like
        ``(left, top, right, bottom)``, broadcast against each other.

    Returns
    -------
    (...) float64
        In [0, 1]; 0 for empty boxes.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def margin_window(image: np.ndarray, box, margin: float, box_px: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The annotated box enlarged by ``margin`` on each side, cut out and resampled.

    Parameters
    ----------
    image : (H, W, 3) uint8
    box : (4,) array_like
        ``(left, top, right, bottom)``.
    margin : float
        Added on each side, as a fraction of the box's width / height.
    box_px : int
        The window is resampled so the box is ``box_px`` pixels wide.

    Returns
    -------
    window : (h, w, 3) uint8
        The window (zero padding where it leaves the image).
    box_in_window : (4,) float64
        The annotated box in window pixels.
    factor : float
        Window pixels per image pixel.
    """
    import cv2

    b = np.asarray(box, np.float64)
    bw, bh = b[2] - b[0], b[3] - b[1]
    x0, y0 = int(np.floor(b[0] - margin * bw)), int(np.floor(b[1] - margin * bh))
    x1, y1 = int(np.ceil(b[2] + margin * bw)), int(np.ceil(b[3] + margin * bh))
    h, w = image.shape[:2]
    win = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        win[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    factor = float(box_px) / max(bw, 1.0)
    size = (max(1, int(round(win.shape[1] * factor))), max(1, int(round(win.shape[0] * factor))))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    win = np.ascontiguousarray(cv2.resize(win, size, interpolation=interp))
    return win, (b - np.array([x0, y0, x0, y0])) * factor, factor


def dlib_face_overlap(hog_detector, image: np.ndarray, box, config: FaceGateConfig) -> float:
    """Best intersection-over-union between dlib HOG detections and the annotated box.

    Parameters
    ----------
    hog_detector : dlib.fhog_object_detector
        ``dlib.get_frontal_face_detector()``.
    image : (H, W, 3) uint8
    box : (4,) array_like
    config : FaceGateConfig
        ``margin``, ``confirm_box_px`` and ``hog_threshold`` (each window is searched without
        upsampling).

    Returns
    -------
    float
        The best overlap over the scales; 0 when no face is found.
    """
    best = 0.0
    for px in config.confirm_box_px:
        win, wbox, _ = margin_window(image, box, float(config.margin), int(px))
        rects, _scores, _ = hog_detector.run(win, 0, float(config.hog_threshold))
        if len(rects):
            found = np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects], np.float64)
            best = max(best, float(box_iou(found, wbox[None, :]).max()))
            if best >= float(config.min_overlap):
                break
    return best
