from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import runs
from pinchgate.config import FinetuneConfig
from pinchgate.errors import PinchgateError
from pinchgate.train import run_finetune


def tiny_config(toy_corpus: Path, out: Path, **changes) -> FinetuneConfig:
    return runs.tiny_config(FinetuneConfig, toy_corpus, out, **changes)


def test_few_steps_lower_the_loss_on_an_overfit_set(toy_corpus, tmp_path):
    cfg = tiny_config(
        toy_corpus,
        tmp_path / "run",
        max_steps=40,
        log_every=10,
        warmup_steps=5,
        save_every=40,
        learning_rate=3e-3,
    )
    results = run_finetune(cfg)
    losses = [
        row["loss"] for row in runs.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in row
    ]
    assert losses[-1] < 0.5 * losses[0]
    run = tmp_path / "run"
    for name in ("config.yaml", "vocab.json", "data_report.json", "results.json"):
        assert (run / name).is_file(), name
    assert FinetuneConfig.load(run / "config.yaml") == cfg  # the saved config reruns the run
    assert results["steps"] == 40
    rows = (run / "eval" / "test.jsonl").read_text().splitlines()
    assert len(rows) == 6
    from transformers import AutoModelForCTC

    model = AutoModelForCTC.from_pretrained(run / "model")  # stock transformers loads it
    assert model.config.vocab_size == len(json.loads((run / "vocab.json").read_text()))


def _command(toy_corpus: Path, out: Path, steps: int) -> list[str]:
    return runs.cli_command("finetune", toy_corpus, out, steps)


def test_kill_and_resume_matches_an_uninterrupted_run(toy_corpus, tmp_path):
    steps = 60
    runs.run_to_end(_command(toy_corpus, tmp_path / "reference", steps))
    killed = tmp_path / "killed"
    runs.kill_and_resume(_command(toy_corpus, killed, steps), killed, kill_after_step=12)
    final = json.loads((killed / "results.json").read_text())
    assert final["steps"] == steps
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == [
        "step-0000055",
        "step-0000060",
    ]
    assert not list((killed / "checkpoints").glob(".*tmp*"))
    # Same data order, optimiser, scheduler and RNG: the same weights as without the kill.
    runs.assert_same_weights(tmp_path / "reference" / "model", killed / "model")


def test_resume_with_another_config_is_refused(toy_corpus, tmp_path):
    cfg = tiny_config(toy_corpus, tmp_path / "run", max_steps=2, save_every=1)
    run_finetune(cfg)
    changed = tiny_config(toy_corpus, tmp_path / "run", max_steps=2, learning_rate=1.0)
    with pytest.raises(PinchgateError, match="another configuration.*learning_rate"):
        run_finetune(changed)


def test_two_processes_agree_on_the_weights(toy_corpus, tmp_path):
    # accelerate's own launcher; on a machine without CUDA it forms a gloo group on the CPU.
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp"
    command = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "pinchgate",
        *_command(toy_corpus, out, 4)[3:],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    final = json.loads((out / "results.json").read_text())
    assert final["processes"] == 2 and final["replicas_agree"] is True
    assert final["steps"] == 4


def test_non_finite_loss_stops_with_the_step(toy_corpus, tmp_path):
    import torch

    from pinchgate.methods.base import CompressionMethod

    class Poisoned(CompressionMethod):  # a loss term that turns NaN at the third step
        def sparsity_term(self, model, step):
            return torch.tensor(float("nan") if step == 2 else 0.0), {}

    cfg = tiny_config(toy_corpus, tmp_path / "run", max_steps=5, save_every=1)
    with pytest.raises(PinchgateError, match="non-finite loss .* at step 3"):
        run_finetune(cfg, Poisoned(cfg, tmp_path / "run"))
    # The checkpoints before it are intact.
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").is_dir()
