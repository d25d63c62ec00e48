"""The training loop, for dense fine-tuning and for every compression method.

Read `run_finetune` top to bottom: set up the run (directory, processes), the processor,
data and model (through the model's family), the method and the optimiser; resume from the
last checkpoint if one exists; then the loop, where every step is visible: batch in, task
loss plus the method's sparsity term, backward, optimiser step, the method's after-step,
log, evaluate, checkpoint. At the end the method hardens the model, which is saved, read
back as exported and scored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object, set_seed
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_scheduler

from pinchgate import checkpoint as ckpt
from pinchgate.config import FinetuneConfig
from pinchgate.console import is_main_process, stderr_console
from pinchgate.data.batching import SpeechDataset, bucket_batches
from pinchgate.data.builtin import corpus_label, resolve_corpus
from pinchgate.data.corpus import CorpusReport, DecodedClips, Utterance, load_corpus, read_corpus
from pinchgate.errors import PinchgateError
from pinchgate.evaluate import EvalResult, evaluate_corpus
from pinchgate.families import ModelFamily, count_parameters, family_for, resolve_model
from pinchgate.methods.base import CompressionMethod

DECODED_CLIPS = "decoded_clips.json"  # in a run directory: what decoding each clip found
# Files of a run directory derived from its configuration: replaced with it (claim_run_dir).
STALE_AFTER_CHANGE = ("vocab.json", "data_report.json", "metrics.jsonl")


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


def run_finetune(
    cfg: FinetuneConfig,
    method: CompressionMethod | None = None,
    console: Console | None = None,
) -> dict:
    """Train (or resume) the run in `cfg.output_dir`, with `method` if one is given; one run
    at a time in a directory (its lock, `checkpoint.run_lock`, held by the main process)."""
    cfg.validate()
    family_for(cfg.model).check_options(cfg)  # refused options leave no trace on disk
    with ckpt.run_lock(Path(cfg.output_dir), hold=is_main_process()):
        return train_locked(cfg, method, console)


def train_locked(
    cfg: FinetuneConfig, method: CompressionMethod | None, console: Console | None
) -> dict:
    """The run itself, its directory locked: read this one top to bottom."""
    saved_cfg, cfg = cfg, dataclasses.replace(cfg, model=resolve_model(cfg.model))
    run_dir = Path(cfg.output_dir)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        kwargs_handlers=[ddp],
        cpu=not torch.cuda.is_available(),  # lets torchrun on CPUs form a gloo group
    )
    console = console or stderr_console()
    main = accelerator.is_main_process
    say = console.print if main else (lambda *a, **k: None)
    family = family_for(cfg.model)
    claim_run_dir(saved_cfg, run_dir, accelerator)  # the model as named (e.g. whisper-tiny.en)

    # --- processor, data, model, method, optimiser --------------------------------------------
    processor, new_head = prepare_processor(cfg, family, run_dir, accelerator)
    with accelerator.main_process_first():  # the main process decodes, the others read
        data = load_run_data(
            cfg,
            family.allowed_characters(processor),
            family.max_input_seconds(processor),
            run_dir / DECODED_CLIPS,
        )
    report_data(data, run_dir, say, main)
    set_seed(cfg.seed)
    model = family.training_model(cfg, processor, new_head)
    if method is not None:
        method.attach(model)  # gates, masks, ...: before the optimiser sees the parameters
    params = count_parameters(model)
    say(f"model: {cfg.model} ({params['total']:,} parameters)")
    teacher = load_teacher(cfg, family, processor, model, accelerator.device, say)
    unused = method is not None and method.unused_parameters
    if unused or getattr(model.config, "layerdrop", 0.0) > 0:
        ddp.find_unused_parameters = True  # dropped layers leave parameters without grads
    optimizer = build_optimizer(model, cfg, method)
    scheduler = get_scheduler(
        cfg.scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.max_steps,
    )
    checkpoints = Checkpoints(run_dir / "checkpoints", cfg, accelerator, method)
    at = checkpoints.resume(model, optimizer, scheduler, say)
    model, optimizer = accelerator.prepare(model, optimizer)
    bare = accelerator.unwrap_model(model)
    batches = BatchStream(cfg, family, processor, data.train, accelerator, at)
    log = TrainLog(cfg, run_dir, accelerator, console, at)

    # --- the loop: batch in, loss out, step, log, evaluate, checkpoint ------------------------
    model.train()
    step = at.step
    with log.progress:
        while step < cfg.max_steps:
            optimizer.zero_grad(set_to_none=True)
            step_loss, logs = 0.0, {}
            for micro in range(cfg.grad_accum):
                batch = batches.next()
                last = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    if teacher is None:
                        loss = family.loss(model, batch)
                    else:
                        loss = family.distillation_loss(
                            model, teacher, batch, cfg.distill_weight, cfg.distill_temperature
                        )
                    if method is not None:
                        term, logs = method.sparsity_term(bare, step)
                        if term is not None:
                            loss = loss + term
                    check_finite(loss, step, accelerator, batches.last, checkpoints.root)
                    accelerator.backward(loss / cfg.grad_accum)
                step_loss += loss.detach().float().item() / cfg.grad_accum
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if method is not None:
                logs.update(method.after_step(bare, step))
            log.step(step, step_loss, grad_norm, scheduler.get_last_lr()[0], batches.epoch, logs)
            if cfg.eval_every and step % cfg.eval_every == 0 and data.dev and step < cfg.max_steps:
                if main:
                    result = evaluate_corpus(
                        bare, family, processor, data.dev, "dev", None, cfg.eval_batch_seconds
                    )
                    log.dev(step, result)
                accelerator.wait_for_everyone()
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                checkpoints.save(step, bare, optimizer, scheduler, batches, log.elapsed())

    # --- the model as exported, read back and scored ------------------------------------------
    results: dict = {"steps": step, "train_seconds": log.elapsed(), "parameters": params}
    summary = method.finalize(bare) if method is not None else None  # e.g. harden the masks
    if summary is not None:
        results.update(summary.to_results())
    results["processes"] = accelerator.num_processes
    if accelerator.num_processes > 1:  # data parallelism must leave identical replicas
        digests = gather_object([weights_digest(bare)])
        results["replicas_agree"] = len(set(digests)) == 1
    if main:
        model_dir = family.save(bare, processor, run_dir / "model")
        # Scores come from the model as exported, read back as a user would load it.
        exported = family.load(model_dir).to(accelerator.device)
        results["eval"] = evaluate_sets(
            exported, family, processor, data, run_dir, cfg.eval_batch_seconds, say
        )
        ckpt.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1))
        say(f"run directory: {run_dir}  (model: {model_dir}, results.json)")
    accelerator.wait_for_everyone()
    log.close()
    results.update(model=bare, family=family, processor=processor, data=data)
    return results


# --- setting up -------------------------------------------------------------------------------


def claim_run_dir(cfg: FinetuneConfig, run_dir: Path, accelerator: Accelerator) -> None:
    """A new run directory gets the config; one where a run has started (a checkpoint or
    results) must hold this very run. A start that never reached a checkpoint (refused by a
    check, or killed early) is no run to resume: its config and what it derived from it
    are replaced."""
    saved_cfg_path = run_dir / "config.yaml"
    stale = False
    if saved_cfg_path.is_file():
        differences = cfg.differences(type(cfg).load(saved_cfg_path))
        started = (run_dir / "results.json").is_file() or ckpt.latest_checkpoint(
            run_dir / "checkpoints"
        ) is not None
        if differences and started:
            raise PinchgateError(
                f"{run_dir}: holds a run with another configuration ({'; '.join(differences)}); "
                "use another --output-dir or delete it"
            )
        stale = bool(differences)
    if accelerator.is_main_process:
        for name in STALE_AFTER_CHANGE if stale else ():
            (run_dir / name).unlink(missing_ok=True)
        ckpt.atomic_write_text(saved_cfg_path, cfg.to_yaml())
    accelerator.wait_for_everyone()


def prepare_processor(
    cfg: FinetuneConfig, family: ModelFamily, run_dir: Path, accelerator: Accelerator
):
    """The family's processor for the run; the main process makes (and saves) any
    vocabulary first, the others read it."""
    train_path = resolve_corpus(cfg.train)
    if accelerator.is_main_process:
        train_raw, _ = read_corpus(train_path)
        prepared = family.prepare_processor(cfg, run_dir, [u.transcript for u in train_raw])
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        prepared = family.prepare_processor(cfg, run_dir, [])
    return prepared


def load_run_data(
    cfg: FinetuneConfig,
    vocab: set[str] | None,
    longest: float | None = None,
    decoded: Path | None = None,
) -> RunData:
    """The run's corpora, checked, every clip decoded (undecodable, NaN/Inf and silent ones
    are skipped and counted; `decoded`: the file that remembers what decoding found, so a
    resume decodes only what changed); `longest`: clips the model cannot take whole (longer
    than its input window) are skipped and counted, in every set."""
    clips = DecodedClips(decoded)
    train_limit = cfg.max_duration if longest is None else min(cfg.max_duration, longest)
    train, train_report = load_corpus(
        resolve_corpus(cfg.train), vocab, train_limit, cfg.min_duration, clips
    )
    reports = [train_report]
    dev = None
    if cfg.dev:
        dev, dev_report = load_corpus(
            resolve_corpus(cfg.dev), None, longest, cfg.min_duration, clips
        )
        reports.append(dev_report)
    tests = {}
    for spec in cfg.test:
        tests[spec], report = load_corpus(
            resolve_corpus(spec), None, longest, cfg.min_duration, clips
        )
        reports.append(report)
    clips.save()
    return RunData(train, dev, tests, reports)


def report_data(data: RunData, run_dir: Path, say, main: bool) -> None:
    for report in data.reports:
        say(report.summary())
        for problem in report.problems[:5]:
            say(f"  skipped {problem}")
    if main:
        (run_dir / "data_report.json").write_text(
            json.dumps([r.to_dict() for r in data.reports], indent=1)
        )


def load_teacher(cfg: FinetuneConfig, family, processor, model, device, say):
    """The frozen teacher of `cfg.distill_from` (a model dir, a run dir or a built-in name),
    or None without one."""
    if cfg.distill_from is None:
        return None
    source = resolve_model(cfg.distill_from)  # a run directory names its final model/
    teacher = family.teacher_model(source, processor, model).to(device)
    say(
        f"teacher: {cfg.distill_from} (weight {cfg.distill_weight}, "
        f"temperature {cfg.distill_temperature})"
    )
    return teacher


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig, method=None):
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
    if method is not None:
        extra = method.param_groups(model)
        taken = {id(p) for g in extra for p in g["params"]}
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in taken]
        groups += extra
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate)


# --- batches, checkpoints, logs ---------------------------------------------------------------


@dataclass
class Position:
    """Where a run stands: what a checkpoint records and a resume restores."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed: float = 0.0  # training seconds before this start


