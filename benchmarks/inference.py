"""CPU inference of dense, pruned, packed and shrunk models: speed, memory, load time, size.

    python benchmarks/inference.py --model dense=PATH --model pruned=RUN_DIR [--model ...]
        [--seconds 10] [--batch 8] [--rounds 3] [--threads N] [--sparse] [--onnx]
        [--quick] [--json OUT]
    python benchmarks/inference.py --from-json OUT    # the table of a stored run again

Each `--model NAME=PATH` is a Hugging Face directory, a run directory (its `model/`), a
packed directory or a shrunk one, loaded with `pinchgate.export.load_any`; the first is the
dense reference every ratio is taken against. Every model runs with PyTorch's dense
kernels; `--sparse` adds a variant whose nn.Linear layers with at least 50% exact zeros
multiply by a CSR copy of their weight (`torch.addmm` with MKL sparse BLAS), `--onnx` one
exported with `export_onnx` and run by onnxruntime. Both are checked against the model's
dense-kernel PyTorch logits first.

Each (variant, batch) is measured in its own process, so that its peak resident memory and
its threads are its own: load the model (timed), one warm-up forward, then forwards timed
until 1 s of compute has passed (at least one; their median). The variants alternate for
`--rounds` rounds so machine drift hits all alike; the table gives medians over rounds.
Real-time factor (RTF) = compute seconds / seconds of audio in the batch. Audio is
synthetic: seeded Gaussian noise at 16 kHz (the compute of these models does not depend on
what the audio says). `--quick`: 2 s clips, batch 2, one round. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
SPARSE_MIN_ZEROS = 0.5  # share of exact zeros from which a Linear gets the sparse kernel
PARITY_TOLERANCE = 1e-4  # largest |logit difference| against the dense-kernel model
NO_SPEEDUP_BELOW = 1.10  # speed-ups under this are reported as none (timing noise)
CHECK_SHAPE = (2, SAMPLE_RATE)  # the parity check's input: 2 clips of 1 s
MIN_TIMED_S = 1.0  # each process times forwards until this much compute has passed


def synthetic_audio(batch: int, seconds: float, seed: int = 0) -> np.ndarray:
    """Zero-mean unit-variance noise, as the feature extractor's normalised output."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, int(seconds * SAMPLE_RATE)), dtype=np.float32)


def sparsify_linears(model, min_zeros: float = SPARSE_MIN_ZEROS) -> tuple[int, int]:
    """Swap every nn.Linear whose weight has at least `min_zeros` exact zeros for a module
    multiplying by a CSR copy of that weight. Returns (swapped, nn.Linear layers in all)."""
    import torch

    # Defined here, not at module level: the onnxruntime child must not import torch, so
    # that its peak memory is onnxruntime's own.
    class SparseLinear(torch.nn.Module):
        """y = x W^T + b as (W x^T)^T: torch 2.13 CPU runs addmm(bias, CSR, dense) with MKL
        sparse BLAS; dense @ CSR is several times slower and COO slower still."""

        def __init__(self, linear: torch.nn.Linear):
            super().__init__()
            self.out_features = linear.out_features
            self.weight = linear.weight.detach().to_sparse_csr()
            bias = linear.bias
            self.bias = None if bias is None else bias.detach().unsqueeze(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            columns = x.reshape(-1, x.shape[-1]).t()
            if self.bias is None:
                out = torch.sparse.mm(self.weight, columns)
            else:
                out = torch.addmm(self.bias, self.weight, columns)
            return out.t().reshape(*x.shape[:-1], self.out_features)

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    swapped = 0
    for name, linear in linears:
        weight = linear.weight
        if (weight == 0).sum().item() < min_zeros * weight.numel():
            continue
        owner, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(owner), attribute, SparseLinear(linear))
        swapped += 1
    return swapped, len(linears)


