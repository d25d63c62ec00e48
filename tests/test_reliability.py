"""Bad inputs and races, tried as a new user would: each is a one-line error naming the file
or option (exit status 2), or a skip that is counted and reported; never a wrong model or a
lost run. The numbers in the section titles are those of the issue "Nothing silent, nothing
lost"; 13 (long runs) and 14 (processes, autocast, other encoders) are at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import get_scheduler
from typer.testing import CliRunner

import runs
from pinchgate import packing
from pinchgate.cli import app
from pinchgate.config import CompressConfig
from pinchgate.families.ctc import CTCFamily, greedy_ctc_text
from pinchgate.families.ctc_vocab import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def said(result) -> str:
    """What a command printed, lines as the terminal's width wrapped them joined again."""
    return " ".join(result.output.split())


def refused(result, *fragments: str) -> None:
    """The one-line error of a refused command: exit 2, no traceback, every fragment on the
    line that starts with `error:`."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = next(x for x in result.output.splitlines() if x.startswith("error:"))
    for fragment in fragments:
        assert fragment in line, (fragment, result.output)


def toy_args(toy_corpus: Path, out: Path, steps: int = 2, train: Path | None = None) -> list:
    return [
        "--model", "toy", "--train", train or toy_corpus / "train",
        "--test", toy_corpus / "test", "--output-dir", out, "--max-steps", steps,
        "--warmup-steps", "1", "--batch-seconds", "4", "--save-every", "1000",
        "--log-every", "1", "--eval-every", "0",
    ]  # fmt: skip


# --- a corpus salted with the faults real data has (2, 3, 7, 10) ------------------------------

GOOD = 24  # the utterances of the test corpus's train split


@pytest.fixture(scope="module")
def salted(tmp_path_factory, toy_corpus) -> Path:
    """The test corpus's train split plus one of each fault, every one beside good data: NaN
    samples, a silent clip, a FLAC cut in half (its header intact), a transcript with
    characters no vocabulary should take, an audio file without a transcript line, and a
    transcript line that is not UTF-8."""
    root = tmp_path_factory.mktemp("salted") / "train"
    shutil.copytree(toy_corpus / "train", root)
    trans = next(root.rglob("*.trans.txt"))
    chapter = trans.parent
    good = sorted(chapter.glob("*.flac"))[0]
    audio, rate = sf.read(good, dtype="float32")
    with_nan = audio.copy()
    with_nan[100:200] = np.nan
    sf.write(chapter / "100-1-9001.wav", with_nan, rate, subtype="FLOAT")
    sf.write(chapter / "100-1-9002.wav", np.zeros_like(audio), rate, subtype="FLOAT")
    data = good.read_bytes()
    (chapter / "100-1-9003.flac").write_bytes(data[: len(data) // 2])
    for name in ("100-1-9004", "100-1-9005", "100-1-9006"):
        shutil.copy(good, chapter / f"{name}.flac")
    lines = ["100-1-9001 SAID NOTE", "100-1-9002 DOT", "100-1-9003 TEN"]
    lines.append("100-1-9004 héllo wörld 42 ½ ☃")  # 100-1-9005: no line at all
    with open(trans, "ab") as handle:
        handle.write(("\n".join(lines) + "\n").encode("utf-8"))
        handle.write("100-1-9006 CAFÉ\n".encode("latin-1"))
    return root


SALT = {  # problem kind: what its line says (the file is named on the same line)
    "non_finite_audio": ("100-1-9001.wav", "samples are NaN or infinite"),
    "silent_audio": ("100-1-9002.wav", "samples is zero"),
    "unreadable_audio": ("100-1-9003.flac", "cannot decode audio"),
    "out_of_vocabulary": ("100-1-9004.flac", "characters outside the vocabulary"),
    "orphan_audio": ("100-1-9005.flac", "audio file without a transcript line"),
    "bad_encoding": (".trans.txt:", "line of utterance 100-1-9006 is not UTF-8 (byte 0xc9"),
}


def test_data_check_decodes_every_clip_and_names_every_fault(salted):
    result = invoke("data", "check", salted)
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(SALT)
    for file, message in SALT.values():
        assert any(file in line and message in line for line in skipped), (file, skipped)
    assert f"{GOOD} utterances" in result.output  # nothing good is lost
    assert "27 clips decoded in" in result.output  # the 24 and the three bad clips
    for char in ("4", "½", "☃", "É"):  # 3: the characters themselves are named
        assert char in next(line for line in skipped if "9004" in line)


def test_a_run_on_the_salted_corpus_skips_counts_and_reports_each_fault(
    salted, toy_corpus, tmp_path
):
    out = tmp_path / "run"
    result = invoke("finetune", *toy_args(toy_corpus, out, train=salted))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "data_report.json").read_text())[0]
    assert report["kept"] == GOOD
    assert report["dropped"] == dict.fromkeys(SALT, 1)
    assert f"{GOOD} utterances" in said(result) and "skipped:" in said(result)
    # 3: what the built vocabulary left out is said, and none of it is in vocab.json.
    assert "left out (not letters, or too rare): '2' (1 utterance)" in said(result)
    vocab = json.loads((out / "vocab.json").read_text())
    assert not set(vocab) & {"4", "2", "½", "☃", "É", "Ö"}


def test_evaluate_skips_and_counts_what_it_cannot_score(salted, tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    result = invoke("evaluate", tiny_model_dir, "--data", salted, "--output-dir", out)
    assert result.exit_code == 0, result.output
    for kind in ("non_finite_audio", "silent_audio", "unreadable_audio", "bad_encoding"):
        assert f"1 {kind}" in result.output, kind
    rows = (out / "train.jsonl").read_text().splitlines()
    assert len(rows) == GOOD + 1  # the good ones and the out-of-vocabulary one, scored as is
    assert not any("9001" in row or "9002" in row or "9003" in row for row in rows)


def test_a_non_finite_loss_names_the_files_of_its_batch(toy_corpus, tmp_path):
    # Finite samples the decode check lets through, but beyond float32's range once
    # normalised: the loss is NaN, and the run says which clip and that nothing was saved.
    corpus = tmp_path / "train"
    shutil.copytree(toy_corpus / "train", corpus)
    trans = next(corpus.rglob("*.trans.txt"))
    huge = (np.sin(np.arange(16000) / 5.0) * 3e38).astype(np.float32)
    sf.write(trans.parent / "100-1-9100.wav", huge, 16000, subtype="FLOAT")
    with open(trans, "a", encoding="utf-8") as handle:
        handle.write("100-1-9100 SAID\n")
    result = invoke("finetune", *toy_args(toy_corpus, tmp_path / "run", 20, train=corpus))
    refused(result, "non-finite loss (nan) at step", "100-1-9100.wav", "no checkpoint was written")


# --- 1, 8: a model directory whose config.json or weights are wrong ---------------------------


def model_copy(source: Path, out: Path, **config_changes) -> Path:
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"intermediate_size": 32}, "layers.0.feed_forward.intermediate_dense.bias' is [64] in"),
        ({"num_hidden_layers": 3}, "layers.2.attention.k_proj.bias' of config.json's model is not"),
        ({"num_hidden_layers": 1}, "layers.1.attention.k_proj.bias' of the weights has no place"),
    ],
    ids=["resized", "missing", "unexpected"],
)
def test_a_config_that_does_not_match_the_weights_is_refused(
    tiny_model_dir, toy_corpus, tmp_path, change, message
):
    model = model_copy(tiny_model_dir, tmp_path / "model", **change)
    weights = f"{model / 'model.safetensors'}: does not match its config.json"
    refused(invoke("evaluate", model, "--data", toy_corpus / "test"), weights, message)
    out = tmp_path / "run"
    args = toy_args(toy_corpus, out)
    args[1] = model
    refused(invoke("compress", *args, "--target-ratio", "1.2"), weights, message)
    assert not (out / "checkpoints").exists()


def test_only_a_new_ctc_head_is_initialised_fresh_and_the_run_says_so(
    tiny_model_dir, toy_corpus, tmp_path
):
    vocab = json.loads((tiny_model_dir / "vocab.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps({**vocab, "Z": len(vocab)}))
    out = tmp_path / "run"
    args = toy_args(toy_corpus, out, steps=1)
    args[1] = tiny_model_dir
    result = invoke("finetune", *args, "--vocab", tmp_path / "vocab.json")
    assert result.exit_code == 0, result.output
    assert f"CTC head: new, {len(vocab) + 1} outputs initialised at random" in said(result)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert after["lm_head.weight"].shape[0] == len(vocab) + 1
    conv = "wav2vec2.feature_extractor.conv_layers.0.conv.weight"
    assert torch.equal(before[conv], after[conv])  # frozen by default: loaded, not re-drawn


def test_truncated_weights_are_one_line(tiny_model_dir, toy_corpus, tmp_path):
    model = model_copy(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = f"{weights}: truncated or corrupt weights"
    refused(invoke("evaluate", model, "--data", toy_corpus / "test"), message)
    args = toy_args(toy_corpus, tmp_path / "run")
    args[1] = model
    refused(invoke("compress", *args, "--target-ratio", "1.2"), message)


# --- 4: two runs on one directory -------------------------------------------------------------


def test_a_second_run_on_a_directory_in_use_is_refused_and_a_killed_one_resumes(
    toy_corpus, tmp_path
):
    out = tmp_path / "run"
    command = runs.cli_command("finetune", toy_corpus, out, 150)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_for_step(step: int) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            rows = runs.read_jsonl(out / "metrics.jsonl")
            if rows and rows[-1]["step"] >= step:
                return
            time.sleep(0.02)

    wait_for_step(1)
    second = invoke(*command[3:])  # the same command, while the first one trains
    refused(second, f"{out}: in use by another run (PID {first.pid})")
    wait_for_step(12)  # past two checkpoints (every 5 steps)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert (out / ".pinchgate.lock").is_file()  # left behind, and it blocks nothing
    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    assert json.loads((out / "results.json").read_text())["steps"] == 150


# --- 5: the packed file's tensor table is under its checksum ---------------------------------


def test_an_edited_tensor_table_fails_the_checksum(tiny_model_dir, tmp_path):
    sparse = model_copy(tiny_model_dir, tmp_path / "sparse")
    state = load_file(sparse / "model.safetensors")
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.view(-1)[::2] = 0.0  # a hardened model's exact zeros
    save_file(state, sparse / "model.safetensors", metadata={"format": "pt"})
    packed = tmp_path / "packed"
    packing.pack(sparse, packed)
    path = packed / packing.PACKED_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    table = json.loads(metadata["pinchgate.tensors"])
    name = next(n for n, e in table.items() if e["dtype"] == "float32")
    table[name]["dtype"] = "float16"  # the tensor would come back in another dtype
    metadata["pinchgate.tensors"] = json.dumps(table)
    save_file(tensors, str(path), metadata=metadata)  # the old checksum kept
    refused(invoke("unpack", packed, tmp_path / "out"), f"{path}: corrupt packed file")
    assert not (tmp_path / "out").exists()


# --- 6: greedy CTC decoding writes no special token --------------------------------------------


def test_greedy_decoding_drops_special_tokens_and_keeps_double_letters(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    vocab = tokenizer.get_vocab()
    path = ["<s>", "D", "<pad>", "D", "O", "O", "|", "<unk>", "T", "</s>", "E", "<pad>"]
    assert greedy_ctc_text(tokenizer, [vocab[t] for t in path]) == "DDO TE"
    # End to end: a model whose head always says <s> transcribes nothing, not "<S><S>".
    family = CTCFamily()
    model = family.load(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.fill_(-10.0)
        model.lm_head.bias[vocab["<s>"]] = 10.0
    audio = [np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32)]
    assert family.decode(model, family.load_processor(tiny_model_dir), audio) == [""]


# --- 9: an output directory that cannot be created --------------------------------------------


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_an_output_directory_that_cannot_be_created_is_one_line(
    tiny_model_dir, toy_corpus, tmp_path, where
):
    (tmp_path / "file").write_text("")
    parent = tmp_path / "file" if where == "under-a-file" else Path("/proc")
    out = parent / "pinchgate-run"
    refused(invoke("finetune", *toy_args(toy_corpus, out)), f"--output-dir {out}: cannot create")
    refused(
        invoke("evaluate", tiny_model_dir, "--data", toy_corpus / "test", "--output-dir", out),
        f"--output-dir {out}: cannot create",
    )
    refused(invoke("pack", tiny_model_dir, out, "--allow-dense"), f"{out}: cannot create")


# --- 11, 12: options refused as a user would type them ----------------------------------------


@pytest.mark.parametrize(
    "args",
    [["--target-ratio", "inf"], ["--target-ratio", "nan"], ["--learning-rate", "inf"]],
    ids=" ".join,
)
def test_infinite_or_nan_options_are_named(toy_corpus, tmp_path, args):
    out = tmp_path / "run"
    result = invoke("compress", *toy_args(toy_corpus, out), *args)
    refused(result, f"{args[0]} {args[1]}: must be a finite number")
    assert not out.exists()


def test_a_refused_start_does_not_block_the_corrected_command(toy_corpus, tmp_path):
    out = tmp_path / "run"
    args = [*toy_args(toy_corpus, out), "--no-train-dense-reference"]
    refused(invoke("compress", *args, "--target-ratio", "10"), "highest reachable ratio")
    assert (out / "config.yaml").is_file() and not (out / "checkpoints").exists()
    result = invoke("compress", *args, "--target-ratio", "1.5")
    assert result.exit_code == 0, result.output
    assert "another configuration" not in result.output
    assert json.loads((out / "report.json").read_text())["compression"]["compression_ratio"] > 1.49
    # Once a run has a checkpoint, another configuration is refused as before.
    refused(invoke("compress", *args, "--target-ratio", "1.4"), "another configuration")


# --- 13: a long run keeps its multipliers bounded and lands -----------------------------------


def _controller_run(steps: int, target: float = 0.68) -> tuple[float, float, float]:
    """The trainer's optimiser and schedule (`build_optimizer`, `get_scheduler`) and the gate
    method's groups and sparsity term, on a perturbed teacher MLP: (hard sparsity at the
    freeze step, before the exact fit; largest |lambda1|; largest lambda2)."""
    from pinchgate.gates import GateConfig, attach_gates
    from pinchgate.methods.gates import GateMethod
    from pinchgate.sparsity import SparsityController
    from pinchgate.train import build_optimizer

    torch.manual_seed(0)
    model, x, y = runs.perturbed_teacher_task()
    cfg = CompressConfig(
        max_steps=steps, warmup_steps=steps // 10, learning_rate=1e-3, target_sparsity=target
    )
    method = GateMethod(cfg, Path("."))
    method.gates = attach_gates(model, GateConfig(include=(r"\d+",)))
    method.controller = SparsityController(target, steps, cfg.ramp_fraction, cfg.multiplier_lr)
    optimizer = build_optimizer(model, cfg, method)
    scheduler = get_scheduler(cfg.scheduler, optimizer, cfg.warmup_steps, steps)
    lambda1 = lambda2 = 0.0
    for step in range(method.freeze_step):
        idx = torch.randint(0, 1024, (64,))
        term, _ = method.sparsity_term(model, step)
        loss = (model(x[idx]) - y[idx]).pow(2).mean() + term
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        lambda1 = max(lambda1, abs(method.controller.lambda1.item()))
        lambda2 = max(lambda2, method.controller.lambda2.item())
    return 1.0 - method.gates.hard_kept_fraction(), lambda1, lambda2


def test_a_20000_step_run_lands_with_its_multipliers_bounded():
    # Before the multipliers' rate was scaled with the ramp, lambda2 reached 35 here (and
    # kept growing with the run length); the 1000-step toy preset's reach about 3.
    sparsity, lambda1, lambda2 = _controller_run(20_000)
    assert abs(sparsity - 0.68) < 0.005  # within 0.5 points before the exact fit
    assert lambda1 < 1.0 and lambda2 < 5.0


# --- 14: two processes, autocast through the gate, the other CTC encoders ---------------------


def test_two_processes_compress_the_ctc_model_to_identical_replicas(toy_corpus, tmp_path):
    out = tmp_path / "ddp"
    command = runs.cli_command("compress", toy_corpus, out, 12, "--warmup-steps", "2")
    final = runs.two_process_compression(
        [*command, "--no-train-dense-reference", "--target-ratio", "1.4"], out
    )
    c = final["compression"]
    state = load_file(out / "model" / "model.safetensors")
    zeros = sum(
        int((t == 0).sum())
        for name, t in state.items()
        if name.endswith(".weight")
        and ("encoder.layers." in name or "feature_projection.projection" in name)
    )
    assert zeros == c["gated_params"] - c["gated_kept"]


def test_bf16_autocast_through_the_gate(toy_corpus, tmp_path):
    from pinchgate.families.ctc import build_model
    from pinchgate.gates import GateConfig, attach_gates

    model = build_model(12)
    gates = attach_gates(model, GateConfig())
    audio = torch.randn(2, 8000)
    labels = torch.randint(5, 12, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_values=audio, labels=labels)
        assert out.logits.dtype == torch.bfloat16
        kept = gates.kept_fractions()
    out.loss.backward()
    assert torch.isfinite(out.loss) and 0.5 < float(kept.soft.detach()) < 1.0
    grads = [p.grad for p in gates.threshold_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # And a whole compression in bf16 on the CPU lands exactly (its own process: accelerate's
    # precision is fixed once per process).
    out = tmp_path / "bf16"
    command = runs.cli_command("compress", toy_corpus, out, 8, "--warmup-steps", "2")
    command += ["--no-train-dense-reference", "--target-ratio", "1.4", "--mixed-precision", "bf16"]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            capture_output=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    c = json.loads((out / "results.json").read_text())["compression"]
    assert c["gated_kept"] == c["target_gated_kept"]


@pytest.mark.parametrize("kind", ["hubert", "wavlm", "data2vec-audio"])
def test_gates_on_the_other_ctc_encoders(tiny_model_dir, toy_corpus, tmp_path, kind):
    import transformers

    from pinchgate.compress import run_compress
    from pinchgate.families.ctc import TINY_CONFIG

    config_class, model_class = {
        "hubert": (transformers.HubertConfig, transformers.HubertForCTC),
        "wavlm": (transformers.WavLMConfig, transformers.WavLMForCTC),
        "data2vec-audio": (transformers.Data2VecAudioConfig, transformers.Data2VecAudioForCTC),
    }[kind]
    vocab = json.loads((tiny_model_dir / "vocab.json").read_text())
    extra = {"num_buckets": 16, "max_bucket_distance": 80} if kind == "wavlm" else {}
    config = config_class(**TINY_CONFIG, **extra, vocab_size=len(vocab), pad_token_id=0)
    torch.manual_seed(0)
    source = tmp_path / kind
    model_class(config).save_pretrained(source)
    for name in ("vocab.json", "preprocessor_config.json"):
        shutil.copy(tiny_model_dir / name, source / name)
    cfg = runs.tiny_config(
        CompressConfig, toy_corpus, tmp_path / "run", model=str(source), max_steps=6,
        warmup_steps=2, save_every=6, log_every=1, target_ratio=None, target_sparsity=0.5,
        train_dense_reference=False,
    )  # fmt: skip
    results = run_compress(cfg)
    c = results["compression"]
    assert c["gated_kept"] == c["target_gated_kept"]
    gateable = [
        name
        for name, module in model_class(config).named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        and (".encoder.layers." in name or name.endswith("feature_projection.projection"))
    ]
    assert len(results["layers"]) == len(gateable) >= 13  # every Linear (WavLM: and the
    # relative-position embedding) of the blocks, gated
    exported = transformers.AutoModelForCTC.from_pretrained(tmp_path / "run" / "model")
    assert type(exported) is model_class  # a stock model of its own kind, no gate left
    assert set(exported.state_dict()) == set(model_class(config).state_dict())
