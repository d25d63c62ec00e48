import math
import random

import jiwer
import pytest

from pinchgate.significance import mapsswe

# Hand-worked example (min_good = 2, the NIST default).
#
# utt 1  ref: the cat sat on the mat today
#        A:   the cat sat in the mat today        A: sub on->in        (1 error)
#        B:   the bat sat on the mat today        B: sub cat->bat      (1 error)
#        both right: the . sat . the mat today   -> the errors at "cat" and "on" are
#        separated by ONE good word ("sat") only, so they share a segment, closed by
#        "the mat":                               segment (A 1, B 1)   d = 0
# utt 2  ref: a b c d e f
#        A:   a b c d e f                         perfect
#        B:   a x c d e f g                       sub b->x, trailing insertion g
#        "c d" closes the first segment (0, 1); the insertion after "f" opens and ends a
#        second one at the end of the utterance (0, 1).   d = -1, -1
# utt 3  ref: one two three four
#        A:   one three four                      deletion of "two"            (1 error)
#        B:   one too three for                   subs two->too, four->for     (2 errors)
#        only "three" is good between the errors: one segment (1, 2).   d = -1
# utt 4  ref: hello world
#        A:   hello hello world                   one insertion                (1 error)
#        B:   hello world                         perfect
#        one segment (1, 0).   d = +1
#
# d = [0, -1, -1, -1, +1], n = 5
# mean = -2 / 5 = -0.4
# squared deviations: 0.16, 0.36, 0.36, 0.36, 1.96 -> sum 3.2; variance = 3.2 / 4 = 0.8
# sd = sqrt(0.8) = 0.894427; standard error = sd / sqrt(5) = 0.4
# Z = -0.4 / 0.4 = -1.0;  p = 2 * (1 - Phi(1)) = 0.317311
# error totals: A = 1 + 0 + 1 + 1 = 3, B = 1 + 2 + 2 + 0 = 5

REFS = ["the cat sat on the mat today", "a b c d e f", "one two three four", "hello world"]
HYPS_A = ["the cat sat in the mat today", "a b c d e f", "one three four", "hello hello world"]
HYPS_B = ["the bat sat on the mat today", "a x c d e f g", "one too three for", "hello world"]


def test_hand_worked_example():
    result = mapsswe(REFS, HYPS_A, HYPS_B)
    assert result.n_segments == 5
    assert result.errors_a == 3
    assert result.errors_b == 5
    assert result.mean_difference == pytest.approx(-0.4)
    assert result.std_difference == pytest.approx(math.sqrt(0.8))
    assert result.z == pytest.approx(-1.0)
    assert result.p_value == pytest.approx(0.317311, abs=1e-6)
    assert not result.significant()


def test_min_good_one_splits_at_every_shared_correct_word():
    # With min_good = 1 the single good word "sat" separates the two errors of utterance 1.
    result = mapsswe(REFS[:1], HYPS_A[:1], HYPS_B[:1], min_good=1)
    assert result.n_segments == 2
    assert result.mean_difference == pytest.approx(0.0)
    two = mapsswe(REFS[:1], HYPS_A[:1], HYPS_B[:1], min_good=2)
    assert two.n_segments == 1


def test_error_totals_match_jiwer():
    result = mapsswe(REFS, HYPS_A, HYPS_B)
    for hyps, total in ((HYPS_A, result.errors_a), (HYPS_B, result.errors_b)):
        out = jiwer.process_words(REFS, hyps)
        assert total == out.substitutions + out.deletions + out.insertions
    assert result.n_reference_words == sum(len(r.split()) for r in REFS)


def test_identical_systems_give_p_one():
    result = mapsswe(REFS, HYPS_B, HYPS_B)
    assert result.n_segments > 0
    assert result.mean_difference == 0.0
    assert result.z == 0.0
    assert result.p_value == 1.0


def _corrupt(words: list[str], rate: float, rng: random.Random) -> str:
    out = []
    for w in words:
        r = rng.random()
        if r < rate / 3:
            continue  # deletion
        if r < 2 * rate / 3:
            out.append(w + "x")  # substitution
        elif r < rate:
            out.extend([w, "uh"])  # insertion
        else:
            out.append(w)
    return " ".join(out)


def test_clearly_better_system_is_significant():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(50)]
    refs = [" ".join(rng.choice(vocab) for _ in range(15)) for _ in range(200)]
    worse = [_corrupt(r.split(), 0.20, rng) for r in refs]
    better = [_corrupt(r.split(), 0.05, rng) for r in refs]
    result = mapsswe(refs, worse, better)
    assert result.errors_a > result.errors_b
    assert result.z > 0  # A (first) makes more errors
    assert result.p_value < 0.05
    assert result.significant()
    swapped = mapsswe(refs, better, worse)
    assert swapped.z == pytest.approx(-result.z)
    assert swapped.p_value == pytest.approx(result.p_value)


def test_empty_reference_and_hypotheses():
    # An empty reference: every hypothesis word is an insertion, in one segment.
    result = mapsswe(["", "a b"], ["uh", "a b"], ["", ""])
    assert result.errors_a == 1
    assert result.errors_b == 2
    assert result.n_segments == 2


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        mapsswe(REFS, HYPS_A[:2], HYPS_B)
