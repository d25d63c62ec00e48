"""Helpers shared by the tests that run training: tiny configs, logs, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def tiny_config(config_class, toy_corpus: Path, out: Path, **changes):
    """The toy preset on the small test corpus, small batches, no dev set."""
    cfg = config_class.toy()
    cfg.train = str(toy_corpus / "train")
    cfg.dev = None
    cfg.test = [str(toy_corpus / "test")]
    cfg.output_dir = str(out)
    cfg.batch_seconds = 4.0
    cfg.eval_every = 0
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def cli_command(command: str, toy_corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """`python -m pinchgate COMMAND` on the test corpus, checkpointing every 5 steps."""
    return [
        sys.executable, "-m", "pinchgate", command, "--model", "toy",
        "--train", str(toy_corpus / "train"), "--test", str(toy_corpus / "test"),
        "--output-dir", str(out), "--max-steps", str(steps), "--save-every", "5",
        "--log-every", "1", "--batch-seconds", "4", "--eval-every", "0", *extra,
    ]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kill_and_resume(command: list[str], run_dir: Path, kill_after_step: int) -> str:
    """Start `command`, SIGKILL it once its metrics pass `kill_after_step`, run it again to
    the end; returns the second run's stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = read_jsonl(run_dir / "metrics.jsonl")
        if rows and rows[-1]["step"] >= kill_after_step:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "results.json").exists()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr
    return result.stderr


def run_to_end(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, capture_output=True)


def assert_same_weights(a_dir: Path, b_dir: Path, atol: float = 1e-5) -> None:
    a = load_file(a_dir / "model.safetensors")
    b = load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), key


def two_process_compression(command: list[str], out: Path) -> dict:
    """Run a `pinchgate compress` command line (as `cli_command` builds it) under
    `torchrun --nproc_per_node 2` (gloo on CPU) and check what every two-process compression
    must give: both replicas agree on every hardened weight, and the landing is exact.
    Returns the run's results.json."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    full = [torchrun, "--nproc_per_node", "2", "-m", "pinchgate", *command[3:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(full, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    final = json.loads((out / "results.json").read_text())
    # replicas_agree compares every hardened weight of both processes: masks and values.
    assert final["processes"] == 2 and final["replicas_agree"] is True
    c = final["compression"]
    assert c["gated_kept"] == c["target_gated_kept"]
    return final


def perturbed_teacher_task() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A cheap stand-in for fine-tuning a pretrained model: a student MLP that starts as a
    teacher MLP with every weight perturbed by 0.3 x its tensor's RMS, and the teacher's
    regression data (1024 points, small noise). Seed torch first; returns (student, x, y)."""
    from torch import nn

    def mlp() -> nn.Module:
        return nn.Sequential(
            nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        )

    teacher = mlp()
    x = torch.randn(1024, 16)
    y = teacher(x).detach() + 0.01 * torch.randn(1024, 1)
    model = mlp()
    model.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.pow(2).mean().sqrt() * torch.randn_like(p))
    return model, x, y
