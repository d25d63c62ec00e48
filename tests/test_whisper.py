"""The Whisper family end to end on a tiny random Whisper (tests/tiny_whisper.py): labels,
the window, training, gates with the tied embedding, every method, hardening and stock
reload, packing, kill-and-resume, two processes, the runaway-decoding guard, structured
gates and shrinking, and the one-line refusals."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

import runs
from pinchgate.cli import app
from pinchgate.compress import run_compress
from pinchgate.config import CompressConfig, FinetuneConfig
from pinchgate.data.corpus import Utterance
from pinchgate.errors import PinchgateError
from pinchgate.families import count_parameters, family_for
from pinchgate.families.whisper import (
    RUNAWAY_TOKENS,
    WhisperFamily,
    cut_window,
    keep_decoder_layers,
    normalize_english,
    runaway_start,
    styled,
)
from pinchgate.train import run_finetune

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def config(config_class, model_dir, toy_corpus, out, **changes):
    """The toy preset on the test corpus, with the tiny Whisper."""
    cfg = runs.tiny_config(config_class, toy_corpus, out, model=str(model_dir))
    cfg.max_steps, cfg.warmup_steps, cfg.save_every, cfg.log_every = 8, 2, 4, 1
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def whisper_command(model_dir, toy_corpus, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pinchgate", "compress", "--model", str(model_dir),
        "--train", str(toy_corpus / "train"), "--test", str(toy_corpus / "test"),
        "--output-dir", str(out), "--max-steps", str(steps), "--save-every", "4",
        "--log-every", "1", "--batch-seconds", "4", "--eval-every", "0",
        "--warmup-steps", "2", "--no-train-dense-reference", *extra,
    ]  # fmt: skip


# --- text, labels, window ---------------------------------------------------------------------


def test_text_policy_and_scoring_normaliser():
    assert styled("HELLO THERE", "sentence") == "Hello there."
    assert styled("IS IT", "lower") == "is it"
    assert styled("AS IS", "as-is") == "AS IS"
    # Whisper's English normaliser on both sides: case, punctuation, numbers, spelling.
    assert normalize_english("NINETEEN SIXTY ONE") == normalize_english("1961.")
    assert normalize_english("THE COLOUR OF MR SMITH") == normalize_english(
        "The color of Mr. Smith"
    )


def test_labels_collator_and_window(tiny_whisper_dir, toy_corpus, tmp_path):
    family = family_for(tiny_whisper_dir)
    assert isinstance(family, WhisperFamily)
    cfg = config(FinetuneConfig, tiny_whisper_dir, toy_corpus, tmp_path)
    processor, new_head = family.prepare_processor(cfg, tmp_path, [])
    assert new_head is False
    tokenizer = processor.tokenizer
    labels = family.labels(processor, Utterance("u", Path("u.flac"), "AD ON"))
    start, no_timestamps = tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|notimestamps|>"]
    )
    assert labels[0] == no_timestamps and start not in labels
    assert labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labels, skip_special_tokens=True) == "Ad on."  # no written form
    written = Utterance("u", Path("u.flac"), "AD ON", written="Ad, on!")
    assert (
        tokenizer.decode(family.labels(processor, written), skip_special_tokens=True) == "Ad, on!"
    )
    # The window: the longest clip of the run's corpora, whole seconds up.
    longest = max(
        sf.info(p).duration for p in toy_corpus.rglob("*.flac") if p.parts[-4] in ("train", "test")
    )
    assert processor.window_seconds == int(longest) + 1 <= 5
    items = [
        {
            "index": i,
            "audio": torch.zeros(n).numpy(),
            "labels": family.labels(processor, Utterance(str(i), Path("u.flac"), t)),
        }
        for i, (n, t) in enumerate([(8000, "A"), (12000, "AD ON TEST")])
    ]
    batch = family.collate(processor, items)
    assert batch["input_features"].shape == (2, 8, 100 * processor.window_seconds)
    assert (batch["labels"][0, len(items[0]["labels"]) :] == -100).all()


# --- training, gates, export ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gated_run(tiny_whisper_dir, toy_corpus, tmp_path_factory):
    """The gates at 2.5x: above the 2.0x the Linears alone allow, so the embedding must be
    pruned too."""
    out = tmp_path_factory.mktemp("whisper") / "gates"
    cfg = config(CompressConfig, tiny_whisper_dir, toy_corpus, out, target_ratio=2.5, max_steps=16)
    cfg.train_dense_reference = False
    return out, run_compress(cfg)


def test_gates_prune_the_tied_embedding_once_and_land_exactly(gated_run, tiny_whisper_dir):
    out, results = gated_run
    c = results["compression"]
    start = family_for(tiny_whisper_dir).load(tiny_whisper_dir)
    cut_window(start, results["processor"].window_seconds)  # as trained: the window's table
    total = count_parameters(start)["total"]
    embedding = next(r for r in results["layers"] if r["name"].endswith("embed_tokens"))
    linears = c["gated_params"] - embedding["numel"]
    assert total / (total - linears) < 2.5  # the Linears alone cannot reach the target
    assert c["total_params"] == total and c["gated_kept"] == c["target_gated_kept"]
    assert c["compression_ratio"] == pytest.approx(2.5, abs=1e-3)
    assert not any(r["name"].endswith("proj_out") for r in results["layers"])
    # The exported model is stock, tied, and computes with the pruned embedding.
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(out / "model")
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    zeros = int((model.model.decoder.embed_tokens.weight == 0).sum())
    assert zeros == embedding["numel"] - embedding["kept"] > 0
    assert not any("parametrizations" in k for k in model.state_dict())


def test_the_exported_model_reloads_stock_with_its_window(gated_run, toy_corpus):
    out, results = gated_run
    saved = json.loads((out / "model" / "config.json").read_text())
    window = results["processor"].window_seconds
    assert saved["max_source_positions"] == 50 * window
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(out / "model")
    assert processor.feature_extractor.chunk_length == window
    # The report's WER is the exported model's, decoded again by `pinchgate evaluate`.
    result = runner.invoke(
        app, ["evaluate", str(out / "model"), "--data", str(toy_corpus / "test"),
              "--output-dir", str(out / "again")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    again = json.loads((out / "again" / "results.json").read_text())["test"]
    assert again["wer"] == results["eval"]["test"]["wer"]


def test_finetuning_lowers_the_loss(tiny_whisper_dir, toy_corpus, tmp_path):
    cfg = config(
        FinetuneConfig, tiny_whisper_dir, toy_corpus, tmp_path / "run", max_steps=30,
        learning_rate=3e-3, warmup_steps=3, log_every=5, save_every=30,
    )  # fmt: skip
    run_finetune(cfg)
    rows = runs.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("method", ["dense", "ump", "global-magnitude", "gmp", "parp", "str"])
def test_every_baseline_runs_on_whisper_and_lands_exactly(
    method, tiny_whisper_dir, toy_corpus, tmp_path
):
    cfg = config(CompressConfig, tiny_whisper_dir, toy_corpus, tmp_path, target_ratio=2.5)
    cfg.method, cfg.train_dense_reference = method, False
    if method == "dense":
        cfg.target_ratio = None
    c = run_compress(cfg)["compression"]
    assert c["gated_kept"] == c["target_gated_kept"]
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert int((model.model.decoder.embed_tokens.weight == 0).sum()) >= 0


def test_pack_unpack_and_info(gated_run, tmp_path):
    out, _ = gated_run
    result = runner.invoke(app, ["pack", str(out), str(tmp_path / "packed")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["unpack", str(tmp_path / "packed"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    a, b = (
        load_file(out / "model" / "model.safetensors"),
        load_file(tmp_path / "hf" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = runner.invoke(app, ["info", str(tmp_path / "hf")])
    assert result.exit_code == 0 and "WhisperForConditionalGeneration" in result.output


def test_kill_and_resume_gives_the_same_model(tiny_whisper_dir, toy_corpus, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    extra = ("--target-ratio", "2.5")
    runs.run_to_end(whisper_command(tiny_whisper_dir, toy_corpus, reference, 12, *extra))
    command = whisper_command(tiny_whisper_dir, toy_corpus, killed, 12, *extra)
    runs.kill_and_resume(command, killed, kill_after_step=6)
    runs.assert_same_weights(reference / "model", killed / "model", atol=0)


def test_two_processes_compress_to_identical_replicas(tiny_whisper_dir, toy_corpus, tmp_path):
    out = tmp_path / "ddp"
    command = whisper_command(tiny_whisper_dir, toy_corpus, out, 6, "--target-ratio", "2.5")
    runs.two_process_compression(command, out)


# --- decoding ---------------------------------------------------------------------------------


def test_runaway_start_finds_loops_and_leaves_speech_alone():
    words = list(range(10, 30))
    assert runaway_start(words) is None
    loop = [5, 6, 7] * 8
    assert runaway_start([1, 2] + loop) == 2 + 3  # cut back to one occurrence
    assert runaway_start([9] * RUNAWAY_TOKENS) == 1
    assert runaway_start([9] * (RUNAWAY_TOKENS - 1)) is None  # "word word word" is speech
    assert runaway_start([4, 4, 8, 8, 4, 4]) is None
    phrase = [31, 32, 33, 34, 35]  # a prompt read out once, then again: a loop
    assert runaway_start([1] + phrase + phrase) == 1 + len(phrase)
    assert runaway_start([1] + phrase + phrase[:3]) is None


def test_a_looping_model_is_stopped(gated_run, toy_corpus):
    """A model that can only say one token (and never end) stops at the guard."""
    out, results = gated_run
    family = family_for(out / "model")
    model = family.load(out / "model")
    processor = family.load_processor(out / "model")
    weight = model.model.decoder.embed_tokens.weight
    norm = model.model.decoder.layer_norm  # a constant last hidden state: ones
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.fill_(1.0)
        weight.zero_()
        weight[100] = 1.0
    audio = [sf.read(p)[0] for p in sorted((toy_corpus / "test").rglob("*.flac"))[:3]]
    texts = family.decode(model, processor, audio)
    assert len(set(texts)) == 1
    ids = processor.tokenizer(texts[0], add_special_tokens=False).input_ids
    assert ids == [100]  # stopped and cut back to one occurrence


# --- structured gates -------------------------------------------------------------------------


def test_structured_gates_remove_heads_of_three_kinds_and_neurons(
    tiny_whisper_dir, toy_corpus, tmp_path
):
    from pinchgate.families.whisper import structured_units

    model = family_for(tiny_whisper_dir).load(tiny_whisper_dir)
    units = structured_units(model)
    kinds = [u.name.rpartition(".")[2] for u in units]
    assert kinds.count("self_attn") == 4 and kinds.count("encoder_attn") == 2
    assert kinds.count("ffn") == 4
    cfg = config(CompressConfig, tiny_whisper_dir, toy_corpus, tmp_path, target_ratio=1.3)
    cfg.method, cfg.train_dense_reference = "structured", False
    results = run_compress(cfg)
    shrunk = results["compression"]["shrunk"]
    assert shrunk["logit_check"]["max_abs_diff"] < 1e-4
    assert shrunk["params"] < results["compression"]["total_params"]
    for name, row in shrunk["eval"].items():
        assert row["wer"] == results["eval"][name]["wer"]
    # Packing and the stock-or-shrunk loader read the shrunken model back.
    small = family_for(tmp_path / "model-shrunk").load(tmp_path / "model-shrunk")
    assert count_parameters(small)["total"] == shrunk["params"]


def test_structured_ffn_units_keep_every_head_and_export_to_ct2(
    tiny_whisper_dir, toy_corpus, tmp_path
):
    cfg = config(CompressConfig, tiny_whisper_dir, toy_corpus, tmp_path, target_ratio=1.15)
    cfg.method, cfg.train_dense_reference = "structured:units=ffn", False
    results = run_compress(cfg)
    small = family_for(tmp_path / "model-shrunk").load(tmp_path / "model-shrunk")
    saved = family_for(tmp_path / "model").load(tmp_path / "model").generation_config
    assert small.generation_config.to_dict() == saved.to_dict()  # decodes as the masked one
    config_ = small.config
    for side in ("encoder", "decoder"):
        for layer in getattr(small.model, side).layers:
            for kind in ("self_attn", "encoder_attn") if side == "decoder" else ("self_attn",):
                assert getattr(layer, kind).num_heads == getattr(config_, f"{side}_attention_heads")
    widths = [layer.fc1.out_features for layer in small.model.encoder.layers]
    assert sum(widths) < config_.encoder_ffn_dim * len(widths)  # neurons were cut
    assert results["compression"]["shrunk"]["logit_check"]["max_abs_diff"] < 1e-4
    pytest.importorskip("ctranslate2")
    from pinchgate.data.corpus import load_corpus
    from pinchgate.export import check_ct2_on_corpus, export_ct2

    out = export_ct2(tmp_path / "model-shrunk", tmp_path / "ct2")
    utterances, _ = load_corpus(toy_corpus / "test")
    found = check_ct2_on_corpus(out, tmp_path / "model-shrunk", utterances, "t", batch_seconds=3)
    assert found["same_hypotheses"] == len(utterances), found


def test_structured_units_option_is_checked(tiny_whisper_dir, toy_corpus, tmp_path):
    cfg = config(CompressConfig, tiny_whisper_dir, toy_corpus, tmp_path, target_ratio=1.15)
    cfg.method, cfg.train_dense_reference = "structured:units=neurons", False
    with pytest.raises(PinchgateError, match="units='neurons'; choose from ffn, heads"):
        run_compress(cfg)


# --- refusals ---------------------------------------------------------------------------------


def test_one_line_refusals(tiny_whisper_dir, toy_corpus, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_whisper_dir, no_tokenizer)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (no_tokenizer / name).unlink(missing_ok=True)
    result = runner.invoke(app, ["evaluate", str(no_tokenizer), "--data", str(toy_corpus / "test")])
    assert result.exit_code == 2 and "no tokenizer files" in result.output
    assert len(result.output.strip().splitlines()) == 1
    out = tmp_path / "toy"
    result = runner.invoke(
        app,
        ["compress", "--model", "toy", "--window", "5", "--train", str(toy_corpus / "train"),
         "--output-dir", str(out)],
    )  # fmt: skip
    assert result.exit_code == 2 and "--window: an option of Whisper models" in result.output
    assert not out.exists()  # refused before anything is written
    cfg = config(FinetuneConfig, tiny_whisper_dir, toy_corpus, tmp_path / "w", window=40)
    with pytest.raises(PinchgateError, match="--window 40"):
        run_finetune(cfg)


def test_clips_longer_than_the_window_are_skipped_and_counted(gated_run, toy_corpus, tmp_path):
    out, results = gated_run
    window = results["processor"].window_seconds
    corpus = tmp_path / "long" / "1" / "1"
    corpus.mkdir(parents=True)
    clips = sorted((toy_corpus / "test").rglob("*.flac"))[:2]
    audio, rate = sf.read(clips[0])
    sf.write(corpus / "1-1-0000.flac", audio, rate)
    sf.write(corpus / "1-1-0001.flac", torch.zeros(int(rate * (window + 1))).numpy(), rate)
    (corpus / "1-1.trans.txt").write_text("1-1-0000 AD\n1-1-0001 TOO LONG\n")
    result = runner.invoke(app, ["evaluate", str(out / "model"), "--data", str(tmp_path / "long")])
    assert result.exit_code == 0, result.output
    assert "1 utterances" in result.output and "1 too_long" in result.output


def test_a_frozen_decoder_is_pruned_but_not_trained(tiny_whisper_dir, toy_corpus, tmp_path):
    cfg = config(CompressConfig, tiny_whisper_dir, toy_corpus, tmp_path, target_ratio=2.5)
    cfg.freeze_decoder, cfg.train_dense_reference = True, False
    c = run_compress(cfg)["compression"]
    assert c["gated_kept"] == c["target_gated_kept"]
    start = family_for(tiny_whisper_dir).load(tiny_whisper_dir).state_dict()
    end = family_for(tmp_path / "model").load(tmp_path / "model").state_dict()
    for name, after in end.items():
        if name.startswith("model.decoder.") and "embed_positions" not in name:
            before = start[name]
            kept = after != 0
            assert torch.equal(after[kept], before[kept]), name  # pruned, else untouched
    trained = end["model.encoder.layers.0.fc1.weight"] != start["model.encoder.layers.0.fc1.weight"]
    assert trained.any()


def test_layer_units_drop_whole_decoder_layers_into_a_stock_model(
    tiny_whisper_dir, toy_corpus, tmp_path
):
    from transformers import WhisperForConditionalGeneration

    cfg = config(CompressConfig, tiny_whisper_dir, toy_corpus, tmp_path, target_ratio=None)
    cfg.target_sparsity = 0.5  # one of the two decoder layers
    cfg.method, cfg.train_dense_reference = "structured:units=layers", False
    results = run_compress(cfg)
    compression = results["compression"]
    full = family_for(tiny_whisper_dir).load(tiny_whisper_dir)
    layer_params = sum(p.numel() for p in full.model.decoder.layers[0].parameters())
    assert compression["kept_params"] == compression["total_params"] - layer_params
    shrunk = compression["shrunk"]
    assert shrunk["structure"] is None  # fewer layers, each whole: a stock config
    assert shrunk["params"] == compression["kept_params"]
    assert shrunk["logit_check"]["max_abs_diff"] < 1e-4
    stock = WhisperForConditionalGeneration.from_pretrained(tmp_path / "model-shrunk")
    assert stock.config.decoder_layers == 1 and len(stock.model.decoder.layers) == 1
    assert [layer.self_attn.layer_idx for layer in stock.model.decoder.layers] == [0]
    for name, row in shrunk["eval"].items():
        assert row["wer"] == results["eval"][name]["wer"]
    pytest.importorskip("ctranslate2")
    from pinchgate.data.corpus import load_corpus
    from pinchgate.export import check_ct2_on_corpus, export_ct2

    out = export_ct2(tmp_path / "model-shrunk", tmp_path / "ct2")
    utterances, _ = load_corpus(toy_corpus / "test")
    found = check_ct2_on_corpus(out, tmp_path / "model-shrunk", utterances, "t", batch_seconds=3)
    assert found["same_hypotheses"] == len(utterances), found


def test_layer_units_take_the_decoder_and_leave_other_kinds_the_encoder(
    tiny_whisper_dir, tiny_model_dir, toy_corpus, tmp_path
):
    from pinchgate.families.whisper import structured_units
    from pinchgate.methods.structured import _without_overlap

    model = family_for(tiny_whisper_dir).load(tiny_whisper_dir)
    kept = _without_overlap([u for u in structured_units(model) if u.kind in ("layers", "ffn")])
    names = {u.name.rpartition(".")[0].rpartition(".")[0] for u in kept if u.kind == "ffn"}
    assert names == {"model.encoder.layers"}
    assert sum(u.kind == "layers" for u in kept) == len(model.model.decoder.layers)
    cfg = config(CompressConfig, tiny_whisper_dir, toy_corpus, tmp_path, target_ratio=None)
    cfg.target_sparsity = 0.5
    cfg.method, cfg.train_dense_reference = "structured:units=layers+ffn", False
    results = run_compress(cfg)
    shrunk = results["compression"]["shrunk"]
    assert shrunk["params"] == results["compression"]["kept_params"]
    assert shrunk["logit_check"]["max_abs_diff"] < 1e-4
    cfg = config(CompressConfig, tiny_model_dir, toy_corpus, tmp_path / "ctc", target_ratio=1.1)
    cfg.method, cfg.train_dense_reference = "structured:units=layers", False
    with pytest.raises(PinchgateError, match="ctc models have no layers units"):
        run_compress(cfg)


def test_the_exact_fit_keeps_the_strongest_decoder_layer(tiny_whisper_dir):
    """A decoder without layers cannot transcribe: even a target the fit would reach by
    removing every layer keeps the one with the highest ratio (a tiny.en run at 0.6 removed
    all four, loss 0.5 -> 29, WER 100%)."""
    from pinchgate.families.whisper import structured_units
    from pinchgate.structured_gates import StructuredGateConfig, attach_structured_gates

    model = family_for(tiny_whisper_dir).load(tiny_whisper_dir)
    layers = [u for u in structured_units(model) if u.kind == "layers"]
    gates = attach_structured_gates(model, StructuredGateConfig(), layers)
    with torch.no_grad():
        gates.bank.raw.fill_(1.0)
    with torch.no_grad():
        ratios = [float(u.mean_squares().sqrt() / u.threshold()) for u in gates.units]
    gates.fit_thresholds(0.99)  # every layer's parameters: only reachable by removing all
    kept = [bool(u.hard_groups().all()) for u in gates.units]
    assert kept.count(True) == 1
    assert kept.index(True) == max(range(len(ratios)), key=ratios.__getitem__)
    gates.fit_thresholds(0.0)
    assert all(bool(u.hard_groups().all()) for u in gates.units)


# --- distillation -----------------------------------------------------------------------------


def _teacher_kl(student, teacher, batch) -> float:
    """KL(teacher || student) over the label positions, temperature 1."""
    with torch.no_grad():
        loss = WhisperFamily().distillation_loss(student, teacher, batch, 1.0, temperature=1.0)
    return float(loss)


def test_distillation_is_cross_entropy_plus_a_kl_that_vanishes_at_the_teacher(
    tiny_whisper_dir, toy_corpus, tmp_path
):
    family = family_for(tiny_whisper_dir)
    cfg = config(FinetuneConfig, tiny_whisper_dir, toy_corpus, tmp_path)
    processor, _ = family.prepare_processor(cfg, tmp_path, [])
    model = family.training_model(cfg, processor, False).eval()
    teacher = family.teacher_model(str(tiny_whisper_dir), processor, model)
    assert not any(p.requires_grad for p in teacher.parameters())
    items = [
        {"index": 0, "audio": torch.randn(16000).numpy() * 0.1,
         "labels": family.labels(processor, Utterance("a", Path("a.flac"), "AD ON TEST"))},
    ]  # fmt: skip
    batch = family.collate(processor, items)
    batch.pop("index")
    with torch.no_grad():
        ce = float(family.loss(model, batch))
        mixed = float(family.distillation_loss(model, teacher, batch, 0.3, 2.0))
    assert mixed == pytest.approx(0.7 * ce, rel=1e-5)  # the same model: KL is 0
    keep_decoder_layers(model, [0])  # a student unlike its teacher
    assert _teacher_kl(model, teacher, batch) > 1e-3


def test_distilling_a_cut_decoder_moves_it_towards_its_teacher(
    tiny_whisper_dir, toy_corpus, tmp_path
):
    family = family_for(tiny_whisper_dir)
    student = family.load(tiny_whisper_dir)
    keep_decoder_layers(student, [1])
    student_dir = family.save(student, family.load_processor(tiny_whisper_dir), tmp_path / "cut")
    cfg = config(
        FinetuneConfig, student_dir, toy_corpus, tmp_path / "run", max_steps=20,
        learning_rate=3e-3, warmup_steps=2, save_every=20, distill_from=str(tiny_whisper_dir),
        distill_weight=1.0, distill_temperature=1.0,
    )  # fmt: skip
    results = run_finetune(cfg)
    processor = results["processor"]
    teacher = family.teacher_model(str(tiny_whisper_dir), processor, student)
    items = [
        {"index": i, "audio": torch.randn(12000).numpy() * 0.1,
         "labels": family.labels(processor, Utterance(str(i), Path("a.flac"), text))}
        for i, text in enumerate(["AD ON", "TEST AD"])
    ]  # fmt: skip
    batch = family.collate(processor, items)
    batch.pop("index")
    before = family.load(student_dir)
    cut_window(before, int(processor.window_seconds))
    after = family.load(tmp_path / "run" / "model")
    assert _teacher_kl(after, teacher, batch) < 0.5 * _teacher_kl(before, teacher, batch)
    assert "distill_from" in (tmp_path / "run" / "config.yaml").read_text()


def test_distillation_is_refused_for_ctc_models(toy_corpus, tmp_path):
    out = tmp_path / "toy"
    result = runner.invoke(
        app,
        ["finetune", "--model", "toy", "--distill-from", "whisper-tiny.en",
         "--train", str(toy_corpus / "train"), "--output-dir", str(out)],
    )  # fmt: skip
    assert result.exit_code == 2 and "--distill-from: an option of Whisper" in result.output
    assert not out.exists()


# --- structured gates counting multiply-adds (structured:cost=flops) ---------------------------


def test_group_costs_follow_the_shapes_and_a_layer_costs_its_parts(tiny_whisper_dir):
    from pinchgate.families.whisper import group_costs, structured_units

    model = family_for(tiny_whisper_dir).load(tiny_whisper_dir)
    c, cost = model.config, group_costs(model)
    d, head, frames = c.d_model, c.d_model // c.encoder_attention_heads, c.max_source_positions
    assert cost["encoder.ffn"] == 50 * 2 * d
    assert cost["encoder.heads"] == 50 * (4 * d * head + 2 * frames * head)
    dec = d // c.decoder_attention_heads
    cross = 4 * (2 * d * dec + 2 * frames * dec) + 50 * 2 * d * dec
    assert cost["decoder.encoder_attn"] == cross
    units = {u.name: u for u in structured_units(model)}
    name = "model.decoder.layers.0"
    parts = [(units[f"{name}.{k}"].n_groups, units[f"{name}.{k}"].cost) for k in
             ("self_attn", "encoder_attn", "ffn")]  # fmt: skip
    assert units[f"{name}.layer"].cost == sum(n * each for n, each in parts)
    # An encoder neuron runs on 50 frames a second, a decoder neuron on 4 tokens.
    assert units["model.encoder.layers.0.ffn"].cost == 12.5 * units[f"{name}.ffn"].cost


def test_the_cost_fit_lands_the_multiply_adds_not_the_parameters(tiny_whisper_dir):
    from pinchgate.families.whisper import structured_units
    from pinchgate.structured_gates import attach_structured_gates

    model = family_for(tiny_whisper_dir).load(tiny_whisper_dir)
    units = [u for u in structured_units(model) if u.kind != "layers"]
    gates = attach_structured_gates(model, units=units, cost=True)
    assert gates.counts_cost
    assert gates.weight == pytest.approx(sum(u.n_groups * u.cost for u in units))
    largest = max(u.group_weight for u in gates.units) / gates.weight
    for target in (0.3, 0.6):
        gates.fit_thresholds(target)
        assert abs(gates.hard_kept_fraction() - (1 - target)) <= largest, target
        assert float(gates.kept_fractions().hard) == pytest.approx(gates.hard_kept_fraction())
        kept, _ = gates.hard_counts()  # parameters: reported, not what was fitted
        assert kept == sum(int(u.hard_groups().sum()) * u.group_params for u in gates.units)


def test_compress_with_cost_flops_reports_multiply_adds_and_refuses_a_ratio(
    tiny_whisper_dir, toy_corpus, tmp_path
):
    cfg = config(CompressConfig, tiny_whisper_dir, toy_corpus, tmp_path / "run")
    cfg.method, cfg.train_dense_reference = "structured:cost=flops", False
    cfg.target_ratio, cfg.target_sparsity = None, 0.4
    results = run_compress(cfg)
    c = results["compression"]
    assert c["cost"] == "flops" and c["target_sparsity"] == 0.4
    gates_weight = c["cost_total"]
    assert abs(c["cost_sparsity"] - 0.4) < 0.1 and c["cost_sparsity"] != c["gated_sparsity"]
    assert gates_weight > 0
    assert "multiply-adds removed (target)" in (tmp_path / "run" / "report.md").read_text()
    assert results["compression"]["shrunk"]["logit_check"]["max_abs_diff"] < 1e-4
    cfg = config(CompressConfig, tiny_whisper_dir, toy_corpus, tmp_path / "ratio")
    cfg.method, cfg.train_dense_reference, cfg.target_ratio = "structured:cost=flops", False, 1.5
    with pytest.raises(PinchgateError, match="give --target-sparsity"):
        run_compress(cfg)
    assert not (tmp_path / "ratio").exists()  # refused before anything is written
    cfg.method = "structured:cost=seconds"
    with pytest.raises(PinchgateError, match="cost='seconds'; choose from params, flops"):
        run_compress(cfg)
