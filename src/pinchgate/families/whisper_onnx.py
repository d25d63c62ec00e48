"""Whisper as ONNX with a key/value-cached decoder, and the onnxruntime model that decodes
with it exactly as pinchgate decodes with PyTorch.

Two graphs in one directory, as every Whisper runtime splits the work:

- `encoder.onnx`: `input_features` float32 [batch, mels, frames] (frames fixed by the
  model's window) -> `cross_key_I`, `cross_value_I` for every decoder layer I, float32
  [batch, heads_I, positions, head_dim]: the encoder output already projected by that
  layer's cross-attention, computed once per clip.
- `decoder.onnx`: `input_ids` int64 [batch, new], the cross keys/values and the cache
  `past_key_I`, `past_value_I` [batch, heads_I, past, head_dim] (past may be 0) ->
  `logits` [batch, new, vocab] and `present_key_I`, `present_value_I` (past + new).

The decoder is written out here from the model's own modules (layer norms, projections,
activation, position table, tied output projection) rather than traced through
transformers' cache classes, so the graph has plain tensors in and out; shrunk models
(per-layer head counts and feed-forward sizes, attention without heads) export as they
are. The first call takes the whole prompt with an empty cache, each later call one token.
`pinchgate_onnx.json` records what decoding needs (prompt length budget, window,
suppressed tokens).

`OnnxWhisper` runs both with onnxruntime behind `WhisperFamily.decode`: greedy search with
the generation config's `suppress_tokens` at every step and `begin_suppress_tokens` at the
first, stopping at end of text or the token budget (beam search is refused).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor, nn

from pinchgate.checkpoint import move_into_place
from pinchgate.errors import PinchgateError
from pinchgate.families.base import RuntimeModel
from pinchgate.families.onnxrt import onnx_session, quiet_export, require_exporter

DECODING_FILE = "pinchgate_onnx.json"
FRAMES_PER_SECOND = 100


def _split_heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    batch, length, _ = x.shape
    return x.reshape(batch, length, heads, head_dim).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    scores = q @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1) @ v


class _Encoder(nn.Module):
    """input_features -> every decoder layer's cross-attention keys and values."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.model.encoder
        self.cross = [layer.encoder_attn for layer in model.model.decoder.layers]
        self.cross_modules = nn.ModuleList(self.cross)

    def forward(self, input_features: Tensor) -> tuple[Tensor, ...]:
        hidden = self.encoder(input_features).last_hidden_state
        out = []
        for attention in self.cross:
            if attention.num_heads == 0:
                continue
            heads, head_dim = attention.num_heads, attention.head_dim
            out.append(_split_heads(attention.k_proj(hidden), heads, head_dim))
            out.append(_split_heads(attention.v_proj(hidden), heads, head_dim))
        return tuple(out)


