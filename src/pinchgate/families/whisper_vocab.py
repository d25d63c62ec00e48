"""A smaller Whisper vocabulary: keep the first `keep` text tokens of the byte-level BPE (the
base bytes and the most frequent merges, in the order BPE learned them) and every special
and timestamp token; cut the token embedding, which Whisper also uses as its output
projection, to those rows.

Why: at batch 1 the output projection (51,864 x 384 in tiny.en, read in full at every
decoding step) is a third of PyTorch's decoding time (docs/RESULTS.md, "Where Whisper tiny.en's
decoding time goes"). Why the first ids: a byte-level BPE numbers its merges in the order it
learned them, most frequent first, so the first `keep` ids with the merges among them are
themselves a complete BPE tokenizer (fewer merges, every byte still spelled): any text still
tokenizes, into more and shorter tokens. The model must then learn those spellings, so a cut
vocabulary is fine-tuned before use (`pinchgate finetune --model OUT`).

The result is a stock transformers Whisper (a smaller `vocab_size`) with its tokenizer.json,
config and generation config renumbered, so transformers, CTranslate2's converter and
faster-whisper load it as they load any Whisper.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

END_OF_TEXT = "<|endoftext|>"
# Token-id fields of a Whisper config and generation config.
ID_FIELDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "no_timestamps_token_id",
    "prev_sot_token_id",
)
LIST_FIELDS = ("suppress_tokens", "begin_suppress_tokens")


def kept_ids(tokenizer, vocab_size: int, keep: int) -> list[int]:
    """The ids that stay: text ids below `keep` and every id from end-of-text on (special
    and timestamp tokens). Raises ValueError for a `keep` the vocabulary cannot take."""
    first_special = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    if not isinstance(first_special, int) or first_special <= 0:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} token")
    base = 256  # a byte-level BPE's single bytes: without them some text cannot be spelled
    if not base <= keep <= first_special:
        raise ValueError(
            f"--keep {keep}: choose between {base} (the single bytes) and {first_special} "
            "(every text token)"
        )
    return list(range(keep)) + list(range(first_special, vocab_size))


def renumbering(kept: list[int]) -> dict[int, int]:
    return {old: new for new, old in enumerate(kept)}


def _renumber_config(obj, new_id: dict[int, int]) -> None:
    """Token ids of a config or generation config, in place; removed suppressed tokens go
    (they can no longer be produced)."""
    for field in ID_FIELDS:
        value = getattr(obj, field, None)
        if isinstance(value, int):
            if value not in new_id:
                raise ValueError(f"{field} {value} is not a kept token")
            setattr(obj, field, new_id[value])
    for field in LIST_FIELDS:
        value = getattr(obj, field, None)
        if value:
            setattr(obj, field, [new_id[i] for i in value if i in new_id])
    for field in ("lang_to_id", "task_to_id"):
        value = getattr(obj, field, None)
        if value:
            setattr(obj, field, {k: new_id[v] for k, v in value.items()})
    forced = getattr(obj, "forced_decoder_ids", None)
    if forced:
        obj.forced_decoder_ids = [[pos, new_id[i] if i is not None else None] for pos, i in forced]


def trim_model(model: nn.Module, kept: list[int]) -> nn.Module:
    """Cut `model`'s token embedding (and the output projection, which is the same tensor)
    to the rows `kept`, in place; renumber its config and generation config."""
    new_id = renumbering(kept)
    decoder = model.model.decoder
    weight = decoder.embed_tokens.weight.detach()
    pad = model.config.pad_token_id
    embedding = nn.Embedding(len(kept), weight.shape[1], padding_idx=new_id.get(pad))
    with torch.no_grad():
        embedding.weight.copy_(weight[kept])
    decoder.embed_tokens = embedding
    model.proj_out = nn.Linear(weight.shape[1], len(kept), bias=False)
    model.proj_out.weight = embedding.weight  # tied, as in every Whisper
    _renumber_config(model.config, new_id)
    model.config.vocab_size = len(kept)
    _renumber_config(model.generation_config, new_id)
    return model


def _merge_parts(merge) -> tuple[str, str]:
    if isinstance(merge, str):  # "a b" in older tokenizer.json files
        left, right = merge.split(" ", 1)
        return left, right
    return merge[0], merge[1]


def _renumber_specials(node, new_id: dict[int, int]) -> None:
    """The ids in a post-processor (template processing, possibly inside a sequence)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list):
                node[key] = [new_id[i] for i in value]
            else:
                _renumber_specials(value, new_id)
    elif isinstance(node, list):
        for item in node:
            _renumber_specials(item, new_id)


def trim_tokenizer_json(data: dict, kept: list[int]) -> dict:
    """tokenizer.json (as a dict) for the kept ids: the BPE vocabulary and the merges among
    kept tokens, added tokens and post-processor renumbered."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json: a {model.get('type')} model, not a byte-level BPE")
    data = copy.deepcopy(data)
    new_id = renumbering(kept)
    vocab = {token: new_id[i] for token, i in model["vocab"].items() if i in new_id}
    merges = []
    for merge in model["merges"]:
        left, right = _merge_parts(merge)
        if left in vocab and right in vocab and left + right in vocab:
            merges.append(merge)
    data["model"] = dict(model, vocab=vocab, merges=merges)
    added = []
    for token in data.get("added_tokens", []):
        if token["id"] in new_id:
            added.append(dict(token, id=new_id[token["id"]]))
    data["added_tokens"] = added
    _renumber_specials(data.get("post_processor"), new_id)
    return data


def trim_tokenizer_files(directory: Path, kept: list[int]) -> None:
    """Rewrite the tokenizer files transformers saved in `directory` for the kept ids."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(trim_tokenizer_json(data, kept), ensure_ascii=False), "utf-8")
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder")
        if decoder:
            new_id = renumbering(kept)
            config["added_tokens_decoder"] = {
                str(new_id[int(i)]): v for i, v in decoder.items() if int(i) in new_id
            }
            config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), "utf-8")
    for stale in ("vocab.json", "merges.txt", "added_tokens.json"):  # the full vocabulary's
        (directory / stale).unlink(missing_ok=True)
