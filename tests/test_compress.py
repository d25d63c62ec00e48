from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import runs
from pinchgate.cli import app
from pinchgate.compress import run_compress
from pinchgate.config import CompressConfig
from pinchgate.errors import PinchgateError
from pinchgate.methods.gates import GateMethod
from pinchgate.sparsity import SparsityController


def tiny_compress_config(toy_corpus: Path, out: Path, **changes) -> CompressConfig:
    defaults = {
        "max_steps": 40,
        "warmup_steps": 5,
        "log_every": 5,
        "save_every": 20,
        "train_dense_reference": False,
    }
    return runs.tiny_config(CompressConfig, toy_corpus, out, **{**defaults, **changes})


def gated_zeros(state: dict[str, torch.Tensor]) -> int:
    return sum(
        int((tensor == 0).sum())
        for name, tensor in state.items()
        if name.endswith(".weight")
        and ("encoder.layers." in name or "feature_projection.projection" in name)
    )


def test_reaches_the_target_and_exports_a_stock_model(toy_corpus, tmp_path):
    cfg = tiny_compress_config(toy_corpus, tmp_path / "run", target_ratio=None, target_sparsity=0.5)
    results = run_compress(cfg)
    c = results["compression"]
    assert abs(c["gated_sparsity"] - 0.5) <= 0.005
    run = tmp_path / "run"
    from transformers import AutoModelForCTC

    model = AutoModelForCTC.from_pretrained(run / "model")  # stock transformers, no gates
    from pinchgate.families.ctc import build_model

    plain = build_model(model.config.vocab_size).state_dict()
    assert set(model.state_dict()) == set(plain)  # no gate, threshold or mask left behind
    pruned = c["gated_params"] - c["gated_kept"]
    assert gated_zeros(model.state_dict()) == pruned
    assert c["kept_params"] == c["total_params"] - pruned
    assert c["compression_ratio"] == pytest.approx(c["total_params"] / c["kept_params"])
    # The report's WER is that of the exported model, decoded again here.
    from pinchgate.data.corpus import load_corpus
    from pinchgate.evaluate import evaluate_corpus
    from pinchgate.families.ctc import CTCFamily

    utterances, _ = load_corpus(toy_corpus / "test")
    family = CTCFamily()
    again = evaluate_corpus(model, family, family.load_processor(run / "model"), utterances, "test")
    report = json.loads((run / "report.json").read_text())
    assert report["sets"]["test"]["wer"] == pytest.approx(again.wer)
    layers = list(csv.DictReader((run / "layers.csv").open()))
    assert len(layers) == 13 and sum(int(r["kept"]) for r in layers) == c["gated_kept"]
    assert len({round(float(r["sparsity"]), 3) for r in layers}) > 1  # mixed sparsity
    for name in ("report.md", "layer_sparsity.png", "training.png", "gates.jsonl"):
        assert (run / name).is_file(), name


def test_controller_tracks_the_target_before_the_exact_fit(toy_corpus, tmp_path):
    cfg = tiny_compress_config(
        toy_corpus,
        tmp_path / "run",
        max_steps=150,
        frozen_fraction=0.2,
        target_ratio=None,
        target_sparsity=0.6,
    )
    run_compress(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "gates.jsonl").read_text().splitlines()]
    before_fit = [r for r in rows if r["step"] == 115][0]  # after the ramp, before the freeze
    assert abs(before_fit["hard_sparsity"] - 0.6) < 0.05
    logged = [
        row
        for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
        if "frozen_at" in row
    ]
    assert len(logged) == 1 and logged[0]["frozen_at"] == 120
    # The report gives the fit made at the freeze, not "none" because it happened earlier.
    c = json.loads((tmp_path / "run" / "report.json").read_text())["compression"]
    assert c["final_fit_factor"] == pytest.approx(logged[0]["fit_factor"])
    assert c["sparsity_before_fit"] == pytest.approx(logged[0]["sparsity_before_fit"])
    assert abs(c["sparsity_before_fit"] - 0.6) < 0.05
    assert "before the exact fit" in (tmp_path / "run" / "report.md").read_text()


def test_the_exact_fit_survives_a_resume(tmp_path):
    cfg = CompressConfig(output_dir=str(tmp_path), target_sparsity=0.5)
    method = GateMethod(cfg, tmp_path)
    method.controller = SparsityController(0.5, 10)
    method.fit = {"sparsity_before_fit": 0.47, "final_fit_factor": 1.03}
    again = GateMethod(cfg, tmp_path)
    again.controller = SparsityController(0.5, 10)
    again.load_state(method.state())
    assert again.fit == method.fit


def test_dense_reference_and_significance_in_the_report(toy_corpus, tmp_path):
    cfg = tiny_compress_config(
        toy_corpus, tmp_path / "run", max_steps=20, train_dense_reference=True
    )
    results = run_compress(cfg)
    row = results["report"]["sets"]["test"]
    assert "dense_wer" in row
    sig = row["significance"]
    assert sig["utterances"] == 6 and 0.0 <= sig["p_value"] <= 1.0
    assert results["report"]["time"]["dense_reference_train_seconds"] > 0
    assert "MAPSSWE p" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-ratio", "1.0"], "--target-ratio 1.0: must be > 1"),
        (["--target-ratio", "10"], "highest reachable ratio"),
        (["--target-sparsity", "1.2"], "--target-sparsity 1.2: must be in [0, 1)"),
        (["--target-ratio", "2", "--target-sparsity", "0.5"], "exactly one of --target-ratio"),
        (["--sparsity-control", "pid"], "--sparsity-control 'pid': must be lagrangian or penalty"),
        (["--penalty-weight", "-1"], "--penalty-weight -1.0: must be > 0"),
    ],
)
def test_bad_targets_are_one_line_before_training(toy_corpus, tmp_path, args, message):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "compress",
            "--model",
            "toy",
            "--train",
            str(toy_corpus / "train"),
            "--output-dir",
            str(out),
            *args,
        ],
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (out / "checkpoints").exists()


def test_resume_with_another_target_is_refused(toy_corpus, tmp_path):
    run_compress(tiny_compress_config(toy_corpus, tmp_path / "run", max_steps=4, save_every=2))
    with pytest.raises(PinchgateError, match="another configuration.*target_ratio"):
        run_compress(
            tiny_compress_config(toy_corpus, tmp_path / "run", max_steps=4, target_ratio=1.4)
        )


def _command(toy_corpus: Path, out: Path) -> list[str]:
    extra = ("--warmup-steps", "5", "--no-train-dense-reference")
    return runs.cli_command("compress", toy_corpus, out, 60, *extra)


def test_kill_and_resume_mid_compression(toy_corpus, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    runs.run_to_end(_command(toy_corpus, reference))
    # Killed during the target ramp, between two checkpoints.
    runs.kill_and_resume(_command(toy_corpus, killed), killed, kill_after_step=22)
    a = json.loads((reference / "report.json").read_text())["compression"]
    b = json.loads((killed / "report.json").read_text())["compression"]
    assert a["gated_kept"] == b["gated_kept"] and a["compression_ratio"] == b["compression_ratio"]
    runs.assert_same_weights(reference / "model", killed / "model")
