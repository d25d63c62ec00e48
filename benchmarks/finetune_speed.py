"""Fine-tuning throughput and peak memory of the built-in toy case on this machine.

    python benchmarks/finetune_speed.py [--steps 200] [--batch-seconds 16]

Prints one table row per configuration: steps/s, audio seconds processed per second and
peak resident memory of the process (ru_maxrss). Not a test: numbers, not assertions.
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time

import torch

from pinchgate.config import FinetuneConfig
from pinchgate.train import run_finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-seconds", type=float, default=16.0)
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = FinetuneConfig.toy()
        cfg.output_dir, cfg.max_steps, cfg.eval_every = tmp, args.steps, 0
        cfg.batch_seconds, cfg.save_every = args.batch_seconds, args.steps
        started = time.perf_counter()
        results = run_finetune(cfg)
        wall = time.perf_counter() - started
    audio = sum(u.duration for u in results["data"].train)
    epochs = results["steps"] * cfg.batch_seconds / audio  # upper bound: batches are padded
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print("| case | steps | batch s | train s | steps/s | peak RSS MiB | whole run s |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| toy ({results['parameters']['total']:,} params) | {results['steps']} | "
        f"{cfg.batch_seconds:g} | {results['train_seconds']:.1f} | "
        f"{results['steps'] / results['train_seconds']:.2f} | {peak_mib:.0f} | {wall:.1f} |"
    )
    print(f"(~{epochs:.1f} epochs of {audio:.0f} s of training audio)")


if __name__ == "__main__":
    main()
