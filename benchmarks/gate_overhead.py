"""Cost of the gates: a compression step against a dense fine-tuning step, time and memory.

    python benchmarks/gate_overhead.py [--config recipes/standin/standin_config.json]
        [--batch-seconds 32] [--steps 8] [--rounds 3] [--device cpu|cuda]

Each variant (dense, gated) runs in its own process so that its peak memory (resident set
on CPU, allocator peak on CUDA) is its own; the variants alternate for `--rounds` rounds so
machine drift hits both alike. A step is the real one: forward, CTC loss (+ the sparsity
term for the gated model), backward, AdamW update. Prints medians and the gated / dense
ratios. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from pinchgate.gates import attach_gates
    from pinchgate.sparsity import SparsityController

    values = json.loads(Path(args.config).read_text())
    values.pop("architectures", None)
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(**values, vocab_size=32)).to(args.device)
    model.train()
    groups = []
    gates = controller = None
    if args.variant == "gated":
        gates = attach_gates(model)
        controller = SparsityController(0.65, 1000).to(args.device)
        groups = [
            {"params": gates.threshold_parameters(), "lr": 0.01, "weight_decay": 0.0},
            controller.param_group(),
        ]
    taken = {id(p) for g in groups for p in g["params"]}
    weights = [p for p in model.parameters() if id(p) not in taken]
    optimizer = torch.optim.AdamW([{"params": weights}, *groups], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    clips = max(1, int(args.batch_seconds // 4))
    audio = torch.randn(clips, 4 * 16000, generator=generator).to(args.device)
    labels = torch.randint(5, 32, (clips, 50), generator=generator).to(args.device)
    times = []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 2):  # two warm-up steps
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(audio, labels=labels).loss
        if gates is not None:
            kept = gates.kept_fractions()
            loss = loss + controller.loss(kept.soft, 500, hard_kept=kept.hard)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if args.device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(json.dumps({"times": times, "peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "recipes/standin/standin_config.json"))
    parser.add_argument("--batch-seconds", type=float, default=32.0)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=["dense", "gated"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    runs: dict[str, list[dict]] = {"dense": [], "gated": []}
    for _ in range(args.rounds):
        for variant in ("dense", "gated"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--variant",
                    variant,
                    "--config",
                    args.config,
                    "--batch-seconds",
                    str(args.batch_seconds),
                    "--steps",
                    str(args.steps),
                    "--device",
                    args.device,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    step = {v: statistics.median(t for r in runs[v] for t in r["times"]) for v in runs}
    peak = {v: statistics.median(r["peak_mib"] for r in runs[v]) for v in runs}
    memory = "allocator peak MiB" if args.device == "cuda" else "peak RSS MiB"
    print(
        f"config {Path(args.config).name}, {args.batch_seconds:g} s of audio per step, "
        f"{args.device}, {args.rounds} rounds x {args.steps} steps per variant"
    )
    print(f"| variant | median step s | {memory} |")
    print("|---|---|---|")
    for variant in runs:
        print(f"| {variant} | {step[variant]:.3f} | {peak[variant]:.0f} |")
    print(
        f"| gated / dense | {step['gated'] / step['dense']:.3f}x | "
        f"{peak['gated'] / peak['dense']:.3f}x |"
    )


if __name__ == "__main__":
    main()