class _Decoder(nn.Module):
    """One decoder call on new tokens with the self-attention cache (see the module doc)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.decoder = model.model.decoder
        self.proj_out = model.proj_out

    def forward(self, input_ids: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        layers = self.decoder.layers
        cross_heads = [layer.encoder_attn.num_heads > 0 for layer in layers]
        n_cross = 2 * sum(cross_heads)
        cross, past = list(caches[:n_cross]), list(caches[n_cross:])
        self_heads = [layer.self_attn.num_heads > 0 for layer in layers]
        past_length = past[0].shape[2] if past else torch.zeros((), dtype=torch.long)
        new = input_ids.shape[1]
        positions = torch.arange(new, device=input_ids.device) + past_length
        hidden = self.decoder.embed_tokens(input_ids) + self.decoder.embed_positions.weight[
            positions
        ].unsqueeze(0)
        # Causal mask of the new tokens over cache + new: column j is visible to new token i
        # when j <= past + i.
        columns = torch.arange(new + (past[0].shape[2] if past else 0), device=hidden.device)
        hidden_mask = torch.where(
            columns.unsqueeze(0) <= positions.unsqueeze(1),
            torch.zeros((), dtype=hidden.dtype),
            torch.full((), torch.finfo(hidden.dtype).min, dtype=hidden.dtype),
        )
        presents = []
        for i, layer in enumerate(layers):
            attention = layer.self_attn
            normed = layer.self_attn_layer_norm(hidden)
            if self_heads[i]:
                heads, head_dim = attention.num_heads, attention.head_dim
                q = _split_heads(attention.q_proj(normed) * attention.scaling, heads, head_dim)
                k = _split_heads(attention.k_proj(normed), heads, head_dim)
                v = _split_heads(attention.v_proj(normed), heads, head_dim)
                k = torch.cat([past.pop(0), k], dim=2)
                v = torch.cat([past.pop(0), v], dim=2)
                presents += [k, v]
                hidden = hidden + attention.out_proj(_merge_heads(_attend(q, k, v, hidden_mask)))
            else:
                hidden = hidden + attention(normed)[0]
            attention = layer.encoder_attn
            normed = layer.encoder_attn_layer_norm(hidden)
            if cross_heads[i]:
                heads, head_dim = attention.num_heads, attention.head_dim
                q = _split_heads(attention.q_proj(normed) * attention.scaling, heads, head_dim)
                k, v = cross.pop(0), cross.pop(0)
                hidden = hidden + attention.out_proj(_merge_heads(_attend(q, k, v, None)))
            else:
                hidden = hidden + attention(normed)[0]
            normed = layer.final_layer_norm(hidden)
            hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(normed)))
        logits = self.proj_out(self.decoder.layer_norm(hidden))
        return (logits, *presents)


def _names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(cross key/value names, self-attention cache names) in graph order."""
    cross, cache = [], []
    for i, layer in enumerate(model.model.decoder.layers):
        if layer.encoder_attn.num_heads > 0:
            cross += [f"cross_key_{i}", f"cross_value_{i}"]
        if layer.self_attn.num_heads > 0:
            cache += [f"key_{i}", f"value_{i}"]
    return cross, cache


