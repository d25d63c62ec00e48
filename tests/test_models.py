from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pinchgate.errors import ModelLoadError
from pinchgate.families import count_parameters
from pinchgate.families.ctc import build_model, load_config, load_ctc_model


def test_count_parameters_adds_up():
    model = build_model(vocab_size=12)
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert sum(counts["by_type"].values()) == counts["total"]
    assert sum(counts["by_component"].values()) == counts["total"]
    assert counts["by_component"]["lm_head"] == 32 * 12 + 12
    assert "Wav2Vec2PositionalConvEmbedding" not in counts["by_type"]  # weight norm: its conv


def test_load_local_directory_keeps_weights(tiny_model_dir):
    model = load_ctc_model(tiny_model_dir)
    reference = build_model(model.config.vocab_size)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert model.config.ctc_zero_infinity


def test_new_head_and_vocab_change(tiny_model_dir):
    kept = load_ctc_model(tiny_model_dir)
    fresh = load_ctc_model(tiny_model_dir, new_head=True)
    bigger = load_ctc_model(tiny_model_dir, vocab_size=kept.config.vocab_size + 3)
    assert not torch.equal(kept.lm_head.weight, fresh.lm_head.weight)
    assert torch.equal(
        kept.wav2vec2.encoder.layers[0].attention.q_proj.weight,
        fresh.wav2vec2.encoder.layers[0].attention.q_proj.weight,
    )
    assert bigger.lm_head.out_features == kept.config.vocab_size + 3


def test_model_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no model weights"):
        load_ctc_model(tmp_path)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file({}, other / "model.safetensors")  # readable weights: the type is what is wrong
    with pytest.raises(ModelLoadError, match="'bert' is not supported"):
        load_config(other)
    with pytest.raises(ModelLoadError, match="example-org/no-such-model.*offline"):
        load_config("example-org/no-such-model")


def test_freeze_feature_encoder():
    model = build_model(vocab_size=10)
    model.freeze_feature_encoder()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("wav2vec2.feature_extractor.") for n in frozen)


def test_fp16_checkpoints_load_as_fp32(tmp_path):
    model = build_model(vocab_size=10).half()
    model.save_pretrained(tmp_path)
    loaded = load_ctc_model(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
