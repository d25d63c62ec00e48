"""Atomic training checkpoints, loaded without pickle.

A checkpoint is a directory `checkpoints/step-XXXXXXX/` holding the weights
(safetensors), the optimiser/scheduler/RNG state (`torch.load(weights_only=True)`) and a
JSON of counters. It is written under a temporary name and renamed into place, and the
`latest` pointer is replaced atomically afterwards, so a run killed at any instant leaves
either the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
COUNTERS_FILE = "counters.json"
ALIASES_KEY = "pinchgate.aliases"  # weights file metadata: names of tensors stored once


def rng_state() -> dict:
    """This process's RNG state in a form `torch.load(weights_only=True)` accepts."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_checkpoint(
    checkpoint_root: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict,
    counters: dict,
    keep: int = 2,
) -> Path:
    """Write one checkpoint atomically, point `latest` at it, and prune old ones."""
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_root / f"step-{step:07d}"
    tmp = checkpoint_root / f".step-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, aliases = _without_shared({k: v.detach() for k, v in model_state.items()})
    save_file(tensors, tmp / MODEL_FILE, metadata={ALIASES_KEY: json.dumps(aliases)})
    torch.save(trainer_state, tmp / STATE_FILE)
    (tmp / COUNTERS_FILE).write_text(json.dumps({"step": step, **counters}, indent=1))
    for child in tmp.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # a checkpoint of the same step from a run killed after the rename
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(checkpoint_root)
    atomic_write_text(checkpoint_root / "latest", final.name + "\n")
    _prune(checkpoint_root, keep, final.name)
    return final


def _prune(checkpoint_root: Path, keep: int, newest: str) -> None:
    steps = sorted(p for p in checkpoint_root.glob("step-*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoint_root.glob(".step-*.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    pointer = checkpoint_root / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root / pointer.read_text().strip()
    return path if (path / COUNTERS_FILE).is_file() else None


def _without_shared(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """Each tensor once (a tied embedding appears under two names): the tensors, on the CPU,
    and {other name: stored name}."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
               tuple(tensor.shape), tensor.stride(), tensor.dtype)  # fmt: skip
        if tensor.numel() and key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        stored[name] = tensor.to("cpu").contiguous()
    return stored, aliases


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Weights, trainer state and counters of one checkpoint, without pickle."""
    model_state = load_file(path / MODEL_FILE)
    with safe_open(str(path / MODEL_FILE), framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get(ALIASES_KEY, "{}"))
    for name, stored in aliases.items():
        model_state[name] = model_state[stored]
    trainer_state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    counters = json.loads((path / COUNTERS_FILE).read_text())
    return model_state, trainer_state, counters
