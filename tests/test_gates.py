import copy
import io

import pytest
import torch
from torch import nn

import pinchgate.gates as gates_module
from pinchgate.gates import (
    GateConfig,
    attach_gates,
    detach_gates,
    gates_of,
    harden,
    pinch,
    set_tau_scale,
    tau_anneal_factor,
)

TOY = GateConfig(include=(r"\d+",))


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    )


def tiny_w2v2(seed: int = 0):
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(seed)
    cfg = Wav2Vec2Config(
        vocab_size=12,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    )
    return Wav2Vec2ForCTC(cfg)


def state_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- the gate itself ----------------------------------------------------------------------


def test_gate_matches_formula():
    torch.manual_seed(0)
    w = torch.randn(6, 7)
    t = torch.tensor(0.6)
    tau = 0.05
    out, soft, hard = pinch(w, t, tau)
    mask = torch.sigmoid((w**2 - t**2) / (2 * tau))
    torch.testing.assert_close(out, w * mask)
    torch.testing.assert_close(soft, mask.sum())
    assert int(hard) == int((w.abs() > t).sum())


def test_gate_gradients_match_formula():
    torch.manual_seed(0)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    both = torch.autograd.gradcheck(lambda w, t: pinch(w, t, 0.3)[:2], (w, t))
    out_only = torch.autograd.gradcheck(lambda w, t: pinch(w, t, 0.3)[0], (w, t))
    soft_only = torch.autograd.gradcheck(lambda w, t: pinch(w, t, 0.3)[1], (w, t))
    assert both and out_only and soft_only


def test_well_above_threshold_pass_unchanged_as_tau_goes_to_zero():
    model = toy_mlp()
    gates = attach_gates(model, TOY)
    set_tau_scale(model, 1e-6)
    layer = gates.layers[1]
    with torch.no_grad():
        w = layer.pre_gate_weight().clone()
        t = float(layer.gate.threshold())
        effective = layer.module.weight
    well_above = w.abs() > 1.5 * t
    well_below = w.abs() < 0.5 * t
    assert well_above.any() and well_below.any()
    assert torch.equal(effective[well_above], w[well_above])
    assert torch.all(effective[well_below] == 0)


def test_gradients_reach_thresholds_and_move_them_under_the_sparsity_term():
    model = toy_mlp()
    gates = attach_gates(model, TOY)
    before = gates.bank.thresholds().detach().clone()
    sparsity_before = 1 - gates.hard_kept_fraction()
    opt = torch.optim.Adam(gates.threshold_parameters(), lr=0.05)
    for _ in range(20):
        model(torch.randn(4, 8))
        loss = gates.soft_kept_fraction()  # a pure "prune more" pressure
        opt.zero_grad()
        loss.backward()
        assert torch.all(gates.bank.raw.grad != 0)
        opt.step()
    after = gates.bank.thresholds().detach()
    assert torch.all(after > before)
    assert 1 - gates.hard_kept_fraction() > sparsity_before + 0.1


def test_soft_kept_fraction_reuses_the_forward_and_notices_updates(monkeypatch):
    model = toy_mlp()
    gates = attach_gates(model, TOY)
    calls = []
    original_apply = gates_module._PinchFunction.apply
    monkeypatch.setattr(
        gates_module._PinchFunction, "apply", lambda *a: calls.append(1) or original_apply(*a)
    )
    model(torch.randn(3, 8))
    assert len(calls) == 3
    cached = gates.soft_kept_fraction()
    assert len(calls) == 3  # no mask was computed a second time
    with torch.no_grad():
        masks = [
            torch.sigmoid(
                (layer.pre_gate_weight() ** 2 - layer.gate.threshold() ** 2) / (2 * layer.gate.tau)
            )
            for layer in gates.layers
        ]
        fresh = sum(m.sum() for m in masks) / gates.numel
    torch.testing.assert_close(cached.detach(), fresh)
    with torch.no_grad():  # an optimiser step changes the weights in place
        gates.layers[0].module.parametrizations.weight.original.mul_(3.0)
    updated = gates.soft_kept_fraction()
    assert len(calls) == 4  # only the updated layer is recomputed
    assert updated.item() > cached.item()  # larger weights: more kept
    assert updated.requires_grad


# --- attaching ------------------------------------------------------------------------------


def test_attach_then_detach_leaves_model_identical():
    model = tiny_w2v2()
    before = copy.deepcopy(model.state_dict())
    classes = {n: type(m) for n, m in model.named_modules()}
    gates = attach_gates(model, GateConfig(extras=("pos_conv", "feature_encoder")))
    out = model(torch.randn(1, 400), labels=torch.randint(1, 12, (1, 4)))
    (out.loss + gates.soft_kept_fraction()).backward()
    detach_gates(model)
    assert state_equal(model.state_dict(), before)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    # The weight-normed positional convolution keeps its own parametrization.
    conv = model.wav2vec2.encoder.pos_conv_embed.conv
    assert len(conv.parametrizations.weight) == 1


