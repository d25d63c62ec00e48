import math
import re

import pytest
import torch

import runs
from pinchgate.gates import GateConfig, attach_gates, tau_anneal_factor
from pinchgate.sparsity import (
    SparsityController,
    compression_ratio_for_gated_sparsity,
    gated_sparsity_for_ratio,
    max_compression_ratio,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- ratio <-> sparsity -----------------------------------------------------------------------


def test_ratio_and_sparsity_convert_both_ways():
    # P = 100, G = 80, r = 2: keep 50, prune 50, all from the gated 80 -> s = 0.625.
    assert gated_sparsity_for_ratio(2.0, 100, 80) == pytest.approx(0.625)
    assert compression_ratio_for_gated_sparsity(0.625, 100, 80) == pytest.approx(2.0)
    for ratio in (1.1, 2.5, 4.26):
        s = gated_sparsity_for_ratio(ratio, 95_000_000, 85_000_000)
        assert compression_ratio_for_gated_sparsity(s, 95_000_000, 85_000_000) == pytest.approx(
            ratio
        )
    assert compression_ratio_for_gated_sparsity(0.0, 100, 80) == 1.0
    assert max_compression_ratio(100, 80) == pytest.approx(5.0)
    assert max_compression_ratio(100, 100) == math.inf


def test_conversion_errors_name_the_bad_value():
    for bad in (1.0, 0.5, math.inf, math.nan):
        message = f"compression ratio must be a finite number > 1, got {bad}"
        with pytest.raises(ValueError, match=re.escape(message)):
            gated_sparsity_for_ratio(bad, 100, 80)
    # r = 10 needs 90 pruned out of 80 gated: s = 1.125; at most 100 / 20 = 5x.
    with pytest.raises(ValueError) as err:
        gated_sparsity_for_ratio(10.0, 100, 80)
    message = str(err.value)
    assert "ratio 10x needs gated sparsity 1.12" in message
    assert "only 80 of 100 parameters are gated" in message
    assert "highest reachable ratio is 5x" in message
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=re.escape(f"got {bad}")):
            compression_ratio_for_gated_sparsity(bad, 100, 80)
    with pytest.raises(ValueError, match="gated parameter count"):
        gated_sparsity_for_ratio(2.0, 100, 120)


# --- the controller ---------------------------------------------------------------------------


def test_target_ramps_linearly_then_holds():
    controller = SparsityController(0.6, total_steps=100, ramp_fraction=0.2)
    assert controller.target_at(0) == 0.0
    assert controller.target_at(10) == pytest.approx(0.3)
    assert controller.target_at(20) == pytest.approx(0.6)
    assert controller.target_at(99) == pytest.approx(0.6)
    assert SparsityController(0.6, 100, ramp_fraction=0.0).target_at(0) == pytest.approx(0.6)


def test_multipliers_ascend_and_push_sparsity_toward_target():
    controller = SparsityController(0.8, total_steps=10, ramp_fraction=0.0, lr=0.1)
    optimizer = torch.optim.AdamW([controller.param_group()])
    soft_kept = torch.tensor(0.5, requires_grad=True)  # sparsity 0.5: too dense
    for _ in range(3):
        term = controller.loss(soft_kept, step=5)
        optimizer.zero_grad()
        soft_kept.grad = None
        term.backward()
        optimizer.step()
    # Ascent: lambda1 follows the sign of the gap (negative), lambda2 grows.
    assert controller.lambda1.item() < 0
    assert controller.lambda2.item() > 0
    term = controller.loss(soft_kept, step=5)
    term.backward()
    assert soft_kept.grad.item() > 0  # descending on it lowers kept = raises sparsity


def test_hard_fraction_sets_the_gap_but_soft_carries_the_gradient():
    controller = SparsityController(0.5, total_steps=10, ramp_fraction=0.0)
    with torch.no_grad():
        controller.lambda1.fill_(2.0)
        controller.lambda2.fill_(4.0)
    soft = torch.tensor(0.6, requires_grad=True)
    hard = torch.tensor(0.3)
    term = controller.loss(soft, 9, hard_kept=hard)
    gap = (1 - 0.3) - 0.5
    assert term.item() == pytest.approx(2.0 * gap + 4.0 * gap**2)
    term.backward()
    assert soft.grad.item() == pytest.approx(-(2.0 + 2 * 4.0 * gap))


