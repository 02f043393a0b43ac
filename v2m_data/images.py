"""Face images and their annotations: loading, iBUG ``.pts`` files, VGGFace lists, face crops.

Conventions
-----------
- Images are ``uint8`` arrays of shape ``(H, W, 3)`` in **RGB** order (OpenCV reads BGR; this
  module converts). Grey images are expanded to three channels, an alpha channel is dropped, 16-bit
  images are scaled to 8 bits (OpenCV ``IMREAD_COLOR``).
- Landmark coordinates in memory are **0-based pixel coordinates** ``(x, y)``: the centre of the
  top-left pixel is ``(0, 0)``, x to the right, y down. iBUG ``.pts`` files store **1-based**
  coordinates (the MATLAB convention of the 300W annotations); :func:`read_pts` subtracts 1 and
  :func:`write_pts` adds it back.
- A face box is ``(left, top, right, bottom)`` in pixels, as in the VGGFace annotation files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from v2m_bench.errors import ValidationError
from v2m_bench.fileio import write_text

__all__ = [
    "load_image",
    "decode_image",
    "image_size_from_header",
    "ImageTooLargeError",
    "read_pts",
    "write_pts",
    "read_vggface_annotations",
    "VGGFACE_COLUMNS",
    "FRONTAL_POSE_MIN",
    "as_box",
    "square_box",
    "crop_face",
]

#: Columns of a VGGFace (v1) ``files/<Name>.txt`` annotation file, in file order.
VGGFACE_COLUMNS = ("id", "url", "left", "top", "right", "bottom", "pose", "detection_score", "curation")

#: A VGGFace image is frontal when its ``pose`` is strictly greater than this.
FRONTAL_POSE_MIN = 2.0


# --------------------------------------------------------------------------------------------
# images


class ImageTooLargeError(ValidationError):
    """An image has more pixels than the limit it is read with (a decompression bomb, or simply
    too large to be a face photo)."""


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the first SOF marker of a JPEG stream, or None."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        seg = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            return w, h
        if seg < 2:
            return None
        i += 2 + seg
    return None


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of an encoded image read from its header, without decoding the pixels.

    PNG (``IHDR``) and JPEG (the first start-of-frame marker) are parsed here; other formats
    through Pillow's lazy ``Image.open`` when Pillow is installed.

    Parameters
    ----------
    data : bytes
        The encoded file content.

    Returns
    -------
    (int, int) or None
        ``None`` when the header cannot be parsed (the caller then checks the size after
        decoding).
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    try:
        import io
        import warnings

        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Exception:  # noqa: BLE001 - any parse failure (incl. Pillow's own bomb refusal): decide after decoding
        return None
    return int(w), int(h)


def decode_image(
    data: bytes, *, source: str = "<bytes>", apply_exif_orientation: bool = False, max_pixels: int | None = None
) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, PPM, BMP, ...) to RGB.

    Parameters
    ----------
    data : bytes
        The encoded file content.
    source : str
        Name used in error messages (usually the file path).
    apply_exif_orientation : bool
        Rotate the pixels as the EXIF orientation tag says. Off by default: box and landmark
        annotations (VGGFace, 300W) refer to the stored pixel grid.
    max_pixels : int, optional
        Refuse images with more pixels than this (width x height), checked on the header before
        decoding when the header can be parsed (:func:`image_size_from_header`), else after.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8, RGB.

    Raises
    ------
    ImageTooLargeError
        When the image has more than ``max_pixels`` pixels.
    ValidationError
        When ``data`` is empty or is not a decodable image.
    """
    import cv2

    if len(data) == 0:
        raise ValidationError("empty file, not an image", path=source)
    if max_pixels is not None:
        wh = image_size_from_header(data)
        if wh is not None and wh[0] * wh[1] > int(max_pixels):
            raise ImageTooLargeError(
                f"image too large: {wh[0]}x{wh[1]} = {wh[0] * wh[1]} pixels > limit {int(max_pixels)} (not decoded)", path=source
            )
    flags = cv2.IMREAD_COLOR
    if not apply_exif_orientation:
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        bgr = cv2.imdecode(buf, flags)
    except cv2.error as exc:  # some decoders raise instead of returning None
        raise ValidationError(f"not a readable image ({str(exc).strip().splitlines()[-1]})", path=source) from None
    if bgr is None or bgr.size == 0:
        raise ValidationError("not a readable image (corrupt, truncated or unsupported format)", path=source)
    if max_pixels is not None and bgr.shape[0] * bgr.shape[1] > int(max_pixels):
        raise ImageTooLargeError(
            f"image too large: {bgr.shape[1]}x{bgr.shape[0]} = {bgr.shape[0] * bgr.shape[1]} pixels > limit {int(max_pixels)}",
            path=source,
        )
    if bgr.ndim == 2:  # defensive: IMREAD_COLOR always gives 3 channels
        bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def load_image(path: str | os.PathLike, *, apply_exif_orientation: bool = False, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as RGB ``uint8``.

    The bytes are read by Python and decoded with ``cv2.imdecode``, so paths that ``cv2.imread``
    cannot open (non-ASCII names on some platforms) work too.

    Parameters
    ----------
    path : str or os.PathLike
        The image file (any format OpenCV decodes: JPEG, PNG, PPM/PGM, BMP, TIFF, WebP, ...).
    apply_exif_orientation : bool
        See :func:`decode_image` (off by default).
    max_pixels : int, optional
        See :func:`decode_image`.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8, RGB.

    Raises
    ------
    ValidationError
        Naming the file, when it is missing, a folder, empty, corrupt or not an image.
    """
    p = Path(path)
    if not p.exists():
        raise ValidationError("no such image file", path=str(p))
    if p.is_dir():
        raise ValidationError("is a folder, not an image file", path=str(p))
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ValidationError(f"cannot read image file ({exc.strerror or exc})", path=str(p)) from None
    return decode_image(data, source=str(p), apply_exif_orientation=apply_exif_orientation, max_pixels=max_pixels)


# --------------------------------------------------------------------------------------------
# iBUG .pts


def read_pts(path: str | os.PathLike, *, n_points: int | None = 68) -> np.ndarray:
    """Read an iBUG ``.pts`` landmark file.

    The format is ``version: 1`` / ``n_points: N`` / ``{`` / N lines ``x y`` / ``}``, with
    1-based pixel coordinates.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.pts`` file.
    n_points : int or None
        The number of points required (68 for the iBUG scheme); ``None`` accepts any count.

    Returns
    -------
    numpy.ndarray
        ``(N, 2)`` float32, **0-based** pixel coordinates ``(x, y)``.

    Raises
    ------
    ValidationError
        Naming the file (and the line) when it is missing or malformed.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig", errors="replace")
    except FileNotFoundError:
        raise ValidationError("no such landmark file", path=str(p)) from None
    except OSError as exc:
        raise ValidationError(f"cannot read landmark file ({exc.strerror or exc})", path=str(p)) from None
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines())]
    lines = [(i, ln) for i, ln in lines if ln and not ln.startswith("#")]
    declared = None
    k = 0
    while k < len(lines) and lines[k][1] != "{":
        lineno, ln = lines[k]
        key, sep, value = ln.partition(":")
        if not sep:
            raise ValidationError(f"line {lineno}: expected 'key: value' or '{{', got {ln[:40]!r}", path=str(p))
        if key.strip().lower() == "n_points":
            try:
                declared = int(value.strip())
            except ValueError:
                raise ValidationError(f"line {lineno}: n_points is not an integer: {value.strip()!r}", path=str(p)) from None
        k += 1
    if k == len(lines):
        raise ValidationError("no '{' opening the point list (not an iBUG .pts file)", path=str(p))
    if declared is None:
        raise ValidationError("no 'n_points:' header line", path=str(p))
    k += 1
    rows = []
    closed = False
    for lineno, ln in lines[k:]:
        if ln == "}":
            closed = True
            break
        parts = ln.split()
        if len(parts) != 2:
            raise ValidationError(f"line {lineno}: expected 'x y', got {ln[:40]!r}", path=str(p))
        try:
            rows.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise ValidationError(f"line {lineno}: not numbers: {ln[:40]!r}", path=str(p)) from None
    if not closed:
        raise ValidationError("no '}' closing the point list", path=str(p))
    if len(rows) != declared:
        raise ValidationError(f"n_points says {declared} but the file lists {len(rows)} points", path=str(p))
    if n_points is not None and declared != n_points:
        raise ValidationError(f"expected {n_points} points, the file has {declared}", path=str(p))
    pts = np.asarray(rows, dtype=np.float64).reshape(-1, 2) - 1.0
    if not np.all(np.isfinite(pts)):
        raise ValidationError("non-finite coordinates", path=str(p))
    return pts.astype(np.float32)


