"""English sentences for the synthetic corpus, and LibriSpeech-style text normalisation.

The sentences ship gzipped in ``sentences.txt.gz`` next to this file: public-domain novels
from Project Gutenberg, cut into sentences and cleaned by :func:`clean_sentence`. The file
is regenerated from the book texts with
``python -m pinchgate.data.texts TAG=BOOK.txt ... | gzip -9n > sentences.txt.gz``
(recipes/synth-corpus.md says where the books come from).
"""

from __future__ import annotations

import functools
import gzip
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from pinchgate.data.text import normalize_transcript

SENTENCES_FILE = Path(__file__).with_name("sentences.txt.gz")

TEXT_SOURCE = (
    "Project Gutenberg public-domain novels (Doyle, The Adventures of Sherlock Holmes, eBook #1661;"
    " Twain, The Adventures of Tom Sawyer, eBook #74; Melville, Moby Dick, eBook #2701), as"
    " shipped in Debian bookworm's golang-github-pierrec-lz4-dev and"
    " golang-github-colinmarc-hdfs-dev test data; sentences extracted by pinchgate.data.texts"
)

MIN_WORDS = 4
MAX_WORDS = 20

# Expanded the way LibriSpeech transcripts spell them, so the TTS reads what the label says.
ABBREVIATIONS: dict[str, str] = {
    "Mr.": "Mister",
    "Mrs.": "Missus",
    "Dr.": "Doctor",
    "St.": "Saint",
    "Messrs.": "Messieurs",
    "Capt.": "Captain",
    "Col.": "Colonel",
    "Gen.": "General",
    "Lieut.": "Lieutenant",
    "Rev.": "Reverend",
    "Prof.": "Professor",
    "Jr.": "Junior",
    "Sr.": "Senior",
    "etc.": "et cetera",
}

# Typographic characters mapped to the plain ones the cleaner understands.
_TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2014": " -- ",
        "\u2013": " -- ",
        "\u00a0": " ",
    }
)
_ALLOWED_DISPLAY = re.compile(r"[A-Za-z .,;:!?'\-]+")
_SENTENCE_END = re.compile(r"([.!?][\"']?)\s+(?=[\"']?[A-Z])")
_ABBREVIATION = re.compile(
    r"(?<![A-Za-z])(" + "|".join(re.escape(a) for a in ABBREVIATIONS) + r")(?=\s|$)"
)
# Apostrophes that are not inside a word are quotation marks, not part of the word.
_STRAY_APOSTROPHE = re.compile(r"(?<![A-Za-z])'|'(?![A-Za-z])")


@dataclass(frozen=True)
class Sentence:
    """One corpus sentence: what the engine reads, what the transcript says, and its book."""

    text: str
    transcript: str
    source: str


def sentence_transcript(text: str) -> str:
    """LibriSpeech-style transcript of a sentence: A-Z, in-word apostrophes, single spaces.

    Abbreviations are expanded and quote marks dropped before the project's own
    normalize_transcript; digits and symbols have no single reading, so they raise
    ValueError instead of being guessed.
    """
    text = unicodedata.normalize("NFKC", text).translate(_TYPOGRAPHY)
    text = _ABBREVIATION.sub(lambda m: ABBREVIATIONS[m.group(1)], text)
    text = normalize_transcript(_STRAY_APOSTROPHE.sub(" ", text))
    bad = sorted({c for c in text if not ("A" <= c <= "Z" or c in "' ")})
    if bad:
        raise ValueError(f"cannot spell {''.join(bad)!r} in {text!r}")
    return text


def clean_sentence(raw: str) -> str | None:
    """Readable sentence for a TTS engine, or None when it would make a doubtful label.

    Rejected: digits, symbols, brackets, non-ASCII letters, all-caps words (acronyms,
    roman numerals, shouting), initials, missing final punctuation, and lengths outside
    MIN_WORDS..MAX_WORDS.
    """
    text = unicodedata.normalize("NFKC", raw).translate(_TYPOGRAPHY)
    text = _ABBREVIATION.sub(lambda m: ABBREVIATIONS[m.group(1)], text)
    text = text.replace('"', " ").replace("_", " ")
    text = re.sub(r"\s*--+\s*", ", ", text)
    text = _STRAY_APOSTROPHE.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,;:.!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:[,;:]|\s)*([,;:.!?])", r"\2", text)
    text = text.lstrip(",;: ")
    if not text or not _ALLOWED_DISPLAY.fullmatch(text):
        return None
    if not text[0].isupper() or text[-1] not in ".!?":
        return None
    tokens = re.findall(r"[A-Za-z']+", text)
    for token in tokens:
        letters = token.replace("'", "")
        if len(letters) >= 2 and letters.isupper():
            return None
        if len(letters) == 1 and letters not in "AIOa":
            return None
    try:
        n_words = len(sentence_transcript(text).split())
    except ValueError:
        return None
    if not MIN_WORDS <= n_words <= MAX_WORDS:
        return None
    return text


def strip_gutenberg(book: str) -> str:
    """The body of a Project Gutenberg text, without its licence header and footer."""
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", book, re.M)
    end = re.search(
        r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
        book,
        re.M,
    )
    return book[start.end() if start else 0 : end.start() if end else len(book)]


def split_sentences(book: str) -> list[str]:
    """Raw sentences of a book: paragraphs are blank-line separated, lines are re-joined."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", book):
        flat = " ".join(paragraph.split())
        # Expand first so "Mr. Holmes" is not cut after "Mr.".
        flat = _ABBREVIATION.sub(lambda m: ABBREVIATIONS[m.group(1)], flat)
        parts = _SENTENCE_END.split(flat)
        # re.split keeps the captured end punctuation as every second item: glue it back.
        for i in range(0, len(parts), 2):
            end = parts[i + 1] if i + 1 < len(parts) else ""
            sentence = (parts[i] + end).strip()
            if sentence:
                sentences.append(sentence)
    return sentences


def extract_sentences(book: str) -> list[str]:
    """Clean, de-duplicated sentences of one Project Gutenberg book, in reading order."""
    seen: set[str] = set()
    kept: list[str] = []
    for raw in split_sentences(strip_gutenberg(book)):
        text = clean_sentence(raw)
        if text is None:
            continue
        key = sentence_transcript(text)
        if key not in seen:
            seen.add(key)
            kept.append(text)
    return kept


@functools.cache
def load_sentences(path: Path = SENTENCES_FILE) -> tuple[Sentence, ...]:
    """The packaged sentences, de-duplicated by transcript so splits can be kept disjoint."""
    seen: set[str] = set()
    sentences: list[Sentence] = []
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        rows = lines.read().splitlines()
    for line in rows:
        if not line.strip() or line.startswith("#"):
            continue
        source, text = line.split("\t", 1)
        transcript = sentence_transcript(text)
        if transcript not in seen:
            seen.add(transcript)
            sentences.append(Sentence(text=text, transcript=transcript, source=source))
    return tuple(sentences)


def main(argv: list[str]) -> None:
    """Print sentences.txt lines from book files given as TAG=PATH (or PATH: tag = file stem)."""
    print(
        "# source<TAB>sentence: public-domain Project Gutenberg texts, see recipes/synth-corpus.md"
    )
    seen: set[str] = set()
    for arg in argv:
        tag, _, path = arg.rpartition("=")
        tag = tag or Path(path).stem
        for text in extract_sentences(Path(path).read_text(encoding="utf-8-sig", errors="replace")):
            key = sentence_transcript(text)
            if key not in seen:
                seen.add(key)
                print(f"{tag}\t{text}")


if __name__ == "__main__":
    main(sys.argv[1:])