def test_controller_state_dict_round_trip():
    controller = SparsityController(0.7, total_steps=50)
    with torch.no_grad():
        controller.lambda1.fill_(-1.5)
        controller.lambda2.fill_(3.0)
    other = SparsityController(0.7, total_steps=50)
    other.load_state_dict(controller.state_dict())
    assert other.lambda1.item() == -1.5 and other.lambda2.item() == 3.0


def test_penalty_control_keeps_a_fixed_quadratic_weight():
    controller = SparsityController(
        0.8, 10, ramp_fraction=0.0, control="penalty", penalty_weight=5.0
    )
    optimizer = torch.optim.AdamW([controller.param_group()])
    soft_kept = torch.tensor(0.5, requires_grad=True)
    for _ in range(3):
        term = controller.loss(soft_kept, step=5)
        optimizer.zero_grad()
        term.backward()
        optimizer.step()
    assert controller.lambda1.item() == 0.0 and controller.lambda2.item() == 5.0
    soft_kept.grad = None
    term = controller.loss(soft_kept, step=5)
    gap = 0.5 - 0.8
    assert term.item() == pytest.approx(5.0 * gap**2)
    term.backward()
    assert soft_kept.grad.item() == pytest.approx(-2 * 5.0 * gap)  # > 0: pushes kept down
    with pytest.raises(ValueError, match="control"):
        SparsityController(0.5, 10, control="pid")
    with pytest.raises(ValueError, match="penalty weight"):
        SparsityController(0.5, 10, control="penalty", penalty_weight=0.0)


# --- end to end on a toy ----------------------------------------------------------------------


def _compress_toy(target: float, steps: int = 300, seed: int = 0):
    """One-pass compression of a perturbed 'pretrained' MLP on a teacher regression task."""
    torch.manual_seed(seed)
    model, x, y = runs.perturbed_teacher_task()
    with torch.no_grad():
        mse_start = (model(x) - y).pow(2).mean().item()
    gates = attach_gates(model, GateConfig(include=(r"\d+",), tau_rel=0.2))
    controller = SparsityController(target, steps, ramp_fraction=0.3, lr=0.05)
    weights = gates.weight_parameters()
    assert len(weights) == len(list(model.parameters())) - 1
    optimizer = torch.optim.AdamW(
        [
            {"params": weights, "lr": 1e-3},
            {"params": gates.threshold_parameters(), "lr": 0.03, "weight_decay": 0.0},
            controller.param_group(),
        ],
        weight_decay=0.0,
    )
    for step in range(steps):
        gates.set_tau_scale(tau_anneal_factor(step, steps // 2, 9 * steps // 10, 0.1))
        idx = torch.randint(0, 1024, (64,))
        task = (model(x[idx]) - y[idx]).pow(2).mean()
        kept = gates.kept_fractions()
        loss = task + controller.loss(kept.soft, step, hard_kept=kept.hard)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sparsity_learned = 1 - gates.hard_kept_fraction()
    gates.fit_thresholds(target)
    per_layer = [s.sparsity for s in gates.layer_stats()]
    result = gates.harden()
    with torch.no_grad():
        mse_end = (model(x) - y).pow(2).mean().item()
    return sparsity_learned, result, per_layer, mse_start, mse_end


@pytest.mark.parametrize("target", [0.5, 0.75])
def test_controller_then_exact_step_land_on_target_with_mixed_sparsity(target):
    learned, result, per_layer, mse_start, mse_end = _compress_toy(target)
    assert abs(learned - target) < 0.03  # the Lagrangian alone gets close
    assert abs(result.sparsity - target) < 0.005  # the exact step lands within 0.5 pp
    assert max(per_layer) - min(per_layer) > 0.05  # mixed per-layer sparsity was learned
    assert mse_end < mse_start  # and the compressed model still fits the task
