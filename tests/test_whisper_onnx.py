"""Whisper as ONNX (`pinchgate export --format onnx` on a Whisper): encoder and key/value-
cached decoder on a tiny random Whisper, dense and shrunk (heads and neurons cut, one
attention left without heads): logits as PyTorch's, the cache giving what one call gives,
transcripts identical through `WhisperFamily.decode`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pinchgate.cli import app
from pinchgate.data.audio import load_audio
from pinchgate.data.corpus import load_corpus
from pinchgate.errors import PinchgateError
from pinchgate.export import check_onnx_on_corpus, shrink_dir
from pinchgate.families import family_for

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def dense_export(tiny_whisper_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "dense"
    result = runner.invoke(app, ["export", str(tiny_whisper_dir), str(out), "--check"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_export_matches_pytorch_and_decodes_the_same(dense_export, tiny_whisper_dir, toy_corpus):
    out, output = dense_export
    for name in ("encoder.onnx", "decoder.onnx", "pinchgate_onnx.json"):
        assert (out / name).is_file()
    difference = float(output.split("PyTorch: ")[1].split()[0])
    assert difference < 1e-4
    utterances, _ = load_corpus(toy_corpus / "test")
    found = check_onnx_on_corpus(out, tiny_whisper_dir, utterances, "test", batch_seconds=3.0)
    assert found["same_hypotheses"] == found["utterances"] == len(utterances)
    assert found["torch"]["wer"] == found["onnx"]["wer"]
    assert found["max_abs_diff"] < 1e-4


def test_the_cache_gives_what_one_call_gives(dense_export, tiny_whisper_dir):
    from pinchgate.families.whisper_onnx import OnnxWhisper

    out, _ = dense_export
    runtime = OnnxWhisper(out)
    config = family_for(tiny_whisper_dir).load(tiny_whisper_dir).config
    rng = np.random.default_rng(0)
    features = rng.standard_normal(
        (2, config.num_mel_bins, config.max_source_positions * 2)
    ).astype(np.float32)
    ids = rng.integers(0, config.vocab_size, (2, 6))
    whole = runtime.logits(features, ids)
    cross = runtime._cross(features)
    feeds = {"input_ids": ids[:, :4], **cross, **runtime._empty_cache(2)}
    first = runtime.decoder.run(None, feeds)
    cache = {
        f"past_{entry['name']}": value
        for entry, value in zip(runtime.settings["cache"], first[1:], strict=True)
    }
    for step in (4, 5):  # one token at a time on the cache
        outputs = runtime.decoder.run(
            None, {"input_ids": ids[:, step : step + 1], **cross, **cache}
        )
        assert np.abs(outputs[0][:, 0] - whole[:, step]).max() < 1e-4
        cache = {
            f"past_{entry['name']}": value
            for entry, value in zip(runtime.settings["cache"], outputs[1:], strict=True)
        }
    assert np.abs(first[0] - whole[:, :4]).max() < 1e-4


def test_a_shrunk_model_with_a_headless_attention_exports(tiny_whisper_dir, toy_corpus, tmp_path):
    family = family_for(tiny_whisper_dir)
    model = family.load(tiny_whisper_dir)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.fc2.weight[:, :3] = 0
        model.model.decoder.layers[0].encoder_attn.out_proj.weight.zero_()  # no head left
        model.model.decoder.layers[1].self_attn.out_proj.weight[:, :4] = 0  # head 0 of 4
    hard = family.save(model, family.load_processor(tiny_whisper_dir), tmp_path / "hard")
    shrink_dir(hard, tmp_path / "small")
    small = family.load(tmp_path / "small")
    assert small.model.decoder.layers[0].encoder_attn.num_heads == 0
    assert small.model.decoder.layers[1].self_attn.num_heads == 3
    out = tmp_path / "onnx"
    result = runner.invoke(app, ["export", str(tmp_path / "small"), str(out), "--check"])
    assert result.exit_code == 0, result.output
    assert float(result.output.split("PyTorch: ")[1].split()[0]) < 1e-4
    utterances, _ = load_corpus(toy_corpus / "test")
    found = check_onnx_on_corpus(out, tmp_path / "small", utterances, "t", batch_seconds=3.0)
    assert found["same_hypotheses"] == len(utterances)


def test_beam_search_and_a_second_export_are_refused(dense_export, tiny_whisper_dir, toy_corpus):
    from pinchgate.families.whisper import BeamSearch
    from pinchgate.families.whisper_onnx import OnnxWhisper

    out, _ = dense_export
    family = family_for(tiny_whisper_dir)
    processor = family.load_processor(tiny_whisper_dir)
    utterances, _ = load_corpus(toy_corpus / "test")
    audio = [load_audio(utterances[0].audio_path, 16000)]
    with pytest.raises(PinchgateError, match="beam search is not available"):
        family.decode(OnnxWhisper(out), processor, audio, BeamSearch(2))
    again = runner.invoke(app, ["export", str(tiny_whisper_dir), str(out)])
    assert again.exit_code == 2 and "not empty" in again.output
