"""`pinchgate trim-vocab` on a tiny random Whisper (tests/tiny_whisper.py, a byte-level BPE of
256 bytes and 3 merges): a stock directory with a renumbered tokenizer, the same scores for
the tokens it keeps, the same transcripts as the full model barred from the removed ones, in
PyTorch, onnxruntime and CTranslate2, trainable, and one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import runs
from pinchgate.cli import app
from pinchgate.config import FinetuneConfig
from pinchgate.data.audio import load_audio
from pinchgate.data.corpus import load_corpus
from pinchgate.families import family_for
from pinchgate.train import run_finetune

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
KEEP = 257  # the bytes and the first merge ("Ġt"); "he" and "Ġthe" go


@pytest.fixture(scope="module")
def trimmed_dir(tiny_whisper_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trim") / "trimmed"
    result = runner.invoke(app, ["trim-vocab", str(tiny_whisper_dir), str(out), "--keep", "257"])
    assert result.exit_code == 0, result.output
    return out


def _load(path):
    family = family_for(path)
    return family, family.load(path), family.load_processor(path)


def test_a_trimmed_whisper_is_stock_with_its_tokens_renumbered(tiny_whisper_dir, trimmed_dir):
    from transformers import WhisperForConditionalGeneration

    _, full, full_processor = _load(tiny_whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(trimmed_dir)  # stock transformers
    removed = full.config.vocab_size - model.config.vocab_size
    assert removed == 2  # "he" and "Ġthe"
    assert model.model.decoder.embed_tokens.weight.shape[0] == model.config.vocab_size
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    _, _, processor = _load(trimmed_dir)
    tokenizer, full_tokenizer = processor.tokenizer, full_processor.tokenizer
    assert len(tokenizer) == model.config.vocab_size
    # Special tokens keep their names, at new ids.
    names = full_tokenizer.convert_ids_to_tokens(full_tokenizer.prefix_tokens)
    assert tokenizer.convert_ids_to_tokens(tokenizer.prefix_tokens) == names
    generation = model.generation_config
    for field, name in [
        ("decoder_start_token_id", "<|startoftranscript|>"),
        ("eos_token_id", "<|endoftext|>"),
        ("no_timestamps_token_id", "<|notimestamps|>"),
    ]:
        assert tokenizer.convert_ids_to_tokens(getattr(generation, field)) == name
    assert max(generation.suppress_tokens) < model.config.vocab_size
    # Text still tokenizes, into kept pieces only, and reads back.
    text = "the other theme, then"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    full_ids = full_tokenizer(text, add_special_tokens=False).input_ids
    assert max(ids) < KEEP and len(ids) > len(full_ids)
    assert tokenizer.decode(ids) == text
    assert "Ġthe" not in tokenizer.get_vocab() and "Ġt" in tokenizer.get_vocab()


def test_kept_tokens_score_as_before_and_transcripts_match_the_barred_full_model(
    tiny_whisper_dir, trimmed_dir, toy_corpus
):
    family, full, full_processor = _load(tiny_whisper_dir)
    _, small, processor = _load(trimmed_dir)
    vocab = full.config.vocab_size
    kept = list(range(KEEP)) + list(range(KEEP + 2, vocab))
    utterances, _ = load_corpus(toy_corpus / "test")
    audio = [load_audio(u.audio_path, 16000) for u in utterances]
    features = family.features(full, full_processor, audio[:2])
    prompt = full_processor.tokenizer.prefix_tokens + [5, 80, 200]  # kept text tokens
    new_prompt = [kept.index(i) for i in prompt]
    with torch.no_grad():
        reference = full(input_features=features, decoder_input_ids=torch.tensor([prompt] * 2))
        trimmed = small(input_features=features, decoder_input_ids=torch.tensor([new_prompt] * 2))
    assert torch.equal(trimmed.logits, reference.logits[..., kept])
    # Greedy decoding: the full model with the removed tokens suppressed says the same.
    full.generation_config.suppress_tokens = [
        *full.generation_config.suppress_tokens,
        *range(KEEP, KEEP + 2),
    ]
    expected = family.decode(full, full_processor, audio)
    assert family.decode(small, processor, audio) == expected
    assert any(text.strip() for text in expected)  # something was said


def test_a_trimmed_whisper_exports_to_ct2_with_the_same_transcripts(
    trimmed_dir, toy_corpus, tmp_path
):
    pytest.importorskip("ctranslate2")
    from pinchgate.export import check_ct2_on_corpus, export_ct2

    out = export_ct2(trimmed_dir, tmp_path / "ct2")
    vocabulary = json.loads((out / "vocabulary.json").read_text())
    assert len(vocabulary) == json.loads((trimmed_dir / "config.json").read_text())["vocab_size"]
    utterances, _ = load_corpus(toy_corpus / "test")
    found = check_ct2_on_corpus(out, trimmed_dir, utterances, "t", batch_seconds=3)
    assert found["same_hypotheses"] == len(utterances), found


def test_a_trimmed_whisper_exports_to_onnx_with_the_same_transcripts(
    trimmed_dir, toy_corpus, tmp_path
):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from pinchgate.export import check_onnx_on_corpus, export_onnx

    out = export_onnx(trimmed_dir, tmp_path / "onnx")
    utterances, _ = load_corpus(toy_corpus / "test")
    found = check_onnx_on_corpus(out, trimmed_dir, utterances, "t", batch_seconds=3.0)
    assert found["same_hypotheses"] == len(utterances), found


def test_a_trimmed_whisper_trains_on_its_own_tokens(trimmed_dir, toy_corpus, tmp_path):
    cfg = runs.tiny_config(FinetuneConfig, toy_corpus, tmp_path / "run", model=str(trimmed_dir))
    cfg.max_steps, cfg.warmup_steps, cfg.save_every, cfg.log_every = 20, 2, 20, 5
    cfg.learning_rate = 3e-3
    run_finetune(cfg)
    losses = [r["loss"] for r in runs.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.9 * losses[0]
    saved, trimmed = (
        json.loads((d / "config.json").read_text())
        for d in (tmp_path / "run" / "model", trimmed_dir)
    )
    assert saved["vocab_size"] == trimmed["vocab_size"]
    # A run directory names its final model: training goes on from it.
    again = runs.tiny_config(
        FinetuneConfig, toy_corpus, tmp_path / "again", model=str(tmp_path / "run")
    )
    again.max_steps, again.warmup_steps, again.save_every, again.test = 2, 1, 2, []
    run_finetune(again)
    resumed = json.loads((tmp_path / "again" / "model" / "config.json").read_text())
    assert resumed["vocab_size"] == trimmed["vocab_size"]


@pytest.mark.parametrize(
    ("keep", "message"),
    [("100", "--keep 100: choose between 256"), ("9999", "--keep 9999: choose between 256")],
)
def test_bad_keep_values_are_refused_in_one_line(tiny_whisper_dir, tmp_path, keep, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["trim-vocab", str(tiny_whisper_dir), str(out), "--keep", keep])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_ctc_models_and_occupied_outputs_are_refused(tiny_model_dir, trimmed_dir, tmp_path):
    result = runner.invoke(app, ["trim-vocab", str(tiny_model_dir), str(tmp_path / "o")])
    assert result.exit_code == 2 and "not available for ctc models" in result.output.lower()
    result = runner.invoke(app, ["trim-vocab", str(trimmed_dir), str(trimmed_dir)])
    assert result.exit_code == 2 and "already exists and is not empty" in result.output