def write_pts(path: str | os.PathLike, points: np.ndarray) -> None:
    """Write landmarks as an iBUG ``.pts`` file (1-based coordinates on disk).

    Parameters
    ----------
    path : str or os.PathLike
        The file to write (its folder must exist).
    points : numpy.ndarray
        ``(N, 2)`` or ``(N, 3)`` 0-based pixel coordinates; only ``x, y`` are written (a ``z``
        column is dropped, the format has none).

    Raises
    ------
    ValidationError
        When ``points`` is not ``(N, 2|3)`` or not finite.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] not in (2, 3) or pts.shape[0] == 0:
        raise ValidationError(f"landmarks must be (N, 2) or (N, 3), got shape {pts.shape}", path=str(path))
    if not np.all(np.isfinite(pts[:, :2])):
        raise ValidationError("landmarks contain non-finite values", path=str(path))
    body = "\n".join(f"{x + 1.0:.6f} {y + 1.0:.6f}" for x, y in pts[:, :2])
    write_text(path, f"version: 1\nn_points: {pts.shape[0]}\n{{\n{body}\n}}\n")


# --------------------------------------------------------------------------------------------
# VGGFace annotation lists


def read_vggface_annotations(path: str | os.PathLike, *, bad_lines: list | None = None):
    """Read a VGGFace (v1) identity file ``files/<Name>.txt``.

    Each line is ``id url left top right bottom pose detection_score curation``.

    Parameters
    ----------
    path : str or os.PathLike
        The annotation file.
    bad_lines : list, optional
        When given, a malformed line (wrong field count, a field that is not a finite number) is
        skipped and appended here as ``(line number, id or "", reason)`` instead of raising.

    Returns
    -------
    pandas.DataFrame
        One row per line, columns :data:`VGGFACE_COLUMNS` plus ``frontal``:
        ``id`` str (zero-padded as in the file, e.g. ``"00000001"``), ``url`` str,
        ``left top right bottom`` float64 (pixels), ``pose`` float64, ``detection_score`` float64,
        ``curation`` int64 (1 = in the curated set), ``frontal`` bool (``pose > 2``).

    Raises
    ------
    ValidationError
        Naming the file and line when a line does not have the nine fields or a number is bad or
        not finite (unless ``bad_lines`` is given).
    """
    import pandas as pd

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ValidationError("no such VGGFace annotation file", path=str(p)) from None
    except OSError as exc:
        raise ValidationError(f"cannot read VGGFace annotation file ({exc.strerror or exc})", path=str(p)) from None
    cols: dict[str, list] = {c: [] for c in VGGFACE_COLUMNS}
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        why = None
        if len(parts) != len(VGGFACE_COLUMNS):
            why = f"expected {len(VGGFACE_COLUMNS)} fields ({' '.join(VGGFACE_COLUMNS)}), got {len(parts)}"
        else:
            try:
                nums = [float(v) for v in parts[2:9]]
                if not all(np.isfinite(nums)):
                    why = f"a numeric field is not finite: {line[:80]!r}"
                else:
                    values = [parts[0], parts[1], *nums[:6], int(nums[6])]
            except ValueError:
                why = f"a numeric field is not a number: {line[:80]!r}"
        if why is not None:
            if bad_lines is None:
                raise ValidationError(f"line {lineno}: {why}", path=str(p))
            bad_lines.append((lineno, parts[0] if parts else "", why))
            continue
        for c, v in zip(VGGFACE_COLUMNS, values):
            cols[c].append(v)
    df = pd.DataFrame(
        {
            "id": pd.Series(cols["id"], dtype=object),
            "url": pd.Series(cols["url"], dtype=object),
            **{c: np.asarray(cols[c], dtype=np.float64) for c in ("left", "top", "right", "bottom", "pose", "detection_score")},
            "curation": np.asarray(cols["curation"], dtype=np.int64),
        }
    )
    df["frontal"] = df["pose"].to_numpy() > FRONTAL_POSE_MIN
    return df


# --------------------------------------------------------------------------------------------
# boxes and crops


def as_box(box: Sequence[float] | np.ndarray, *, what: str = "box") -> np.ndarray:
    """Check a face box and return it as ``(4,)`` float64 ``(left, top, right, bottom)``.

    Raises
    ------
    ValidationError
        When it is not four finite numbers with ``right > left`` and ``bottom > top``.
    """
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        raise ValidationError(f"must be 4 finite numbers (left, top, right, bottom), got {np.asarray(box).tolist()!r}", key=what)
    if not (b[2] > b[0] and b[3] > b[1]):
        raise ValidationError(f"must have right > left and bottom > top, got {b.tolist()!r}", key=what)
    return b


def square_box(box: Sequence[float] | np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The square ``(left, top, right, bottom)`` of side ``scale * max(w, h)`` centred on ``box``.

    Parameters
    ----------
    box : array_like
        ``(4,)`` face box in pixels.
    scale : float
        Side of the square relative to the longer side of the box.

    Returns
    -------
    numpy.ndarray
        ``(4,)`` float64.
    """
    b = as_box(box)
    if not scale > 0:
        raise ValidationError(f"must be > 0, got {scale!r}", key="scale")
    cx, cy = (b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0
    half = scale * max(b[2] - b[0], b[3] - b[1]) / 2.0
    return np.array([cx - half, cy - half, cx + half, cy + half])


def crop_face(
    image: np.ndarray,
    box: Sequence[float] | np.ndarray,
    size: int,
    scale: float = 1.0,
    *,
    pad_value: int | Sequence[int] = 0,
) -> np.ndarray:
    """Cut a square face crop around ``box`` and resize it to ``size x size``.

    The square has side ``round(scale * max(w, h))`` pixels and is centred on the box centre
    (rounded to whole pixels, so no resampling happens before the resize). Parts of the square
    outside the image are filled with ``pad_value``. The resize uses area averaging when
    shrinking and bilinear interpolation when enlarging.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 (any channel order; it is kept), or ``(H, W)`` uint8.
    box : array_like
        ``(left, top, right, bottom)`` in pixels.
    size : int
        Output side in pixels (e.g. 64 for the voice->face GAN, 120 for the image->3DMM network).
    scale : float
        Side of the square relative to the longer side of the box (1.0 = the box made square).
    pad_value : int or sequence of int
        Fill value of the padding.

    Returns
    -------
    numpy.ndarray
        ``(size, size, 3)`` uint8 (``(size, size)`` for a 2-D input).

    Raises
    ------
    ValidationError
        On a bad image, box, size or scale.
    """
    import cv2

    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3) or img.size == 0:
        raise ValidationError(f"must be a (H, W, 3) or (H, W) uint8 array, got {img.dtype} {img.shape}", key="image")
    if int(size) != size or size < 1:
        raise ValidationError(f"must be a positive integer, got {size!r}", key="size")
    size = int(size)
    sq = square_box(box, scale)
    side = max(1, int(round(sq[2] - sq[0])))
    cx, cy = (sq[0] + sq[2]) / 2.0, (sq[1] + sq[3]) / 2.0
    x0 = int(np.floor(cx - side / 2.0 + 0.5))
    y0 = int(np.floor(cy - side / 2.0 + 0.5))
    x1, y1 = x0 + side, y0 + side
    h, w = img.shape[:2]
    shape = (side, side) + img.shape[2:]
    fill = np.broadcast_to(np.asarray(pad_value, dtype=np.uint8), img.shape[2:] if img.ndim == 3 else ())
    out = np.empty(shape, dtype=np.uint8)
    out[...] = fill
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
    if side == size:
        return out
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(out, (size, size), interpolation=interp))
