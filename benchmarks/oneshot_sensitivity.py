"""How much magnitude pruning a model tolerates with no training at all.

    python benchmarks/oneshot_sensitivity.py [--model whisper-tiny.en] [--window 10]
        [--sparsities 0.3 0.5 0.6672] [--allocations global uniform]
        [--data embedded:dev embedded:real]

Loads the model, zeroes the smallest-magnitude share of the weights the gates would prune
(the family's default targets; `global`: one ranking over all of them, `uniform`: the same
share of every matrix), scores it greedily on each set and prints one markdown table. A
model whose WER explodes at a sparsity has little slack there: the fine-tuning pass must
recover what the pruning takes. The default model's rows are in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--window", type=int, default=10, help="Whisper encoder window, s")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.6672])
    parser.add_argument("--allocations", nargs="+", default=["global", "uniform"])
    parser.add_argument("--data", nargs="+", default=["embedded:dev", "embedded:real"])
    args = parser.parse_args(argv)

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from pinchgate import masking
    from pinchgate.data.builtin import resolve_corpus
    from pinchgate.data.corpus import load_corpus
    from pinchgate.evaluate import evaluate_corpus
    from pinchgate.families import family_for, resolve_model
    from pinchgate.methods.magnitude import magnitude_masks

    source = resolve_model(args.model)
    family = family_for(source)
    include, exclude = family.gate_targets()
    sets = {name: load_corpus(resolve_corpus(name))[0] for name in args.data}
    rows = []
    for allocation in args.allocations:
        for sparsity in args.sparsities:
            model = family.load(source)
            processor = family.load_processor(Path(source))
            if family.name == "whisper":
                from pinchgate.families.whisper import cut_window, with_window

                cut_window(model, args.window)
                processor = with_window(processor, args.window)
            targets = masking.select_targets(model, include, exclude)
            weights = [module.weight.detach() for _, module in targets]
            total = sum(w.numel() for w in weights)
            keep = round((1 - sparsity) * total)
            masks, _ = magnitude_masks([w.abs() for w in weights], keep, allocation)
            with torch.no_grad():
                for weight, mask in zip(weights, masks, strict=True):
                    weight.masked_fill_(~mask, 0)
            wers = []
            for name, utterances in sets.items():
                result = evaluate_corpus(model, family, processor, utterances, name, None, 200)
                wers.append(f"{100 * result.wer:.2f}%")
            rows.append(f"| {allocation} | {sparsity:.4f} | " + " | ".join(wers) + " |")
            print(rows[-1], flush=True)
    print()
    print("| allocation | gated sparsity | " + " | ".join(sets) + " |")
    print("|---|---|" + "---|" * len(sets))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
