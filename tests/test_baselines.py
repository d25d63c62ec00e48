from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import runs
from pinchgate.cli import app
from pinchgate.compress import run_compress
from pinchgate.config import CompressConfig
from pinchgate.errors import PinchgateError
from pinchgate.methods import GmpOptions, parse_method
from pinchgate.methods.gradual import GmpSchedule, GradualMagnitude, cubic_sparsity
from pinchgate.methods.magnitude import magnitude_masks, top_k_mask, uniform_kept_counts
from pinchgate.methods.soft_threshold import SoftThreshold, soft_threshold

pytestmark = pytest.mark.usefixtures("one_thread")
GATED = ("encoder.layers.", "feature_projection.projection")


def tiny(toy_corpus: Path, out: Path, method: str, **changes) -> CompressConfig:
    defaults = {
        "method": method,
        "max_steps": 8,
        "warmup_steps": 2,
        "log_every": 1,
        "save_every": 100,
        "train_dense_reference": False,
        "target_ratio": None,
        "target_sparsity": 0.5,
    }
    return runs.tiny_config(CompressConfig, toy_corpus, out, **{**defaults, **changes})


def gated_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in state.items()
        if k.endswith(".weight") and any(g in k for g in GATED) and "norm" not in k
    }


def exported(run: Path) -> dict[str, torch.Tensor]:
    """The run's model read by stock transformers; checks nothing of ours is left in it."""
    from transformers import AutoModelForCTC

    from pinchgate.families.ctc import build_model

    model = AutoModelForCTC.from_pretrained(run / "model")
    state = model.state_dict()
    assert set(state) == set(build_model(model.config.vocab_size).state_dict())
    return state


def check_exact(results: dict, run: Path) -> dict[str, torch.Tensor]:
    """The target count is hit exactly and the export holds exactly that many zeros."""
    c = results["compression"]
    assert c["gated_kept"] == c["target_gated_kept"] == round(0.5 * c["gated_params"])
    assert c["kept_params"] == c["total_params"] - (c["gated_params"] - c["gated_kept"])
    state = gated_weights(exported(run))
    pruned = c["gated_params"] - c["gated_kept"]
    assert sum(int((w == 0).sum()) for w in state.values()) == pruned
    layers = json.loads((run / "report.json").read_text())
    assert layers["method"] == c["method"]
    rows = (run / "layers.csv").read_text().splitlines()[1:]
    assert sum(int(r.split(",")[2]) for r in rows) == c["gated_kept"]
    return state


# --- pieces ---------------------------------------------------------------------------------
def test_uniform_counts_are_exact_and_proportional():
    numels = [1024, 1024, 2048, 3000, 7]
    for kept in (0, 1, 3550, 7103 // 3, sum(numels)):
        counts = uniform_kept_counts(kept, numels)
        assert sum(counts) == kept
        for n, k in zip(numels, counts, strict=True):
            assert abs(k - kept * n / sum(numels)) < 1


def test_magnitude_masks_uniform_and_global():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(40, 30, generator=gen) * s for s in (0.5, 1.0, 2.0)]
    kept = 1500
    masks, thresholds = magnitude_masks([w.abs() for w in weights], kept, "uniform")
    assert sum(int(m.sum()) for m in masks) == kept
    assert {int(m.sum()) for m in masks} == {500}  # same sparsity in every layer
    for w, m, t in zip(weights, masks, thresholds, strict=True):
        assert w.abs()[m].min() >= w.abs()[~m].max() == t
    masks, _ = magnitude_masks([w.abs() for w in weights], kept, "global")
    assert sum(int(m.sum()) for m in masks) == kept
    kept_min = min(float(w.abs()[m].min()) for w, m in zip(weights, masks, strict=True))
    pruned_max = max(float(w.abs()[~m].max()) for w, m in zip(weights, masks, strict=True))
    assert kept_min >= pruned_max  # one threshold across layers
    assert int(masks[0].sum()) < int(masks[2].sum())  # so the small layer loses more
    assert int(top_k_mask(torch.zeros(10), 4).sum()) == 4  # ties at the cut: still exactly k


