"""Word n-gram language models and lexicon-constrained CTC beam search.

Greedy decoding (pinchgate.evaluate) is what the paper and every pinchgate report use.
This module adds the decoding speech engineers also report: a beam search that only
writes words of a lexicon and scores them with a word n-gram LM.

- :func:`build_arpa` estimates an interpolated modified Kneser-Ney model (Chen & Goodman
  1998, the estimate KenLM's ``lmplz`` makes) from normalised sentences and writes it in
  ARPA format. Written here because no installable library fits: KenLM's estimator needs a
  Boost build, and the pure-Python ARPA builders we tried write unnormalised models.
- :class:`LexiconDecoder` runs flashlight-text's CTC lexicon decoder (the one behind
  torchaudio's ``ctc_decoder``) with KenLM reading the ARPA file; the lexicon is the LM's
  vocabulary spelled in the model's characters. Install with ``pip install
  'pinchgate[lm]'``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch

from pinchgate.errors import PinchgateError

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def kneser_ney_discounts(counts: Iterable[int]) -> tuple[float, float, float]:
    """Modified Kneser-Ney discounts D1, D2, D3+ from one order's (adjusted) counts.

    Chen & Goodman's estimates from the counts of counts n1..n4; where those are too few for
    valid discounts (tiny corpora), one absolute discount Y = n1 / (n1 + 2 n2) for all.
    """
    n = Counter(min(c, 4) for c in counts)
    n1, n2, n3, n4 = (n[k] for k in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
    y = min(max(y, 0.05), 0.95)
    if n1 and n2 and n3 and n4:
        d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        if all(0 < dk < k for dk, k in zip(d, (1, 2, 3), strict=True)):
            return d
    return (y, y, y)


def build_arpa(sentences: Iterable[str], order: int = 3) -> str:
    """An interpolated modified Kneser-Ney n-gram model of the sentences, as ARPA text.

    Sentences are word sequences (already normalised); each is padded with <s> and </s>.
    Stored probabilities are the interpolated ones and backoff weights the interpolation
    weights, so the model sums to one over the vocabulary (plus </s> and <unk>) in every
    context. <unk> gets the uniform share of the unigram interpolation.
    """
    if order < 2:  # KenLM reads bigram models and up
        raise PinchgateError(f"--order: must be at least 2, got {order}")
    counts: list[Counter] = [Counter() for _ in range(order + 1)]  # counts[n][ngram tuple]
    n_sentences = 0
    for sentence in sentences:
        words = sentence.split()
        if not words:
            continue
        n_sentences += 1
        padded = [BOS, *words, EOS]
        for end in range(1, len(padded)):
            for n in range(1, order + 1):
                if end - n + 1 < 0:
                    break
                counts[n][tuple(padded[end - n + 1 : end + 1])] += 1
    if not n_sentences:
        raise PinchgateError("no words to build a language model from")

    # Adjusted counts: the highest order keeps raw counts; a lower-order n-gram counts the
    # distinct words seen before it, except at the sentence start where none can be.
    adjusted: list[dict] = [{} for _ in range(order + 1)]
    adjusted[order] = dict(counts[order])
    for n in range(1, order):
        left = Counter(gram[1:] for gram in counts[n + 1])
        adjusted[n] = {gram: (c if gram[0] == BOS else left[gram]) for gram, c in counts[n].items()}

    vocabulary = sorted({gram[0] for gram in counts[1]} | {UNK})  # words, </s>, <unk>
    probs: list[dict] = [{} for _ in range(order + 1)]
    backoffs: list[dict] = [{} for _ in range(order + 1)]
    for n in range(1, order + 1):
        d1, d2, d3 = kneser_ney_discounts(adjusted[n].values())
        discount = {1: d1, 2: d2}
        totals: dict[tuple, float] = defaultdict(float)
        mass: dict[tuple, float] = defaultdict(float)
        for gram, c in adjusted[n].items():
            totals[gram[:-1]] += c
            mass[gram[:-1]] += discount.get(c, d3)
        for gram, c in adjusted[n].items():
            context = gram[:-1]
            own = (c - discount.get(c, d3)) / totals[context]
            gamma = mass[context] / totals[context]
            if n == 1:
                lower = 1.0 / len(vocabulary)
            else:
                lower = probs[n - 1][gram[1:]]
            probs[n][gram] = own + gamma * lower
        for context in totals:
            backoffs[n - 1][context] = mass[context] / totals[context]
    probs[1][(UNK,)] = backoffs[0][()] / len(vocabulary)

    lines = ["\\data\\"]
    sizes = {1: len(probs[1]) + 1}  # + <s>
    sizes.update({n: len(probs[n]) for n in range(2, order + 1)})
    lines += [f"ngram {n}={sizes[n]}" for n in range(1, order + 1)]
    for n in range(1, order + 1):
        lines += ["", f"\\{n}-grams:"]
        entries = sorted(probs[n].items())
        if n == 1:
            entries = [((BOS,), None), *entries]
        for gram, p in entries:
            logp = -99.0 if p is None else math.log10(p)
            line = f"{logp:.6f}\t{' '.join(gram)}"
            if n < order and gram in backoffs[n]:
                line += f"\t{math.log10(backoffs[n][gram]):.6f}"
            lines.append(line)
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


def write_arpa(sentences: Iterable[str], path: str | Path, order: int = 3) -> dict:
    """Build and write an ARPA file atomically; returns its n-gram counts and words."""
    sentences = [s for s in sentences if s.split()]
    text = build_arpa(sentences, order)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
    sizes = [int(m) for m in re.findall(r"^ngram \d+=(\d+)$", text, flags=re.M)]
    return {
        "sentences": len(sentences),
        "words": sum(len(s.split()) for s in sentences),
        "ngrams": sizes,
    }


def arpa_unigrams(path: str | Path) -> list[str]:
    """The words of an ARPA file's 1-gram section (<s>, </s> and <unk> left out)."""
    path = Path(path)
    if not path.is_file():
        raise PinchgateError(f"{path}: no such language model file")
    words, inside = [], False
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if line == "\\1-grams:":
                inside = True
            elif inside and line.startswith("\\"):
                break
            elif inside and line:
                fields = line.split()
                if len(fields) >= 2 and fields[1] not in (BOS, EOS, UNK):
                    words.append(fields[1])
    if not inside:
        raise PinchgateError(f"{path}: not an ARPA language model (no \\1-grams: section)")
    return words


