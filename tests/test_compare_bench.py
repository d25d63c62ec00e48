"""benchmarks/compare.py: tabulating finished runs without training (`--report-only`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(run_dir: Path, ratio: float, wer: float, seconds: float) -> None:
    """The parts of a finished run's report.json that the benchmark reads."""
    run_dir.mkdir(parents=True)
    total = 1000
    report = {
        "compression": {
            "compression_ratio": ratio,
            "total_params": total,
            "kept_params": round(total / ratio),
            "gated_sparsity": 1 - 1 / ratio,
        },
        "time": {"compression_seconds": seconds},
        "sets": {"dev": {"wer": wer + 0.01}, "toy:test": {"wer": wer}},
    }
    (run_dir / "report.json").write_text(json.dumps(report))


def test_report_only_tabulates_finished_runs_and_lists_missing(tmp_path):
    compare = _compare_module()
    out = tmp_path / "cmp"
    _fake_run(out / "seed0" / "dense", 1.0, 0.20, 100.0)
    _fake_run(out / "seed0" / "gates-2x", 2.0, 0.25, 110.0)
    argv = ["--out", str(out), "--ratios", "2", "3", "--methods", "gates", "ump"]
    assert compare.main([*argv, "--report-only"]) == 0

    summary = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["target_ratio"]) for r in summary["rows"]] == [
        ("dense", None),
        ("gates", 2.0),
    ]
    assert sorted(Path(m).name for m in summary["missing"]) == ["gates-3x", "ump-2x", "ump-3x"]
    # Nothing was trained: no run directory was made for the missing runs.
    assert not (out / "seed0" / "ump-2x").exists()
    table = (out / "compare.md").read_text()
    # One table per test set (here only toy:test), with its WER, p-values and dev's WER.
    assert table.count("### ") == 1 and "### toy:test" in table
    assert "| gates | 2x | 2.000x | 500 | 25.00% |  | 26.00% |" in table
    assert "not finished yet: ump-2x, gates-3x, ump-3x" in table
    assert (out / "compare.png").stat().st_size > 0


def test_primary_set_skips_dev():
    compare = _compare_module()
    assert compare.primary_set(["dev", "embedded:test", "embedded:test-unseen"]) == "embedded:test"
    assert compare.primary_set(["ls:dev-clean", "ls:test-clean"]) == "ls:test-clean"
    assert compare.primary_set(["ls:dev-clean"]) == "ls:dev-clean"


def test_gates_long_is_the_gates_with_twice_the_steps(tmp_path):
    from pinchgate.config import CompressConfig

    compare = _compare_module()
    base = CompressConfig.toy()
    base.max_steps = 80
    long = compare.run_config(base, tmp_path / "gl", 0, "gates-long", 2.0, tmp_path / "dense")
    gates = compare.run_config(base, tmp_path / "g", 0, "gates", 2.0, tmp_path / "dense")
    assert (long.method, long.max_steps, long.target_ratio) == ("gates", 160, 2.0)
    assert (gates.method, gates.max_steps) == ("gates", 80)
    structured = compare.run_config(base, tmp_path / "s", 0, "structured", 2.0)
    assert structured.method == "structured"
    dense = compare.run_config(base, tmp_path / "d", 0, "dense", None)
    assert dense.target_ratio is None and dense.dense_reference is None
    # Not part of the default set: the default benchmark does not run it.
    assert "gates-long" not in compare.METHODS