def export_whisper_onnx(model: nn.Module, out_dir: Path, opset: int) -> Path:
    """Write encoder.onnx, decoder.onnx and pinchgate_onnx.json into `out_dir` (new)."""
    require_exporter()
    model = model.eval()
    config = model.config
    cross_names, cache_names = _names(model)
    frames = int(config.max_source_positions) * 2
    batch = torch.export.Dim("batch", min=1, max=1024)
    features = torch.randn(2, config.num_mel_bins, frames)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    encoder = _Encoder(model).eval()
    with torch.no_grad():
        cross = encoder(features)
    new = torch.export.Dim("new", min=1, max=int(config.max_target_positions))
    past = torch.export.Dim("past", min=1, max=int(config.max_target_positions))
    layers = model.model.decoder.layers
    example_cache = []
    for layer in layers:
        attention = layer.self_attn
        if attention.num_heads > 0:
            shape = (2, attention.num_heads, 3, attention.head_dim)
            example_cache += [torch.randn(shape), torch.randn(shape)]
    ids = torch.randint(0, config.vocab_size, (2, 2))
    decoder = _Decoder(model).eval()
    decoder_shapes = (  # forward(input_ids, *caches): the varargs are one tuple
        {0: batch, 1: new},
        (*({0: batch} for _ in cross_names), *({0: batch, 2: past} for _ in cache_names)),
    )
    # One file per graph while the protobuf stays under 2 GiB; larger models get external data.
    external = sum(p.nbytes for p in model.state_dict().values()) > 1.5 * 2**30
    try:
        with torch.no_grad(), quiet_export():
            program = torch.onnx.export(
                encoder,
                (features,),
                dynamo=True,
                opset_version=opset,
                input_names=["input_features"],
                output_names=cross_names,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
            program.save(str(tmp / "encoder.onnx"), external_data=external)
            program = torch.onnx.export(
                decoder,
                (ids, *cross, *example_cache),
                dynamo=True,
                opset_version=opset,
                input_names=["input_ids", *cross_names, *[f"past_{n}" for n in cache_names]],
                output_names=["logits", *[f"present_{n}" for n in cache_names]],
                dynamic_shapes=decoder_shapes,
                verbose=False,
            )
            program.save(str(tmp / "decoder.onnx"), external_data=external)
    except Exception as exc:  # the exporter's many failure types: one line, nothing left
        shutil.rmtree(tmp, ignore_errors=True)
        raise PinchgateError(f"ONNX export of the Whisper model failed: {exc}") from None
    generation = model.generation_config
    decoding = {
        "max_target_positions": int(config.max_target_positions),
        "window_seconds": frames // FRAMES_PER_SECOND,
        "eos_token_id": int(generation.eos_token_id),
        "suppress_tokens": list(generation.suppress_tokens or []),
        "begin_suppress_tokens": list(generation.begin_suppress_tokens or []),
        "cross": cross_names,
        "cache": [
            {
                "name": name,
                "heads": layers[int(name.rpartition("_")[2])].self_attn.num_heads,
                "head_dim": layers[int(name.rpartition("_")[2])].self_attn.head_dim,
            }
            for name in cache_names
        ],
    }
    (tmp / DECODING_FILE).write_text(json.dumps(decoding, indent=1) + "\n")
    move_into_place(tmp, out_dir)
    return out_dir


class OnnxWhisper(RuntimeModel):
    """An exported Whisper directory run by onnxruntime behind `WhisperFamily.decode`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        settings = self.path / DECODING_FILE
        if not settings.is_file():
            raise PinchgateError(f"{self.path}: no {DECODING_FILE}: not a Whisper ONNX export")
        self.settings = json.loads(settings.read_text())
        self.encoder = onnx_session(self.path / "encoder.onnx")
        self.decoder = onnx_session(self.path / "decoder.onnx")
        self.window = int(self.settings["window_seconds"])
        self.config = SimpleNamespace(max_target_positions=self.settings["max_target_positions"])

    def _cross(self, features: np.ndarray) -> dict[str, np.ndarray]:
        values = self.encoder.run(None, {"input_features": features.astype(np.float32)})
        return dict(zip(self.settings["cross"], values, strict=True))

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {
            f"past_{entry['name']}": np.zeros(
                (batch, entry["heads"], 0, entry["head_dim"]), dtype=np.float32
            )
            for entry in self.settings["cache"]
        }

    def logits(self, features: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Teacher-forced logits of `ids` [batch, length] in one call (parity checks)."""
        feeds = {"input_ids": ids.astype(np.int64), **self._cross(features)}
        feeds.update(self._empty_cache(ids.shape[0]))
        return self.decoder.run(["logits"], feeds)[0]

    def generate(
        self, features: np.ndarray, prompt: list[int], max_new_tokens: int, beam_size: int = 1
    ) -> list[list[int]]:
        """Prompt plus greedy tokens per clip (end of text excluded)."""
        if beam_size != 1:
            raise PinchgateError("beam search is not available with the ONNX Whisper runtime")
        batch = features.shape[0]
        cross = self._cross(features)
        cache = self._empty_cache(batch)
        ids = np.array([prompt] * batch, dtype=np.int64)
        eos = self.settings["eos_token_id"]
        suppress = self.settings["suppress_tokens"]
        begin = self.settings["begin_suppress_tokens"]
        rows = [list(prompt) for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        cache_names = [f"present_{e['name']}" for e in self.settings["cache"]]
        for step in range(max_new_tokens):
            outputs = self.decoder.run(None, {"input_ids": ids, **cross, **cache})
            logits = outputs[0][:, -1, :].copy()
            logits[:, suppress] = -np.inf
            if step == 0:
                logits[:, begin] = -np.inf
            token = logits.argmax(-1)
            for row in range(batch):
                if not done[row]:
                    if token[row] == eos:
                        done[row] = True
                    else:
                        rows[row].append(int(token[row]))
            if done.all():
                break
            ids = token.reshape(batch, 1).astype(np.int64)
            cache = {
                name.replace("present_", "past_", 1): value
                for name, value in zip(cache_names, outputs[1:], strict=True)
            }
        return rows
