"""Transcript normalisation, the LibriSpeech convention: upper-case words, apostrophes kept.

The same function is applied to training transcripts, references and hypotheses before
scoring, so WER is computed on exactly what the model is asked to produce.
"""

from __future__ import annotations

import re
import unicodedata

# Punctuation that carries no spoken word: replaced by a space.
_PUNCTUATION = re.compile(r"[\.,;:!\?\"“”‘’«»()\[\]{}\-–—/\\_*#~`]")
_SPACES = re.compile(r"\s+")


def normalize_transcript(text: str) -> str:
    """Upper-case, curly apostrophes made straight, punctuation dropped, spaces collapsed.

    Characters that are neither letters, apostrophes nor punctuation (digits, symbols,
    accented letters) are kept so the vocabulary check can report them, not hide them.
    """
    text = unicodedata.normalize("NFC", text).replace("’", "'").replace("‘", "'")
    text = _PUNCTUATION.sub(" ", text.upper())
    return _SPACES.sub(" ", text).strip()
