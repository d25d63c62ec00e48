"""Word n-gram LMs (ARPA, modified Kneser-Ney) and the lexicon + LM beam search decoder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from pinchgate.cli import app
from pinchgate.errors import PinchgateError
from pinchgate.lm import build_arpa, kneser_ney_discounts, write_arpa

SENTENCES = [
    "THE CAT SAT ON THE MAT",
    "THE DOG SAT ON THE LOG",
    "A CAT AND A DOG",
    "THE CAT SAW THE DOG",
    "THE DOG SAW A CAT ON THE MAT",
    "ON THE MAT THE CAT SAT",
]


def read_arpa(text: str) -> tuple[dict, dict]:
    """log10 probabilities and backoffs by n-gram tuple, parsed from ARPA text."""
    probs, backoffs, inside = {}, {}, False
    for line in text.splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            inside = True
        elif line.startswith("\\"):
            inside = False
        elif inside and line:
            fields = line.split("\t")
            gram = tuple(fields[1].split())
            probs[gram] = float(fields[0])
            if len(fields) > 2:
                backoffs[gram] = float(fields[2])
    return probs, backoffs


def arpa_log10(probs: dict, backoffs: dict, context: tuple, word: str) -> float:
    """log10 P(word | context) by the ARPA backoff rule."""
    gram = (*context, word)
    if gram in probs:
        return probs[gram]
    if not context:
        return probs[("<unk>",)]
    return backoffs.get(context, 0.0) + arpa_log10(probs, backoffs, context[1:], word)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_kneser_ney_model_sums_to_one_in_every_context(order):
    probs, backoffs = read_arpa(build_arpa(SENTENCES, order))
    vocabulary = sorted({w for s in SENTENCES for w in s.split()} | {"</s>", "<unk>"})
    contexts = [(), ("<s>",), ("THE",), ("ON", "THE"), ("ZEBRA",), ("<s>", "THE"), ("A", "DOG")]
    for context in contexts:
        context = context[-(order - 1) :] if order > 1 else ()
        total = sum(10 ** arpa_log10(probs, backoffs, context, w) for w in vocabulary)
        assert total == pytest.approx(1.0, abs=1e-5), context  # 6 decimals in the file
    # Seen continuations beat unseen ones: "THE" -> "CAT" over "THE" -> "AND".
    assert arpa_log10(probs, backoffs, ("THE",), "CAT") > arpa_log10(
        probs, backoffs, ("THE",), "AND"
    )
    assert probs[("<s>",)] == -99.0  # never predicted
    assert "ngram 1=" in build_arpa(SENTENCES, order)


def test_kneser_ney_discounts_follow_chen_and_goodman():
    counts = [1] * 40 + [2] * 20 + [3] * 10 + [4] * 5
    y = 40 / (40 + 2 * 20)
    expected = (1 - 2 * y * 20 / 40, 2 - 3 * y * 10 / 20, 3 - 4 * y * 5 / 10)
    assert kneser_ney_discounts(counts) == pytest.approx(expected)
    # Too few counts for the three-discount estimate: one absolute discount.
    d = kneser_ney_discounts([1, 1, 2])
    assert d[0] == d[1] == d[2] and 0 < d[0] < 1


def test_build_arpa_rejects_bad_input(tmp_path):
    with pytest.raises(PinchgateError, match="at least 2"):
        build_arpa(SENTENCES, 1)
    with pytest.raises(PinchgateError, match="no words"):
        write_arpa(["", "  "], tmp_path / "lm.arpa")
    info = write_arpa(SENTENCES, tmp_path / "lm.arpa", 3)
    # 10 words, <s>, </s>, <unk>
    assert info["sentences"] == len(SENTENCES) and info["ngrams"][0] == 13
    assert not list(tmp_path.glob(".lm.arpa.*"))  # written atomically, no temp file left


def _emissions(tokens: list[str], frames: list[dict[str, float]]) -> torch.Tensor:
    """Log-probabilities per frame from a few named token probabilities (rest share 1%)."""
    rows = []
    for frame in frames:
        row = torch.full((len(tokens),), 0.01 / len(tokens))
        for token, p in frame.items():
            row[tokens.index(token)] = p
        rows.append((row / row.sum()).log())
    return torch.stack(rows)


def test_lexicon_decoder_writes_lexicon_words_that_greedy_misspells(tmp_path):
    pytest.importorskip("flashlight.lib.text.decoder")
    from pinchgate.lm import LexiconDecoder

    tokens = ["<pad>", "|", *"ACDEGHLMNOSTW"]
    lm_path = tmp_path / "lm.arpa"
    write_arpa(SENTENCES, lm_path, 3)
    # "THE CAT SAT" where the last T is slightly more like a D: greedy writes "SAD".
    spelled = "THE|CAT|SA"
    frames = []
    for ch in spelled:
        frames += [{ch: 0.9}, {"<pad>": 0.9}]
    frames += [{"D": 0.5, "T": 0.45}, {"<pad>": 0.9}]
    emissions = _emissions(tokens, frames)
    greedy = "".join(tokens[i] for i in emissions.argmax(-1) if tokens[i] != "<pad>")
    assert greedy.replace("|", " ") == "THE CAT SAD"
    decoder = LexiconDecoder(tokens, lm_path, lm_weight=1.0, beam_size=20)
    assert decoder.decode(emissions) == "THE CAT SAT"
    assert decoder.lexicon_size == 10 and decoder.skipped_words == 0
    # A model that cannot write L leaves LOG out of the lexicon.
    no_l = LexiconDecoder([t for t in tokens if t != "L"], lm_path)
    assert no_l.lexicon_size == 9 and no_l.skipped_words == 1


def test_lexicon_decoder_errors_are_one_line(tmp_path):
    pytest.importorskip("flashlight.lib.text.decoder")
    from pinchgate.lm import LexiconDecoder

    lm_path = tmp_path / "lm.arpa"
    write_arpa(SENTENCES, lm_path, 2)
    with pytest.raises(PinchgateError, match="no such language model"):
        LexiconDecoder(["<pad>", "|", "A"], tmp_path / "missing.arpa")
    with pytest.raises(PinchgateError, match="no word of the LM can be spelled"):
        LexiconDecoder(["<pad>", "|", "X"], lm_path)
    with pytest.raises(PinchgateError, match="no blank token"):
        LexiconDecoder(["|", "A"], lm_path)
    broken = tmp_path / "broken.arpa"
    broken.write_text("\\data\\\nngram 1=1\n\n\\1-grams:\n-1\tA\n\n\\end\\\n")
    with pytest.raises(PinchgateError, match="broken.arpa: not a readable ARPA file"):
        LexiconDecoder(["<pad>", "|", "A"], broken)


def test_cli_lm_builds_and_excludes_test_transcripts(tmp_path, toy_corpus):
    from pinchgate.data.corpus import read_corpus

    text = tmp_path / "text.txt"
    test_lines = [u.transcript for u in read_corpus(toy_corpus / "test")[0]]
    text.write_text("\n".join(SENTENCES + test_lines) + "\n")
    runner = CliRunner()
    out = tmp_path / "lm.arpa"
    result = runner.invoke(
        app, ["lm", str(out), "--text", str(text), "--exclude", str(toy_corpus / "test")]
    )
    assert result.exit_code == 0, result.output
    assert f"from {len(SENTENCES)} sentences" in result.output
    probs, _ = read_arpa(out.read_text())
    test_words = {w for line in test_lines for w in line.split()}
    assert not test_words & {gram[0] for gram in probs if len(gram) == 1}

    missing = runner.invoke(app, ["lm", str(out), "--text", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 2 and "--text" in missing.output and "nope.txt" in missing.output
    bad_order = runner.invoke(app, ["lm", str(out), "--text", str(text), "--order", "1"])
    assert bad_order.exit_code == 2 and "--order" in bad_order.output


def test_cli_evaluate_with_lm_writes_only_lexicon_words(tmp_path, toy_corpus, tiny_model_dir):
    pytest.importorskip("flashlight.lib.text.decoder")
    from pinchgate.data.corpus import read_corpus

    train = [u.transcript for u in read_corpus(toy_corpus / "train")[0]]
    lm_path = tmp_path / "lm.arpa"
    write_arpa(train, lm_path, 2)
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(tiny_model_dir),
            "--data",
            str(toy_corpus / "test"),
            "--lm",
            str(lm_path),
            "--output-dir",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    lexicon = {w for line in train for w in line.split()}
    rows = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert rows and all(set(r["hyp"].split()) <= lexicon for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["decoder"]["lm"] == str(lm_path)
    assert math.isfinite(results["test"]["wer"])
