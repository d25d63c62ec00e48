"""Compare the gates with the baselines at several compression ratios, on equal terms.

    python benchmarks/compare.py [--out runs/compare] [--ratios 2 2.86 4.26 6]
                                 [--methods gates ump global-magnitude gmp parp str structured
                                            gates-long]
                                 [--seeds 0]
                                 [--config recipe.yaml] [--quick] [--report-only]

Every method starts from the same model and corpus (the embedded default unless --config
names a `pinchgate compress` YAML), with the same step budget per pass, the same seed and
the same gated weights. One dense fine-tuning run per seed is the reference accuracy and the
first pass of the two-pass methods (ump, global-magnitude, parp): it is trained once and its
training time is counted in each of their totals. `structured` (structured gates) is scored
(WER and speed) as the shrunken model it exports.
`gates-long` (only when named in --methods) is the gates with twice the steps in their one
pass: the training budget of a two-pass method, to compare at equal compute.
Writes to --out:

    compare.json   every run's ratio, parameters, WER per test set, MAPSSWE p against dense
                   and against the gates, decoding real-time factor of the exported model
                   per set (from the run's own evaluation), total compression time
    compare.md     the table (mean and spread over seeds when there are several)
    compare.png    WER on the first test set against parameters kept and against the
                   real-time factor, one line per method

Finished runs are not redone: rerunning the command (after a kill, or with more ratios,
methods or seeds) only runs what is missing. `--quick` is the tiny built-in toy case, two
ratios and a few dozen steps: the whole benchmark in a few minutes on 2 CPU cores.
`--report-only` trains nothing: it tabulates the runs that have finished and lists the
missing ones (in compare.md and compare.json), to read a long benchmark while it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

DEFAULT_RATIOS = (2.0, 2.86, 4.26, 6.0)
METHODS = ("gates", "ump", "global-magnitude", "gmp", "parp", "str", "structured")
# Asked for by name only: the gates given the step budget of a two-pass method (twice the
# steps in one pass), to compare at equal training compute rather than equal steps per pass.
EXTRA_METHODS = ("gates-long",)
# `structured` removes FFN neurons and heads; its accuracy and real-time factor are those of
# the shrunken model it exports.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--ratios", type=float, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--config", type=Path, default=None, help="compress YAML to start from")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per pass")
    parser.add_argument("--quick", action="store_true", help="tiny toy setting, a few minutes")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate finished runs, list missing ones",
    )
    args = parser.parse_args(argv)

    import transformers

    transformers.utils.logging.set_verbosity_error()
    from pinchgate.compress import CompressConfig
    from pinchgate.errors import PinchgateError

    if args.quick:
        base = CompressConfig.toy()
        base.max_steps, base.warmup_steps, base.eval_every = 80, 10, 0
        base.save_every, base.log_every = 40, 20
        ratios = args.ratios or [1.3, 1.6]
    else:
        base = CompressConfig.load(args.config) if args.config else CompressConfig.embedded()
        ratios = args.ratios or list(DEFAULT_RATIOS)
    if args.max_steps is not None:
        base.max_steps = args.max_steps
    base.train_dense_reference = False
    base.zero_shot = False  # the same for every method: the main command scores it once
    unknown = sorted(set(args.methods) - set(METHODS) - set(EXTRA_METHODS))
    if unknown:
        choices = ", ".join(METHODS + EXTRA_METHODS)
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {choices}")

    rows, missing = [], []
    for seed in args.seeds:
        seed_dir = args.out / f"seed{seed}"
        dense_dir = seed_dir / "dense"
        runs = [(dense_dir, "dense", None)] + [
            (seed_dir / f"{method}-{ratio:g}x", method, ratio)
            for ratio in ratios
            for method in args.methods
        ]
        for run_dir, method, ratio in runs:
            if args.report_only and not (run_dir / "report.json").is_file():
                missing.append(str(run_dir))
                continue
            try:
                row = run_one(
                    base,
                    run_dir,
                    seed=seed,
                    method=method,
                    target_ratio=ratio,
                    dense_dir=None if method == "dense" else dense_dir,
                )
            except PinchgateError as exc:
                if method == "dense":
                    print(f"dense run: {exc}", file=sys.stderr)
                    return 1
                print(f"{method} at {ratio:g}x: {exc}", file=sys.stderr)
                continue
            rows.append(row)
    add_gate_comparisons(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"command": " ".join(["python benchmarks/compare.py", *(argv or sys.argv[1:])])}
    summary["rows"] = rows
    summary["missing"] = missing
    (args.out / "compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = render_table(rows)
    if missing:
        table += "\n\nnot finished yet: " + ", ".join(Path(m).name for m in missing)
        print(f"{len(missing)} runs not finished yet", file=sys.stderr)
    (args.out / "compare.md").write_text(table + "\n")
    plot(rows, args.out / "compare.png")
    print(table)
    print(f"\nwrote {args.out / 'compare.md'}, compare.json, compare.png")
    return 0


def run_one(base, run_dir: Path, seed: int, method: str, target_ratio, dense_dir=None) -> dict:
    """One run, or its saved result when it has finished before."""
    from pinchgate.compress import run_compress

    report_path = run_dir / "report.json"
    if not report_path.is_file():
        cfg = run_config(base, run_dir, seed, method, target_ratio, dense_dir)
        started = time.perf_counter()
        run_compress(cfg)
        print(f"{run_dir}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    report = json.loads(report_path.read_text())
    compression = report["compression"]
    # The real-time factor of decoding each set with the model as exported (the shrunken one
    # for structured runs), measured by the run's own evaluation.
    exported = (compression.get("shrunk") or {}).get("eval")
    if exported is None:
        results_path = run_dir / "results.json"
        exported = (
            json.loads(results_path.read_text()).get("eval", {}) if results_path.is_file() else {}
        )
    return {
        "seed": seed,
        "method": method,
        "target_ratio": target_ratio,
        "ratio": compression["compression_ratio"],
        "total_params": compression["total_params"],
        "kept_params": compression["kept_params"],
        "gated_sparsity": compression["gated_sparsity"],
        "seconds": report["time"]["compression_seconds"],
        "passes": report["time"].get("passes"),
        "sets": {
            name: {
                "wer": s["wer"],
                "p_vs_dense": (s.get("significance") or {}).get("p_value"),
                "better_than_dense": _better(s.get("significance")),
                "rtf": (exported.get(name) or {}).get("rtf"),
            }
            for name, s in report["sets"].items()
        },
        "run_dir": str(run_dir),
    }


def run_config(base, run_dir: Path, seed: int, method: str, target_ratio, dense_dir=None):
    """The `pinchgate compress` configuration of one benchmark run."""
    from pinchgate.compress import CompressConfig

    values = dataclasses.asdict(base)
    values.update(output_dir=str(run_dir), seed=seed, method=method, granularity="weight")
    if method == "gates-long":
        values.update(method="gates", max_steps=2 * base.max_steps)
    values.update(target_ratio=None if method == "dense" else target_ratio, target_sparsity=None)
    values["dense_reference"] = str(dense_dir) if dense_dir is not None else None
    return CompressConfig(**values)


def _better(significance: dict | None) -> str | None:
    if not significance:
        return None
    if significance["compressed_errors"] == significance["dense_errors"]:
        return "same"
    return (
        "compressed"
        if significance["compressed_errors"] < significance["dense_errors"]
        else "dense"
    )


# The references each run is tested against at its ratio and seed (besides dense).
REFERENCES = ("gates", "gates-long")


def _key(ref: str) -> str:
    return "p_vs_" + ref.replace("-", "_")


def add_gate_comparisons(rows: list[dict]) -> None:
    """MAPSSWE of each run against the gates (and gates-long, when run) at the same ratio
    and seed; time relative to the gates."""
    from pinchgate.report import compare_with_reference

    for ref in REFERENCES:
        runs = {(r["seed"], r["target_ratio"]): r for r in rows if r["method"] == ref}
        for row in rows:
            ours = runs.get((row["seed"], row["target_ratio"]))
            if ref == "gates":
                row["time_vs_gates"] = row["seconds"] / ours["seconds"] if ours else None
            for name, entry in row["sets"].items():
                entry[_key(ref)] = None
                if ref == "gates":
                    entry["better_than_gates"] = None
                if ours is None or row is ours:
                    continue
                test = compare_with_reference(
                    Path(row["run_dir"]) / "eval" / f"{name}.jsonl",
                    Path(ours["run_dir"]) / "eval" / f"{name}.jsonl",
                )
                entry[_key(ref)] = test["p_value"] if test else None
                if ref == "gates":
                    # "compressed" is this run (fewer errors than the gates), "dense" the gates.
                    better = _better(test)
                    entry["better_than_gates"] = {"compressed": "this", "dense": "gates"}.get(
                        better, better
                    )


def render_table(rows: list[dict]) -> str:
    """One table per test set (every set that is not a dev set), one line per (method,
    target ratio): mean ± spread (sample std) over seeds."""
    sets = list(rows[0]["sets"]) if rows else []
    tests = [s for s in sets if not _is_dev(s)] or sets[:1]
    dev = next((s for s in sets if _is_dev(s)), None)
    return "\n\n".join(_set_table(rows, s, dev) for s in tests) + "\n\n" + _NOTE


_NOTE = (
    "p: MAPSSWE on the utterances of the set; 'lower' / 'higher' is this row's WER against"
    " the reference, given where p < 0.05. Time counts every pass a method needs (the"
    " dense pass included for two-pass methods). RTF: decoding seconds per audio second"
    " of the exported model, from the run's own evaluation."
)


def _set_table(rows: list[dict], s: str, dev: str | None) -> str:
    header = ["method", "target", "ratio", "kept params", f"WER {s}", "p vs dense"]
    refs = [ref for ref in REFERENCES if any(r["sets"][s].get(_key(ref)) is not None for r in rows)]
    header += [f"p vs {ref}" for ref in refs]
    header += ([f"WER {dev}"] if dev else []) + ["RTF", "time s", "time / gates"]
    lines = [f"### {s}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["target_ratio"] or 1.0, row["method"]), []).append(row)
    for (target, method), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))
    ):
        cells = [method, f"{target:g}x", _stat([r["ratio"] for r in group], "{:.3f}x")]
        cells.append(_stat([r["kept_params"] for r in group], "{:,.0f}"))
        cells.append(_stat([100 * r["sets"][s]["wer"] for r in group], "{:.2f}%"))
        for key, ref in [("p_vs_dense", "dense")] + [(_key(ref), ref) for ref in refs]:
            values = [r["sets"][s][key] for r in group if r["sets"][s].get(key) is not None]
            cell = _stat(values, "{:.3f}") if values else ""
            if values and max(values) < 0.05:
                # Significant in every seed: say which way, from the mean WER.
                ours = statistics.mean(r["sets"][s]["wer"] for r in group)
                theirs = [
                    r["sets"][s]["wer"]
                    for r in rows
                    if r["method"] == ref
                    and (ref == "dense" or r["target_ratio"] == group[0]["target_ratio"])
                ]
                if theirs:
                    cell += " lower" if ours < statistics.mean(theirs) else " higher"
            cells.append(cell)
        if dev:
            cells.append(_stat([100 * r["sets"][dev]["wer"] for r in group], "{:.2f}%"))
        values = [r["sets"][s]["rtf"] for r in group if r["sets"][s].get("rtf") is not None]
        cells.append(_stat(values, "{:.4f}") if values else "")
        cells.append(_stat([r["seconds"] for r in group], "{:.0f}"))
        ratios = [r["time_vs_gates"] for r in group if r.get("time_vs_gates") is not None]
        cells.append(_stat(ratios, "{:.2f}") if ratios and method != "gates" else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is_dev(name: str) -> bool:
    return Path(name.split(":")[-1]).name.startswith("dev")


def primary_set(names: list[str]) -> str:
    """The set the table's p-values and the plot use: the first that is not a dev set."""
    return next((n for n in names if not _is_dev(n)), names[0])


