"""Tiny random Whisper models for the tests, nothing downloaded: a byte-level BPE tokenizer
laid out as Whisper's (special tokens, timestamps), random weights, written in CTranslate2's
layout (fused q/k/v, zero key bias, float16, duplicates aliased as CTranslate2 does) and
converted to a stock transformers directory the way the packaged tiny.en is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pinchgate.families.ct2 import write_ct2_model

LANGUAGES = ("en", "zh", "de")  # the first of OpenAI's order, which transformers assumes
N_TIMESTAMPS = 30
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]


# --- building tiny CTranslate2 Whisper directories -------------------------------------


def byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 base tokens of a byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def bpe_tokens(multilingual: bool) -> tuple[dict[str, int], list[str]]:
    """BPE vocab and the special tokens in id order, laid out as Whisper's: the English-only
    (GPT-2) vocabulary holds <|endoftext|> itself, the multilingual one adds it."""
    vocab = {c: i for i, c in enumerate(byte_chars())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    if not multilingual:
        vocab["<|endoftext|>"] = len(vocab)
    specials = ["<|endoftext|>", "<|startoftranscript|>"]
    specials += [f"<|{lang}|>" for lang in LANGUAGES]
    specials += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>"]
    specials += ["<|nocaptions|>", "<|notimestamps|>"]
    return vocab, specials


def special_ids(multilingual: bool) -> dict[str, int]:
    vocab, specials = bpe_tokens(multilingual)
    first = vocab.get("<|endoftext|>", len(vocab))
    return {token: first + i for i, token in enumerate(specials)}


def vocab_size(multilingual: bool) -> int:
    return special_ids(multilingual)["<|notimestamps|>"] + 1 + N_TIMESTAMPS


def tiny_hf(multilingual: bool = False, seed: int = 0, std: float = 0.5, **overrides):
    """A random WhisperForConditionalGeneration, float16-rounded (what CTranslate2 stores);
    layer norms keep their ones/zeros, so CTranslate2 would alias them. ``overrides`` change
    the config (e.g. a longer window for training tests)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    ids = special_ids(multilingual)
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=vocab_size(multilingual),
        num_mel_bins=8,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=24,
        max_source_positions=50,
        max_target_positions=24,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        begin_suppress_tokens=[eot],
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" not in name:
                param.normal_(0.0, std)
    return model.half().float()


