"""Hugging Face model directories on disk: what is a model directory, which files hold its
weights, reading them without pickle, and the side files (config, tokenizer, feature
extractor) that travel with a model when it is rewritten."""

from __future__ import annotations

import json
import os
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
