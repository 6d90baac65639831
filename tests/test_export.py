"""int8 export: quantization error, exact file round-trips, corruption, and the model read back from disk."""

import pytest
import torch

import train_gpt as T
from conftest import small_hp


def test_int8_error_is_at_most_half_a_step_inside_the_clip():
    torch.manual_seed(0)
    weight = torch.randn(300, 400)
    entry = T.quantize_int8({"w": weight})["w"]
    assert entry["kind"] == "int8" and entry["data"].dtype == torch.int8
    restored = T.dequantize_int8({"w": entry})["w"]
    scale = entry["scale"].float()[:, None]
    clip = 127 * scale
    error, half_step = (restored - weight).abs(), scale.expand_as(weight) / 2 + 1e-6
    inside = weight.abs() <= clip
    assert (error[inside] <= half_step[inside]).all()
    assert (error[~inside] <= (weight.abs() - clip)[~inside] + half_step[~inside]).all()  # clipped: no worse
    assert inside.float().mean() > 0.99  # only the extreme quantile of each row is clipped


def test_small_and_vector_tensors_pass_through():
    state = {"gain": torch.randn(8), "small": torch.randn(4, 16)}
    quantized = T.quantize_int8(state)
    assert quantized["gain"]["kind"] == "fp32" and torch.equal(quantized["gain"]["data"], state["gain"])
    assert quantized["small"]["kind"] == "fp16"


@pytest.mark.parametrize("compressor", sorted(T.COMPRESSORS))
def test_artifact_file_round_trip_is_exact(tmp_path, compressor):
    torch.manual_seed(1)
    quantized = T.quantize_int8({"a": torch.randn(256, 300), "b": torch.randn(7), "c": torch.randn(3, 5)})
    size = T.write_artifact(tmp_path / "m.ptz", quantized, compressor)
    assert size == (tmp_path / "m.ptz").stat().st_size
    back = T.read_artifact(tmp_path / "m.ptz")
    for name, entry in quantized.items():
        for key, value in entry.items():
            assert torch.equal(back[name][key], value) if torch.is_tensor(value) else back[name][key] == value


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-10], "checksum mismatch"),
    (lambda b: b[:50] + bytes([b[50] ^ 1]) + b[51:], "checksum mismatch"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:20], "truncated header"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "unknown compressor"),
])
def test_a_damaged_artifact_fails_clearly(tmp_path, damage, message):
    path = tmp_path / "m.ptz"
    T.write_artifact(path, T.quantize_int8({"a": torch.randn(300, 300)}), "zlib")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        T.read_artifact(path)


def test_model_read_back_from_disk_matches_the_in_memory_quantized_model(tmp_path):
    torch.manual_seed(2)
    hp = small_hp(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=300)
    model = T.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    quantized = T.quantize_int8(model.state_dict())
    T.write_artifact(tmp_path / "m.ptz", quantized, "zstd")
    in_memory, from_disk = T.GPT(hp), T.GPT(hp)
    in_memory.load_state_dict(T.dequantize_int8(quantized), strict=True)
    from_disk.load_state_dict(T.dequantize_int8(T.read_artifact(tmp_path / "m.ptz")), strict=True)
    tokens = torch.randint(0, 300, (2, 32))
    assert torch.equal(in_memory(tokens), from_disk(tokens))
    assert torch.allclose(from_disk(tokens), model(tokens), atol=0.05)  # and close to the unquantized model
