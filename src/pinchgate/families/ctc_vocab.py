"""Character CTC vocabulary, compatible with `Wav2Vec2CTCTokenizer` (vocab.json)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import Wav2Vec2CTCTokenizer

from pinchgate.errors import PinchgateError

# The special tokens and their order follow facebook/wav2vec2-base-960h's vocab.json.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
WORD_DELIMITER = "|"


def build_vocab(transcripts: Iterable[str]) -> dict[str, int]:
    """Special tokens, the word delimiter, then every character seen, sorted."""
    chars = sorted({c for text in transcripts for c in text if c != " "})
    tokens = [*SPECIAL_TOKENS, WORD_DELIMITER, *chars]
    return {token: index for index, token in enumerate(tokens)}


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


def vocab_characters(tokenizer: Wav2Vec2CTCTokenizer) -> set[str]:
    """The transcript characters the tokenizer can spell (the delimiter stands for space)."""
    return {t for t in tokenizer.get_vocab() if len(t) == 1 and t != WORD_DELIMITER}
