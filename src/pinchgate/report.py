"""The compression report: report.json, report.md, per-layer CSV and PNG plots."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from pinchgate.evaluate import read_hypotheses
from pinchgate.significance import mapsswe


def compare_with_reference(run_eval: Path, reference_eval: Path) -> dict | None:
    """MAPSSWE between the dense reference (A) and the compressed model (B) on one set."""
    if not (run_eval.is_file() and reference_eval.is_file()):
        return None
    return _compare_rows(_rows_by_id(run_eval), _rows_by_id(reference_eval))


def _rows_by_id(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in read_hypotheses(path)}


def _compare_rows(ours: dict[str, dict], theirs: dict[str, dict]) -> dict | None:
    shared = [utt for utt in ours if utt in theirs]
    if not shared:
        return None
    test = mapsswe(
        [ours[u]["ref"] for u in shared],
        [theirs[u]["hyp"] for u in shared],
        [ours[u]["hyp"] for u in shared],
    )
    return {
        "utterances": len(shared),
        "segments": test.n_segments,
        "dense_errors": test.errors_a,
        "compressed_errors": test.errors_b,
        "z": test.z,
        "p_value": test.p_value,
        "significant_at_0.05": test.significant(0.05),
    }


def eval_files(path: Path) -> dict[str, Path]:
    """The per-utterance files of an evaluation: `evaluate --output-dir`'s directory, or a
    run directory (its `eval/`), by set name."""
    path = Path(path)
    if (path / "eval").is_dir():  # a run directory (its own *.jsonl are logs)
        path = path / "eval"
    return {f.stem: f for f in sorted(path.glob("*.jsonl"))}


def compare_evaluations(a: Path, b: Path) -> list[dict]:
    """Per set both directories scored: WER of A and of B on their shared utterances and
    MAPSSWE between them (A the "dense" side of `compare_with_reference`)."""
    files_a, files_b = eval_files(a), eval_files(b)
    rows = []
    for name in [n for n in files_a if n in files_b]:
        theirs, ours = _rows_by_id(files_a[name]), _rows_by_id(files_b[name])
        test = _compare_rows(ours, theirs)
        if test is None:
            continue
        shared = [u for u in ours if u in theirs]
        words = sum(ours[u]["words"] for u in shared)
        rows.append(
            {
                "set": name,
                **test,
                "words": words,
                "wer_a": sum(theirs[u]["errors"] for u in shared) / max(1, words),
                "wer_b": sum(ours[u]["errors"] for u in shared) / max(1, words),
            }
        )
    return rows


def write_report(
    run_dir: Path,
    cfg,
    results: dict,
    reference_dir: Path | None = None,
    reference_seconds: float | None = None,
    zero_shot_dir: Path | None = None,
) -> dict:
    """report.json, report.md, layers.csv and the plots of a compression run. MAPSSWE p of the
    compressed model against the dense reference; with a zero-shot evaluation (the model
    before fine-tuning), also its WER and the p of the dense (else the compressed) model
    against it."""
    compression = results["compression"]
    reference = zero_shot = None
    if reference_dir is not None:
        reference = json.loads((reference_dir / "results.json").read_text())
    if zero_shot_dir is not None and (zero_shot_dir / "results.json").is_file():
        zero_shot = json.loads((zero_shot_dir / "results.json").read_text())
    sets = {}
    for name, ours in results["eval"].items():
        row = {"wer": ours["wer"], "cer": ours["cer"], "utterances": ours["utterances"]}
        if reference is not None and name in reference.get("eval", {}):
            row["dense_wer"] = reference["eval"][name]["wer"]
            row["significance"] = compare_with_reference(
                run_dir / "eval" / f"{name}.jsonl", reference_dir / "eval" / f"{name}.jsonl"
            )
        if zero_shot is not None and name in zero_shot.get("eval", {}):
            row["zero_shot_wer"] = zero_shot["eval"][name]["wer"]
            against = reference_dir if reference is not None else run_dir
            row["zero_shot_significance"] = compare_with_reference(
                against / "eval" / f"{name}.jsonl", zero_shot_dir / "eval" / f"{name}.jsonl"
            )
            row["zero_shot_compared"] = "dense" if reference is not None else "compressed"
        sets[name] = row
    # The compression time counts every pass a method needs (training, pruning, hardening).
    timing = {
        "compression_seconds": sum(p["seconds"] for p in results["passes"]),
        "wall_seconds": results.get("wall_seconds"),
        "passes": results["passes"],
    }
    if reference is not None:
        timing["dense_reference_train_seconds"] = reference["train_seconds"]
        timing["dense_reference_wall_seconds"] = reference_seconds
    report = {
        "model": cfg.model,
        "method": results["method"],
        "steps": results["steps"],
        "compression": compression,
        "sets": sets,
        "time": timing,
        "dense_reference": str(reference_dir) if reference_dir else None,
        "zero_shot": str(zero_shot_dir) if zero_shot is not None else None,
        "config": cfg.to_dict(),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    (run_dir / "report.md").write_text(render_markdown(report))
    write_layers_csv(run_dir / "layers.csv", results["layers"])
    plot_layers(run_dir / "layer_sparsity.png", results["layers"])
    if (run_dir / "gates.jsonl").is_file():
        plot_training(run_dir / "training.png", run_dir / "gates.jsonl")
    return report


def render_markdown(report: dict) -> str:
    c, t = report["compression"], report["time"]
    lines = [
        f"# Compression report: {report['model']}",
        "",
        "| | value |",
        "|---|---|",
        f"| parameters before | {c['total_params']:,} |",
        f"| parameters after (nonzero kept) | {c['kept_params']:,} |",
        f"| compression ratio | {c['compression_ratio']:.3f}x |",
        f"| parameter reduction | {100 * c['parameter_reduction']:.2f}% |",
        f"| gated sparsity (target) | {c['gated_sparsity']:.4f} ({c['target_sparsity']:.4f}) |",
        f"| gated parameters | {c['gated_params']:,} |",
    ]
    if c.get("cost") == "flops":  # the target was a share of multiply-adds, not parameters
        lines[-2] = (
            f"| gated multiply-adds removed (target) | {c['cost_sparsity']:.4f} "
            f"({c['target_sparsity']:.4f}) of {c['cost_total'] / 1e9:.3f} G per second of audio |"
        )
        lines.append(f"| gated parameters removed | {c['gated_sparsity']:.4f} |")
    if c.get("sparsity_before_fit") is not None:
        lines.append(
            f"| gated sparsity training reached alone, before the exact fit (threshold factor) "
            f"| {c['sparsity_before_fit']:.4f} (x{c['final_fit_factor']:.4f}) |"
        )
    lines += [f"| compression time (all passes) | {t['compression_seconds']:.1f} s |"]
    lines.insert(4, f"| method | {report['method']} |")
    shrunk = c.get("shrunk")  # --granularity structured: the physically smaller model too
    if shrunk:
        lines.append(
            f"| parameters of the shrunken model (`{Path(shrunk['dir']).name}/`) "
            f"| {shrunk['params']:,} |"
        )
    for i, row in enumerate(t.get("passes", []), 1):
        lines.append(f"| pass {i}: {row['name']} (`{row['run_dir']}`) | {row['seconds']:.1f} s |")
    if report["time"].get("dense_reference_train_seconds") is not None:
        lines.append(
            f"| dense reference training time | "
            f"{report['time']['dense_reference_train_seconds']:.1f} s |"
        )
    zero = any("zero_shot_wer" in row for row in report["sets"].values())
    header = "| set | WER | CER | dense WER | MAPSSWE p | significant (0.05) |"
    if zero:
        compared = next(
            r["zero_shot_compared"] for r in report["sets"].values() if "zero_shot_wer" in r
        )
        header += f" zero-shot WER | p, {compared} vs zero-shot |"
    lines += ["", header, "|---" * (header.count("|") - 1) + "|"]
    for name, row in report["sets"].items():
        wer, cer = f"{100 * row['wer']:.2f}%", f"{100 * row['cer']:.2f}%"
        dense = f"{100 * row['dense_wer']:.2f}%" if "dense_wer" in row else "-"
        p, flag = _significance(row.get("significance"), "compressed")
        line = f"| {name} | {wer} | {cer} | {dense} | {p} | {flag} |"
        if zero:
            zero_wer = f"{100 * row['zero_shot_wer']:.2f}%" if "zero_shot_wer" in row else "-"
            p, flag = _significance(row.get("zero_shot_significance"), "fine-tuned")
            line += f" {zero_wer} | {p}{'' if flag in ('-', 'no') else ' (' + flag + ')'} |"
        lines.append(line)
    if shrunk:
        check = shrunk.get("logit_check")
        against = ""
        if check and check.get("utterances"):
            against = (
                f" (max |logit difference| against the masked model on {check['utterances']} "
                f"{check['set']} utterances: {check['max_abs_diff']:.3g})"
            )
        lines += ["", f"Shrunken model, read back from disk{against}:", ""]
        for name, row in shrunk["eval"].items():
            lines.append(f"- {name}: WER {100 * row['wer']:.2f}%, CER {100 * row['cer']:.2f}%")
    during = "; kept fraction and thresholds during training: `gates.jsonl`, `training.png`"
    gated = report["method"] in ("gates", "structured")
    lines += [
        "",
        "Per-layer sparsity and thresholds: `layers.csv`, `layer_sparsity.png`"
        + (during if gated else "; training: `metrics.jsonl`")
        + ".",
        "",
    ]
    return "\n".join(lines)


def _significance(sig: dict | None, side: str) -> tuple[str, str]:
    """(p, "yes, <side> better|worse" / "no") of a MAPSSWE result whose second system is
    the row's own model ("compressed_errors")."""
    if not sig:
        return "-", "-"
    better = sig["compressed_errors"] < sig["dense_errors"]
    direction = f"{side} better" if better else f"{side} worse"
    return f"{sig['p_value']:.3f}", f"yes, {direction}" if sig["significant_at_0.05"] else "no"


