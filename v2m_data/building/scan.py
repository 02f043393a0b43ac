"""Input scanning: the utterance and image files of one identity."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from v2m_bench.errors import ValidationError

from ..identities import Identity, validate_component
from .failures import failure, short_reason

__all__ = ["AUDIO_SUFFIXES", "IMAGE_SUFFIXES", "IdentityFiles", "scan_identity"]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".m4a", ".mp3")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")


@dataclass(frozen=True)
class IdentityFiles:
    """The input files of one identity (paths relative to the wav / image roots, sorted).

    ``utterances``: tuples ``(relpath, size)``; ``images``: tuples ``(relpath, image_id, size,
    box or None, pose or None)``; ``notes``: failures found while scanning (missing folders, a bad
    annotation file); ``annotated_missing``: annotation lines without an image file.
    """

    utterances: tuple
    images: tuple
    notes: tuple
    annotated_missing: int

def scan_identity(ident: Identity, wav_root: Path, images_root: Path, annotations: Path | None) -> IdentityFiles:
    """List one identity's utterances and images (see :class:`IdentityFiles`)."""
    notes = []
    utts = []
    vdir = wav_root / validate_component(ident.vox_id, "VoxCeleb1 ID")
    if vdir.is_dir():
        for video in sorted(os.listdir(vdir)):
            vp = vdir / video
            if video.startswith(".") or not vp.is_dir():
                continue
            for f in sorted(os.listdir(vp)):
                if f.startswith(".") or Path(f).suffix.lower() not in AUDIO_SUFFIXES:
                    continue
                p = vp / f
                if p.is_file():
                    utts.append((f"{ident.vox_id}/{video}/{f}", p.stat().st_size))
    else:
        notes.append(failure("identity", ident, "", f"no voice folder {ident.vox_id}/ under the VoxCeleb wav folder"))
    boxes: dict = {}
    bad_ids: dict = {}
    if annotations is not None:
        ann = annotations / f"{validate_component(ident.name, 'VGGFace1 ID')}.txt"
        if ann.is_file():
            from ..images import read_vggface_annotations

            bad_lines: list = []
            try:
                df = read_vggface_annotations(ann, bad_lines=bad_lines)
                for rid, l, t, r, b, pose in zip(df["id"], df["left"], df["top"], df["right"], df["bottom"], df["pose"]):
                    boxes[str(rid)] = ((float(l), float(t), float(r), float(b)), float(pose))
            except ValidationError as e:
                notes.append(failure("identity", ident, f"{ident.name}.txt", f"annotation file unusable, faces detected without boxes: {short_reason(e, ann)}"))
            for lineno, rid, why in bad_lines:
                bad_ids[str(rid)] = f"annotation line {lineno} of {ident.name}.txt unusable ({why}); image not used"
    images = []
    idir = images_root / validate_component(ident.name, "VGGFace1 ID")
    seen = set()
    if idir.is_dir():
        for f in sorted(os.listdir(idir)):
            p = idir / f
            if f.startswith(".") or Path(f).suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                continue
            stem = Path(f).stem
            seen.add(stem)
            if stem in bad_ids and stem not in boxes:
                notes.append(failure("image", ident, f"{ident.name}/{f}", bad_ids[stem]))
                continue
            box, pose = boxes.get(stem, (None, None))
            images.append((f"{ident.name}/{f}", stem, p.stat().st_size, box, pose))
    else:
        notes.append(failure("identity", ident, "", f"no image folder {ident.name}/ under the VGGFace image folder"))
    missing = sum(1 for k in boxes if k not in seen)
    for rid, why in sorted(bad_ids.items()):
        if rid not in seen and rid not in boxes:
            notes.append(failure("identity", ident, f"{ident.name}.txt", why.replace("; image not used", "")))
    return IdentityFiles(tuple(utts), tuple(images), tuple(notes), missing)
