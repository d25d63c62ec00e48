from __future__ import annotations

import json

import pytest

from pinchgate.evaluate import score, utterance_errors


def test_wer_of_a_known_pair():
    # ref 4 words; hyp: 1 substitution (B->X), 1 deletion (D) -> WER 2/4.
    result = score(["a b c d"], ["A X C"])
    assert result["wer"] == pytest.approx(0.5)
    assert (result["substitutions"], result["deletions"], result["insertions"]) == (1, 1, 0)
    assert result["words"] == 4
    # Character level: "A B C D" vs "A X C": 1 substitution + 2 deletions (" D") of 7.
    assert result["cer"] == pytest.approx(3 / 7)
    assert utterance_errors("A B C D", "A X C E F") == (3, 4)


def test_score_normalises_case_and_punctuation():
    assert score(["Hello, world."], ["HELLO WORLD"])["wer"] == 0.0


def test_evaluate_command_writes_per_utterance_output(tiny_model_dir, toy_corpus, tmp_path):
    from typer.testing import CliRunner

    from pinchgate.cli import app

    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(tiny_model_dir),
            "--data",
            str(toy_corpus / "test"),
            "--output-dir",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"id", "ref", "hyp", "errors", "words"} <= set(rows[0])
    summary = json.loads((out / "results.json").read_text())["test"]
    assert summary["utterances"] == 6 and summary["rtf"] > 0
    # The corpus WER is the sum of the per-utterance errors over reference words.
    errors = sum(r["errors"] for r in rows)
    assert summary["wer"] == pytest.approx(errors / sum(r["words"] for r in rows))