def forward_flops(model, seconds: float, mask: bool) -> int:
    """FLOPs of one forward on 1 x `seconds` of audio (torch.utils.flop_counter: matrix
    products, convolutions and attention, 2 per multiply-add), as dense kernels do them:
    exact zeros in a weight still count, removed neurons and heads do not."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    # The counter knows the CUDA attention kernels, not the CPU one transformers calls here.
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}
    x = torch.from_numpy(synthetic_audio(1, seconds, seed=2))
    attention_mask = torch.ones(x.shape, dtype=torch.long) if mask else None
    # no_grad, not inference_mode: the counter's module tracker hooks need autograd nodes.
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        with torch.no_grad():
            model(x, attention_mask=attention_mask)
    return int(counter.get_total_flops())


# --- one measurement, in its own process -----------------------------------------------


def measure(spec: dict) -> dict:
    """Load (timed), warm up, time one forward; peak RSS of this process."""
    audio = synthetic_audio(spec["batch"], spec["seconds"])
    threads = spec["threads"]
    if spec["runtime"] == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        start = time.perf_counter()
        session = onnxruntime.InferenceSession(
            spec["onnx"], options, providers=["CPUExecutionProvider"]
        )
        load_s = time.perf_counter() - start
        feeds = {"input_values": audio}
        if "attention_mask" in {i.name for i in session.get_inputs()}:
            feeds["attention_mask"] = np.ones(audio.shape, dtype=np.int64)

        def forward():
            return session.run(["logits"], feeds)
    else:
        import torch
        import transformers

        from pinchgate.export import load_any

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(threads)
        _import_model_code(spec["path"])  # so load s is reading weights, not importing
        start = time.perf_counter()
        model = load_any(spec["path"])
        if spec["runtime"] == "sparse":
            sparsify_linears(model)
        load_s = time.perf_counter() - start
        x = torch.from_numpy(audio)
        mask = torch.ones(x.shape, dtype=torch.long) if spec["mask"] else None

        def forward():
            with torch.inference_mode():
                return model(x, attention_mask=mask).logits

    forward()  # warm-up: first-call allocations, kernel selection
    times: list[float] = []
    while sum(times) < MIN_TIMED_S or not times:  # short forwards: time a few, not one
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    compute_s = statistics.median(times)
    return {"load_s": load_s, "compute_s": compute_s, "forwards": len(times), **peak_rss()}


def peak_rss() -> dict:
    """This process's peak resident memory in MiB. VmHWM, not ru_maxrss: Linux carries a
    parent's maxrss into a forked child, so a child would report at least its parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_mib": int(line.split()[1]) / 1024, "peak_source": "VmHWM"}
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": maxrss, "peak_source": "ru_maxrss"}


def _import_model_code(path: str) -> None:
    """Import the transformers modules of the model's architecture (lazily loaded)."""
    import transformers

    import pinchgate.export  # noqa: F401  (load_any and the families it imports)
    from pinchgate.modeldir import resolve_model_dir

    config = json.loads((resolve_model_dir(path) / "config.json").read_text())
    for name in config.get("architectures") or ["AutoModelForCTC"]:
        getattr(transformers, name, None)


