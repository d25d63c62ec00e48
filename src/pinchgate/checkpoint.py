"""Atomic training checkpoints, loaded without pickle.

A checkpoint is a directory `checkpoints/step-XXXXXXX/` holding the weights
(safetensors), the optimiser/scheduler/RNG state (`torch.load(weights_only=True)`) and a
JSON of counters. It is written under a temporary name and renamed into place, and the
`latest` pointer is replaced atomically afterwards, so a run killed at any instant leaves
either the previous checkpoint or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pinchgate.errors import PinchgateError

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
COUNTERS_FILE = "counters.json"
ALIASES_KEY = "pinchgate.aliases"  # weights file metadata: names of tensors stored once
LOCK_FILE = ".pinchgate.lock"  # in a run directory: the OS lock of the run using it
_held_locks: dict[Path, list] = {}  # run directory -> [file descriptor, depth]: re-entrant


def make_dir(path: Path, option: str = "--output-dir") -> None:
    """Create a directory (and its parents) or say in one line why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PinchgateError(
            f"{option} {path}: cannot create the directory ({exc.strerror or exc})"
        ) from None


@contextlib.contextmanager
def run_lock(run_dir: Path, hold: bool = True) -> Iterator[None]:
    """One run at a time in a run directory: an exclusive OS lock (flock) on its lock file,
    which holds the PID of the run that has it. A second run is refused with one line
    naming that PID. The OS drops the lock when its process ends, however it ends, so a
    run killed with SIGKILL leaves nothing that blocks its resume. Re-entrant within a
    process (a compression holds its directory across passes); `hold=False` (the other
    processes of a multi-process run) only creates the directory."""
    make_dir(run_dir)
    key = run_dir.resolve()
    if not hold or key in _held_locks:
        if hold:
            _held_locks[key][1] += 1
        try:
            yield
        finally:
            if hold:
                _release(key)
        return
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PinchgateError(
            f"--output-dir {run_dir}: cannot write in it ({exc.strerror or exc})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise PinchgateError(
            f"{run_dir}: in use by another run (PID {holder}); wait for it to end, or use "
            "another --output-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[key] = [fd, 1]
    try:
        yield
    finally:
        _release(key)


def _release(key: Path) -> None:
    held = _held_locks[key]
    held[1] -= 1
    if held[1] == 0:
        del _held_locks[key]
        os.close(held[0])  # closing the descriptor drops the lock


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


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """One rename, so a half-written directory never looks finished."""
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            out_dir.rename(old)
        else:
            out_dir.rmdir()
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
