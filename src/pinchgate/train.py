"""Dense CTC fine-tuning on Hugging Face accelerate: CPU, one GPU, or many via accelerate launch.

Read top to bottom: set up the run directory, data, vocabulary and model; resume from the
last checkpoint if one exists; then batch in, loss out, step, log, checkpoint; finally
save the model and evaluate it. `TrainHooks` lets the compression loop add its loss term,
parameters and state without a second copy of this loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_scheduler

from pinchgate import checkpoint as ckpt
from pinchgate.config import FinetuneConfig
from pinchgate.data.batching import CTCCollator, SpeechDataset, bucket_batches
from pinchgate.data.builtin import resolve_corpus
from pinchgate.data.corpus import CorpusReport, Utterance, load_corpus, read_corpus
from pinchgate.data.text import normalize_transcript
from pinchgate.data.vocab import build_vocab, load_tokenizer, save_vocab, vocab_characters
from pinchgate.errors import PinchgateError
from pinchgate.evaluate import EvalResult, evaluate_corpus
from pinchgate.models import (
    build_model,
    count_parameters,
    feature_extractor_for,
    is_local_model,
    load_config,
    load_ctc_model,
)


@dataclass
class TrainHooks:
    """What a method adds to plain fine-tuning (the gates add a sparsity term, for example)."""

    extra_loss: Callable[[torch.nn.Module, int], tuple[torch.Tensor, dict]] | None = None
    param_groups: Callable[[torch.nn.Module], list[dict]] | None = None
    after_step: Callable[[torch.nn.Module, int], dict] | None = None
    state: Callable[[], dict] | None = None
    load_state: Callable[[dict], None] | None = None
    # Turns the trained model into the one exported (e.g. harden the masks); every process.
    finalize: Callable[[torch.nn.Module], dict] | None = None
    unused_parameters: bool = False  # some parameters may get no gradient in a step (DDP)


@dataclass
class RunData:
    train: list[Utterance]
    dev: list[Utterance] | None
    tests: dict[str, list[Utterance]]
    reports: list[CorpusReport] = field(default_factory=list)


def resolve_mixed_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def prepare_tokenizer(cfg: FinetuneConfig, run_dir: Path, train_raw: list[Utterance]):
    """The run's vocabulary: kept from an earlier start of this run, else the one given,
    else the model's own, else built from the training transcripts. Returns
    (tokenizer, head_is_new)."""
    saved = run_dir / "vocab.json"
    model_vocab = (
        Path(cfg.model) / "vocab.json" if cfg.model != "toy" and is_local_model(cfg.model) else None
    )
    if saved.is_file():
        source = saved
    elif cfg.vocab:
        source = Path(cfg.vocab)
    elif model_vocab is not None and model_vocab.is_file():
        source = model_vocab
    else:
        vocab = build_vocab(normalize_transcript(u.transcript) for u in train_raw)
        source = save_vocab(vocab, saved)
    tokenizer = load_tokenizer(source)
    if not saved.is_file():
        save_vocab(tokenizer.get_vocab(), saved)
    head_is_new = cfg.new_head or source != model_vocab
    return tokenizer, head_is_new


def load_run_data(cfg: FinetuneConfig, vocab: set[str] | None) -> RunData:
    train, train_report = load_corpus(
        resolve_corpus(cfg.train), vocab, cfg.max_duration, cfg.min_duration
    )
    reports = [train_report]
    dev = None
    if cfg.dev:
        dev, dev_report = load_corpus(resolve_corpus(cfg.dev), None, None, cfg.min_duration)
        reports.append(dev_report)
    tests = {}
    for spec in cfg.test:
        tests[spec], report = load_corpus(resolve_corpus(spec), None, None, cfg.min_duration)
        reports.append(report)
    return RunData(train, dev, tests, reports)


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig, hooks: TrainHooks):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Biases and norms are not decayed, as usual for transformers.
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if hooks.param_groups is not None:
        extra = hooks.param_groups(model)
        taken = {id(p) for g in extra for p in g["params"]}
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in taken]
        groups += extra
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)


def run_finetune(
    cfg: FinetuneConfig,
    hooks: TrainHooks | None = None,
    build: Callable[[torch.nn.Module], None] | None = None,
    console: Console | None = None,
) -> dict:
    """Train (or resume) the run in `cfg.output_dir`; returns the final results."""
    hooks = hooks or TrainHooks()
    cfg.validate()
    run_dir = Path(cfg.output_dir)
    checkpoint_root = run_dir / "checkpoints"
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        kwargs_handlers=[ddp],
        cpu=not torch.cuda.is_available(),  # lets torchrun on CPUs form a gloo group
    )
    console = console or Console(stderr=True)
    main = accelerator.is_main_process
    say = console.print if main else (lambda *a, **k: None)

    # --- the run directory: a new run, or the same run resumed -------------------------
    saved_cfg_path = run_dir / "config.yaml"
    resume_from = ckpt.latest_checkpoint(checkpoint_root)
    if saved_cfg_path.is_file():
        differences = cfg.differences(type(cfg).load(saved_cfg_path))
        if differences:
            raise PinchgateError(
                f"{run_dir}: holds a run with another configuration ({'; '.join(differences)}); "
                "use another --output-dir or delete it"
            )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(saved_cfg_path, cfg.to_yaml())
    accelerator.wait_for_everyone()

    # --- data and vocabulary ------------------------------------------------------------
    train_path = resolve_corpus(cfg.train)
    if main:
        train_raw, _ = read_corpus(train_path)
        tokenizer, head_is_new = prepare_tokenizer(cfg, run_dir, train_raw)
    accelerator.wait_for_everyone()
    if not main:
        tokenizer, head_is_new = prepare_tokenizer(cfg, run_dir, [])
    data = load_run_data(cfg, vocab_characters(tokenizer))
    for report in data.reports:
        say(report.summary())
        for problem in report.problems[:5]:
            say(f"  skipped {problem}")
    if main:
        (run_dir / "data_report.json").write_text(
            json.dumps([r.to_dict() for r in data.reports], indent=1)
        )

    # --- model ---------------------------------------------------------------------------
    set_seed(cfg.seed)
    if cfg.model == "toy":
        model = build_model(len(tokenizer), tokenizer.pad_token_id, seed=cfg.seed)
    else:
        load_config(cfg.model)  # a clear error before anything heavy
        model = load_ctc_model(
            cfg.model, len(tokenizer), tokenizer.pad_token_id, new_head=head_is_new
        )
    feature_extractor = feature_extractor_for(
        model.config, None if cfg.model == "toy" else cfg.model
    )
    if cfg.freeze_feature_encoder:
        model.freeze_feature_encoder()
    if build is not None:
        build(model)  # e.g. attach gates, before the optimiser sees the parameters
    params = count_parameters(model)
    say(f"model: {cfg.model} ({params['total']:,} parameters)")
    if hooks.unused_parameters or getattr(model.config, "layerdrop", 0.0) > 0:
        ddp.find_unused_parameters = True  # dropped layers leave parameters without grads
    optimizer = build_optimizer(model, cfg, hooks)
    scheduler = get_scheduler(
        cfg.scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.max_steps,
    )

    # --- resume ---------------------------------------------------------------------------
    step, epoch, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
    if resume_from is not None:
        model_state, trainer_state, counters = ckpt.load_checkpoint(resume_from)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        if hooks.load_state is not None:
            hooks.load_state(trainer_state.get("hooks", {}))
        rng_states = trainer_state["rng"]
        if len(rng_states) == accelerator.num_processes:
            ckpt.set_rng_state(rng_states[accelerator.process_index])
        step, epoch = counters["step"], counters["epoch"]
        batch_in_epoch, elapsed_before = counters["batch_in_epoch"], counters["elapsed"]
        say(f"resuming from {resume_from} (step {step}/{cfg.max_steps})")
    model, optimizer = accelerator.prepare(model, optimizer)

    dataset = SpeechDataset(data.train, feature_extractor.sampling_rate, tokenizer)
    collate = CTCCollator(feature_extractor)
    metrics_path = run_dir / "metrics.jsonl"
    writer = _tensorboard(run_dir) if main else None

    def epoch_batches(epoch_index: int) -> list[list[int]]:
        batches = bucket_batches(dataset.durations, cfg.batch_seconds, cfg.seed, epoch_index)
        world = accelerator.num_processes
        usable = len(batches) // world * world  # every process gets the same number
        if usable == 0:
            raise PinchgateError(f"{cfg.train}: too little data for {world} processes")
        return batches[accelerator.process_index : usable : world]

    def loader(epoch_index: int, start: int):
        batches = epoch_batches(epoch_index)[start:]
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, collate_fn=collate, num_workers=cfg.num_workers
        )

    def save(step_now: int) -> None:
        states = gather_object([ckpt.rng_state()])
        if main:
            trainer_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": states,
                "hooks": hooks.state() if hooks.state else {},
            }
            counters = {
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "elapsed": elapsed_before + time.perf_counter() - started,
            }
            ckpt.save_checkpoint(
                checkpoint_root,
                step_now,
                accelerator.unwrap_model(model).state_dict(),
                trainer_state,
                counters,
                cfg.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    # --- the loop: batch in, loss out, step, log, checkpoint -------------------------------
    progress = Progress(
        TextColumn("[bold]step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} steps/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not main,
    )
    model.train()
    started = time.perf_counter()
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    micro = 0
    iterator = iter(loader(epoch, batch_in_epoch))
    with progress:
        task = progress.add_task("train", total=cfg.max_steps, completed=step, loss="-", rate="-")
        while step < cfg.max_steps:
            optimizer.zero_grad(set_to_none=True)
            step_loss, extra_logs = 0.0, {}
            for micro in range(cfg.grad_accum):
                batch = next(iterator, None)
                if batch is None:  # end of epoch: the next one has its own order
                    epoch, batch_in_epoch = epoch + 1, 0
                    iterator = iter(loader(epoch, 0))
                    batch = next(iterator)
                batch_in_epoch += 1
                batch.pop("index")
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                last = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
                with sync:
                    loss = model(**batch).loss
                    if hooks.extra_loss is not None:
                        extra, extra_logs = hooks.extra_loss(accelerator.unwrap_model(model), step)
                        loss = loss + extra
                    _check_finite(loss, step, accelerator)
                    accelerator.backward(loss / cfg.grad_accum)
                step_loss += loss.detach().float().item() / cfg.grad_accum
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if hooks.after_step is not None:
                extra_logs.update(hooks.after_step(accelerator.unwrap_model(model), step))
            window_loss += step_loss
            window_steps += 1
            rate = window_steps / max(time.perf_counter() - window_start, 1e-9)
            progress.update(task, completed=step, loss=f"{step_loss:.3f}", rate=f"{rate:.2f}")

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                mean_loss = accelerator.reduce(
                    torch.tensor(window_loss / window_steps, device=accelerator.device), "mean"
                ).item()
                row = {
                    "step": step,
                    "epoch": epoch,
                    "loss": mean_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "steps_per_s": rate,
                    "elapsed_s": elapsed_before + time.perf_counter() - started,
                    **extra_logs,
                }
                if main:
                    _append_jsonl(metrics_path, row)
                    if writer is not None:
                        for key, value in row.items():
                            if isinstance(value, (int, float)) and key != "step":
                                writer.add_scalar(f"train/{key}", value, step)
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if cfg.eval_every and step % cfg.eval_every == 0 and data.dev and step < cfg.max_steps:
                if main:
                    result = evaluate_corpus(
                        accelerator.unwrap_model(model),
                        feature_extractor,
                        tokenizer,
                        data.dev,
                        "dev",
                        batch_seconds=cfg.eval_batch_seconds,
                    )
                    _append_jsonl(metrics_path, {"step": step, "dev_wer": result.wer})
                    progress.console.print(f"step {step}: {result.summary()}")
                accelerator.wait_for_everyone()
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save(step)

    train_seconds = elapsed_before + time.perf_counter() - started
    final_model = accelerator.unwrap_model(model)
    results: dict = {"steps": step, "train_seconds": train_seconds, "parameters": params}
    if hooks.finalize is not None:
        results.update(hooks.finalize(final_model))
    results["processes"] = accelerator.num_processes
    if accelerator.num_processes > 1:  # data parallelism must leave identical replicas
        digests = gather_object([weights_digest(final_model)])
        results["replicas_agree"] = len(set(digests)) == 1
    if main:
        model_dir = save_model_dir(final_model, feature_extractor, tokenizer, run_dir / "model")
        # Scores come from the model as exported, read back by stock transformers.
        exported = load_ctc_model(model_dir).to(accelerator.device)
        results["eval"] = evaluate_sets(
            exported, feature_extractor, tokenizer, data, run_dir, cfg.eval_batch_seconds, say
        )
        ckpt.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1))
        say(f"run directory: {run_dir}  (model: {model_dir}, results.json)")
    accelerator.wait_for_everyone()
    if writer is not None:
        writer.close()
    results["model"] = final_model
    results["feature_extractor"] = feature_extractor
    results["tokenizer"] = tokenizer
    results["data"] = data
    return results


def evaluate_sets(model, feature_extractor, tokenizer, data: RunData, run_dir, batch_seconds, say):
    out = {}
    sets = ([("dev", data.dev)] if data.dev else []) + list(data.tests.items())
    for name, utterances in sets:
        label = Path(name.replace("toy:", "toy-")).name
        result: EvalResult = evaluate_corpus(
            model,
            feature_extractor,
            tokenizer,
            utterances,
            label,
            run_dir / "eval" / f"{label}.jsonl",
            batch_seconds,
        )
        say(result.summary())
        out[label] = result.to_dict()
    return out


def save_model_dir(model, feature_extractor, tokenizer, path: Path) -> Path:
    """A stock Hugging Face directory (safetensors, config, vocab, preprocessor), written
    under a temporary name and renamed so a half-written model never looks finished."""
    import shutil

    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    feature_extractor.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, to compare replicas exactly."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_finite(loss: torch.Tensor, step: int, accelerator: Accelerator) -> None:
    finite = torch.isfinite(loss.detach()).float()
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, "min")
    if finite.item() < 1:
        raise PinchgateError(
            f"non-finite loss ({loss.item()}) at step {step + 1}: stopping; lower the learning "
            "rate or check the data (the last checkpoint is kept)"
        )


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
