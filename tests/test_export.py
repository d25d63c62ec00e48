from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pinchgate import export, packing
from pinchgate.cli import app
from pinchgate.errors import PinchgateError
from pinchgate.families.ctc_onnx import OnnxCTCModel, onnx_max_abs_diff

runner = CliRunner()


def harden(source: Path, out: Path, keep_fraction: float | dict, seed: int = 0) -> Path:
    """A copy of `source` whose floating tensors keep about `keep_fraction` of their
    values (a float for all, or {name: fraction} with 1.0 for the rest); the rest are
    exact zeros, as a compress run leaves them."""
    out.mkdir(parents=True)
    for side in source.iterdir():
        if side.name != "model.safetensors":
            shutil.copy2(side, out / side.name)
    generator = torch.Generator().manual_seed(seed)
    state = load_file(source / "model.safetensors")
    for name, tensor in state.items():
        if isinstance(keep_fraction, dict):
            fraction = keep_fraction.get(name, 1.0)
        else:
            fraction = keep_fraction
        keep = torch.rand(tensor.shape, generator=generator) < fraction
        # Zero-initialised biases get a value where kept, so exactly the kept ones are non-zero.
        tensor[keep & (tensor == 0)] = 0.5
        tensor[~keep] = 0.0
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A 4x-sparse tiny model (75% exact zeros in every tensor)."""
    return harden(tiny_model_dir, tmp_path_factory.mktemp("sparse") / "model", 0.25)


def rewrite(packed_dir: Path, change) -> None:
    """Edit a packed file's tensors and table, keeping its checksum valid."""
    path = packed_dir / packing.PACKED_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    table = json.loads(metadata["pinchgate.tensors"])
    change(tensors, table)
    metadata["pinchgate.tensors"] = json.dumps(table)
    metadata["pinchgate.sha256"] = packing.digest(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_is_bit_identical(tmp_path, tiny_model_dir, one_thread, seed):
    state = load_file(tiny_model_dir / "model.safetensors")
    names = sorted(state)
    generator = torch.Generator().manual_seed(seed)
    fractions = {name: float(torch.rand(1, generator=generator)) for name in names}
    fractions["lm_head.weight"] = 0.0  # every weight pruned
    fractions["wav2vec2.encoder.layers.0.attention.q_proj.weight"] = 0.5
    fractions["wav2vec2.encoder.layers.1.feed_forward.output_dense.weight"] = 1.0  # none
    model_dir = harden(tiny_model_dir, tmp_path / "model", fractions, seed)
    report = packing.pack(model_dir, tmp_path / "packed")
    assert {"plain", "bitmask", "indices"} <= set(report.encodings())
    packing.unpack(tmp_path / "packed", tmp_path / "unpacked")

    before = load_file(model_dir / "model.safetensors")
    after = load_file(tmp_path / "unpacked" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert torch.equal(before[name].view(torch.int32), after[name].view(torch.int32)), name
    for side in ("config.json", "vocab.json", "preprocessor_config.json"):
        assert (tmp_path / "unpacked" / side).read_bytes() == (model_dir / side).read_bytes()

    model = packing.load_packed(tmp_path / "packed")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("shape", [(7, 13), (13,), (1,), (3, 1, 7), (0,), (), (40000,)], ids=str)
@pytest.mark.parametrize("keep", [0.0, 0.03, 0.5, 1.0])
def test_tensor_codec_round_trips_odd_shapes(tmp_path, shape, keep):
    generator = torch.Generator().manual_seed(len(shape))
    tensor = torch.randn(shape, generator=generator) + 3.0  # no accidental zeros
    tensor[torch.rand(shape, generator=generator) >= keep] = 0.0
    parts, entry, report = packing.encode_tensor("w", tensor, "fp32")
    assert report.kept == int(torch.count_nonzero(tensor))
    assert report.stored_bytes == sum(p.nbytes for p in parts.values())
    restored = packing.decode_tensor(tmp_path / "f", "w", json.loads(json.dumps(entry)), parts)
    assert restored.shape == tensor.shape
    assert torch.equal(restored.view(torch.int32), tensor.view(torch.int32))


def test_smaller_of_bitmask_and_indices_is_chosen():
    generator = torch.Generator().manual_seed(0)

    def encoded(numel, keep):
        tensor = torch.randn(numel, generator=generator) + 3.0
        tensor[torch.randperm(numel, generator=generator)[round(keep * numel) :]] = 0.0
        parts, entry, _ = packing.encode_tensor("w", tensor.reshape(-1, 100), "fp32")
        return entry, parts

    entry, parts = encoded(10_000, 0.01)  # 100 kept: 200 B of int16 indices < 1250 B of mask
    assert entry["encoding"] == "indices" and parts["w/indices"].dtype == torch.int16
    entry, parts = encoded(100_000, 0.01)  # positions past 32767 need int32: 4 kB < 12.5 kB
    assert entry["encoding"] == "indices" and parts["w/indices"].dtype == torch.int32
    entry, parts = encoded(10_000, 0.5)  # 1250 B of mask < 10 kB of indices
    assert entry["encoding"] == "bitmask" and "w/indices" not in parts
    assert parts["w/mask"].numel() == 10_000 // 8
    entry, parts = encoded(10_000, 1.0)
    assert entry["encoding"] == "plain" and set(parts) == {"w/values"}
    entry, parts = encoded(10_000, 0.0)  # nothing kept: no values, no positions
    assert entry["encoding"] == "indices" and parts["w/values"].numel() == 0


def test_size_accounting(tmp_path, sparse_dir, one_thread):
    report = packing.pack(sparse_dir, tmp_path / "packed")
    path = tmp_path / "packed" / packing.PACKED_FILE
    assert report.packed_bytes == path.stat().st_size
    assert report.dense_bytes == (sparse_dir / "model.safetensors").stat().st_size
    assert report.header_bytes + sum(t.stored_bytes for t in report.tensors) == report.packed_bytes
    assert report.sparsity == pytest.approx(0.75, abs=0.02)
    # Bit masks cost 1/32 of fp32 values: 0.25 + 0.03 of the dense bytes, plus the header.
    dense_data = sum(t.numel * 4 for t in report.tensors)
    assert report.packed_bytes - report.header_bytes <= 1.15 * dense_data / 4
    assert report.packed_bytes <= 1.15 * report.dense_bytes / 4 + report.header_bytes
    assert json.loads(json.dumps(report.to_dict()))["ratio"] == pytest.approx(report.ratio)


def test_fp16_and_int8_stay_within_their_error_bounds(tmp_path, sparse_dir, one_thread):
    original = load_file(sparse_dir / "model.safetensors")
    for values in ("fp16", "int8"):
        report = packing.pack(sparse_dir, tmp_path / values, values=values)
        assert report.sparsity == pytest.approx(0.75, abs=0.02)  # pruning, not quantisation
        restored = packing.read_packed(tmp_path / values)
        worst = 0.0
        for name, weight in original.items():
            got = restored[name]
            assert got.dtype == weight.dtype
            assert torch.all(got[weight == 0] == 0), name  # pruned weights stay exact zeros
            error = (got - weight).abs()
            if values == "fp16":  # half an fp16 ulp: relative 2^-11 (normal range)
                bound = weight.abs() * 2**-11 + 2**-24
            elif weight.dim() >= 2:  # half a step of the row's 127 levels
                row_max = weight.reshape(weight.shape[0], -1).abs().amax(dim=1)
                bound = (row_max / 254).reshape(-1, *[1] * (weight.dim() - 1)) * 1.0001
            else:  # int8 keeps 1-D tensors (biases, norms) exact
                bound = torch.zeros_like(weight)
            assert torch.all(error <= bound), (values, name)
            worst = max(worst, float(error.max()))
        assert report.max_abs_error == pytest.approx(worst, rel=1e-6)
        assert (
            report.packed_bytes < packing.pack(sparse_dir, tmp_path / f"{values}-32").packed_bytes
        )


def test_truncated_or_corrupt_file_is_refused_naming_it(tmp_path, sparse_dir):
    packing.pack(sparse_dir, tmp_path / "packed")
    path = tmp_path / "packed" / packing.PACKED_FILE
    data = path.read_bytes()

    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PinchgateError, match="corrupt or truncated") as info:
        packing.load_packed(tmp_path / "packed")
    assert str(path) in str(info.value) and "\n" not in str(info.value)

    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # inside the stored values
    path.write_bytes(bytes(flipped))
    with pytest.raises(PinchgateError, match="checksum") as info:
        packing.unpack(tmp_path / "packed", tmp_path / "unpacked")
    assert str(path) in str(info.value)
    assert not (tmp_path / "unpacked").exists()

    result = runner.invoke(app, ["unpack", str(tmp_path / "packed"), str(tmp_path / "u")])
    assert result.exit_code == 2 and str(path) in result.output
    assert "Traceback" not in result.output


def test_tensor_disagreeing_with_config_or_mask_is_named(tmp_path, sparse_dir):
    packed = tmp_path / "packed"
    packing.pack(sparse_dir, packed)
    table = json.loads(
        safe_open(str(packed / packing.PACKED_FILE), "pt").metadata()["pinchgate.tensors"]
    )
    masked = next(name for name, e in table.items() if e["encoding"] == "bitmask")

    def drop_one_value(tensors, table):
        tensors[f"{masked}/values"] = tensors[f"{masked}/values"][1:].contiguous()
        table[masked]["kept"] -= 1  # table and values agree, the mask does not

    rewrite(packed, drop_one_value)
    with pytest.raises(PinchgateError, match="mask keeps") as info:
        packing.load_packed(packed)
    assert repr(masked) in str(info.value) and packing.PACKED_FILE in str(info.value)

    shutil.rmtree(packed)
    packing.pack(sparse_dir, packed)

    def drop_tensor(tensors, table):
        for key in [k for k in tensors if k.startswith("lm_head.bias/")]:
            del tensors[key]
        del table["lm_head.bias"]

    rewrite(packed, drop_tensor)
    with pytest.raises(PinchgateError, match="'lm_head.bias' of config.json is missing"):
        packing.load_packed(packed)

    shutil.rmtree(packed)
    packing.pack(sparse_dir, packed)
    config = json.loads((packed / "config.json").read_text())
    config["vocab_size"] += 1
    (packed / "config.json").write_text(json.dumps(config))
    with pytest.raises(PinchgateError, match=r"tensor 'lm_head\.\w+' has shape \[") as info:
        packing.unpack(packed, tmp_path / "unpacked")
    assert str(packed / packing.PACKED_FILE) in str(info.value)


def test_dense_model_is_refused_unless_allowed(tmp_path, tiny_model_dir):
    with pytest.raises(PinchgateError, match="not a hardened") as info:
        packing.pack(tiny_model_dir, tmp_path / "packed")
    assert str(tiny_model_dir / "model.safetensors") in str(info.value)
    assert not (tmp_path / "packed").exists()

    result = runner.invoke(app, ["pack", str(tiny_model_dir), str(tmp_path / "p")])
    assert result.exit_code == 2 and "--allow-dense" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(app, ["pack", str(tiny_model_dir), str(tmp_path / "p"), "--allow-dense"])
    assert result.exit_code == 0, result.output
    restored = packing.read_packed(tmp_path / "p")
    for name, tensor in load_file(tiny_model_dir / "model.safetensors").items():
        assert torch.equal(restored[name], tensor), name


def test_pickle_only_model_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "wav2vec2"}')
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(PinchgateError, match="pickle weights are not read"):
        packing.pack(tmp_path / "m", tmp_path / "p", allow_dense=True)


