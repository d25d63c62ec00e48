"""Character CTC vocabulary, compatible with `Wav2Vec2CTCTokenizer` (vocab.json)."""

from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from transformers import Wav2Vec2CTCTokenizer

from pinchgate.errors import PinchgateError

# The special tokens and their order follow facebook/wav2vec2-base-960h's vocab.json.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
WORD_DELIMITER = "|"
# A vocabulary built from transcripts takes a letter (or the apostrophe) only when it is in at
# least this many utterances and this share of them: one "café" does not add a letter.
MIN_UTTERANCES_PER_CHARACTER = 2
MIN_SHARE_PER_CHARACTER = 0.001


def build_vocab(transcripts: Iterable[str]) -> dict[str, int]:
    """Special tokens, the word delimiter, then every character seen, sorted."""
    chars = sorted({c for text in transcripts for c in text if c != " "})
    tokens = [*SPECIAL_TOKENS, WORD_DELIMITER, *chars]
    return {token: index for index, token in enumerate(tokens)}


def vocab_from_transcripts(transcripts: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """The vocabulary a run builds from its (normalised) training transcripts, and the
    characters left out, each with the number of utterances it is in: anything that is not
    a letter or the apostrophe (digits, symbols: numbers must be written as words), and
    letters too rare to learn (`MIN_UTTERANCES_PER_CHARACTER`, `MIN_SHARE_PER_CHARACTER`).
    Utterances with a left-out character are then skipped as out of vocabulary."""
    seen = Counter(c for text in transcripts for c in set(text) if c != " ")
    needed = max(
        MIN_UTTERANCES_PER_CHARACTER, math.ceil(MIN_SHARE_PER_CHARACTER * len(transcripts))
    )
    taken = {
        c
        for c, n in seen.items()
        if (c == "'" or unicodedata.category(c).startswith("L")) and n >= needed
    }
    left_out = {c: n for c, n in sorted(seen.items()) if c not in taken}
    return build_vocab(taken), left_out


def describe_left_out(left_out: dict[str, int]) -> str:
    """`'4' (1 utterance), 'É' (2 utterances)`: the characters a built vocabulary left out."""
    return ", ".join(
        f"{c!r} ({n} utterance{'s' if n != 1 else ''})" for c, n in sorted(left_out.items())
    )


def save_vocab(vocab: dict[str, int], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def load_tokenizer(vocab_path: str | Path) -> Wav2Vec2CTCTokenizer:
    """A tokenizer from a vocab.json file or a directory holding one."""
    path = Path(vocab_path)
    if path.is_dir():
        path = path / "vocab.json"
    if not path.is_file():
        raise PinchgateError(f"{path}: vocabulary file does not exist")
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PinchgateError(f"{path}: not a JSON vocabulary ({exc})") from None
    missing = [t for t in ("<pad>", "<unk>", WORD_DELIMITER) if t not in vocab]
    if missing:
        raise PinchgateError(f"{path}: vocabulary lacks the tokens {missing}")
    return Wav2Vec2CTCTokenizer(
        str(path),
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        word_delimiter_token=WORD_DELIMITER,
    )


def vocab_characters(tokenizer: Wav2Vec2CTCTokenizer | dict[str, int]) -> set[str]:
    """The transcript characters a tokenizer (or a vocab.json mapping) can spell (the
    delimiter stands for space)."""
    vocab = tokenizer if isinstance(tokenizer, dict) else tokenizer.get_vocab()
    return {t for t in vocab if len(t) == 1 and t != WORD_DELIMITER}
