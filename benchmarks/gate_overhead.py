"""Cost of the gates: a compression step against a dense fine-tuning step, time and memory.

    python benchmarks/gate_overhead.py [--model whisper-tiny.en|standin|DIR] [--clips 8]
        [--steps 8] [--rounds 3] [--device cpu|cuda] [--ratio 2.86]

The step is the training loop's own (`pinchgate.train`): the embedded preset's model as a
run prepares it (for Whisper: its window, frozen parts and the tied output projection),
one batch of `--clips` clips of `embedded:train` through the family's collator, the
family's loss (+ the gates' sparsity term for the gated variant, `methods.gates.GateMethod`
attached as `pinchgate compress` attaches it), backward, AdamW with the run's parameter
groups. Each variant (dense, gated) runs in its own process so that its peak memory
(resident set on CPU, allocator peak on CUDA) is its own; the variants alternate for
`--rounds` rounds so machine drift hits both alike. Prints medians and the gated / dense
ratios. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from inference import peak_rss  # benchmarks/inference.py, beside this script


def child(args: argparse.Namespace) -> None:
    import tempfile

    import torch
    import transformers

    from pinchgate.config import CompressConfig
    from pinchgate.data.audio import load_audio
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import load_corpus
    from pinchgate.families import family_for, resolve_model
    from pinchgate.methods.gates import GateMethod
    from pinchgate.train import build_optimizer

    transformers.utils.logging.set_verbosity_error()
    preset = CompressConfig.standin() if args.model == "standin" else CompressConfig.embedded()
    cfg = dataclasses.replace(preset, target_ratio=args.ratio, model=resolve_model(args.model))
    family = family_for(cfg.model)
    run_dir = Path(tempfile.mkdtemp())
    utterances, _ = load_corpus(resolve_corpus(cfg.train))
    processor, new_head = family.prepare_processor(cfg, run_dir, [u.transcript for u in utterances])
    torch.manual_seed(0)
    model = family.training_model(cfg, processor, new_head).to(args.device)
    method = None
    if args.variant == "gated":
        method = GateMethod(cfg, run_dir)
        method.attach(model)
    optimizer = build_optimizer(model, cfg, method)
    rate = family.sampling_rate(processor)
    items = [
        {
            "index": i,
            "audio": load_audio(u.audio_path, rate),
            "labels": family.labels(processor, u),
        }
        for i, u in enumerate(utterances[: args.clips])
    ]
    batch = family.collate(processor, items)
    batch.pop("index")
    batch = {k: v.to(args.device) for k, v in batch.items()}
    model.train()
    times = []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 2):  # two warm-up steps
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = family.loss(model, batch)
        if method is not None:
            term, _ = method.sparsity_term(model, 10)
            loss = loss + term
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    # On CPU, VmHWM (benchmarks/inference.py): ru_maxrss would carry the parent's peak.
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if args.device == "cuda"
        else peak_rss()["peak_mib"]
    )
    print(json.dumps({"times": times, "peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=2.86)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=["dense", "gated"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    runs: dict[str, list[dict]] = {"dense": [], "gated": []}
    for _ in range(args.rounds):
        for variant in ("dense", "gated"):
            command = [sys.executable, __file__, "--variant", variant, "--model", args.model]
            command += ["--clips", str(args.clips), "--steps", str(args.steps)]
            command += ["--ratio", str(args.ratio), "--device", args.device]
            out = subprocess.run(command, check=True, capture_output=True, text=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    step = {v: statistics.median(t for r in runs[v] for t in r["times"]) for v in runs}
    spread = {
        v: (min(min(r["times"]) for r in runs[v]), max(max(r["times"]) for r in runs[v]))
        for v in runs
    }
    peak = {v: statistics.median(r["peak_mib"] for r in runs[v]) for v in runs}
    memory = "allocator peak MiB" if args.device == "cuda" else "peak RSS MiB"
    print(
        f"model {args.model}, {args.clips} clips of embedded:train per step, {args.device}, "
        f"{args.rounds} rounds x {args.steps} steps per variant, alternating"
    )
    print(f"| variant | median step s | fastest-slowest step s | {memory} |")
    print("|---|---|---|---|")
    for variant in runs:
        low, high = spread[variant]
        print(f"| {variant} | {step[variant]:.3f} | {low:.3f}-{high:.3f} | {peak[variant]:.0f} |")
    print(
        f"| gated / dense | {step['gated'] / step['dense']:.3f}x | | "
        f"{peak['gated'] / peak['dense']:.3f}x |"
    )


if __name__ == "__main__":
    main()
