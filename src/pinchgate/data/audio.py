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
    if not np.isfinite(mono).all():  # NaN in, NaN loss or an empty hypothesis out
        raise AudioError(f"{path}: {_non_finite(audio)}")
    if file_rate != sample_rate:
        mono = soxr.resample(mono, file_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_problem(path: str | Path) -> tuple[str, str] | None:
    """Decode a whole file (headers can be valid over damaged data): why it cannot be used,
    as (kind, message), or None. Kinds: unreadable_audio, zero_length, non_finite_audio,
    silent_audio."""
    try:
        audio, _ = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for damaged files
        return "unreadable_audio", f"cannot decode audio ({_reason(exc)})"
    if audio.size == 0:
        return "zero_length", "audio file has no samples"
    if not np.isfinite(audio).all():
        return "non_finite_audio", _non_finite(audio)
    if not audio.any():
        return "silent_audio", f"every one of its {audio.shape[0]} samples is zero"
    return None


def _non_finite(audio: np.ndarray) -> str:
    bad = int(audio.size - np.isfinite(audio).sum())
    return f"{bad} of {audio.size} samples are NaN or infinite"


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
