"""Hugging Face model directories on disk: what is a model directory, which files hold its
weights, reading them without pickle, and the side files (config, tokenizer, feature
extractor) that travel with a model when it is rewritten."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pinchgate.errors import ModelLoadError, PinchgateError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Files of a model directory that are weights, not side files to carry along.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


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
    check_weight_headers(path)


def check_weight_headers(path: Path) -> None:
    """Open every safetensors weight file of a directory: a truncated or damaged header (or
    a file shorter than its header says) is one line naming the file, not a traceback from
    deep inside the loader."""
    if (
        not (path / "model.safetensors").is_file()
        and not (path / "model.safetensors.index.json").is_file()
    ):
        return  # pickle weights: refused where they would be read
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(
                f"{file}: truncated or corrupt weights ({one_line(exc)})"
            ) from None


def weights_name(source: str | Path) -> str:
    """The weights file of a model directory, for messages (a hub id names itself)."""
    path = Path(source)
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return str(path / name)
    return str(source)


def check_loading_info(
    source: str | Path, info: dict, fresh: str | None = None, unused: str | None = None
) -> list[str]:
    """Refuse a model whose config.json does not match its weights, as transformers'
    loading info reports it (one line naming the weights file and the first tensor):
    tensors of the model the weights lack (transformers would initialise them at random),
    tensors of another shape, and tensors of the weights the model has no place for.
    `fresh`: a regular expression of tensors that may be missing or resized (a new output
    head); `unused`: of weights that may go unused (a pretraining-only head). Returns the
    names of the tensors initialised fresh."""
    where = f"{weights_name(source)}: does not match its config.json"

    def allowed(name: str, pattern: str | None) -> bool:
        return pattern is not None and re.fullmatch(pattern, name) is not None

    def more(items: list) -> str:
        return f" (and {len(items) - 1} more)" if len(items) > 1 else ""

    resized = sorted(m for m in info.get("mismatched_keys", []) if not allowed(m[0], fresh))
    if resized:
        name, in_file, in_model = resized[0]
        raise ModelLoadError(
            f"{where}: tensor {name!r} is {list(in_file)} in the weights but "
            f"{list(in_model)} in config.json's model{more(resized)}"
        )
    missing = sorted(k for k in info.get("missing_keys", []) if not allowed(k, fresh))
    if missing:
        raise ModelLoadError(
            f"{where}: tensor {missing[0]!r} of config.json's model is not in the weights"
            f"{more(missing)}"
        )
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not allowed(k, unused))
    if unexpected:
        raise ModelLoadError(
            f"{where}: tensor {unexpected[0]!r} of the weights has no place in config.json's "
            f"model{more(unexpected)}"
        )
    if info.get("error_msgs"):
        raise ModelLoadError(f"{where}: {one_line(Exception(info['error_msgs'][0]))}")
    return sorted(
        {m[0] for m in info.get("mismatched_keys", [])} | set(info.get("missing_keys", []))
    )


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory whose `model/` holds one (compress, finetune)."""
    path = Path(path)
    if not path.exists():
        raise PinchgateError(f"{path}: does not exist")
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding a model's weights (one, or the shards of an index)."""
    if not (model_dir / "config.json").is_file():
        raise PinchgateError(f"{model_dir}: no config.json: not a model directory")
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PinchgateError(f"{index}: unreadable shard index ({exc})") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / "pytorch_model.bin").is_file():
        raise PinchgateError(
            f"{model_dir / 'pytorch_model.bin'}: pickle weights are not read; re-save the "
            "model with save_pretrained(safe_serialization=True)"
        )
    raise PinchgateError(f"{model_dir}: no model.safetensors in the model directory")


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise PinchgateError(f"{path}: unreadable weights ({one_line(exc)})") from None
    return state


def side_files(model_dir: Path) -> list[Path]:
    """config.json, tokenizer and feature-extractor files: everything but weights."""
    return sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(WEIGHT_SUFFIXES)
        and p.name not in WEIGHT_INDEX_FILES
    )


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_auto_config(source: str | Path, check_dir=check_model_dir):
    """The transformers config of a local directory (checked by `check_dir` first) or, when
    online, a hub id; one-line errors."""
    from transformers import AutoConfig

    source = str(source)
    if is_local_model(source):
        check_dir(Path(source))
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as exc:
        if is_local_model(source):
            raise ModelLoadError(f"{source}: unreadable model config ({exc})") from None
        raise hub_error(source) from None


def read_config(model_dir: Path):
    """The transformers config of a model directory (one-line errors)."""
    from transformers import AutoConfig

    path = model_dir / "config.json"
    if not path.is_file():
        raise PinchgateError(f"{path}: missing: a model directory needs its config.json")
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise PinchgateError(f"{path}: unreadable model config ({one_line(exc)})") from None


def hub_error(source: str) -> ModelLoadError:
    """The one line for a model that is neither a local directory nor reachable on the hub."""
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    if offline:
        return ModelLoadError(
            f"{source}: cannot load model: offline mode is set (HF_HUB_OFFLINE) and it is "
            "not cached"
        )
    return ModelLoadError(
        f"{source}: cannot load model: it is not a local directory and the hub could not be "
        "reached (give a local directory, or connect to the Hugging Face hub)"
    )