def _order(method: str) -> int:
    order = ("dense", *METHODS, *EXTRA_METHODS)
    return order.index(method) if method in order else len(order)


def _stat(values: list[float], fmt: str) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def plot(rows: list[dict], path: Path) -> None:
    """WER against parameters kept (left) and against decoding real-time factor (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    names = list(rows[0]["sets"])
    first = primary_set(names)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    dense = [r for r in rows if r["method"] == "dense"]
    if dense:
        wer = statistics.mean(100 * r["sets"][first]["wer"] for r in dense)
        for ax in (left, right):
            ax.axhline(wer, color="black", linestyle="--", label="dense")
        rtfs = [r["sets"][first].get("rtf") for r in dense]
        if all(x is not None for x in rtfs):
            right.plot([statistics.mean(rtfs)], [wer], marker="s", color="black")
    for method in METHODS + EXTRA_METHODS:
        points: dict[float, list[dict]] = {}
        for r in rows:
            if r["method"] == method:
                points.setdefault(r["target_ratio"], []).append(r)
        if not points:
            continue
        ordered = sorted(points.items())
        xs = [
            statistics.mean(100 * r["kept_params"] / r["total_params"] for r in g)
            for _, g in ordered
        ]
        ys = [statistics.mean(100 * r["sets"][first]["wer"] for r in g) for _, g in ordered]
        (line,) = left.plot(xs, ys, marker="o", label=method)
        speed = [
            (statistics.mean(r["sets"][first]["rtf"] for r in g), y)
            for (_, g), y in zip(ordered, ys, strict=True)
            if all(r["sets"][first].get("rtf") is not None for r in g)
        ]
        if speed:
            right.plot(*zip(*speed, strict=True), marker="o", color=line.get_color())
    left.set_xlabel("parameters kept (%)")
    left.invert_xaxis()
    right.set_xlabel("decoding real-time factor (lower is faster)")
    right.invert_xaxis()
    for ax in (left, right):
        ax.set_ylabel(f"WER on {first} (%)")
        ax.grid(alpha=0.3)
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
