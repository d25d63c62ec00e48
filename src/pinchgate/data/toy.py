"""The built-in toy case: a "tone alphabet" corpus, generated in a second from a seed.

Each letter is a short two-harmonic tone at its own pitch, words are separated by silence,
and light noise is added. It is not speech: it is a small, exactly labelled sequence task
that a tiny wav2vec2 learns in minutes on a CPU, so tests and the first run of the tool
exercise the whole pipeline (readers, batching, CTC, decoding, WER) without any download.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf

LETTERS = "ADEINOST"
SAMPLE_RATE = 16000
SPLIT_SIZES = {"train": 240, "dev": 30, "test": 30}


def _letter_tone(letter: str, rng: np.random.Generator) -> np.ndarray:
    pitch = 600.0 + 800.0 * LETTERS.index(letter)  # far apart for a tiny CNN to tell
    seconds = rng.uniform(0.07, 0.11)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * pitch * t)
    envelope = np.sin(np.pi * t / seconds) ** 0.5  # soft onset/offset, no clicks
    gap = np.zeros(int(0.025 * SAMPLE_RATE))  # separates repeated letters, like a blank
    return np.concatenate([tone * envelope * rng.uniform(0.3, 0.6), gap])


def _sentence(rng: np.random.Generator) -> str:
    words = ["".join(rng.choice(list(LETTERS), size=rng.integers(2, 5))) for _ in range(3)]
    return " ".join(words[: rng.integers(1, 4)])


def synthesize(text: str, rng: np.random.Generator) -> np.ndarray:
    pieces = [np.zeros(int(0.1 * SAMPLE_RATE))]
    for word in text.split(" "):
        pieces.extend(_letter_tone(c, rng) for c in word)
        pieces.append(np.zeros(int(rng.uniform(0.08, 0.15) * SAMPLE_RATE)))
    audio = np.concatenate(pieces)
    audio += rng.normal(0.0, 0.01, audio.shape)  # ~30 dB SNR
    return audio.astype(np.float32)


def build_toy_corpus(
    out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None
) -> Path:
    """Write the splits in LibriSpeech layout under `out_dir/<split>/`; reused if present."""
    out_dir = Path(out_dir)
    sizes = sizes or SPLIT_SIZES
    for split_index, (split, count) in enumerate(sizes.items()):
        chapter = out_dir / split / str(100 + split_index) / "1"
        trans = chapter / f"{100 + split_index}-1.trans.txt"
        if trans.is_file():
            continue
        chapter.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, split_index])
        lines = []
        for i in range(count):
            utt_id = f"{100 + split_index}-1-{i:04d}"
            text = _sentence(rng)
            sf.write(chapter / f"{utt_id}.flac", synthesize(text, rng), SAMPLE_RATE)
            lines.append(f"{utt_id} {text}")
        tmp = trans.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, trans)  # the transcript file last: its presence means complete
    return out_dir
