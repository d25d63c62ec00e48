"""Decoding speed and accuracy of Whisper models in the runtimes users deploy them in.

    python benchmarks/whisper_decode.py --model dense=runs/compare/seed0/dense \\
        --model gates-2.86x=runs/embedded-compress [--model NAME=PATH ...]
        [--runtime torch onnx ct2-float32 ct2-int8] [--batch 1 8] [--threads 2] [--rounds 2]
        [--data embedded:test embedded:real] [--utterances N] [--work runs/decode-bench]
        [--json OUT] [--plot OUT.png]
    python benchmarks/whisper_decode.py --from-json OUT     # the table of a stored run again

Every `--model NAME=PATH` is a Hugging Face, run, packed or shrunk Whisper directory (or a
built-in name such as `whisper-tiny.en`); the first is the dense reference. `NAME=PATH@10`
is that model with its encoder cut to a 10 s window (the first 500 positions, no training,
as `pinchgate compress` cuts it for the run's longest clip), saved under `--work` first.

Runtimes: `torch` (PyTorch, fp32, `generate`), `onnx` (onnxruntime, fp32: `pinchgate export
--format onnx`, encoder and cached decoder, greedy), `ct2-float32` and `ct2-int8`
(CTranslate2: `pinchgate export --format ct2`, int8 weights with CTranslate2's int8
kernels); exports go into `--work`. Every runtime decodes the same way
(`WhisperFamily.decode`: transformers' log-mel features at the model's window, greedy, the
same token budget and runaway guard), so the runtimes differ only in the model's arithmetic.

Each (model, runtime, batch) runs in its own process, so its peak resident memory and its
threads are its own: load, one warm-up batch, then every clip of every set in batches of
`--batch` clips of similar length; the time of each `decode` call (features included,
audio loading not) is summed. The processes alternate for `--rounds` rounds so that
machine drift hits all alike; RTF (decoding seconds / audio seconds, over all sets) is the
median over rounds, and its range is printed. WER and MAPSSWE (against the dense model in
the same runtime at the same batch) come from the first round's transcripts. Numbers, not
assertions: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from inference import peak_rss  # benchmarks/inference.py, beside this script

RUNTIMES = ("torch", "onnx", "ct2-float32", "ct2-int8")


def _corpus(spec: str, limit: int | None):
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import load_corpus

    utterances, _ = load_corpus(resolve_corpus(spec))
    return utterances[:limit] if limit else utterances


def run_one(args: argparse.Namespace) -> dict:
    """One (model, runtime, batch): transcripts per set, seconds, peak memory."""
    import torch

    torch.set_num_threads(args.threads)
    from pinchgate.data.audio import load_audio
    from pinchgate.export import load_with_processor
    from pinchgate.families import family_for
    from pinchgate.modeldir import resolve_model_dir
    from pinchgate.packing import is_packed

    if args.runtime == "torch":
        model, family, processor, _ = load_with_processor(args.source)
    else:  # the PyTorch weights are not loaded: the peak memory is the runtime's own
        source = Path(args.source)
        model_dir = source if is_packed(source) else resolve_model_dir(source)
        family = family_for(model_dir)
        processor = family.load_processor(model_dir)
        if args.runtime == "onnx":
            model = family.onnx_runtime_model(Path(args.ct2_dir), None)
        else:
            model = family.ct2_runtime_model(Path(args.ct2_dir), args.runtime.removeprefix("ct2-"))
    rate = family.sampling_rate(processor)
    normalize = family.normalizer(processor)
    sets = {}
    for spec in args.data:
        utterances = _corpus(spec, args.utterances)
        audio = [load_audio(u.audio_path, rate) for u in utterances]
        sets[spec] = (utterances, audio)
    first = next(iter(sets.values()))[1]
    with torch.no_grad():
        family.decode(model, processor, first[: args.batch])  # warm-up
    out: dict = {"sets": {}}
    total_seconds = total_audio = 0.0
    for spec, (utterances, audio) in sets.items():
        order = sorted(range(len(audio)), key=lambda i: len(audio[i]))
        hypotheses = [""] * len(audio)
        seconds = 0.0
        with torch.no_grad():
            for start in range(0, len(order), args.batch):
                chunk = order[start : start + args.batch]
                began = time.perf_counter()
                texts = family.decode(model, processor, [audio[i] for i in chunk])
                seconds += time.perf_counter() - began
                for i, text in zip(chunk, texts, strict=True):
                    hypotheses[i] = normalize(text)
        audio_seconds = sum(len(a) for a in audio) / rate
        out["sets"][spec] = {
            "references": [normalize(u.transcript) for u in utterances],
            "hypotheses": hypotheses,
            "seconds": seconds,
            "audio_seconds": audio_seconds,
        }
        total_seconds += seconds
        total_audio += audio_seconds
    out["rtf"] = total_seconds / total_audio
    out["peak_rss_mb"] = peak_rss()["peak_mib"]  # VmHWM: this process's own
    return out


def with_window(name: str, source: str, work: Path) -> str:
    """`PATH@SECONDS`: the model cut to that encoder window, saved once under `work`
    (built-in names resolved to their directory)."""
    from pinchgate.families.builtin import resolve_model

    if "@" not in source:
        return resolve_model(source)
    source, seconds = source.rsplit("@", 1)
    source = resolve_model(source)
    out = work / f"{name}-hf"
    if not (out / "config.json").is_file():
        from pinchgate.export import load_with_processor
        from pinchgate.families.whisper import cut_window
        from pinchgate.families.whisper import with_window as processor_at

        model, family, processor, _ = load_with_processor(source)
        cut_window(model, int(seconds))
        family.save(model, processor_at(processor, int(seconds)), out)
    return str(out)


def model_bytes(path: Path) -> int:
    names = ("model.bin", "model.safetensors", "model.pinch.safetensors")
    names += ("encoder.onnx", "encoder.onnx.data", "decoder.onnx", "decoder.onnx.data")
    return sum((path / n).stat().st_size for n in names if (path / n).is_file())


def prepare(models: dict[str, str], runtimes: list[str], work: Path) -> dict:
    """Export each model for the CTranslate2 runtimes (once) and note file sizes/params."""
    from pinchgate.export import export_ct2, export_onnx, load_with_processor
    from pinchgate.families import count_parameters

    info = {}
    for name, source in models.items():
        model, _, _, model_dir = load_with_processor(source)
        entry = {
            "source": source,
            "params": count_parameters(model)["total"],
            "nonzero": int(sum(int(p.count_nonzero()) for p in model.parameters())),
            "bytes": {"torch": model_bytes(model_dir)},
            "ct2_dirs": {},
        }
        for runtime in runtimes:
            if runtime == "torch":
                continue
            out = work / f"{name}-{runtime}"
            if runtime == "onnx" and not (out / "decoder.onnx").is_file():
                export_onnx(source, out)
            elif runtime != "onnx" and not (out / "model.bin").is_file():
                export_ct2(source, out, runtime.removeprefix("ct2-"))
            entry["ct2_dirs"][runtime] = str(out)
            entry["bytes"][runtime] = model_bytes(out)
        info[name] = entry
    return info


def measure(args: argparse.Namespace, models: dict[str, str]) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = {name: with_window(name, source, work) for name, source in models.items()}
    info = prepare(models, args.runtime, work)
    combos = [(m, r, b) for b in args.batch for r in args.runtime for m in models]
    runs: dict[str, list[dict]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for round_index in range(args.rounds):
        order = combos if round_index % 2 == 0 else combos[::-1]
        for name, runtime, batch in order:
            command = [
                sys.executable, __file__, "--one", "--source", models[name],
                "--runtime", runtime, "--batch-one", str(batch), "--threads", str(args.threads),
                "--data", *args.data,
            ]  # fmt: skip
            if args.utterances:
                command += ["--utterances", str(args.utterances)]
            if runtime != "torch":
                command += ["--ct2-dir", info[name]["ct2_dirs"][runtime]]
            found = subprocess.run(command, env=env, capture_output=True, text=True)
            if found.returncode != 0:
                sys.exit(f"{name} {runtime} batch {batch} failed:\n{found.stderr[-2000:]}")
            result = json.loads(found.stdout.strip().splitlines()[-1])
            key = f"{name}|{runtime}|{batch}"
            if key in runs:  # later rounds: timing and memory only
                for spec in result["sets"]:
                    result["sets"][spec].pop("hypotheses")
                    result["sets"][spec].pop("references")
            runs.setdefault(key, []).append(result)
            print(f"round {round_index + 1}: {key} RTF {result['rtf']:.4f}", flush=True)
    return {"info": info, "runs": runs, "args": vars(args), "models": models}


def table(stored: dict) -> list[dict]:
    from pinchgate.evaluate import score
    from pinchgate.significance import mapsswe

    args, info, runs = stored["args"], stored["info"], stored["runs"]
    names = list(stored["models"])
    rows = []
    for batch in args["batch"]:
        for runtime in args["runtime"]:
            dense = runs[f"{names[0]}|{runtime}|{batch}"][0]
            dense_rtf = statistics.median(r["rtf"] for r in runs[f"{names[0]}|{runtime}|{batch}"])
            for name in names:
                found = runs[f"{name}|{runtime}|{batch}"]
                rtfs = [r["rtf"] for r in found]
                row = {
                    "model": name, "runtime": runtime, "batch": batch,
                    "params": info[name]["params"], "nonzero": info[name]["nonzero"],
                    "mb": info[name]["bytes"][runtime] / 1e6,
                    "rtf": statistics.median(rtfs), "rtf_range": (min(rtfs), max(rtfs)),
                    "speedup": dense_rtf / statistics.median(rtfs),
                    "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in found),
                    "sets": {},
                }  # fmt: skip
                for spec, got in found[0]["sets"].items():
                    refs, hyps = got["references"], got["hypotheses"]
                    entry = {"wer": score(refs, hyps, str)["wer"]}
                    if name != names[0]:
                        test = mapsswe(refs, hyps, dense["sets"][spec]["hypotheses"])
                        entry["p"] = test.p_value
                        entry["worse"] = test.errors_a > test.errors_b
                    row["sets"][spec] = entry
                rows.append(row)
    return rows


def print_table(rows: list[dict], stored: dict) -> None:
    specs = list(rows[0]["sets"])
    args = stored["args"]
    print(
        f"\n{args['threads']} threads, {args['rounds']} rounds; RTF median (range); speed-up "
        "against the first model in the same runtime and batch; p: MAPSSWE against it.\n"
    )
    header = ["model", "runtime", "batch", "MB", "RTF", "speed-up"]
    header += [f"WER {s}" for s in specs] + ["peak RSS MB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row["model"], row["runtime"], str(row["batch"]), f"{row['mb']:.1f}"]
        low, high = row["rtf_range"]
        cells += [f"{row['rtf']:.4f} ({low:.4f}-{high:.4f})", f"{row['speedup']:.2f}x"]
        for spec in specs:
            entry = row["sets"][spec]
            text = f"{100 * entry['wer']:.2f}%"
            if "p" in entry:
                text += f" (p {entry['p']:.3f}{', worse' if entry['worse'] else ''})"
            cells.append(text)
        cells.append(f"{row['peak_rss_mb']:.0f}")
        print("| " + " | ".join(cells) + " |")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(rows[0]["sets"])
    fig, axes = plt.subplots(1, len(specs), figsize=(6 * len(specs), 4.5), squeeze=False)
    markers = {"torch": "o", "onnx": "D", "ct2-float32": "s", "ct2-int8": "^"}
    for ax, spec in zip(axes[0], specs, strict=True):
        for row in rows:
            ax.scatter(
                row["rtf"], 100 * row["sets"][spec]["wer"],
                marker=markers.get(row["runtime"], "x"),
                color="C0" if row["batch"] == 1 else "C1",
            )  # fmt: skip
            label = f"{row['model']} {row['runtime']} b{row['batch']}"
            ax.annotate(label, (row["rtf"], 100 * row["sets"][spec]["wer"]), fontsize=6)
        ax.set_xlabel("real-time factor (decoding s / audio s)")
        ax.set_ylabel("WER %")
        ax.set_title(spec)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH")
    parser.add_argument("--runtime", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", nargs="+", default=["embedded:test", "embedded:real"])
    parser.add_argument("--utterances", type=int, default=None, help="first N of each set")
    parser.add_argument("--work", default="runs/decode-bench")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--from-json", default=None)
    # One measurement, in its own process (used by the parent).
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--ct2-dir", help=argparse.SUPPRESS)  # the runtime's export
    parser.add_argument("--batch-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        args.runtime, args.batch = args.runtime[0], args.batch_one
        print(json.dumps(run_one(args)))
        return 0
    if args.from_json:
        stored = json.loads(Path(args.from_json).read_text())
    else:
        models = dict(m.split("=", 1) for m in args.model)
        if not models:
            parser.error("give at least one --model NAME=PATH (the first is the reference)")
        stored = measure(args, models)
        if args.json:
            Path(args.json).write_text(json.dumps(stored))
    rows = table(stored)
    print_table(rows, stored)
    if args.plot:
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