def ct2_variables(model) -> dict[str, np.ndarray]:
    """The WhisperSpec variables CTranslate2's converter would write for `model`."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    cfg = model.config
    out: dict[str, np.ndarray] = {
        "encoder/num_heads": np.int16(cfg.encoder_attention_heads),
        "decoder/num_heads": np.int16(cfg.decoder_attention_heads),
        "decoder/pre_norm": np.int8(1),
        "decoder/activation": np.int8(3),
        "decoder/alignment_layer": np.int16(-1),
        "decoder/alignment_heads": np.int16(1),
        "decoder/scale_embeddings": np.int8(0),
        "decoder/start_from_zero_embedding": np.int8(0),
        "decoder/alibi": np.int8(0),
        "decoder/alibi_use_positive_positions": np.int8(0),
        "decoder/scale_alibi": np.int8(0),
    }

    def put(dst: str, src: str, bias: bool = True) -> None:
        out[f"{dst}/weight"] = sd[f"{src}.weight"]
        if bias:
            out[f"{dst}/bias"] = sd[f"{src}.bias"]

    def norm(dst: str, src: str) -> None:
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(dst: str, src: str, parts: str) -> None:
        out[f"{dst}/weight"] = np.concatenate([sd[f"{src}.{p}_proj.weight"] for p in parts])
        zeros = np.zeros(cfg.d_model, np.float16)
        biases = [zeros if p == "k" else sd[f"{src}.{p}_proj.bias"] for p in parts]
        out[f"{dst}/bias"] = np.concatenate(biases)

    for side in ("encoder", "decoder"):
        for i in range(getattr(cfg, f"{side}_layers")):
            dst, src = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            fused(f"{dst}/self_attention/linear_0", f"{src}.self_attn", "qkv")
            put(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
            norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
            if side == "decoder":
                put(f"{dst}/attention/linear_0", f"{src}.encoder_attn.q_proj")
                fused(f"{dst}/attention/linear_1", f"{src}.encoder_attn", "kv")
                put(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
                norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
            put(f"{dst}/ffn/linear_0", f"{src}.fc1")
            put(f"{dst}/ffn/linear_1", f"{src}.fc2")
            norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        out[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
    put("encoder/conv1", "model.encoder.conv1")
    put("encoder/conv2", "model.encoder.conv2")
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["decoder/projection/weight"] = sd["proj_out.weight"]
    return out


def alias_duplicates(variables: dict) -> tuple[dict, dict[str, str]]:
    """CTranslate2's `_alias_variables`: a tensor equal to one whose name sorts earlier is
    stored once, the later name becoming an alias of the first."""
    names = sorted(variables)
    kept, aliases = {}, {}
    for name in names:
        value = np.asarray(variables[name])
        target = next(
            (
                other
                for other in names
                if other < name
                and other not in aliases
                and value.ndim > 0
                and np.asarray(variables[other]).dtype == value.dtype
                and np.array_equal(variables[other], value)
            ),
            None,
        )
        if target is None:
            kept[name] = value
        else:
            aliases[name] = target
    return kept, aliases


def quantize_int8(variables: dict) -> dict:
    """CTranslate2's int8 quantisation (model_spec.py) of linear, conv and embedding weights."""
    out = dict(variables)
    for name, value in variables.items():
        if not name.endswith("/weight"):
            continue
        value = value.astype(np.float32)
        rows = value.reshape(value.shape[0], -1)
        amax = np.abs(rows).max(axis=1)
        amax[amax == 0] = 127.0
        scale = (127.0 / amax).astype(np.float32)
        out[name] = np.rint(rows * scale[:, None]).astype(np.int8).reshape(value.shape)
        out[f"{name}_scale"] = scale
    return out


def write_tokenizer(
    directory: Path, multilingual: bool, vocabulary: str | None, timestamps: bool = False
) -> None:
    """tokenizer.json as the Hub's Whisper tokenizers: byte-level BPE plus special tokens;
    `timestamps` also adds the timestamp tokens, marked special (as some files have them)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, specials = bpe_tokens(multilingual)
    stamps = ["<|%.2f|>" % (i * 0.02) for i in range(N_TIMESTAMPS)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    added = specials + stamps if timestamps else specials
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.save(str(directory / "tokenizer.json"))
    tokens = [
        t for t, _ in sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda x: x[1])
    ]
    tokens += [] if timestamps else stamps
    if vocabulary == "txt":
        (directory / "vocabulary.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    elif vocabulary == "json":
        (directory / "vocabulary.json").write_text(json.dumps(tokens), encoding="utf-8")


def write_ct2_dir(
    directory: Path,
    model,
    multilingual: bool = False,
    vocabulary: str | None = "txt",
    int8: bool = False,
    timestamps: bool = False,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    variables = ct2_variables(model)
    if int8:
        variables = quantize_int8(variables)
    kept, aliases = alias_duplicates(variables)
    write_ct2_model(directory / "model.bin", kept, aliases)
    ids = special_ids(multilingual)
    blank = byte_chars()[ord(" ")]
    config = {
        "alignment_heads": [[1, 0], [1, 1]],
        "lang_ids": [ids[f"<|{lang}|>"] for lang in LANGUAGES],
        "suppress_ids": [1, 2, 7, ids["<|startoftranscript|>"], ids["<|translate|>"]],
        "suppress_ids_begin": [bpe_tokens(multilingual)[0][blank], ids["<|endoftext|>"]],
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    write_tokenizer(directory, multilingual, vocabulary, timestamps)
    return directory