class BatchStream:
    """The training batches, epoch after epoch, each epoch in its own (seed, epoch) order,
    from any position: a resumed run sees exactly the batches it would have seen."""

    def __init__(self, cfg, family, processor, utterances, accelerator, at: Position) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        labels = partial(family.labels, processor)
        self.dataset = SpeechDataset(utterances, family.sampling_rate(processor), labels)
        self.collate = partial(family.collate, processor)
        self.epoch, self.batch_in_epoch = at.epoch, at.batch_in_epoch
        self.iterator = iter(self.loader(self.epoch, self.batch_in_epoch))
        self.last: list[str] = []  # the audio files of the last batch, for messages

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        cfg = self.cfg
        batches = bucket_batches(self.dataset.durations, cfg.batch_seconds, cfg.seed, epoch)
        world = self.accelerator.num_processes
        usable = len(batches) // world * world  # every process gets the same number
        if usable == 0:
            raise PinchgateError(f"{cfg.train}: too little data for {world} processes")
        return batches[self.accelerator.process_index : usable : world]

    def loader(self, epoch: int, start: int):
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.epoch_batches(epoch)[start:],
            collate_fn=self.collate,
            num_workers=self.cfg.num_workers,
        )

    def next(self) -> dict[str, torch.Tensor]:
        batch = next(self.iterator, None)
        if batch is None:  # end of epoch: the next one has its own order
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self.iterator = iter(self.loader(self.epoch, 0))
            batch = next(self.iterator)
        self.batch_in_epoch += 1
        utterances = self.dataset.utterances
        self.last = [str(utterances[i].audio_path) for i in batch.pop("index").tolist()]
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}


