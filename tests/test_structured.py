"""Structured self-pinching gates (FFN neurons, attention heads) and physical shrinking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.utils import parametrize
from typer.testing import CliRunner

import runs
from pinchgate import export, packing
from pinchgate.cli import app
from pinchgate.compress import run_compress
from pinchgate.config import CompressConfig
from pinchgate.errors import PinchgateError
from pinchgate.families import count_parameters
from pinchgate.families.ctc import (
    build_model,
    encoder_blocks,
    load_ctc_model,
    load_shrunk,
    save_shrunk,
    shrink,
)
from pinchgate.sparsity import SparsityController
from pinchgate.structured_gates import (
    StructuredGateConfig,
    attach_structured_gates,
    structured_gates_of,
)

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, HEADS, HEAD_DIM, NEURONS = 32, 4, 8, 64


def tiny(kind: str = "wav2vec2", seed: int = 0) -> torch.nn.Module:
    """A tiny CTC model with 4 heads of 8 dims and 64 FFN neurons per block, in eval mode."""
    if kind == "wav2vec2":
        return build_model(12, seed=seed, num_attention_heads=HEADS).eval()
    if kind == "stable-layer-norm":
        return build_model(
            12, seed=seed, num_attention_heads=HEADS, do_stable_layer_norm=True,
            feat_extract_norm="layer",
        ).eval()  # fmt: skip
    from transformers import HubertConfig, HubertForCTC

    from pinchgate.families.ctc import TINY_CONFIG

    torch.manual_seed(seed)
    config = HubertConfig(**{**TINY_CONFIG, "num_attention_heads": HEADS}, vocab_size=12)
    return HubertForCTC(config).eval()


def audio(batch: int = 2, samples: int = 4000, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, samples, generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None):
    with torch.no_grad():
        return model(x, attention_mask=mask).logits


def prune_by_hand(model: torch.nn.Module, seed: int = 0, keep: float = 0.5):
    """Attach gates, freeze a random group mask per unit, harden: a structurally pruned model."""
    gates = attach_structured_gates(model)
    generator = torch.Generator().manual_seed(seed)
    for unit in gates.units:
        unit.hard_mask = torch.rand(unit.n_groups, generator=generator) < keep
    return gates.harden()


# --- groups, norms, masks ----------------------------------------------------------------------


def test_group_sizes_are_the_parameters_a_group_removes():
    gates = attach_structured_gates(tiny())
    sizes = {unit.kind: unit.group_size for unit in gates.units}
    assert sizes == {"ffn": 2 * HIDDEN + 1, "heads": 4 * HEAD_DIM * HIDDEN + 3 * HEAD_DIM}
    assert len(gates.units) == 4  # heads and FFN of each of 2 blocks, one threshold each
    assert gates.numel == 2 * (NEURONS * (2 * HIDDEN + 1) + HEADS * (4 * HEAD_DIM * HIDDEN + 24))


def test_ffn_mask_is_the_formula_on_the_neuron_norm_and_scales_exactly_its_rows_and_columns():
    model = tiny()
    ff = model.wav2vec2.encoder.layers[0].feed_forward
    w_in, b_in = ff.intermediate_dense.weight.detach().clone(), ff.intermediate_dense.bias.clone()
    w_out = ff.output_dense.weight.detach().clone()
    gates = attach_structured_gates(
        model, StructuredGateConfig(tau_rel=0.2, threshold_init_rel=0.3)
    )
    unit = next(u for u in gates.units if u.name.endswith("layers.0.feed_forward"))
    norms2 = w_in.square().sum(1) + b_in.square() + w_out.square().sum(0)  # ||group||^2
    n = 2 * HIDDEN + 1
    mean_square = norms2.sum() / (NEURONS * n)  # over every grouped parameter of the unit
    t2, tau = 0.09 * mean_square, 0.2 * mean_square
    expected = torch.sigmoid((norms2 / n - t2) / (2 * tau))
    soft, hard = unit.masks()
    torch.testing.assert_close(soft, expected)
    assert torch.equal(hard, norms2 / n > t2)
    # In the group L2 norm's own units (the form of the issue): the same mask.
    g2, t2_norm, tau_norm = norms2, t2 * n, tau * n
    torch.testing.assert_close(soft, torch.sigmoid((g2 - t2_norm) / (2 * tau_norm)))
    torch.testing.assert_close(ff.intermediate_dense.weight, w_in * expected[:, None])
    torch.testing.assert_close(ff.intermediate_dense.bias, b_in * expected)
    torch.testing.assert_close(ff.output_dense.weight, w_out * expected[None, :])
    assert not parametrize.is_parametrized(ff.output_dense, "bias")  # shared: not gated


def test_head_mask_covers_its_qkv_rows_and_out_proj_columns_only():
    model = tiny()
    attention = model.wav2vec2.encoder.layers[1].attention
    before = {n: p.detach().clone() for n, p in attention.named_parameters()}
    gates = attach_structured_gates(model)
    unit = next(u for u in gates.units if u.name.endswith("layers.1.attention"))
    unit.hard_mask = torch.tensor([True, False, True, True])  # head 1 pruned
    rows = slice(HEAD_DIM, 2 * HEAD_DIM)
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(attention, name)
        assert torch.all(layer.weight[rows] == 0) and torch.all(layer.bias[rows] == 0)
        keep = torch.ones(HIDDEN, dtype=torch.bool)
        keep[rows] = False
        assert torch.equal(layer.weight[keep], before[f"{name}.weight"][keep])
        assert torch.equal(layer.bias[keep], before[f"{name}.bias"][keep])
    out = attention.out_proj.weight
    assert torch.all(out[:, rows] == 0)
    assert torch.equal(out[:, :HEAD_DIM], before["out_proj.weight"][:, :HEAD_DIM])
    assert torch.equal(attention.out_proj.bias, before["out_proj.bias"])  # shared: not gated
    # A change to one head's weights moves that head's mask value only.
    unit.hard_mask = None
    soft_before, _ = unit.masks()
    with torch.no_grad():
        attention.out_proj.parametrizations.weight.original[:, 2 * HEAD_DIM : 3 * HEAD_DIM] *= 3
    soft_after, _ = unit.masks()
    changed = (soft_after - soft_before).abs() > 0
    assert changed.tolist() == [False, False, True, False]


@pytest.mark.parametrize(("tying", "n_thresholds"), [("matrix", 4), ("block", 2), ("global", 1)])
def test_tying(tying, n_thresholds):
    gates = attach_structured_gates(tiny(), StructuredGateConfig(tying=tying))
    assert gates.bank.raw.numel() == n_thresholds
    assert len(gates.thresholds()) == 4  # reported per unit, on each unit's group norm


def test_attach_refuses_a_second_time_and_models_without_blocks():
    model = tiny()
    attach_structured_gates(model)
    with pytest.raises(ValueError, match="already attached"):
        attach_structured_gates(model)
    with pytest.raises(ValueError, match="no structured units known for Sequential"):
        attach_structured_gates(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    without_blocks = build_model(12)
    without_blocks.wav2vec2.encoder.layers = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="no transformer blocks"):
        attach_structured_gates(without_blocks)


def test_wavlm_attention_is_refused_clearly():
    from transformers import WavLMConfig, WavLMForCTC

    from pinchgate.families.ctc import TINY_CONFIG

    model = WavLMForCTC(WavLMConfig(**TINY_CONFIG, vocab_size=12))
    with pytest.raises(ValueError, match="per-head parameters"):
        attach_structured_gates(model)


# --- training signals ----------------------------------------------------------------------------


def _train_sparsity(model, target: float, steps: int = 40):
    gates = attach_structured_gates(model)
    controller = SparsityController(target, steps, ramp_fraction=0.3, lr=0.05)
    optimizer = torch.optim.AdamW(
        [
            {"params": gates.weight_parameters(), "lr": 1e-3},
            {"params": gates.threshold_parameters(), "lr": 0.1, "weight_decay": 0.0},
            controller.param_group(),
        ]
    )
    x = audio()
    reference = logits(model, x)
    for step in range(steps):
        optimizer.zero_grad()
        task = (model(x).logits - reference).square().mean()
        kept = gates.kept_fractions()
        (task + controller.loss(kept.soft, step, hard_kept=kept.hard)).backward()
        optimizer.step()
    return gates


def test_thresholds_move_under_the_sparsity_term():
    model = tiny()
    gates = attach_structured_gates(tiny())
    start = gates.thresholds()
    trained = _train_sparsity(model, target=0.6)
    after = trained.thresholds()
    assert all(after[name] > 1.5 * start[name] for name in start)
    assert trained.hard_kept_fraction() < 0.8


def test_controller_and_exact_fit_land_within_one_group():
    gates = _train_sparsity(tiny(), target=0.6)
    half_largest = max(u.group_size for u in gates.units) / 2
    for target in (0.6, 0.3, 0.85):
        gates.fit_thresholds(target)
        kept, total = gates.hard_counts()
        assert abs(kept - (1 - target) * total) <= half_largest, target
    # The learned allocation stays: FFN units and head units are not pruned alike.
    stats = gates.layer_stats()
    assert len({round(s.sparsity, 2) for s in stats}) > 1


def test_fit_on_an_untrained_model_counts_parameters_not_groups():
    gates = attach_structured_gates(tiny())
    gates.fit_thresholds(0.5)
    kept, total = gates.hard_counts()
    by_groups = sum(int(u.hard_groups().sum()) * u.group_size for u in gates.units)
    assert kept == by_groups and abs(kept - total / 2) <= 4 * HEAD_DIM * HIDDEN


def test_frozen_masks_survive_a_checkpoint_restore():
    model = tiny()
    gates = attach_structured_gates(model)
    gates.fit_thresholds(0.5)
    kept, _ = gates.freeze_masks()
    state = model.state_dict()
    fresh = tiny(seed=3)
    attach_structured_gates(fresh)
    fresh.load_state_dict(state)
    restored = structured_gates_of(fresh)
    assert restored.frozen and restored.hard_counts()[0] == kept
    x = audio()
    torch.testing.assert_close(logits(fresh, x), logits(model, x), rtol=0, atol=0)


def test_detach_restores_the_original_model():
    model = tiny()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    structured_gates_of(attach_structured_gates(model).model).detach()
    assert list(model.state_dict()) == list(plain)
    assert all(torch.equal(model.state_dict()[k], plain[k]) for k in plain)


# --- shrinking -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wav2vec2", "stable-layer-norm", "hubert"])
def test_shrunk_model_computes_the_masked_models_outputs(kind):
    model = tiny(kind)
    hardened = prune_by_hand(model)
    x = audio()
    mask = torch.ones(x.shape, dtype=torch.long)
    mask[1, 3000:] = 0  # a padded row
    small = shrink(model)
    for m in (None, mask):
        assert (logits(small, x, m) - logits(model, x, m)).abs().max() < 1e-5
    pruned = hardened.total - hardened.kept
    assert count_parameters(small)["total"] == count_parameters(model)["total"] - pruned
    structure = small.config.pinchgate_structure["layers"]
    for block, layer in zip(encoder_blocks(small), structure, strict=True):
        assert block.feed_forward.intermediate_dense.weight.shape == (
            layer["intermediate_size"],
            HIDDEN,
        )
        assert block.attention.q_proj.weight.shape[0] == HEAD_DIM * len(layer["heads"])
        assert block.attention.num_heads == len(layer["heads"])


def test_ffn_neuron_removal_alone():
    model = tiny()
    gates = attach_structured_gates(model)
    for unit in gates.units:
        unit.hard_mask = torch.ones(unit.n_groups, dtype=torch.bool)
        if unit.kind == "ffn":
            unit.hard_mask[::3] = False
    gates.harden()
    small = shrink(model)
    x = audio()
    assert (logits(small, x) - logits(model, x)).abs().max() < 1e-5
    sizes = [layer["intermediate_size"] for layer in small.config.pinchgate_structure["layers"]]
    assert sizes == [NEURONS - len(range(0, NEURONS, 3))] * 2


def test_blocks_with_no_neurons_or_no_heads_still_work(tmp_path):
    model = tiny()
    gates = attach_structured_gates(model)
    for unit in gates.units:
        unit.hard_mask = torch.ones(unit.n_groups, dtype=torch.bool)
    gates.units[0].hard_mask[:] = False  # block 0: every head
    gates.units[3].hard_mask[:] = False  # block 1: every FFN neuron
    gates.harden()
    small = shrink(model)
    layers = small.config.pinchgate_structure["layers"]
    assert layers[0]["heads"] == [] and layers[1]["intermediate_size"] == 0
    x = audio()
    assert (logits(small, x) - logits(model, x)).abs().max() < 1e-5
    # The empty attention adds out_proj's bias; the empty FFN its output bias.
    hidden = torch.randn(1, 5, HIDDEN)
    attention = small.wav2vec2.encoder.layers[0].attention
    out, _ = attention(hidden)
    torch.testing.assert_close(out, attention.out_proj.bias.expand(1, 5, HIDDEN))
    ff = small.wav2vec2.encoder.layers[1].feed_forward
    torch.testing.assert_close(ff(hidden), ff.output_dense.bias.expand(1, 5, HIDDEN))
    save_shrunk(small, tmp_path / "empty")
    assert (logits(load_shrunk(tmp_path / "empty"), x) - logits(model, x)).abs().max() < 1e-5


def test_shrink_refuses_a_gated_model():
    model = tiny()
    attach_structured_gates(model)
    with pytest.raises(ValueError, match="harden"):
        shrink(model)


def test_export_and_reload_round_trip(tmp_path):
    model = tiny()
    prune_by_hand(model, seed=4)
    small = shrink(model)
    path = save_shrunk(small, tmp_path / "shrunk")
    config = json.loads((path / "config.json").read_text())
    assert config["pinchgate_structure"]["layers"] == small.config.pinchgate_structure["layers"]
    x = audio()
    expected = logits(model, x)
    # pinchgate's general loader (evaluate, training) reads it too, never re-initialising it.
    for loaded in (load_shrunk(path), export.load_any(path), load_ctc_model(path)):
        assert count_parameters(loaded)["total"] == count_parameters(small)["total"]
        assert (logits(loaded, x) - expected).abs().max() < 1e-5
    # Packed (compact) form of the shrunken model reads back through the same structure.
    packing.pack(path, tmp_path / "packed", allow_dense=True)
    assert (logits(packing.load_packed(tmp_path / "packed"), x) - expected).abs().max() < 1e-5
    packing.unpack(tmp_path / "packed", tmp_path / "unpacked")
    assert (logits(export.load_any(tmp_path / "unpacked"), x) - expected).abs().max() < 1e-5
    # Shrinking a shrunken model keeps the original head indices.
    again = shrink(load_shrunk(path))
    assert again.config.pinchgate_structure["layers"] == config["pinchgate_structure"]["layers"]


def test_reload_refuses_mismatched_files(tmp_path):
    model = tiny()
    prune_by_hand(model)
    path = save_shrunk(shrink(model), tmp_path / "shrunk")
    config = json.loads((path / "config.json").read_text())
    config["pinchgate_structure"]["layers"][0]["intermediate_size"] += 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PinchgateError, match="do not match"):
        load_shrunk(path)
    config["pinchgate_structure"]["layers"][0]["intermediate_size"] = NEURONS + 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PinchgateError, match="neurons of"):
        load_shrunk(path)
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(PinchgateError, match="not a shrunken model"):
        load_shrunk(tmp_path / "plain")


def test_cli_shrink_of_a_hardened_directory(tmp_path, tiny_model_dir):
    from pinchgate.families.ctc import load_ctc_model

    model = load_ctc_model(tiny_model_dir)
    prune_by_hand(model)
    model.save_pretrained(tmp_path / "hard")
    for name in ("vocab.json", "preprocessor_config.json"):
        (tmp_path / "hard" / name).write_bytes((tiny_model_dir / name).read_bytes())
    result = CliRunner().invoke(app, ["shrink", str(tmp_path / "hard"), str(tmp_path / "small")])
    assert result.exit_code == 0, result.output
    assert "parameters:" in result.output
    assert (tmp_path / "small" / "vocab.json").is_file()
    x = audio()
    small = export.load_any(tmp_path / "small")
    assert (logits(small, x) - logits(model.eval(), x)).abs().max() < 1e-5


# --- the compression run ---------------------------------------------------------------------


def structured_config(toy_corpus: Path, out: Path, **changes) -> CompressConfig:
    defaults = {
        "max_steps": 20,
        "warmup_steps": 5,
        "log_every": 5,
        "save_every": 10,
        "train_dense_reference": False,
        "granularity": "structured",
        "target_ratio": None,
        "target_sparsity": 0.5,
    }
    return runs.tiny_config(CompressConfig, toy_corpus, out, **{**defaults, **changes})


def test_compress_structured_exports_both_models(toy_corpus, tmp_path):
    run = tmp_path / "run"
    results = run_compress(structured_config(toy_corpus, run))
    report = json.loads((run / "report.json").read_text())
    c = report["compression"]
    assert c["granularity"] == "structured"
    assert abs(c["gated_kept"] - 0.5 * c["gated_params"]) <= c["largest_group_params"] / 2
    assert c["compression_ratio"] == pytest.approx(c["total_params"] / c["kept_params"])
    # The shrunken model, as exported: honest parameter count, its own WER.
    shrunk = c["shrunk"]
    assert shrunk["params"] == c["kept_params"]
    assert "test" in shrunk["eval"] and 0 <= shrunk["eval"]["test"]["wer"]
    small = load_shrunk(run / "model-shrunk")
    assert count_parameters(small)["total"] == c["kept_params"]
    from transformers import AutoModelForCTC

    masked = AutoModelForCTC.from_pretrained(run / "model").eval()  # stock HF, exact zeros
    x = audio()
    assert (logits(small, x) - logits(masked, x)).abs().max() < 1e-5
    assert shrunk["eval"]["test"]["wer"] == pytest.approx(report["sets"]["test"]["wer"])
    check = shrunk["logit_check"]  # measured by the run itself, on its real clips
    assert check["utterances"] > 0 and 0 <= check["max_abs_diff"] < 1e-5
    assert "max |logit difference| against the masked model" in (run / "report.md").read_text()
    for row in c["groups"]:
        assert set(row) == {"layer", "neurons", "neurons_kept", "heads", "heads_kept"}
    kept_by_groups = sum(
        r["neurons_kept"] * (2 * 32 + 1) + len(r["heads_kept"]) * (4 * 16 * 32 + 3 * 16)
        for r in c["groups"]
    )  # the toy model: hidden 32, 2 heads of 16
    assert kept_by_groups == c["gated_kept"]
    saved = json.loads((run / "results.json").read_text())
    assert saved["compression"]["shrunk"]["params"] == c["kept_params"]
    assert "shrunken model" in (run / "report.md").read_text()
    assert results["compression"]["shrunk"]["dir"].endswith("model-shrunk")


def test_kill_and_resume_mid_structured_compression(toy_corpus, tmp_path):
    def command(out: Path) -> list[str]:
        extra = ("--warmup-steps", "5", "--no-train-dense-reference", "--granularity", "structured")
        return runs.cli_command("compress", toy_corpus, out, 24, *extra)

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    runs.run_to_end(command(reference))
    runs.kill_and_resume(command(killed), killed, kill_after_step=12)  # after the ramp
    a = json.loads((reference / "report.json").read_text())["compression"]
    b = json.loads((killed / "report.json").read_text())["compression"]
    assert a["gated_kept"] == b["gated_kept"] and a["groups"] == b["groups"]
    assert a["shrunk"]["params"] == b["shrunk"]["params"]
    runs.assert_same_weights(reference / "model", killed / "model")
    runs.assert_same_weights(reference / "model-shrunk", killed / "model-shrunk")


def _cli_compress(toy_corpus: Path, out: Path, *args: str):
    return CliRunner().invoke(
        app,
        ["compress", "--model", "toy", "--train", str(toy_corpus / "train"),
         "--output-dir", str(out), *args],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--granularity", "neurons"], "--granularity 'neurons': must be weight or structured"),
        (["--granularity", "structured", "--target-ratio", "2.5"], "highest reachable ratio"),
        (["--method", "structured:cost=flops", "--target-sparsity", "0.5"], "no cost known"),
        (["--granularity", "structured", "--method", "ump"], "only with --method gates"),
        (["--granularity", "structured", "--include-pos-conv"], "weight-level option"),
    ],
)
def test_bad_structured_options_are_one_line_before_training(toy_corpus, tmp_path, args, message):
    out = tmp_path / "run"
    result = _cli_compress(toy_corpus, out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if "error" in line] == [
        next(line for line in result.output.splitlines() if message in line)
    ]  # the error is one line
    if "neurons" in message:
        assert result.output.strip().count("\n") == 0  # nothing else printed before it
    assert not (out / "checkpoints").exists()


def test_group_count_arithmetic_matches_the_toy_model():
    """The numbers the toy-run test above relies on (hidden 32, 2 heads, 64 neurons)."""
    model = build_model(12)
    gates = attach_structured_gates(model)
    sizes = sorted({u.group_size for u in gates.units})
    assert sizes == [2 * 32 + 1, 4 * 16 * 32 + 3 * 16]
    total = count_parameters(model)["total"] - 4  # minus the 4 thresholds
    assert math.isclose(total / (total - gates.numel), 1.889, rel_tol=1e-3)
