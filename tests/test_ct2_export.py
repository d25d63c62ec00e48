"""Whisper to CTranslate2 (`pinchgate export --format ct2`) on a tiny random Whisper: the
exported directory decodes to the same transcripts as PyTorch, fp32 and int8, shrunk models
with per-layer feed-forward sizes included; what the spec cannot hold is refused in one
line; without ctranslate2 the command says what to install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pinchgate.cli import app
from pinchgate.data.corpus import load_corpus
from pinchgate.errors import PinchgateError
from pinchgate.families import family_for

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def hardened_dir(source: Path, out: Path, heads: bool) -> Path:
    """`source` with feed-forward neurons zeroed (a different number per layer) and, with
    `heads`, head 0 of the first encoder layer: what a structured run leaves before shrink."""
    family = family_for(source)
    model = family.load(source)
    with torch.no_grad():
        for side in ("encoder", "decoder"):
            for i, layer in enumerate(getattr(model.model, side).layers):
                cut = 2 + 3 * i + (side == "decoder")
                layer.fc1.weight[:cut] = 0
                layer.fc1.bias[:cut] = 0
                layer.fc2.weight[:, :cut] = 0
        if heads:
            attention = model.model.encoder.layers[0].self_attn
            attention.out_proj.weight[:, : attention.head_dim] = 0
    return family.save(model, family.load_processor(source), out)


def shrunk_dir(source: Path, tmp_path: Path, heads: bool) -> Path:
    from pinchgate.export import shrink_dir

    small = tmp_path / "small"
    shrink_dir(hardened_dir(source, tmp_path / "hard", heads), small)
    return small


def test_the_ct2_export_decodes_as_pytorch_does(tiny_whisper_dir, toy_corpus, tmp_path):
    pytest.importorskip("ctranslate2")
    from pinchgate.export import check_ct2_on_corpus

    out = tmp_path / "ct2"
    result = runner.invoke(app, ["export", str(tiny_whisper_dir), str(out), "--format", "ct2"])
    assert result.exit_code == 0, result.output
    for name in ("model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    utterances, _ = load_corpus(toy_corpus / "test")
    found = check_ct2_on_corpus(out, tiny_whisper_dir, utterances, "test", batch_seconds=3.0)
    assert found["same_hypotheses"] == found["utterances"] == len(utterances)
    assert found["torch"]["wer"] == found["ct2"]["wer"]
    assert found["encoder_max_abs_diff"] < 1e-4
    assert found["steps"] > 0 and found["logits_max_abs_diff"] < 1e-3
    # A second export to the same place is refused: nothing is overwritten.
    again = runner.invoke(app, ["export", str(tiny_whisper_dir), str(out), "--format", "ct2"])
    assert again.exit_code == 2 and "not empty" in again.output


def test_int8_export_is_smaller_and_decodes(tiny_whisper_dir, toy_corpus, tmp_path):
    pytest.importorskip("ctranslate2")
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    for out, extra in ((fp32, []), (int8, ["--quantization", "int8"])):
        command = ["export", str(tiny_whisper_dir), str(out), "--format", "ct2", *extra]
        command += ["--check-data", str(toy_corpus / "test")]
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
        assert "identical hypotheses" in result.output
    assert (int8 / "model.bin").stat().st_size < 0.6 * (fp32 / "model.bin").stat().st_size


def test_a_shrunk_model_with_per_layer_ffn_sizes_exports_exactly(
    tiny_whisper_dir, toy_corpus, tmp_path
):
    pytest.importorskip("ctranslate2")
    from pinchgate.export import check_ct2_on_corpus
    from pinchgate.families.ct2 import read_ct2_model

    small = shrunk_dir(tiny_whisper_dir, tmp_path, heads=False)
    out = tmp_path / "ct2"
    result = runner.invoke(app, ["export", str(small), str(out), "--format", "ct2"])
    assert result.exit_code == 0, result.output
    variables = read_ct2_model(out / "model.bin").variables
    widths = [
        variables[f"{side}/layer_{i}/ffn/linear_0/weight"].shape[0]
        for side in ("encoder", "decoder")
        for i in range(2)
    ]
    config = family_for(tiny_whisper_dir).load(tiny_whisper_dir).config
    encoder, decoder = config.encoder_ffn_dim, config.decoder_ffn_dim
    assert widths == [encoder - 2, encoder - 5, decoder - 3, decoder - 6]
    utterances, _ = load_corpus(toy_corpus / "test")
    found = check_ct2_on_corpus(out, small, utterances, "test", batch_seconds=3.0)
    assert found["same_hypotheses"] == len(utterances)
    assert found["logits_max_abs_diff"] < 1e-3


def test_pruned_heads_are_refused_in_one_line(tiny_whisper_dir, tmp_path):
    pytest.importorskip("ctranslate2")
    small = shrunk_dir(tiny_whisper_dir, tmp_path, heads=True)
    out = tmp_path / "ct2"
    result = runner.invoke(app, ["export", str(small), str(out), "--format", "ct2"])
    assert result.exit_code == 2
    assert "encoder layer 0 self_attn keeps 1 of 2 attention heads" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_without_ctranslate2_the_export_says_what_to_install(
    tiny_whisper_dir, tmp_path, monkeypatch
):
    from pinchgate.export import export_ct2

    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import ctranslate2 fails
    with pytest.raises(PinchgateError, match=r"pip install 'pinchgate\[ct2\]'"):
        export_ct2(tiny_whisper_dir, tmp_path / "ct2")


def test_options_of_the_wrong_format_are_refused(tiny_whisper_dir, tmp_path):
    out = str(tmp_path / "x")
    quantized_onnx = ["export", str(tiny_whisper_dir), out, "--quantization", "int8"]
    for command, message in (
        (quantized_onnx, "--quantization: only with --format ct2"),
        (["export", str(tiny_whisper_dir), out, "--format", "tflite"], "choose onnx or ct2"),
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and message in result.output, result.output


def test_cli_shrink_prints_a_whisper_structure(tiny_whisper_dir, tmp_path):
    hard = hardened_dir(tiny_whisper_dir, tmp_path / "hard", heads=True)
    result = runner.invoke(app, ["shrink", str(hard), str(tmp_path / "small")])
    assert result.exit_code == 0, result.output
    assert "layer  0: 1 self_attn heads [1], " in result.output
    assert "parameters:" in result.output


def test_the_window_is_extended_with_whisper_sinusoids(tiny_whisper_dir, toy_corpus, tmp_path):
    pytest.importorskip("ctranslate2")
    import json

    from transformers.models.whisper.modeling_whisper import sinusoids

    from pinchgate.export import check_ct2_on_corpus

    # The tiny test model's position table is random: refused, it cannot be extended.
    refused = runner.invoke(
        app, ["export", str(tiny_whisper_dir), str(tmp_path / "x"), "--format", "ct2",
              "--window", "10"],
    )  # fmt: skip
    assert refused.exit_code == 2 and "not Whisper's sinusoids" in refused.output
    # With Whisper's table (5 s window here) it is extended to 10 s, rows kept.
    family = family_for(tiny_whisper_dir)
    model = family.load(tiny_whisper_dir)
    table = model.model.encoder.embed_positions.weight
    with torch.no_grad():
        table.copy_(sinusoids(*table.shape))
    source = family.save(model, family.load_processor(tiny_whisper_dir), tmp_path / "sin")
    out = tmp_path / "ct2"
    command = ["export", str(source), str(out), "--format", "ct2", "--window", "10"]
    assert runner.invoke(app, command).exit_code == 0
    assert json.loads((out / "preprocessor_config.json").read_text())["chunk_length"] == 10
    assert json.loads((out / "pinchgate_ct2.json").read_text())["window_seconds"] == 10
    utterances, _ = load_corpus(toy_corpus / "test")
    found = check_ct2_on_corpus(out, source, utterances, "test", batch_seconds=3.0, window=10)
    assert found["same_hypotheses"] == len(utterances)
    assert found["encoder_max_abs_diff"] < 1e-4
    # Shorter than the model's own: cut (faster on short clips), and said.
    shorter = tmp_path / "y"
    command = ["export", str(source), str(shorter), "--format", "ct2", "--window", "2"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0 and "shorter than the model's own 5 s" in result.output
    assert json.loads((shorter / "pinchgate_ct2.json").read_text())["window_seconds"] == 2
    assert json.loads((shorter / "preprocessor_config.json").read_text())["chunk_length"] == 2
