"""Loading Hugging Face CTC speech models, building tiny ones from configs, counting parameters."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCTC,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
)

from pinchgate.errors import ModelLoadError

# The stand-in foundation model shipped with the package (recipes/standin/).
EMBEDDED_MODEL = Path(__file__).resolve().parent / "embedded" / "standin"
SUPPORTED_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# A ~50k-parameter wav2vec2 for tests and the built-in toy case: 320x downsampling
# (20 ms frames at 16 kHz) like the real models, everything else shrunk.
TINY_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (32, 32, 32),
    "conv_kernel": (10, 8, 4),
    "conv_stride": (10, 8, 4),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "feat_extract_norm": "group",
    "do_stable_layer_norm": False,
    "mask_time_prob": 0.0,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.0,
    "layerdrop": 0.0,
}


def is_local_model(source: str | Path) -> bool:
    return Path(source).exists()


def check_model_dir(path: Path) -> None:
    """A local model directory must hold a config and weights we can load without pickle."""
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model path is not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json in the model directory")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"{path}: no model weights (expected model.safetensors or pytorch_model.bin)"
        )


def load_config(source: str | Path) -> PretrainedConfig:
    source = str(source)
    if is_local_model(source):
        check_model_dir(Path(source))
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        if is_local_model(source):
            raise ModelLoadError(f"{source}: unreadable model config ({exc})") from None
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        why = "offline mode is set" if offline else "it is not a local directory and the hub"
        raise ModelLoadError(
            f"{source}: cannot load model: {why} could not be reached "
            "(give a local directory, or connect to the Hugging Face hub)"
            if not offline
            else f"{source}: cannot load model: {why} (HF_HUB_OFFLINE) and it is not cached"
        ) from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: model type {config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return config


def load_ctc_model(
    source: str | Path,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    new_head: bool = False,
    **config_overrides,
) -> PreTrainedModel:
    """Any HF *ForCTC speech model, from a local directory or (online) a hub id.

    With `new_head` (or a different vocabulary size) the CTC head is freshly initialised,
    as when fine-tuning a self-supervised checkpoint. CTC uses zero_infinity so one
    impossible alignment cannot turn the loss into inf.
    """
    config = load_config(source)
    if getattr(config, "pinchgate_structure", None) is not None:
        # Physically shrunk (per-layer sizes): HF would re-initialise every resized tensor.
        if vocab_size is not None or new_head or config_overrides:
            raise ModelLoadError(f"{source}: a shrunk model cannot be given a new head or config")
        from pinchgate.structured import load_shrunk

        return load_shrunk(source).float()
    overrides = {"ctc_zero_infinity": True, "ctc_loss_reduction": "mean", **config_overrides}
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    if pad_token_id is not None:
        overrides["pad_token_id"] = pad_token_id
    for key, value in overrides.items():
        setattr(config, key, value)
    try:
        # fp32 master weights whatever the file holds (fp16 checkpoints included);
        # mixed precision is the trainer's business.
        model = AutoModelForCTC.from_pretrained(
            str(source), config=config, ignore_mismatched_sizes=True, dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{source}: cannot load model weights ({exc})") from None
    if new_head:
        model.lm_head.reset_parameters()
    return model


def build_model(
    vocab_size: int, pad_token_id: int = 0, seed: int = 0, **config_overrides
) -> Wav2Vec2ForCTC:
    """A randomly initialised tiny wav2vec2 CTC model (tests, the built-in toy case)."""
    config = Wav2Vec2Config(
        **{**TINY_CONFIG, **config_overrides},
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        ctc_zero_infinity=True,
        ctc_loss_reduction="mean",
    )
    torch.manual_seed(seed)
    return Wav2Vec2ForCTC(config)


def feature_extractor_for(
    config: PretrainedConfig, source: str | Path | None = None
) -> Wav2Vec2FeatureExtractor:
    """The model's own preprocessor when it has one, else wav2vec2's standard settings:
    zero-mean unit-variance input, attention masks only for layer-norm feature encoders
    (group-norm models such as wav2vec2-base are trained without them)."""
    if source is not None and (Path(source) / "preprocessor_config.json").is_file():
        return Wav2Vec2FeatureExtractor.from_pretrained(str(source))
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=getattr(config, "feat_extract_norm", "group") == "layer",
    )


def count_parameters(model: torch.nn.Module) -> dict:
    """Total parameters, split by module type and by top-level component.

    Parametrised weights (weight norm, gates) count once, under the module that owns them.
    """
    by_type: Counter[str] = Counter()
    by_component: Counter[str] = Counter()
    total = 0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        if ".parametrizations." in name:
            owner = name.split(".parametrizations.")[0]
        else:
            owner = name.rpartition(".")[0]
        module = model.get_submodule(owner)
        by_type[type(module).__name__.removeprefix("Parametrized")] += n
        by_component[_component(name)] += n
    return {"total": total, "by_type": dict(by_type), "by_component": dict(by_component)}


def _component(name: str) -> str:
    parts = name.split(".")
    # Skip the base-model prefix (wav2vec2., hubert., ...) to name the real component.
    if parts[0] in ("wav2vec2", "hubert", "wavlm", "data2vec_audio") and len(parts) > 1:
        parts = parts[1:]
    return parts[0]