def write_layers_csv(path: Path, layers: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["name", "numel", "kept", "sparsity", "threshold", "tau"]
        )
        writer.writeheader()
        for layer in layers:
            writer.writerow({k: layer[k] for k in writer.fieldnames})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layers(path: Path, layers: list[dict]) -> None:
    plt = _pyplot()
    names = short_names([layer["name"] for layer in layers])
    fig, ax = plt.subplots(figsize=(8, max(3, 0.22 * len(layers))))
    ax.barh(range(len(layers)), [100 * layer["sparsity"] for layer in layers])
    ax.set_yticks(range(len(layers)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("sparsity (%)")
    ax.set_xlim(0, 100)
    ax.set_title("Per-layer sparsity after hardening")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def short_names(names: list[str]) -> list[str]:
    """Module names without the prefix they all share, ``layers.<i>.`` written ``L<i>.``."""
    parts = [name.split(".") for name in names]
    shared = 0
    while parts and all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [_LAYER.sub(r"L\1.", ".".join(p[shared:])) for p in parts]


_LAYER = re.compile(r"\blayers\.(\d+)\.")


def plot_training(path: Path, gates_log: Path) -> None:
    plt = _pyplot()
    rows = [json.loads(line) for line in gates_log.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    top.plot(steps, [r["target_sparsity"] for r in rows], "k--", label="target")
    top.plot(steps, [r["hard_sparsity"] for r in rows], label="hard (|W| > t)")
    if all("soft_sparsity" in r for r in rows):
        top.plot(steps, [r["soft_sparsity"] for r in rows], label="soft (gates)")
    top.set_ylabel("gated sparsity")
    top.legend()
    for name in rows[-1]["thresholds"]:
        bottom.plot(steps, [r["thresholds"].get(name) for r in rows], linewidth=0.8)
    bottom.set_yscale("log")
    bottom.set_ylabel("threshold t (one line per layer)")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
