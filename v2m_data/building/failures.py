"""Per-item failure records of the build (one dict per failed item, in shard reports and the
manifest) and their one-line reasons."""

from __future__ import annotations

import os
from pathlib import Path

from ..identities import Identity

__all__ = ["STAGES", "failure", "short_reason"]

#: The stages a failure can name, in the order failures are sorted within an identity.
STAGES = ("identity", "audio", "image", "face", "landmarks", "crop", "fit", "reference")


def failure(stage: str, ident: Identity, item: str, reason: str) -> dict:
    """One failure record: ``{"stage", "vox_id", "identity", "item", "reason"}``."""
    return {"stage": stage, "vox_id": ident.vox_id, "identity": ident.name, "item": item, "reason": reason}


def short_reason(err: BaseException | str, path: Path | str | None = None, root: Path | str | None = None) -> str:
    """One-line reason without the absolute path prefix the item field already gives; other
    mentions of files under ``root`` are made relative to it (reasons do not depend on where the
    inputs live)."""
    msg = " ".join(str(err).split())
    if path is not None:
        pre = f"{path}: "
        if msg.startswith(pre):
            msg = msg[len(pre):]
    if root is not None:
        r = str(root).rstrip(os.sep)
        msg = msg.replace(r + os.sep, "").replace(r, ".")
    return msg
