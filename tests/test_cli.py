from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pinchgate.cli import app

runner = CliRunner()
COMMANDS = [
    [],
    ["finetune"],
    ["evaluate"],
    ["info"],
    ["vocab"],
    ["data"],
    ["data", "toy"],
    ["data", "check"],
    ["significance"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "main")
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_missing_corpus_is_one_clear_line(tmp_path):
    missing = tmp_path / "no-such-corpus"
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            "toy",
            "--train",
            str(missing),
            "--output-dir",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2
    assert f"{missing}: corpus path does not exist" in result.output
    assert "Traceback" not in result.output


def test_bad_option_value_is_named(tmp_path, toy_corpus):
    result = runner.invoke(
        app,
        [
            "finetune",
            "--train",
            str(toy_corpus / "train"),
            "--max-steps",
            "0",
            "--output-dir",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 2 and "--max-steps 0: must be > 0" in result.output


def test_model_without_weights_is_refused(tmp_path, toy_corpus):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "wav2vec2"}')
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tmp_path / "m"),
            "--train",
            str(toy_corpus / "train"),
            "--output-dir",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 2 and "no model weights" in result.output


def test_data_check_reports_problems(tmp_path, toy_corpus):
    result = runner.invoke(app, ["data", "check", str(toy_corpus / "dev"), "--max-duration", "1"])
    assert result.exit_code == 0
    assert "skipped" in result.output and "longer than 1 s (--max-duration" in result.output


def test_info_counts_parameters(tiny_model_dir):
    result = runner.invoke(app, ["info", str(tiny_model_dir)])
    assert result.exit_code == 0 and "parameters" in result.output and "lm_head" in result.output


def _eval_dir(path, rows):
    """An evaluation directory with one set ("s") of (id, ref, hyp) rows."""
    import jiwer

    path.mkdir(parents=True)
    with open(path / "s.jsonl", "w", encoding="utf-8") as handle:
        for utt, ref, hyp in rows:
            out = jiwer.process_words(ref, hyp)
            errors = out.substitutions + out.deletions + out.insertions
            row = {"id": utt, "ref": ref, "hyp": hyp, "errors": errors, "words": len(ref.split())}
            handle.write(json.dumps(row) + "\n")
    return path


def _worse(ref: str, errors: int) -> str:
    """`ref` with 0, 1 or 2 adjacent substitutions: one MAPSSWE segment each, whose
    differences vary (constant differences have no variance, hence no test)."""
    return ref.replace(*[("", ""), ("cat", "dog"), ("cat sat", "dog sit")][errors])


def test_significance_compares_two_evaluations(tmp_path):
    refs = [f"the cat sat on mat number {i} today" for i in range(40)]
    a = _eval_dir(tmp_path / "a", [(f"u{i}", r, r) for i, r in enumerate(refs)])
    same = _eval_dir(tmp_path / "same", [(f"u{i}", r, r) for i, r in enumerate(refs)])
    _eval_dir(
        tmp_path / "run" / "eval",  # a run directory: its eval/ is read
        [(f"u{i}", r, _worse(r, i % 3)) for i, r in enumerate(refs)],
    )
    result = runner.invoke(app, ["significance", str(a), str(same)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("| s |"))
    assert "| 0.00% | 0.00% |" in row and row.endswith("| no |")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # a log
    result = runner.invoke(app, ["significance", str(a), str(tmp_path / "run")])
    row = next(line for line in result.output.splitlines() if line.startswith("| s |"))
    assert "| 0.00% | 12.19% | 0 | 39 | 0.000 | B worse |" in row
    result = runner.invoke(app, ["significance", str(a), str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no per-utterance .jsonl files" in result.output