def test_hf_default_targets_and_forward_backward():
    model = tiny_w2v2()
    gates = attach_gates(model)
    expected = ["wav2vec2.feature_projection.projection"] + [
        f"wav2vec2.encoder.layers.{i}.{part}"
        for i in range(2)
        for part in (
            "attention.k_proj",
            "attention.v_proj",
            "attention.q_proj",
            "attention.out_proj",
            "feed_forward.intermediate_dense",
            "feed_forward.output_dense",
        )
    ]
    assert sorted(layer.name for layer in gates.layers) == sorted(expected)
    assert not any("lm_head" in layer.name for layer in gates.layers)
    assert gates.numel == sum(dict(model.named_modules())[n].weight.numel() for n in expected)
    model.train()
    out = model(torch.randn(2, 400), labels=torch.randint(1, 12, (2, 4)))
    kept = gates.kept_fractions()
    assert 0 < kept.hard.item() < 1
    (out.loss + kept.soft).backward()
    assert torch.isfinite(out.loss)
    assert torch.all(torch.isfinite(gates.bank.raw.grad)) and torch.any(gates.bank.raw.grad != 0)
    q = model.wav2vec2.encoder.layers[0].attention.q_proj.parametrizations.weight.original
    assert q.grad is not None and torch.any(q.grad != 0)


@pytest.mark.parametrize(
    ("tying", "pos_conv", "expected"),
    [("matrix", False, 13), ("block", False, 3), ("global", False, 1), ("block", True, 4)],
)
def test_tying_modes_give_expected_threshold_counts(tying, pos_conv, expected):
    model = tiny_w2v2()
    gates = attach_gates(model, GateConfig(tying=tying, extras=("pos_conv",) if pos_conv else ()))
    assert gates.bank.raw.numel() == expected
    assert len(gates.threshold_parameters()) == 1
    if tying == "block":
        names = gates.bank.group_names
        assert "wav2vec2.encoder.layers.0" in names and "wav2vec2.encoder.layers.1" in names
        by_layer = {layer.name: layer.gate.index for layer in gates.layers}
        block0 = {i for n, i in by_layer.items() if ".layers.0." in n}
        assert len(block0) == 1  # all six matrices of block 0 share one threshold


def test_no_gateable_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="Sequential: .* give include patterns"):
        attach_gates(toy_mlp())  # a plain module has no family, so no default targets
    with pytest.raises(ValueError, match="patterns"):
        attach_gates(toy_mlp(), GateConfig(include=(r"encoder\..*",)))


def test_excluded_and_already_gated():
    model = toy_mlp()
    gates = attach_gates(model, GateConfig(include=(r"\d+",), exclude=(r"4",)))
    assert [layer.name for layer in gates.layers] == ["0", "2"]
    with pytest.raises(ValueError, match="already attached"):
        attach_gates(model, TOY)


def test_config_rejects_zero_threshold_start():
    with pytest.raises(ValueError, match="threshold_init_rel"):
        GateConfig(threshold_init_rel=0.0)


# --- calibration, freezing, hardening -------------------------------------------------------


def test_fit_thresholds_hits_target_and_keeps_allocation():
    model = toy_mlp()
    gates = attach_gates(model, TOY)
    with torch.no_grad():
        gates.bank.raw.copy_(torch.tensor([0.4, 1.2, 0.8]))
    ratio_before = gates.bank.thresholds() / gates.bank.thresholds()[0]
    gates.fit_thresholds(0.6)
    kept, total = gates.hard_counts()
    assert abs(kept - round(0.4 * total)) <= 1
    torch.testing.assert_close(gates.bank.thresholds() / gates.bank.thresholds()[0], ratio_before)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_frozen_masks_keep_the_exact_count_despite_tied_magnitudes(sparsity):
    model = toy_mlp()
    with torch.no_grad():  # magnitudes from 4 values: no threshold can split the ties
        for layer in (model[0], model[2], model[4]):
            layer.weight.copy_(torch.randint(1, 5, layer.weight.shape) * 0.1)
    gates = attach_gates(model, TOY)
    target = gates.target_kept(sparsity)
    gates.fit_thresholds(sparsity)
    assert gates.hard_counts()[0] != target  # the ties defeat the threshold alone
    with torch.no_grad():
        ratios = [layer.pre_gate_weight().abs() / layer.gate.threshold() for layer in gates.layers]
    kept, total = gates.freeze_masks(target)
    assert kept == target and gates.hard_counts()[0] == target
    # Only boundary entries moved: every kept |W| / t is >= every pruned one, per layer.
    for layer, ratio in zip(gates.layers, ratios, strict=True):
        mask = layer.hard_mask()
        if mask.any() and (~mask).any():
            assert ratio[mask].min() >= ratio[~mask].max() - 1e-6
    result = harden(model)
    assert result.kept == target