def test_cubic_schedule():
    assert cubic_sparsity(5, 0.8, 10, 50) == 0.0  # dense before the start
    assert cubic_sparsity(10, 0.8, 10, 50, initial=0.1) == pytest.approx(0.1)
    assert cubic_sparsity(30, 0.8, 10, 50) == pytest.approx(0.8 - 0.8 * 0.5**3)
    assert cubic_sparsity(50, 0.8, 10, 50) == cubic_sparsity(99, 0.8, 10, 50) == 0.8
    values = [cubic_sparsity(t, 0.8, 10, 50) for t in range(10, 51)]
    assert values == sorted(values)
    schedule = GmpSchedule.for_run(GmpOptions(start=0.1, end=0.7, every=7), 100)
    assert (schedule.start_step, schedule.end_step, schedule.every) == (10, 66, 7)
    assert [t for t in range(101) if schedule.prunes_at(t)] == list(range(10, 67, 7))


def test_gmp_mask_at_a_mid_step(toy_corpus, tmp_path):
    from pinchgate.families.ctc import build_model

    cfg = tiny(toy_corpus, tmp_path, "gmp", max_steps=20)
    options = GmpOptions(start=0.1, end=0.5, every=2)
    model = build_model(12)
    method = GradualMagnitude(cfg, tmp_path, options)
    method.attach(model)
    assert (method.schedule.start_step, method.schedule.end_step) == (2, 10)
    for step in range(1, 7):
        logs = method.after_step(model, step)
    gated = method.target.gated_params
    expected = round((1 - cubic_sparsity(6, 0.5, 2, 10)) * gated)
    masks = [layer.module.parametrizations.weight[-1].mask for layer in method.layers]
    assert sum(int(m.sum()) for m in masks) == expected
    assert logs["hard_sparsity"] == pytest.approx(1 - expected / gated)
    for layer, mask in zip(method.layers, masks, strict=True):
        assert abs(int(mask.sum()) - expected * layer.numel / gated) < 1  # uniform
        assert (layer.module.parametrizations.weight.original[~mask] == 0).all()
    for step in range(7, 21):
        method.after_step(model, step)
    assert sum(int(m.sum()) for m in masks) == method.target.kept  # exact after the end


def test_soft_threshold_math_and_gradient():
    w = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5], requires_grad=True)
    t = torch.tensor(0.4, requires_grad=True)
    out = soft_threshold(w, t)
    assert out.tolist() == pytest.approx([-1.6, -0.1, 0.0, 0.0, 1.1])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out.backward(g)
    alive = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    assert w.grad.tolist() == pytest.approx((g * alive).tolist())  # pruned: no gradient
    assert t.grad.item() == pytest.approx(-(torch.sign(w) * g * alive).sum().item())
    # The parametrization: threshold = sigmoid(s) * 4 * RMS, so dL/ds = dL/dt * t' (s).
    p = SoftThreshold(rms=0.5, s_init=-1.0)
    threshold = torch.sigmoid(torch.tensor(-1.0)) * 2.0
    assert p.threshold().item() == pytest.approx(threshold.item())
    p(w.detach()).backward(g)
    sig = torch.sigmoid(torch.tensor(-1.0))
    alive = (w.detach().abs() > threshold).float()
    d_t = -(torch.sign(w.detach()) * g * alive).sum()
    assert p.s.grad.item() == pytest.approx((d_t * sig * (1 - sig) * 2.0).item(), rel=1e-5)


def test_method_options_parse_and_bad_values():
    name, options = parse_method("gmp:start=0.2,end=0.8,every=5,allocation=global", 100)
    assert name == "gmp" and options == GmpOptions(0.2, 0.8, 5, 0.0, "global")
    assert parse_method("str:init=-3,decay=0.5", 100)[1].init == -3.0
    bad = {
        "pinch": "unknown method",
        "ump:every=3": "ump takes no options",
        "gmp:speed=2": "bad option 'speed=2'",
        "gmp:every=two": "every='two' is not int",
        "gmp:start=0.8,end=0.5": "need 0 <= start < end <= 1",
        "gmp:start=0.5,end=0.6,every=20": "no pruning event fits",
        "parp:allocation=random": "allocation must be uniform or global",
    }
    for spec, message in bad.items():
        with pytest.raises(PinchgateError, match=message):
            parse_method(spec, 100)