class Checkpoints:
    """Atomic checkpoints of the model, optimiser, scheduler, RNG, method and position."""

    def __init__(self, root: Path, cfg, accelerator: Accelerator, method) -> None:
        self.root = root
        self.cfg = cfg
        self.accelerator = accelerator
        self.method = method

    def resume(self, model, optimizer, scheduler, say) -> Position:
        path = ckpt.latest_checkpoint(self.root)
        if path is None:
            return Position()
        model_state, trainer_state, counters = ckpt.load_checkpoint(path)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        if self.method is not None:
            self.method.load_state(trainer_state.get("hooks", {}))
        rng_states = trainer_state["rng"]
        if len(rng_states) == self.accelerator.num_processes:
            ckpt.set_rng_state(rng_states[self.accelerator.process_index])
        at = Position(
            counters["step"], counters["epoch"], counters["batch_in_epoch"], counters["elapsed"]
        )
        say(f"resuming from {path} (step {at.step}/{self.cfg.max_steps})")
        return at

    def save(self, step: int, model, optimizer, scheduler, batches: BatchStream, elapsed: float):
        states = gather_object([ckpt.rng_state()])
        if self.accelerator.is_main_process:
            trainer_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": states,
                "hooks": self.method.state() if self.method is not None else {},
            }
            counters = {
                "epoch": batches.epoch,
                "batch_in_epoch": batches.batch_in_epoch,
                "elapsed": elapsed,
            }
            ckpt.save_checkpoint(
                self.root,
                step,
                model.state_dict(),
                trainer_state,
                counters,
                self.cfg.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()


class TrainLog:
    """metrics.jsonl (and TensorBoard when installed), the progress bar on a terminal, and a
    plain line every `log_every` steps when the output is a file."""

    def __init__(self, cfg, run_dir: Path, accelerator, console: Console, at: Position) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.console = console
        self.main = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.writer = _tensorboard(run_dir) if self.main else None
        self.elapsed_before = at.elapsed
        self.started = time.perf_counter()
        self.window_loss, self.window_steps, self.window_start = 0.0, 0, time.perf_counter()
        self.plain = self.main and not console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} steps/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.main or self.plain,
        )
        self.task = self.progress.add_task(
            "train", total=cfg.max_steps, completed=at.step, loss="-", rate="-"
        )
        self.first_step = at.step

    def elapsed(self) -> float:
        """Training seconds of the run so far, earlier starts included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def step(self, step: int, loss: float, grad_norm, lr: float, epoch: int, logs: dict) -> None:
        self.window_loss += loss
        self.window_steps += 1
        rate = self.window_steps / max(time.perf_counter() - self.window_start, 1e-9)
        self.progress.update(self.task, completed=step, loss=f"{loss:.3f}", rate=f"{rate:.2f}")
        cfg = self.cfg
        if not (step % cfg.log_every == 0 or step == cfg.max_steps):
            return
        mean_loss = self.accelerator.reduce(
            torch.tensor(self.window_loss / self.window_steps, device=self.accelerator.device),
            "mean",
        ).item()
        row = {
            "step": step,
            "epoch": epoch,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "steps_per_s": rate,
            "elapsed_s": self.elapsed(),
            **logs,
        }
        if self.main:
            _append_jsonl(self.path, row)
            if self.writer is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key != "step":
                        self.writer.add_scalar(f"train/{key}", value, step)
        if self.plain:
            self.console.print(self._plain_line(step, mean_loss, rate), highlight=False)
        self.window_loss, self.window_steps, self.window_start = 0.0, 0, time.perf_counter()

    def _plain_line(self, step: int, loss: float, rate: float) -> str:
        done = step - self.first_step
        spent = time.perf_counter() - self.started
        left = (self.cfg.max_steps - step) * spent / done if done else float("nan")
        return (
            f"step {step}/{self.cfg.max_steps}  loss {loss:.3f}  {rate:.2f} steps/s  "
            f"elapsed {_clock(spent)}  ETA {_clock(left)}"
        )

    def dev(self, step: int, result: EvalResult) -> None:
        _append_jsonl(self.path, {"step": step, "dev_wer": result.wer})
        self.progress.console.print(f"step {step}: {result.summary()}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: not known yet
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def evaluate_zero_shot(cfg: FinetuneConfig, out_dir: Path, console: Console | None = None):
    """Score the model a run starts from, as the run would train it (same processor and,
    for Whisper, the same window), on the run's test sets: `out_dir/eval/<set>.jsonl` and
    `out_dir/results.json`. Done once; a finished one is read back."""
    done = out_dir / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg.validate()
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model), dev=None)
    family = family_for(cfg.model)
    family.check_options(cfg)
    say = (console or stderr_console()).print
    processor, new_head = family.prepare_processor(cfg, out_dir, [])
    if new_head:
        raise PinchgateError(f"--model {cfg.model}: it has no output head to decode with yet")
    data = load_run_data(cfg, None, family.max_input_seconds(processor))
    model = family.training_model(cfg, processor, new_head).eval()
    say(f"zero-shot: {cfg.model} before any training")
    scores = evaluate_sets(model, family, processor, data, out_dir, cfg.eval_batch_seconds, say)
    results = {"model": cfg.model, "eval": scores}
    ckpt.atomic_write_text(done, json.dumps(results, indent=1))
    return results


# --- the end ----------------------------------------------------------------------------------


def evaluate_sets(model, family, processor, data: RunData, run_dir, batch_seconds, say) -> dict:
    """Score the run's dev and test sets; one JSON line per utterance in eval/<set>.jsonl."""
    out = {}
    sets = ([("dev", data.dev)] if data.dev else []) + list(data.tests.items())
    for name, utterances in sets:
        label = corpus_label(name)
        result: EvalResult = evaluate_corpus(
            model,
            family,
            processor,
            utterances,
            label,
            run_dir / "eval" / f"{label}.jsonl",
            batch_seconds,
        )
        say(result.summary())
        out[label] = result.to_dict()
    return out


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, to compare replicas exactly."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_finite(
    loss: torch.Tensor,
    step: int,
    accelerator: Accelerator,
    batch: list[str] | None = None,
    checkpoints: Path | None = None,
) -> None:
    """Stop on a NaN or infinite loss, naming the audio files of the batch behind it."""
    here = torch.isfinite(loss.detach()).float()
    finite = accelerator.reduce(here, "min") if accelerator.num_processes > 1 else here
    if finite.item() < 1:
        if here.item() < 1 and batch:
            where = f" on the batch of {', '.join(batch[:4])}" + (
                f" and {len(batch) - 4} more" if len(batch) > 4 else ""
            )
        else:
            where = " on another process's batch" if here.item() == 1 else ""
        last = ckpt.latest_checkpoint(checkpoints) if checkpoints is not None else None
        kept = f"the checkpoint {last.name} is kept" if last else "no checkpoint was written yet"
        raise PinchgateError(
            f"non-finite loss ({loss.item()}) at step {step + 1}{where}: stopping ({kept}); "
            "check that audio, or lower the learning rate"
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