def test_harden_gives_exact_zeros_and_true_counts():
    model = tiny_w2v2()
    gates = attach_gates(model, GateConfig(extras=("pos_conv",)))
    gates.scale_thresholds(3.0)
    expected_kept, total = gates.hard_counts()
    names = [layer.name for layer in gates.layers]
    result = harden(model)
    modules = dict(model.named_modules())
    zeros = sum(int((modules[n].weight == 0).sum()) for n in names)
    assert result.total == total
    assert result.kept == expected_kept
    assert zeros == total - result.kept
    assert 0 < result.kept < total
    for stats in result.layers:
        assert int((modules[stats.name].weight != 0).sum()) == stats.kept
    assert not any(k for k in model.state_dict() if "tau_base" in k or "thresholds" in k)
    assert type(modules["wav2vec2.encoder.layers.0.attention.q_proj"]) is nn.Linear


def test_freeze_then_harden_keeps_pruned_weights_at_zero():
    model = toy_mlp()
    gates = attach_gates(model, TOY)
    gates.fit_thresholds(0.5)
    kept, total = gates.freeze_masks()
    masks = [layer.hard_mask() for layer in gates.layers]
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    start = [layer.pre_gate_weight().detach().clone() for layer in gates.layers]
    for _ in range(5):
        loss = model(torch.randn(8, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer, mask, w0 in zip(gates.layers, masks, start, strict=True):
        effective = layer.module.weight.detach()
        assert torch.all(effective[~mask] == 0)
        assert not torch.equal(effective[mask], w0[mask])  # kept weights still train
    with torch.no_grad():
        x = torch.randn(4, 8)
        frozen_out = model(x)
    result = harden(gates)
    assert (result.kept, result.total) == (kept, total)
    with torch.no_grad():
        assert torch.equal(model(x), frozen_out)


def test_state_dict_round_trip_of_a_gated_model():
    cfg = GateConfig(extras=("pos_conv",), tying="block")
    model = tiny_w2v2(seed=0)
    gates = attach_gates(model, cfg)
    gates.scale_thresholds(2.0)
    set_tau_scale(gates, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(torch.randn(1, 400), labels=torch.randint(1, 12, (1, 4)))
    (out.loss + gates.soft_kept_fraction()).backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)

    restored = tiny_w2v2(seed=1)
    restored_gates = attach_gates(restored, cfg)
    restored.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(restored_gates.bank.thresholds(), gates.bank.thresholds())
    assert [layer.gate.tau for layer in restored_gates.layers] == [
        layer.gate.tau for layer in gates.layers
    ]
    model.eval()
    restored.eval()
    x = torch.randn(2, 400)
    with torch.no_grad():
        assert torch.equal(model(x).logits, restored(x).logits)
    assert gates.hard_counts() == restored_gates.hard_counts()

    # A checkpoint from the frozen stretch carries its masks into a fresh, unfrozen model.
    gates.freeze_masks()
    again = tiny_w2v2(seed=2)
    again_gates = attach_gates(again, cfg)
    again.load_state_dict(copy.deepcopy(model.state_dict()))
    assert gates_of(again).frozen and again_gates.hard_counts() == gates.hard_counts()


def test_hook_based_weight_norm_is_skipped_with_a_warning():
    model = toy_mlp()
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(model[2])
    with pytest.warns(UserWarning, match="hook-based weight_norm"):
        gates = attach_gates(model, TOY)
    assert [layer.name for layer in gates.layers] == ["0", "4"]


def test_tau_anneal_factor_is_geometric():
    assert tau_anneal_factor(0, 10, 20, 0.01) == 1.0
    assert tau_anneal_factor(15, 10, 20, 0.01) == pytest.approx(0.1)
    assert tau_anneal_factor(20, 10, 20, 0.01) == pytest.approx(0.01)
    assert tau_anneal_factor(99, 10, 20, 0.01) == pytest.approx(0.01)


def test_deepcopy_after_a_forward_gives_an_independent_gated_copy():
    model = toy_mlp()
    gates = attach_gates(model, TOY)
    x = torch.randn(3, 8)
    model(x)  # leaves autograd graphs in the gates' caches
    clone = copy.deepcopy(model)
    clone_gates = gates_of(clone)
    assert clone_gates.bank is not gates.bank
    assert all(layer.gate.bank is clone_gates.bank for layer in clone_gates.layers)
    clone_gates.scale_thresholds(2.0)
    with torch.no_grad():
        assert not torch.equal(clone(x), model(x))
    assert gates.bank.thresholds()[0] < clone_gates.bank.thresholds()[0]
