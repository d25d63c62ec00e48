"""Decoding through the model's family, WER/CER scoring with jiwer, per-utterance output,
real-time factor.

Scoring normalisation: references and hypotheses both go through the family's
`normalize` before jiwer counts word and character errors (for CTC models
`pinchgate.data.text.normalize_transcript`: upper-case, punctuation removed, whitespace
collapsed, so the WER is on exactly what the model is trained to write).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jiwer
import torch

from pinchgate.data.audio import load_audio
from pinchgate.data.batching import bucket_batches
from pinchgate.data.corpus import Utterance
from pinchgate.data.text import normalize_transcript
from pinchgate.families import ModelFamily


@dataclass
class EvalResult:
    name: str
    utterances: int
    words: int
    wer: float
    cer: float
    substitutions: int
    deletions: int
    insertions: int
    audio_seconds: float
    decode_seconds: float
    rtf: float  # model compute and decoding time / audio time (audio loading excluded)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.name}: WER {100 * self.wer:.2f}%  CER {100 * self.cer:.2f}%  "
            f"({self.utterances} utts, {self.words} words, RTF {self.rtf:.4f})"
        )


@torch.no_grad()
def transcribe(
    model: torch.nn.Module,
    family: ModelFamily,
    processor,
    utterances: list[Utterance],
    batch_seconds: float = 200.0,
    decoder=None,
) -> tuple[list[str], float]:
    """Hypotheses in input order, normalised, and the seconds spent in the model and decoder.

    Greedy unless `decoder` is given (for CTC: an object whose `decode(log_probs)` turns one
    utterance's (frames, tokens) log-probabilities into text, pinchgate.lm.LexiconDecoder).
    """
    was_training = model.training
    model.eval()
    sample_rate = family.sampling_rate(processor)
    normalize = family.normalizer(processor)
    durations = [u.duration or 0.0 for u in utterances]
    hypotheses: list[str] = [""] * len(utterances)
    compute_seconds = 0.0
    for batch in bucket_batches(durations, batch_seconds, shuffle=False):
        audio = [load_audio(utterances[i].audio_path, sample_rate) for i in batch]
        start = time.perf_counter()
        texts = family.decode(model, processor, audio, decoder)
        compute_seconds += time.perf_counter() - start
        for i, text in zip(batch, texts, strict=True):
            hypotheses[i] = normalize(text)
    model.train(was_training)
    return hypotheses, compute_seconds


def score(references: list[str], hypotheses: list[str], normalize=normalize_transcript) -> dict:
    """Corpus-level WER and CER and the error counts, after normalisation."""
    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    if not any(refs):
        raise ValueError("cannot score: every reference is empty")
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    n_words = words.hits + words.substitutions + words.deletions
    return {
        "wer": words.wer,
        "cer": chars.cer,
        "words": n_words,
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
    }


def utterance_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word errors, reference words) of one utterance."""
    if not reference:
        return len(hypothesis.split()), 0
    out = jiwer.process_words(reference, hypothesis)
    return out.substitutions + out.deletions + out.insertions, len(reference.split())


def evaluate_corpus(
    model: torch.nn.Module,
    family: ModelFamily,
    processor,
    utterances: list[Utterance],
    name: str,
    output_path: str | Path | None = None,
    batch_seconds: float = 200.0,
    decoder=None,
) -> EvalResult:
    """Decode, score, and write one JSON line per utterance (id, ref, hyp, errors)."""
    hypotheses, compute_seconds = transcribe(
        model, family, processor, utterances, batch_seconds, decoder
    )
    normalize = family.normalizer(processor)
    references = [normalize(u.transcript) for u in utterances]
    totals = score(references, hypotheses, normalize)
    audio_seconds = sum(u.duration or 0.0 for u in utterances)
    if output_path is not None:
        write_hypotheses(output_path, utterances, references, hypotheses)
    return EvalResult(
        name=name,
        utterances=len(utterances),
        words=totals["words"],
        wer=totals["wer"],
        cer=totals["cer"],
        substitutions=totals["substitutions"],
        deletions=totals["deletions"],
        insertions=totals["insertions"],
        audio_seconds=audio_seconds,
        decode_seconds=compute_seconds,
        rtf=compute_seconds / audio_seconds if audio_seconds else float("nan"),
    )


def write_hypotheses(
    path: str | Path, utterances: list[Utterance], references: list[str], hypotheses: list[str]
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for utt, ref, hyp in zip(utterances, references, hypotheses, strict=True):
            errors, words = utterance_errors(ref, hyp)
            row = {"id": utt.utt_id, "ref": ref, "hyp": hyp, "errors": errors, "words": words}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_hypotheses(path: str | Path) -> list[dict]:
    """The per-utterance rows written by `evaluate_corpus`, for comparing two systems."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