@contextlib.contextmanager
def _quiet_stderr():
    """Silence what C++ code writes to file descriptor 2 for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LexiconDecoder:
    """CTC beam search over a lexicon with a word n-gram LM (flashlight-text + KenLM).

    `tokens` are the model's output tokens in id order; `blank` the CTC blank and
    `delimiter` the word separator. Words of the LM that use a character the model cannot
    write are left out of the lexicon (counted in `skipped_words`). Scores: acoustic
    log-probabilities + lm_weight * LM log-probability + word_score per word.
    """

    def __init__(
        self,
        tokens: list[str],
        lm_path: str | Path,
        lm_weight: float = 1.0,
        word_score: float = 0.0,
        beam_size: int = 50,
        beam_threshold: float = 25.0,
        blank: str = "<pad>",
        delimiter: str = "|",
    ):
        try:
            from flashlight.lib.text.decoder import (
                CriterionType,
                LexiconDecoderOptions,
                SmearingMode,
                Trie,
            )
            from flashlight.lib.text.decoder import LexiconDecoder as FlashlightDecoder
            from flashlight.lib.text.decoder.kenlm import KenLM
            from flashlight.lib.text.dictionary import Dictionary, create_word_dict
        except ImportError:
            raise PinchgateError(
                "LM decoding needs flashlight-text: pip install 'pinchgate[lm]'"
            ) from None
        for name, token in (("blank", blank), ("word delimiter", delimiter)):
            if token not in tokens:
                raise PinchgateError(f"the model's vocabulary has no {name} token {token!r}")
        if beam_size < 1:
            raise PinchgateError(f"--beam-size: must be at least 1, got {beam_size}")
        token_dict = Dictionary(tokens)
        spellable = set(tokens) - {blank, delimiter}
        words = arpa_unigrams(lm_path)
        lexicon = {w: [[*w, delimiter]] for w in words if set(w) <= spellable}
        self.skipped_words = len(words) - len(lexicon)
        if not lexicon:
            raise PinchgateError(f"{lm_path}: no word of the LM can be spelled by the model")
        self.lexicon_size = len(lexicon)
        lexicon[UNK] = []
        self.word_dict = create_word_dict(lexicon)
        try:
            with _quiet_stderr():  # KenLM draws a progress bar on stderr
                self.lm = KenLM(str(lm_path), self.word_dict)
        except Exception as exc:  # KenLM's own message names the problem and byte
            last = str(exc).strip().splitlines()[-1]
            raise PinchgateError(f"{lm_path}: not a readable ARPA file: {last}") from None
        silence = token_dict.get_index(delimiter)
        trie = Trie(len(tokens), silence)
        start = self.lm.start(False)
        for word, spellings in lexicon.items():
            index = self.word_dict.get_index(word)
            _, score = self.lm.score(start, index)
            for spelling in spellings:
                trie.insert([token_dict.get_index(t) for t in spelling], index, score)
        trie.smear(SmearingMode.MAX)
        options = LexiconDecoderOptions(
            beam_size=beam_size,
            beam_size_token=len(tokens),
            beam_threshold=beam_threshold,
            lm_weight=lm_weight,
            word_score=word_score,
            unk_score=float("-inf"),
            sil_score=0.0,
            log_add=False,
            criterion_type=CriterionType.CTC,
        )
        unk = self.word_dict.get_index(UNK)
        blank_index = token_dict.get_index(blank)
        self._decoder = FlashlightDecoder(
            options, trie, self.lm, silence, blank_index, unk, [], False
        )
        self.options = {
            "lm": str(lm_path),
            "lm_weight": lm_weight,
            "word_score": word_score,
            "beam_size": beam_size,
            "beam_threshold": beam_threshold,
            "lexicon_words": self.lexicon_size,
            "skipped_words": self.skipped_words,
        }

    def decode(self, log_probs: torch.Tensor) -> str:
        """The best word sequence for one utterance's (frames, tokens) log-probabilities."""
        emissions = log_probs.detach().to("cpu", torch.float32).contiguous()
        frames, tokens = emissions.shape
        results = self._decoder.decode(emissions.data_ptr(), frames, tokens)
        if not results:
            return ""
        return " ".join(self.word_dict.get_entry(i) for i in results[0].words if i >= 0)
