"""Shared fixtures: a small generated corpus and a tiny random wav2vec2, nothing downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests must never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["PINCHGATE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture
def one_thread():
    """Tiny tensors: extra threads only add contention on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> Path:
    """Tone-alphabet corpus with small train/dev/test splits in LibriSpeech layout."""
    from pinchgate.data.toy import build_toy_corpus

    root = tmp_path_factory.mktemp("toy")
    return build_toy_corpus(root, seed=0, sizes={"train": 24, "dev": 6, "test": 6})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, toy_corpus) -> Path:
    """A saved tiny Wav2Vec2ForCTC with vocab.json and preprocessor, as `finetune` writes."""
    from pinchgate.data.corpus import read_corpus
    from pinchgate.families.ctc import build_model, feature_extractor_for
    from pinchgate.families.ctc_vocab import build_vocab, load_tokenizer, save_vocab

    utterances, _ = read_corpus(toy_corpus / "train")
    path = tmp_path_factory.mktemp("model")
    tokenizer = load_tokenizer(
        save_vocab(build_vocab(u.transcript for u in utterances), path / "vocab.json")
    )
    model = build_model(len(tokenizer), tokenizer.pad_token_id)
    model.save_pretrained(path)
    feature_extractor_for(model.config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory) -> Path:
    """A tiny random Whisper (2+2 layers, 16 wide, 8 mel bins, a 5 s window, 64 target
    positions) with a byte-level tokenizer, as `pinchgate convert ct2` writes it."""
    from pinchgate.families.ct2 import convert_ct2_whisper
    from tiny_whisper import tiny_hf, write_ct2_dir

    root = tmp_path_factory.mktemp("whisper")
    model = tiny_hf(std=0.05, max_source_positions=250, max_target_positions=64)
    return convert_ct2_whisper(write_ct2_dir(root / "ct2", model), root / "hf")