def run_child(spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-15:])
        what = f"{spec['name']} {spec['runtime']} batch {spec['batch']}"
        raise SystemExit(f"{what}: measuring process failed (exit {out.returncode}):\n{tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- what is known before timing: sizes, counts, parity ------------------------------


def prepare(name: str, path: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """One row per variant of this model, with everything but the timings."""
    import torch

    from pinchgate.export import export_onnx, load_any
    from pinchgate.families import count_parameters
    from pinchgate.families.ctc import feature_extractor_for
    from pinchgate.families.ctc_onnx import onnx_max_abs_diff
    from pinchgate.modeldir import resolve_model_dir, weight_files
    from pinchgate.packing import PACKED_FILE, is_packed

    model = load_any(path)
    model_dir = Path(path) if is_packed(path) else resolve_model_dir(path)
    files = [model_dir / PACKED_FILE] if is_packed(path) else weight_files(model_dir)
    mask = bool(feature_extractor_for(model.config, model_dir).return_attention_mask)
    params = count_parameters(model)["total"]
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    flops = forward_flops(model, args.seconds, mask)
    common = {"name": name, "path": str(path), "params": params, "nonzero": nonzero}
    common["gflop_per_s"] = flops / 1e9 / args.seconds
    rows = [
        {
            **common,
            "runtime": "torch",
            "mask": mask,
            "weight_bytes": sum(f.stat().st_size for f in files),
            "max_abs_diff": None,
        }
    ]
    batch, samples = CHECK_SHAPE
    check = torch.from_numpy(synthetic_audio(batch, samples / SAMPLE_RATE, seed=1))
    check_mask = torch.ones(check.shape, dtype=torch.long) if mask else None
    with torch.inference_mode():
        reference = model(check, attention_mask=check_mask).logits

    if args.onnx:
        out = tmp / f"{len(os.listdir(tmp))}-{name}" / "model.onnx"
        start = time.perf_counter()
        export_onnx(path, out)
        export_s = time.perf_counter() - start
        rows.append(
            {
                **rows[0],
                "runtime": "onnx",
                "onnx": str(out),
                "export_s": export_s,
                "weight_bytes": sum(f.stat().st_size for f in out.parent.iterdir()),
                "max_abs_diff": onnx_max_abs_diff(out, model, check.numpy()),
            }
        )
    if args.sparse:
        swapped, linears = sparsify_linears(model)
        if swapped:
            with torch.inference_mode():
                logits = model(check, attention_mask=check_mask).logits
            diff = float((logits - reference).abs().max())
            rows.insert(
                1,
                {
                    **rows[0],
                    "runtime": "sparse",
                    "sparse_linears": [swapped, linears],
                    "max_abs_diff": diff,
                },
            )
        else:
            rows[0]["sparse_linears"] = [0, linears]
    return rows


# --- the table -------------------------------------------------------------------------


def _count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def _ratio(value: str, reference: float, this: float) -> str:
    return f"{value} ({reference / this:.2f}x)" if this else value


def table(rows: list[dict], batches: list[int]) -> list[str]:
    dense = rows[0]
    head = ["model", "runtime", "params", "nonzero", "GFLOP/audio s", "weights MiB", "load s"]
    head += [f"RTF b{b}" for b in batches] + [f"peak RSS b{b} MiB" for b in batches]
    head += ["max abs diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["name"],
            row["runtime"],
            _ratio(_count(row["params"]), dense["params"], row["params"]),
            _ratio(_count(row["nonzero"]), dense["nonzero"], row["nonzero"]),
            _ratio(f"{row['gflop_per_s']:.3g}", dense["gflop_per_s"], row["gflop_per_s"]),
            _ratio(
                f"{row['weight_bytes'] / 2**20:.2f}", dense["weight_bytes"], row["weight_bytes"]
            ),
            f"{row['load_s']:.2f}",
        ]
        for b in batches:
            rtf = row["rtf"][str(b)]
            cells.append(_ratio(f"{rtf:.3g}", dense["rtf"][str(b)], rtf))
        for b in batches:
            peak = row["peak_mib"][str(b)]
            cells.append(_ratio(f"{peak:.0f}", dense["peak_mib"][str(b)], peak))
        diff = row["max_abs_diff"]
        cells.append("-" if diff is None else f"{diff:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def footer(rows: list[dict], batches: list[int]) -> list[str]:
    dense = rows[0]
    notes = [
        "(N.NNx) after a value: the dense reference's value divided by this row's; above 1 "
        "is faster (RTF: the speed-up), smaller or less memory.",
        "RTF: median compute seconds / audio seconds of the batch (lower is faster). Peak "
        "RSS: the measuring process's maximum resident memory, including its runtime "
        "(torch + transformers, or onnxruntime alone). load s: load_any (plus the CSR "
        "conversion for sparse) or the onnxruntime session. weights MiB: weight files on "
        "disk (the .onnx file for onnx). GFLOP/audio s: FLOPs of a forward on one clip "
        "(torch.utils.flop_counter, 2 per multiply-add) per second of audio, as dense "
        "kernels do them. max abs diff: largest |logit difference| against "
        f"the same model's dense-kernel PyTorch forward on {CHECK_SHAPE[0]} x "
        f"{CHECK_SHAPE[1] / SAMPLE_RATE:g} s of noise (tolerance {PARITY_TOLERANCE:g}).",
    ]
    batch_names = " / ".join(f"b{b}" for b in batches)
    for row in rows:
        speedups = [dense["rtf"][str(b)] / row["rtf"][str(b)] for b in batches]
        at = f"{' / '.join(f'{s:.2f}x' for s in speedups)} ({batch_names}) the dense speed"
        zeros = 1 - row["nonzero"] / row["params"]
        label = f"{row['name']} ({row['runtime']})"
        if row["runtime"] == "torch" and row is not dense:
            if row["params"] < 0.95 * dense["params"]:  # shrunk: fewer FLOPs, not just zeros
                notes.append(
                    f"{label}: {100 * row['params'] / dense['params']:.0f}% of the dense "
                    f"parameters, runs at {at}: {_verdict(speedups, batches)} from shrinking."
                )
            elif zeros < 0.1:
                pass  # a dense model: nothing to say about sparsity
            elif max(speedups) < NO_SPEEDUP_BELOW:
                notes.append(
                    f"{label}: {100 * zeros:.1f}% of its weights are exact zeros, and it runs "
                    f"at {at}: unstructured sparsity gives no speed-up with dense kernels."
                )
            else:
                notes.append(
                    f"{label}: {100 * zeros:.1f}% of its weights are exact zeros, but dense "
                    f"kernels do the dense reference's FLOPs, so {at} is timing noise, not a "
                    "gain from sparsity (rerun with more --rounds): unstructured sparsity "
                    "gives no speed-up with dense kernels."
                )
        if row["params"] < 0.95 * dense["params"] and row["runtime"] in ("torch", "onnx"):
            notes.append(flop_note(rows, row, batches))
        if row["runtime"] == "sparse":
            swapped, linears = row["sparse_linears"]
            notes.append(
                f"{label}: CSR kernels on {swapped} of {linears} Linear layers (convolutions "
                f"stay dense), {100 * zeros:.1f}% zeros overall, runs at {at}: "
                f"{_verdict(speedups, batches)} from sparse kernels."
            )
        if row["runtime"] == "torch" and row.get("sparse_linears", [1])[0] == 0:
            notes.append(
                f"{row['name']}: no Linear layer has >= {100 * SPARSE_MIN_ZEROS:.0f}% exact "
                "zeros: no sparse variant."
            )
        diff = row["max_abs_diff"]
        if diff is not None and diff > PARITY_TOLERANCE:
            notes.append(f"{label}: outputs differ by {diff:.2g} > {PARITY_TOLERANCE:g}.")
    return notes


def flop_note(rows: list[dict], row: dict, batches: list[int]) -> str:
    """Speed-up of a smaller model over the dense reference in the same runtime, as a share
    of its FLOP reduction (1: time falls exactly as FLOPs do)."""
    same = [r for r in rows if r["runtime"] == row["runtime"] and r["name"] == rows[0]["name"]]
    if not same:
        return f"{row['name']} ({row['runtime']}): no dense {row['runtime']} row to compare."
    reference = same[0]
    fewer = reference["gflop_per_s"] / row["gflop_per_s"]
    speedups = [reference["rtf"][str(b)] / row["rtf"][str(b)] for b in batches]
    shares = " / ".join(f"{s / fewer:.2f}" for s in speedups)
    ups = " / ".join(f"{s:.2f}x" for s in speedups)
    batch_names = " / ".join(f"b{b}" for b in batches)
    return (
        f"{row['name']} ({row['runtime']}): {fewer:.2f}x fewer FLOPs than "
        f"{reference['name']} ({reference['runtime']}), {ups} faster ({batch_names}): "
        f"speed-up / FLOP reduction = {shares}."
    )


def _verdict(speedups: list[float], batches: list[int]) -> str:
    faster = [b for b, s in zip(batches, speedups, strict=True) if s >= NO_SPEEDUP_BELOW]
    if len(faster) == len(batches):
        return "a speed-up"
    if not faster:
        return f"no speed-up (none reaches {NO_SPEEDUP_BELOW:.2f}x)"
    return f"no consistent speed-up (only at {', '.join(f'b{b}' for b in faster)})"


# --- main ------------------------------------------------------------------------------


def model_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH")
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(f"{path}: does not exist")
    return name, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=model_spec, action="append", metavar="NAME=PATH")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per clip")
    parser.add_argument("--batch", type=int, default=8, help="the batch measured besides 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--sparse", action="store_true", help="add CSR sparse-kernel variants")
    parser.add_argument("--onnx", action="store_true", help="add onnxruntime variants")
    parser.add_argument("--quick", action="store_true", help="2 s clips, batch 2, one round")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        metavar="IN",
        help="print the table of an earlier --json run again, measuring nothing",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    if args.from_json:
        stored = json.loads(args.from_json.read_text())
        print("\n".join(table(stored["rows"], stored["batches"])))
        print("\n".join(footer(stored["rows"], stored["batches"])))
        return
    if not args.model:
        parser.error("give at least one --model NAME=PATH (the first is the dense reference)")
    if args.quick:
        args.seconds, args.batch, args.rounds = 2.0, 2, 1
    batches = [1, args.batch] if args.batch != 1 else [1]

    import torch
    import transformers

    from pinchgate.errors import PinchgateError

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, path in args.model:
            try:
                rows += prepare(name, path, args, Path(tmp))
            except PinchgateError as exc:
                raise SystemExit(f"{name}: {exc}") from None
        runs: dict[int, dict[str, list[dict]]] = {i: {} for i in range(len(rows))}
        for _ in range(args.rounds):
            for i, row in enumerate(rows):
                for batch in batches:
                    spec = {
                        **{k: row.get(k) for k in ("name", "path", "runtime", "mask", "onnx")},
                        "batch": batch,
                        "seconds": args.seconds,
                        "threads": args.threads,
                    }
                    runs[i].setdefault(str(batch), []).append(run_child(spec))
    for i, row in enumerate(rows):
        measured = runs[i]
        audio_s = {b: int(b) * args.seconds for b in measured}
        row["rtf_runs"] = {b: [r["compute_s"] / audio_s[b] for r in measured[b]] for b in measured}
        row["rtf"] = {b: statistics.median(v) for b, v in row["rtf_runs"].items()}
        row["peak_mib"] = {
            b: statistics.median(r["peak_mib"] for r in measured[b]) for b in measured
        }
        row.pop("onnx", None)  # the exported file was temporary
        row["load_s"] = statistics.median(r["load_s"] for m in measured.values() for r in m)

    versions = f"torch {torch.__version__}"
    if args.onnx:
        import onnxruntime

        versions += f", onnxruntime {onnxruntime.__version__}"
    print(
        f"\nCPU {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"{versions}; audio: synthetic (seeded Gaussian noise at 16 kHz), "
        f"{args.seconds:g} s per clip, batches {' and '.join(map(str, batches))}; median of "
        f"{args.rounds} round(s), each a fresh process per variant and batch: load, one "
        f"warm-up, forwards timed until {MIN_TIMED_S:g} s of compute (their median)"
    )
    print("\n".join(table(rows, batches)))
    print("\n".join(footer(rows, batches)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "machine": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "seconds_per_clip": args.seconds,
            "batches": batches,
            "rounds": args.rounds,
            "audio": "synthetic: seeded Gaussian noise, 16 kHz",
            "reference": rows[0]["name"],
            "rows": rows,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
