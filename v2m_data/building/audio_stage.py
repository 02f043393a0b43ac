"""The audio stage: the features of every utterance of a shard (:func:`v2m_data.audio.extract_features`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from v2m_bench.errors import ValidationError
from v2m_bench.fileio import progress as progress_bar

from ..audio import AudioConfig, extract_features, mel_filterbank
from .failures import failure, short_reason

__all__ = ["process_utterances"]


def process_utterances(ident_files: Sequence, wav_root: Path, config: AudioConfig, *, progress: bool = False) -> tuple:
    """Features of every utterance: :func:`v2m_data.audio.extract_features` (load, VAD, log-mel,
    normalise), an utterance without speech or without one whole frame being a failure.

    The VAD's ``on_no_speech`` is always ``"raise"`` here (an utterance without speech is a
    recorded failure of stage ``"audio"``, whatever ``config.vad_on_no_speech`` says).

    Parameters
    ----------
    ident_files : sequence of (Identity, IdentityFiles, identity row)
    wav_root : Path
    config : AudioConfig

    Returns
    -------
    (records, failures)
        ``records``: list of dicts ``row, path, duration, voiced_duration`` (seconds) and
        ``features ((F, n_mels) float32)``; ``failures``: records of
        :func:`v2m_data.building.failures.failure`.
    """
    fb = mel_filterbank(config)
    cfg = config if config.vad_on_no_speech == "raise" else dataclasses.replace(config, vad_on_no_speech="raise")
    records, failures = [], []
    total = sum(len(f.utterances) for _, f, _ in ident_files)
    with progress_bar(total=total, desc="audio features", unit="utt", enabled=bool(progress), leave=False) as bar:
        for ident, files, row in ident_files:
            for rel, _size in files.utterances:
                path = wav_root / rel
                try:
                    feats, info = extract_features(path, cfg, filterbank=fb, return_info=True)
                    if feats.shape[1] == 0:
                        raise ValidationError(f"too short for one frame ({info.voiced_samples} voiced samples)", path=path)
                    records.append(
                        {
                            "row": row,
                            "path": rel,
                            "duration": info.samples / info.sample_rate,
                            "voiced_duration": info.voiced_samples / info.sample_rate,
                            "features": np.ascontiguousarray(feats.T, dtype=np.float32),
                        }
                    )
                except ValidationError as e:
                    failures.append(failure("audio", ident, rel, short_reason(e, path, wav_root)))
                except Exception as e:  # noqa: BLE001 - a per-item failure must not stop the build
                    failures.append(failure("audio", ident, rel, f"unexpected {type(e).__name__}: {short_reason(e, path, wav_root)}"))
                bar.update(1)
    return records, failures
