"""Ablation of the gate method's design choices: threshold tying, tau schedule, controller.

    python benchmarks/ablation.py [--ratio 2.86] [--dense-reference runs/compare/seed0/dense]
        [--out runs/ablation] [--only NAME ...] [--table-only] [-- EXTRA COMPRESS OPTIONS]

Runs `pinchgate compress` (the embedded default unless extra options say otherwise) once per
variant into `OUT-NAME`, each changing one thing from the default recipe (one threshold per
matrix, Lagrangian controller; the stand-in's preset keeps tau fixed, Whisper's anneals it
and runs the multipliers 10x faster, so one of each tau pair repeats the default):

    default        (nothing changed)
    tying-block    --tying block                 one threshold per transformer block
    tying-global   --tying global                one threshold for the model
    tau-annealed   --tau-final 0.1               tau annealed to a tenth by the freeze step
    tau-fixed      --tau-final 1                 tau fixed (Whisper's preset anneals it)
    slow-controller --multiplier-lr 0.05         the generic multiplier pace (Whisper's: 0.5)
    penalty        --sparsity-control penalty    fixed quadratic term, weight 10, no multipliers

A variant whose `report.json` exists is not run again (a killed run resumes: the command is
the same). Then prints one markdown table: the hard gated sparsity the training reached on
its own (last log step before the exact fit), the factor the fit moved every threshold by,
the ratio landed, the lowest and highest sparsity of a gated matrix, WER and MAPSSWE p
against the dense reference per set, compression time; then MAPSSWE of every variant
against `default` per set (variants that are the default itself are left out).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "default": [],
    "tying-block": ["--tying", "block"],
    "tying-global": ["--tying", "global"],
    "tau-annealed": ["--tau-final", "0.1"],
    "tau-fixed": ["--tau-final", "1"],
    "slow-controller": ["--multiplier-lr", "0.05"],
    "penalty": ["--sparsity-control", "penalty", "--penalty-weight", "10"],
}


def run_variant(name: str, args: argparse.Namespace, extra: list[str]) -> Path:
    out = Path(f"{args.out}-{name}")
    if (out / "report.json").is_file():
        return out
    command = [
        "pinchgate",
        "compress",
        "--target-ratio",
        str(args.ratio),
        "--dense-reference",
        args.dense_reference,
        "--no-train-dense-reference",
        "--output-dir",
        str(out),
        *VARIANTS[name],
        *extra,
    ]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return out


def before_fit(run: Path, report: dict) -> tuple[str, float]:
    """(hard gated sparsity training reached before the exact fit, the fit's factor).

    From report.json; runs made before it recorded them: the last gates.jsonl row before
    the freeze step and the factor logged in metrics.jsonl at the freeze.
    """
    c, cfg = report["compression"], report["config"]
    if c.get("sparsity_before_fit") is not None:
        return f"{c['sparsity_before_fit']:.4f}", c["final_fit_factor"]
    freeze_step = cfg["max_steps"] - round(cfg["frozen_fraction"] * cfg["max_steps"])
    rows = [json.loads(line) for line in (run / "gates.jsonl").read_text().splitlines() if line]
    last = [r for r in rows if r["step"] < freeze_step][-1]
    metrics = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    factor = next(m["fit_factor"] for m in metrics if "fit_factor" in m)
    return f"{last['hard_sparsity']:.4f} (step {last['step']})", factor


def spread(run: Path) -> str:
    """Lowest and highest sparsity of a gated matrix (layers.csv)."""
    with open(run / "layers.csv", newline="") as handle:
        values = [float(r["sparsity"]) for r in csv.DictReader(handle)]
    return f"{min(values):.2f}-{max(values):.2f}"


def row(name: str, run: Path) -> str:
    report = json.loads((run / "report.json").read_text())
    c = report["compression"]
    learned, factor = before_fit(run, report)
    cells = [
        name,
        learned,
        f"{c['target_sparsity']:.4f}",
        f"x{factor:.4f}",
        f"{c['compression_ratio']:.3f}x",
        spread(run),
    ]
    for key in sorted(report["sets"], key=lambda k: ("dev" not in k, "unseen" in k, k)):
        one = report["sets"][key]
        sig = one.get("significance") or {}
        p = sig.get("p_value")
        mark = ""
        if p is not None and p < 0.05:
            mark = " (worse)" if one["wer"] > one["dense_wer"] else " (better)"
        cells.append(f"{100 * one['wer']:.2f}%")
        cells.append("-" if p is None else f"{p:.3f}{mark}")
    cells.append(f"{report['time']['compression_seconds']:.0f}")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=2.86)
    parser.add_argument("--dense-reference", default="runs/compare/seed0/dense")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--table-only", action="store_true", help="run nothing, print the table")
    args = parser.parse_args(argv)

    runs = {}
    for name in args.only:
        if args.table_only:
            runs[name] = Path(f"{args.out}-{name}")
        else:
            runs[name] = run_variant(name, args, extra)
    runs = {n: r for n, r in runs.items() if (r / "report.json").is_file()}
    if not runs:
        raise SystemExit("no finished variant to tabulate")
    first = json.loads((next(iter(runs.values())) / "report.json").read_text())
    sets = sorted(first["sets"], key=lambda k: ("dev" not in k, "unseen" in k, k))
    head = ["variant", "hard sparsity before fit", "target", "fit factor", "ratio"]
    head.append("per-matrix sparsity")
    for key in sets:
        dense = first["sets"][key].get("dense_wer")
        name = Path(key.replace("embedded:", "")).name
        head += [f"{name} WER" + (f" (dense {100 * dense:.2f}%)" if dense else ""), "p"]
    head.append("compression s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, run in runs.items():
        print(row(name, run))
    if "default" in runs:
        print(against_default(runs, sets))


def against_default(runs: dict[str, Path], sets: list[str]) -> str:
    """A second table: MAPSSWE of every variant against `default` on the same utterances
    (the runs' eval/*.jsonl), with both error counts."""
    from pinchgate.significance import mapsswe

    def hypotheses(run: Path, key: str) -> dict[str, dict]:
        lines = (run / "eval" / f"{key}.jsonl").read_text().splitlines()
        return {r["id"]: r for r in map(json.loads, lines)}

    names = [Path(k.replace("embedded:", "")).name for k in sets]
    lines = ["", "Against `default` (errors: variant vs default):", ""]
    lines.append("| variant | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(sets))
    for name, run in runs.items():
        if name == "default" or run.resolve() == runs["default"].resolve():
            continue
        cells = []
        for key in sets:
            mine, base = hypotheses(run, key), hypotheses(runs["default"], key)
            ids = sorted(mine)
            test = mapsswe(
                [mine[i]["ref"] for i in ids],
                [mine[i]["hyp"] for i in ids],
                [base[i]["hyp"] for i in ids],
            )
            side = "worse" if test.errors_a > test.errors_b else "better"
            mark = f" {side}" if test.p_value < 0.05 else ""
            cells.append(f"p {test.p_value:.3f}{mark} ({test.errors_a} vs {test.errors_b})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