@pytest.mark.parametrize(
    ("method", "message"),
    [("nope", "--method 'nope': unknown method"), ("gmp:start=2", "need 0 <= start")],
)
def test_bad_method_is_one_line_before_training(toy_corpus, tmp_path, method, message):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["compress", "--model", "toy", "--train", str(toy_corpus / "train"),
         "--output-dir", str(out), "--method", method],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


# --- whole runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_run(toy_corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dense") / "run"
    results = run_compress(tiny(toy_corpus, out, "dense"))
    return out, results


def test_dense_reports_ratio_one(dense_run):
    run, results = dense_run
    c = results["compression"]
    assert c["compression_ratio"] == 1 and c["gated_kept"] == c["gated_params"] == 17408
    report = json.loads((run / "report.json").read_text())
    assert [p["name"] for p in report["time"]["passes"]] == ["dense fine-tuning"]
    assert "| method | dense |" in (run / "report.md").read_text()


def dense_weights(dense_run) -> dict[str, torch.Tensor]:
    return gated_weights(exported(dense_run[0]))


@pytest.mark.parametrize("method", ["ump", "gmp-global"])
def test_one_shot_magnitude_from_a_given_dense_run(toy_corpus, tmp_path, dense_run, method):
    cfg = tiny(toy_corpus, tmp_path / "run", method, dense_reference=str(dense_run[0]))
    results = run_compress(cfg)
    state = check_exact(results, tmp_path / "run")
    # The mask was cut on the dense model's |W| and fixed: compare with those weights.
    before = dense_weights(dense_run)
    masks = {k: state[k] != 0 for k in state}
    if method == "ump":
        gated, kept = results["compression"]["gated_params"], results["compression"]["gated_kept"]
        for k, mask in masks.items():
            assert abs(int(mask.sum()) - kept * mask.numel() / gated) < 1  # same proportion
            assert before[k].abs()[mask].min() >= before[k].abs()[~mask].max()
    else:
        kept_min = min(float(before[k].abs()[m].min()) for k, m in masks.items())
        pruned_max = max(float(before[k].abs()[~m].max()) for k, m in masks.items())
        assert kept_min >= pruned_max  # one threshold across all matrices
        assert len({round(float((~m).float().mean()), 3) for m in masks.values()}) > 1
    report = results["report"]
    passes = report["time"]["passes"]
    assert [p["given"] for p in passes[:1]] == [True] and len(passes) == 2
    assert passes[0]["train_seconds"] == dense_run[1]["train_seconds"]  # counted, not redone
    assert report["time"]["compression_seconds"] == pytest.approx(sum(p["seconds"] for p in passes))
    assert "dense_wer" in report["sets"]["test"]  # the dense pass is the reference


def test_gmp_reaches_the_target_on_its_schedule(toy_corpus, tmp_path):
    cfg = tiny(toy_corpus, tmp_path, "gmp:start=0.2,end=0.6,every=2", max_steps=10)
    results = run_compress(cfg)
    check_exact(results, tmp_path)
    rows = {r["step"]: r for r in runs.read_jsonl(tmp_path / "metrics.jsonl")}
    gated = results["compression"]["gated_params"]
    for step in (1, 2, 3, 4, 5, 6, 10):
        kept = round((1 - cubic_sparsity(step, 0.5, 2, 6)) * gated)
        if step < 2:
            kept = gated
        if step in (3, 5):  # between events: the last event's mask
            kept = round((1 - cubic_sparsity(step - 1, 0.5, 2, 6)) * gated)
        assert rows[step]["hard_sparsity"] == pytest.approx(1 - kept / gated), step


