"""MAPSSWE: NIST's matched-pairs sentence-segment word error test (sc_stats ``-t mapsswe``).

Gillick & Cox (1989), as implemented in NIST SCTK (``mtchprs.c``):

1. Align each reference with each system's hypothesis (substitution, deletion, insertion).
2. Cut each utterance into segments at stretches of at least ``min_good`` (NIST default 2)
   consecutive reference words that BOTH systems got right with no insertion between them;
   those stretches make the errors of neighbouring segments roughly independent. The start
   and end of an utterance also bound segments. Segments where neither system erred are
   dropped (with this segmentation only segments with errors arise).
3. Count each system's errors (sub + del + ins) per segment; d_i = errors_a - errors_b.
4. Z = mean(d) / (sd(d) / sqrt(n)), sd with n - 1; two-sided p = 2 * (1 - Phi(|Z|)).
   As in sc_stats, zero variance (including all d = 0, or a single segment) gives Z = 0,
   p = 1: there is no spread from which to judge a difference.

Differences from sc_stats, on purpose: the alignment is jiwer's (unit-cost Levenshtein, the
one our WERs come from) rather than sclite's weighted one, so counts can differ on ambiguous
alignments; and trailing insertions of the second system are counted (sc_stats' loop stops
at the end of the first system's path and drops them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jiwer
from scipy.stats import norm


@dataclass
class MapsswePairResult:
    """Outcome of the test; ``mean_difference`` > 0 means system A makes more errors."""

    n_segments: int
    mean_difference: float
    std_difference: float
    z: float
    p_value: float
    errors_a: int
    errors_b: int
    n_reference_words: int

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


@dataclass
class _RefSynchronousErrors:
    """One hypothesis' errors laid on the reference: per word and per gap between words."""

    word_correct: list[bool]  # len n: reference word i matched
    insertions: list[int]  # len n + 1: inserted words before reference word i (n: at the end)


def _errors_on_reference(chunks: Sequence, n_ref: int) -> _RefSynchronousErrors:
    correct = [False] * n_ref
    insertions = [0] * (n_ref + 1)
    for chunk in chunks:
        if chunk.type == "equal":
            for i in range(chunk.ref_start_idx, chunk.ref_end_idx):
                correct[i] = True
        elif chunk.type == "insert":
            insertions[chunk.ref_start_idx] += chunk.hyp_end_idx - chunk.hyp_start_idx
        # "substitute" and "delete" leave the words marked incorrect
    return _RefSynchronousErrors(correct, insertions)


def segment_errors(
    a: _RefSynchronousErrors, b: _RefSynchronousErrors, min_good: int = 2
) -> list[tuple[int, int]]:
    """(errors_a, errors_b) per segment of one utterance."""
    n = len(a.word_correct)
    segments: list[tuple[int, int]] = []
    errors_a = errors_b = 0
    good_run = 0  # consecutive words right in both, with no insertion between them
    for i in range(n + 1):
        if a.insertions[i] or b.insertions[i]:
            errors_a += a.insertions[i]
            errors_b += b.insertions[i]
            good_run = 0
        if i == n:
            break
        if a.word_correct[i] and b.word_correct[i]:
            good_run += 1
            if good_run == min_good and (errors_a or errors_b):
                segments.append((errors_a, errors_b))
                errors_a = errors_b = 0
        else:
            errors_a += not a.word_correct[i]
            errors_b += not b.word_correct[i]
            good_run = 0
    if errors_a or errors_b:
        segments.append((errors_a, errors_b))
    return segments


def mapsswe(
    references: Sequence[str],
    hypotheses_a: Sequence[str],
    hypotheses_b: Sequence[str],
    min_good: int = 2,
) -> MapsswePairResult:
    """Matched-pairs sentence-segment word error test of system A against system B.

    Inputs are whitespace-separated word strings, one per utterance, in the same order.
    """
    if not len(references) == len(hypotheses_a) == len(hypotheses_b):
        raise ValueError(
            f"need one hypothesis per reference: {len(references)} references, "
            f"{len(hypotheses_a)} hypotheses from A, {len(hypotheses_b)} from B"
        )
    if min_good < 1:
        raise ValueError(f"min_good must be >= 1, got {min_good}")
    refs = [" ".join(r.split()) for r in references]
    hyps_a = [" ".join(h.split()) for h in hypotheses_a]
    hyps_b = [" ".join(h.split()) for h in hypotheses_b]
    n_words = sum(len(r.split()) for r in refs)
    differences: list[int] = []
    total_a = total_b = 0
    if refs:
        out_a = jiwer.process_words(refs, hyps_a)
        out_b = jiwer.process_words(refs, hyps_b)
        for ref, chunks_a, chunks_b in zip(refs, out_a.alignments, out_b.alignments, strict=True):
            n = len(ref.split())
            seg = segment_errors(
                _errors_on_reference(chunks_a, n), _errors_on_reference(chunks_b, n), min_good
            )
            for ea, eb in seg:
                differences.append(ea - eb)
                total_a += ea
                total_b += eb
    return _z_test(differences, total_a, total_b, n_words)


def _z_test(
    differences: Sequence[int], errors_a: int, errors_b: int, n_words: int
) -> MapsswePairResult:
    n = len(differences)
    mean = sum(differences) / n if n else 0.0
    ss = sum((d - mean) ** 2 for d in differences)
    if n < 2 or ss == 0.0:
        std, z, p = 0.0, 0.0, 1.0  # sc_stats: no variance, no test
    else:
        std = math.sqrt(ss / (n - 1))
        z = mean / (std / math.sqrt(n))
        p = float(2.0 * norm.sf(abs(z)))
    return MapsswePairResult(
        n_segments=n,
        mean_difference=mean,
        std_difference=std,
        z=z,
        p_value=p,
        errors_a=errors_a,
        errors_b=errors_b,
        n_reference_words=n_words,
    )
