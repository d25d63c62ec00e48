"""Audio loading: soundfile for decoding, soxr for resampling, mono by averaging channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from pinchgate.errors import AudioError


def audio_duration(path: str | Path) -> float:
    """Duration in seconds read from the file header, without decoding the audio."""
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise AudioError(f"{path}: cannot read audio ({_reason(exc)})") from None
    if info.samplerate <= 0:
        raise AudioError(f"{path}: invalid sample rate {info.samplerate}")
    return info.frames / info.samplerate


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read a file as float32 mono at `sample_rate` (downmixed, resampled with soxr)."""
    try:
        audio, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(f"{path}: cannot read audio ({_reason(exc)})") from None
    mono = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if mono.size == 0:
        raise AudioError(f"{path}: audio is empty (0 samples)")
    if file_rate != sample_rate:
        mono = soxr.resample(mono, file_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