def test_parp_weights_revive_before_the_reprune(toy_corpus, tmp_path, dense_run):
    cfg = tiny(toy_corpus, tmp_path, "parp:every=4", dense_reference=str(dense_run[0]))
    results = run_compress(cfg)
    check_exact(results, tmp_path)
    rows = {r["step"]: r for r in runs.read_jsonl(tmp_path / "metrics.jsonl")}
    assert rows[3]["revived"] > 0  # pruned at the start, nonzero again before step 4
    assert rows[4]["repruned_at"] == 4


def test_str_lands_exactly_after_its_own_sparsity(toy_corpus, tmp_path):
    cfg = tiny(toy_corpus, tmp_path, "str", max_steps=10, frozen_fraction=0.2)
    results = run_compress(cfg)
    check_exact(results, tmp_path)
    c = results["compression"]
    assert c["frozen_at"] == 8 and c["final_fit_factor"] > 0
    rows = {r["step"]: r for r in runs.read_jsonl(tmp_path / "metrics.jsonl")}
    assert rows[8]["sparsity_before_fit"] == c["sparsity_before_fit"]
    assert 0 < rows[7]["str_sparsity"] < 1  # STR's own, before the exact step


def test_two_passes_run_once_and_rerun_resumes(toy_corpus, tmp_path):
    cfg = tiny(toy_corpus, tmp_path / "run", "ump", max_steps=4)
    first = run_compress(cfg)
    dense_results = tmp_path / "run" / "dense" / "results.json"
    stamp = dense_results.stat().st_mtime_ns
    second = run_compress(tiny(toy_corpus, tmp_path / "run", "ump", max_steps=4))
    assert dense_results.stat().st_mtime_ns == stamp  # the finished pass 1 is not redone
    a, b = first["report"], second["report"]
    assert a["compression"]["gated_kept"] == b["compression"]["gated_kept"]
    assert a["time"]["passes"][0]["seconds"] == b["time"]["passes"][0]["seconds"]
    assert len(runs.read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 4  # resumed at its end


@pytest.mark.parametrize(("method", "resume_at"), [("gmp:start=0.2,end=0.6,every=2", 4),
                                                    ("str", 8)])  # fmt: skip
def test_interrupted_run_resumes_to_the_same_model(toy_corpus, tmp_path, method, resume_at):
    changes = {"max_steps": 10, "save_every": 2, "keep_checkpoints": 10, "frozen_fraction": 0.2}
    cut, whole = tmp_path / "run", tmp_path / "uninterrupted"
    run_compress(tiny(toy_corpus, cut, method, **changes))
    shutil.copytree(cut, whole)
    # Now as if killed after its checkpoint at `resume_at`: later checkpoints, results gone.
    for path in (cut / "checkpoints").glob("step-*"):
        if int(path.name.split("-")[1]) > resume_at:
            shutil.rmtree(path)
    (cut / "checkpoints" / "latest").write_text(f"step-{resume_at:07d}\n")
    for name in ("results.json", "report.json", "metrics.jsonl"):
        (cut / name).unlink()
    shutil.rmtree(cut / "model")
    results = run_compress(tiny(toy_corpus, cut, method, **changes))
    assert results["steps"] == 10
    assert len(runs.read_jsonl(cut / "metrics.jsonl")) == 10 - resume_at
    runs.assert_same_weights(whole / "model", cut / "model")


def test_old_names_still_work_and_say_so(capsys):
    from pinchgate.compress import check_config

    assert parse_method("gmp-global", 100)[0] == "global-magnitude"
    cfg = CompressConfig.toy()
    cfg.method = "gmp-global"
    assert check_config(cfg)[0] == "global-magnitude" and cfg.method == "global-magnitude"
    assert "deprecated" in capsys.readouterr().err
    cfg = CompressConfig.toy()
    cfg.granularity = "structured"
    assert check_config(cfg)[0] == "structured"
    assert (cfg.method, cfg.granularity) == ("structured", "weight")