@pytest.mark.parametrize("command", ["pack", "unpack", "export"])
def test_commands_have_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_cli_pack_and_unpack_a_run_directory(tmp_path, sparse_dir, one_thread):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(sparse_dir, run_dir / "model")  # as `pinchgate compress` leaves it
    result = runner.invoke(app, ["pack", str(run_dir), str(tmp_path / "p"), "--values", "int8"])
    assert result.exit_code == 0, result.output
    assert "ratio (dense / packed)" in result.output and "int8" in result.output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted(
        [packing.PACKED_FILE, *(p.name for p in sparse_dir.iterdir() if p.suffix == ".json")]
    )

    result = runner.invoke(app, ["unpack", str(tmp_path / "p"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    from pinchgate.families.ctc import load_ctc_model

    model = load_ctc_model(tmp_path / "hf")
    assert model.lm_head.weight.shape[0] == len(json.loads((sparse_dir / "vocab.json").read_text()))

    result = runner.invoke(app, ["unpack", str(tmp_path / "p"), str(tmp_path / "hf")])
    assert result.exit_code == 2 and "not empty" in result.output
    result = runner.invoke(app, ["pack", str(run_dir), str(tmp_path / "q"), "--values", "fp8"])
    assert result.exit_code == 2 and "values 'fp8'" in result.output
    result = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "m.x"), "--format", "x"])
    assert result.exit_code == 2 and "--format 'x'" in result.output


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory, tiny_model_dir, toy_corpus):
    """`pinchgate export --check` on a packed layer-norm model (whose feature extractor
    returns attention masks, so the graph takes one): (packed dir, onnx file, output)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from pinchgate.families.ctc import build_model, feature_extractor_for

    root = tmp_path_factory.mktemp("onnx")
    vocab_size = len(json.loads((tiny_model_dir / "vocab.json").read_text()))
    model = build_model(vocab_size, feat_extract_norm="layer", do_stable_layer_norm=True)
    model.save_pretrained(root / "dense")
    feature_extractor_for(model.config).save_pretrained(root / "dense")
    shutil.copy2(tiny_model_dir / "vocab.json", root / "dense")
    packing.pack(harden(root / "dense", root / "model", 0.25), root / "packed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = root / "onnx" / "model.onnx"
    result = runner.invoke(
        app,
        ["export", str(root / "packed"), str(out), "--check"]
        + ["--check-data", str(toy_corpus / "dev")],
    )
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return root / "packed", out, result.output


def test_cli_export_check_prints_the_difference(onnx_run):
    _, path, output = onnx_run
    difference = float(output.split("onnxruntime vs PyTorch:")[1].split()[0])
    assert path.is_file() and difference < 1e-4


def test_cli_export_check_data_decodes_the_corpus_with_both(onnx_run):
    output = onnx_run[2]
    line = next(row for row in output.splitlines() if row.startswith("dev: WER"))
    assert "identical hypotheses 6/6" in line
    torch_wer, onnx_wer = (float(x) for x in re.findall(r"(?:PyTorch|onnxruntime) ([\d.]+)%", line))
    assert torch_wer == onnx_wer


def test_onnx_model_decodes_like_the_pytorch_model(onnx_run, toy_corpus, one_thread):
    from pinchgate.data.corpus import read_corpus

    packed, path, _ = onnx_run
    utterances, _ = read_corpus(toy_corpus / "test")
    found = export.check_onnx_on_corpus(path, packed, utterances, "test", batch_seconds=3.0)
    assert found["utterances"] == len(utterances) == found["same_hypotheses"]
    assert found["onnx"]["wer"] == found["torch"]["wer"]
    assert found["onnx"]["words"] == found["torch"]["words"] > 0
    assert found["max_abs_diff"] < 1e-4
    # The wrapper counts output frames as the PyTorch model does, for unpadding.
    model = packing.load_packed(packed)
    lengths = torch.tensor([400, 16000, 23456])
    wrapper = OnnxCTCModel(path, model.config)
    assert torch.equal(
        wrapper._get_feat_extract_output_lengths(lengths),
        model._get_feat_extract_output_lengths(lengths),
    )


def test_onnx_matches_pytorch_at_new_batch_sizes_and_lengths(onnx_run, one_thread):
    import onnx

    packed, path, _ = onnx_run
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_values", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]
    model = packing.load_packed(packed)
    generator = torch.Generator().manual_seed(0)
    for batch, samples in ((1, 5000), (4, 9001)):  # the export example was (2, 16000)
        audio = torch.randn(batch, samples, generator=generator)
        mask = torch.ones(batch, samples, dtype=torch.long)
        mask[-1, samples // 2 :] = 0
        assert onnx_max_abs_diff(path, model, audio, mask) < 1e-4
        assert onnx_max_abs_diff(path, model, audio) < 1e-4  # no padding: all ones
