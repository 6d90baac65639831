"""Export: packing, quantization error, GPTQ against round-to-nearest, LQER, QAT under compile, the size target,
exact file round-trips, corruption, and the model read back from disk."""

import contextlib
import dataclasses
import itertools

import numpy as np
import pytest
import torch

import train_gpt as T
from conftest import small_hp

NO_AUTOCAST = contextlib.nullcontext


@pytest.mark.parametrize("packing", ["byte", "dense"])
@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_packing_round_trips_every_value_exactly(bits, packing):
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, (37, 53)).float()
    q[0, :3] = torch.tensor([-qmax, qmax, 0])
    packed = T.pack_values(q, bits, packing)
    assert torch.equal(T.unpack_values(packed, bits, packing, [37, 53]), q)
    if packing == "dense":
        assert packed.numel() == -(-37 * 53 * bits // 8)  # bits per value, not bytes


@pytest.mark.parametrize("clip", ["sdclip", "percentile", "rowmax"])
def test_rounding_error_is_at_most_half_a_step_inside_the_clip(clip):
    torch.manual_seed(0)
    w = torch.randn(64, 300) * torch.linspace(0.1, 2, 64)[:, None]
    hp = T.Hyperparameters(quant_clip=clip, quant_bits=6)
    scale = T.row_scales(w, 6, clip, 13.0)
    q = T.round_to_nearest(w, scale, 31)
    error, half_step = (q * scale[:, None] - w).abs(), scale[:, None].expand_as(w) / 2 + 1e-6
    inside = w.abs() <= 31 * scale[:, None]
    assert (error[inside] <= half_step[inside]).all()
    assert (error[~inside] <= (w.abs() - 31 * scale[:, None])[~inside] + half_step[~inside]).all()
    assert torch.equal(scale, scale.half().float())  # the scale used is exactly the one stored
    if clip == "sdclip":  # k * std / qmax
        assert torch.equal(scale, (13.0 * w.std(dim=1) / 31).half().float())  # the sample std, as the records'
    assert hp.quant_clip == clip


def test_state_dict_quantization_covers_matrices_and_tables_and_passes_the_rest():
    hp = small_hp(num_layers=2, model_dim=64, bigram_buckets=16, ve_layers="1")
    model = T.GPT(hp)
    groups = T.quantized_tensor_groups(model)
    assert groups["tok_emb.weight"] == groups["bigram.table.weight"] == groups["value_embed.table.weight"] == "embed"
    assert groups["blocks.0.mlp.fc.weight"] == "mlp" and groups["blocks.1.attn.c_k.weight"] == "attn"
    quantized = T.quantize_state_dict(model.state_dict(), groups, hp)
    assert {name for name, e in quantized.items() if e["kind"] == "int"} == set(groups)
    assert quantized["tok_emb.weight"]["bits"] == 7 and quantized["blocks.0.mlp.fc.weight"]["bits"] == 6
    assert quantized["skip_weights"]["kind"] == "fp16" and quantized["blocks.0.attn_scale"]["kind"] == "fp32"
    assert "blocks.0.attn.gate.weight" not in groups  # the small gates pass through


@pytest.mark.parametrize("vectors_fp32", [True, False])
def test_the_tensors_kept_out_of_quantization_are_fp16_but_for_the_vectors_unless_vectors_fp32_is_off(vectors_fp32):
    hp = small_hp(num_layers=2, model_dim=64, vectors_fp32=vectors_fp32)
    model = T.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no value that fp16 holds exactly by chance
    groups, state = T.quantized_tensor_groups(model, hp), model.state_dict()
    restored = T.dequantize_state_dict(T.quantize_state_dict(state, groups, hp))
    kept = [name for name, tensor in state.items() if name not in groups and tensor.is_floating_point()]
    vectors = [name for name in kept if state[name].ndim < 2]
    assert vectors and len(vectors) < len(kept)  # gains and scales; skip weights, resid_mix
    for name in kept:
        exact = vectors_fp32 and name in vectors
        assert torch.equal(restored[name], state[name] if exact else state[name].half().float()), name


@pytest.fixture(scope="module")
def trained(sample):
    """A small model trained briefly on the offline sample, with calibration and held-out Hessians."""
    data_dir, _ = sample
    hp = small_hp(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=1024, train_seq_len=64)
    torch.manual_seed(0)
    model = T.GPT(hp)
    optimizers = T.Optimizers(model, hp, 0, 1)
    loader = T.TrainLoader(T.shard_files(str(data_dir), "train"), 64, 16, data_seed=0)
    for step in range(60):
        model(*loader.batch(step, 0)[:2]).backward()
        optimizers.step(lr_scale=1.0, momentum=T.muon_momentum(hp, step))
        optimizers.zero_grad()
    batches = lambda first: [loader.batch(step, 0)[0] for step in range(first, first + 4)]
    hessians = [T.collect_hessians(model, batches(first), NO_AUTOCAST) for first in (100, 200)]
    return hp, model, *hessians


def output_error(quantized, model, held_out):
    """sum over matrices of ||X (W - W_hat)^T||^2 on held-out inputs, i.e. tr(dW H dW^T)."""
    restored, weights = T.dequantize_state_dict(quantized), model.state_dict()
    return {name: ((restored[name] - weights[name]) @ h * (restored[name] - weights[name])).sum().item()
            for name, h in held_out.items()}


@pytest.mark.parametrize("bits", [5, 6])
def test_gptq_beats_round_to_nearest_on_held_out_activations(trained, bits):
    hp, model, calibration, held_out = trained
    hp = dataclasses.replace(hp, quant_bits=bits, embed_quant_bits=bits)
    groups = T.quantized_tensor_groups(model)
    rtn = output_error(T.quantize_state_dict(model.state_dict(), groups, hp), model, held_out)
    gptq = output_error(T.quantize_state_dict(model.state_dict(), groups, hp, calibration), model, held_out)
    assert set(gptq) == {name for name in groups if name != "value_embed.table.weight"}  # tok_emb via the final state
    assert sum(gptq.values()) < 0.9 * sum(rtn.values())
    assert sum(gptq[name] < rtn[name] for name in gptq) >= 0.8 * len(gptq)


def test_hessians_of_a_looped_layer_add_up_every_pass():
    hp = small_hp(num_layers=3, model_dim=64, loop_start=1, loop_end=1, num_loops=2, loop_enable_at=0)
    torch.manual_seed(5)
    model = T.GPT(hp)
    seen = []
    model.blocks[1].attn.c_q.register_forward_hook(lambda m, args, out: seen.append(args[0].flatten(0, -2)))
    tokens = torch.randint(0, 64, (2, 16))
    hessians = T.collect_hessians(model, [tokens], NO_AUTOCAST)
    assert len(seen) == 3  # layer 1 runs three times
    assert torch.allclose(hessians["blocks.1.attn.c_q.weight"], sum(x.T @ x for x in seen), rtol=1e-5, atol=1e-5)
    hidden = model.hidden_states(tokens).flatten(0, -2)  # the tied embedding: the input of the logit matmul
    assert torch.allclose(hessians["tok_emb.weight"], hidden.T @ hidden, rtol=1e-5, atol=1e-5)


def test_gptq_handles_dead_columns_and_falls_back_when_cholesky_fails():
    torch.manual_seed(3)
    w, x = torch.randn(8, 16), torch.randn(100, 16)
    x[:, 5] = 0  # a column that is never active
    scale = T.row_scales(w, 6, "rowmax", 0)
    q = T.gptq(w, x.T @ x, scale, 31)
    assert (q[:, 5] == 0).all() and q.abs().max() <= 31
    messages = []
    bad = {"w": -torch.eye(16)}  # negative definite: Cholesky fails even after damping
    hp = T.Hyperparameters(quant_clip="rowmax")
    quantized = T.quantize_state_dict({"w": w}, {"w": "attn"}, hp, bad, log=messages.append)
    assert "Cholesky failed for w" in messages[0] and quantized["w"]["kind"] == "int"


def test_gptq_block_size_changes_how_the_updates_are_batched_not_the_codes(monkeypatch):
    """GPTQ_BLOCK_SIZE: the error of a block's columns reaches the later columns at once, which is the same sum as
    column by column, so the codes are the same at any block size."""
    torch.manual_seed(5)
    w, x = torch.randn(12, 40), torch.randn(200, 40)
    scale = T.row_scales(w, 6, "rowmax", 0)
    codes = [T.gptq(w, x.T @ x, scale, 31, block_size) for block_size in (1, 7, 16, 40, 128)]
    assert all(torch.equal(c, codes[0]) for c in codes[1:]) and codes[0].abs().max() <= 31
    assert not torch.equal(codes[0], T.round_to_nearest(w, scale, 31))  # GPTQ, not plain rounding
    gptq, sizes = T.gptq, []
    monkeypatch.setattr(T, "gptq", lambda *args: sizes.append(args[4]) or gptq(*args))
    T.gptq_best_of(w, x.T @ x, [scale], 31, T.Hyperparameters(gptq_block_size=7))
    assert sizes == [7]


def records_gptq_order(w, hessian):
    """What the records' GPTQ does before rounding (the SP4096 record's and PR #2014's alike): dead columns'
    diagonal set to 1 and their weights zeroed, damping 0.01 of the mean diagonal, act-order, and the upper Cholesky
    factor of the inverse Hessian. Returns (w, rows, cols, perm, w permuted, that factor)."""
    w, hessian = w.float().clone(), hessian.float().clone()
    rows, cols = w.shape
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    hessian.diagonal().add_(0.01 * hessian.diag().mean())
    perm = torch.argsort(hessian.diag(), descending=True)
    w_perm = w[:, perm].clone()
    w_perm[:, dead[perm]] = 0
    hessian = hessian[perm][:, perm]
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    return w, rows, cols, perm, w_perm, inverse


def sp4096_gptq(w, hessian, qmax=31, block_size=128):
    """The SP4096 record's (2026-04-04) GPTQ, restated from its script: damping 0.01, act-order, and a full GPTQ
    for each candidate quantile of the rows' |w|, keeping the result with the lowest weight MSE."""
    w, rows, cols, perm, w_perm, inverse = records_gptq_order(w, hessian)
    best = None
    for pct in [0.9990, 0.9995, 0.9999, 0.99999, 1.0]:
        row_clip = torch.quantile(w.abs(), pct, dim=1) if pct < 1.0 else w.abs().amax(dim=1)
        s = (row_clip / qmax).clamp_min(1.0 / qmax).to(torch.float16).float()
        q, work = torch.zeros(rows, cols), w_perm.clone()
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            block, errors = work[:, i1:i2].clone(), torch.zeros(rows, i2 - i1)
            for j in range(i2 - i1):
                q[:, i1 + j] = torch.clamp(torch.round(block[:, j] / s), -qmax, qmax)
                errors[:, j] = (block[:, j] - q[:, i1 + j] * s) / inverse[i1 + j, i1 + j]
                block[:, j:] -= errors[:, j:j + 1] * inverse[i1 + j, i1 + j:i2][None]
            if i2 < cols:
                work[:, i2:] -= errors @ inverse[i1:i2, i2:]
        mse = (w_perm - q * s[:, None]).pow(2).mean().item()
        if best is None or mse < best[0]:
            best = (mse, q[:, torch.argsort(perm)], s, pct)
    return best


def test_gptq_clip_search_runs_gptq_per_candidate_as_the_sp4096_record_does():
    """GPTQ_CLIP_SEARCH=gptq (set by pr1392) gives the SP4096 record's integers and scales; the default, which picks
    the quantile by round to nearest before one GPTQ, picks another one here."""
    torch.manual_seed(5)
    w = torch.randn(48, 192) * 0.02
    w[::7, ::11] *= 30  # outliers: the quantiles differ
    x = torch.randn(400, 192) * torch.linspace(0.1, 3, 192)
    x[:, 3] = 0  # a dead column
    _, q, scale, quantile = sp4096_gptq(w, x.T @ x)
    hp = T.Hyperparameters.from_env({"PRESET": "pr1392"})[0]
    assert hp.gptq_clip_search == "gptq" and quantile < 1.0
    for search, same in (("gptq", True), ("rtn", False)):
        entry = T.quantize_state_dict({"w": w}, {"w": "attn"}, T.dataclasses.replace(hp, gptq_clip_search=search),
                                      {"w": x.T @ x})["w"]
        ours_q, ours_scale = T.unpack_values(entry["data"], 6, "byte", (48, 192)), entry["scale"].float()
        assert (torch.equal(ours_q, q) and torch.equal(ours_scale, scale)) == same, search


def test_gptq_embed_off_rounds_the_tied_embedding_to_nearest_and_the_matrices_with_gptq(trained):
    """GPTQ_EMBED=0 (set by pr1392: the SP4096 record rounds its int8 table to nearest): the table is what round to
    nearest stores, every other matrix what GPTQ stores; on (the default) GPTQ rounds the table too."""
    hp, model, hessians, _ = trained
    groups, state = T.quantized_tensor_groups(model), model.state_dict()
    assert "tok_emb.weight" in hessians and groups["tok_emb.weight"] == "embed"
    nearest = T.quantize_state_dict(state, groups, hp)
    with_embed = T.quantize_state_dict(state, groups, hp, hessians)
    without = T.quantize_state_dict(state, groups, T.dataclasses.replace(hp, gptq_embed=False), hessians)
    same = lambda a, b: torch.equal(a["data"], b["data"]) and torch.equal(a["scale"], b["scale"])
    assert same(without["tok_emb.weight"], nearest["tok_emb.weight"])
    assert not same(with_embed["tok_emb.weight"], nearest["tok_emb.weight"])
    for name in groups:
        if name != "tok_emb.weight":
            assert same(without[name], with_embed[name]) and not same(without[name], nearest[name]), name
    assert not T.Hyperparameters.from_env({"PRESET": "pr1392"})[0].gptq_embed


def test_lqer_corrects_the_worst_matrices(trained):
    hp, model, calibration, _ = trained
    groups = T.quantized_tensor_groups(model)
    plain = T.quantize_state_dict(model.state_dict(), groups, hp)
    corrected = T.quantize_state_dict(model.state_dict(), groups, dataclasses.replace(hp, lqer_rank=4, lqer_top_k=2))
    fixed = [name for name, entry in corrected.items() if "lqer" in entry]
    assert len(fixed) == 2
    weights, before, after = model.state_dict(), T.dequantize_state_dict(plain), T.dequantize_state_dict(corrected)
    for name in fixed:
        assert (after[name] - weights[name]).norm() < (before[name] - weights[name]).norm()


@pytest.mark.cuda_path  # a compile test: CI's second step
def test_qat_switch_takes_effect_inside_a_compiled_model():
    hp = small_hp(num_layers=2, model_dim=64, qat_start_lr_scale=0.2)
    torch.manual_seed(4)
    model = T.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    T.set_qat(model, hp, on=False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    tokens = torch.randint(0, 64, (2, 16))
    off = compiled(tokens)
    assert torch.allclose(off, model(tokens), atol=1e-6)
    T.set_qat(model, hp, on=True)  # what `train` does once the LR scale falls below QAT_START_LR_SCALE
    on = compiled(tokens)
    assert not torch.allclose(on, off, atol=1e-4)
    reference = T.GPT(hp)  # the same weights, fake-quantized by hand, with QAT off
    reference.load_state_dict(model.state_dict())
    T.set_qat(reference, hp, on=False)
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, T.CastedLinear) and module.qat_grid is not None:
                module.weight.copy_(T.fake_quantize(module.weight, *module.qat_grid))
    assert torch.allclose(on, reference(tokens), atol=1e-5)
    compiled(tokens, torch.randint(0, 64, (2, 16))).backward()  # straight-through: gradients reach the fp32 weights
    assert model.blocks[0].mlp.fc.weight.grad.abs().sum() > 0


def test_size_target_picks_the_finest_clip_grid_that_fits(trained):
    hp, model, _, _ = trained
    hp = dataclasses.replace(hp, compressor="zlib", size_target_bytes=0)
    groups = T.quantized_tensor_groups(model)
    _, blob, k_scale = T.quantize_to_fit(model.state_dict(), groups, hp, None, 1000)
    assert k_scale == 1.0  # no target: the k's as given
    fit = lambda target: T.quantize_to_fit(model.state_dict(), groups,
                                           dataclasses.replace(hp, size_target_bytes=target), None, 1000,
                                           messages.append)
    messages = []
    _, _, k_scale = fit(10 ** 9)  # room to spare: the finest grid of the search range
    assert k_scale == T.K_SCALE_RANGE[0]
    for target in (1000 + len(blob) - 3000, 1000 + len(blob) + 3000):  # tighter and looser than k x1
        _, fitted, k_scale = fit(target)
        assert 1000 + len(fitted) <= target and (k_scale > 1.0) == (target < 1000 + len(blob))
        finer = dataclasses.replace(hp, clip_k_mlp=hp.clip_k_mlp * k_scale / 1.1,
                                    clip_k_attn=hp.clip_k_attn * k_scale / 1.1,
                                    clip_k_embed=hp.clip_k_embed * k_scale / 1.1)
        _, too_big, _ = T.quantize_to_fit(model.state_dict(), groups, finer, None, 1000)
        assert 1000 + len(too_big) > target  # a grid 10% finer would not have fit
    assert "finest grid that fits" in messages[-1]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("compressor", sorted(T.COMPRESSORS))
def test_artifact_file_round_trip_is_exact(tmp_path, compressor, shuffle):
    torch.manual_seed(1)
    hp = T.Hyperparameters(quant_packing="dense", compressor=compressor)
    state = {"a": torch.randn(256, 300), "b": torch.randn(7), "c": torch.randn(3, 5)}
    quantized = T.quantize_state_dict(state, {"a": "mlp"}, hp)
    size = T.write_artifact(tmp_path / "m.ptz", T.serialize_artifact(quantized, compressor, shuffle))
    assert size == (tmp_path / "m.ptz").stat().st_size
    back = T.read_artifact(tmp_path / "m.ptz")
    for name, entry in quantized.items():
        for key, value in entry.items():
            assert torch.equal(back[name][key], value) if torch.is_tensor(value) else back[name][key] == value
    for blob in (b"", b"x", bytes(range(255))):
        assert T.byte_shuffle(T.byte_shuffle(blob), inverse=True) == blob


@pytest.mark.parametrize("settings", [
    dict(quant_bits=6, compressor="brotli"), dict(quant_bits=8, embed_quant_bits=8, compressor="zlib"),
    dict(quant_bits=5, embed_quant_bits=7, compressor="zstd", gated_attn_quant_gate=True),  # the gate is int8
    dict(quant_bits=16, embed_quant_bits=8, compressor="lzma"), dict(quant_bits=7, compressor="pergroup",
                                                                      pergroup_codec="lzma")])
def test_an_artifact_read_back_is_named_as_its_run_named_it_whatever_this_runs_settings(settings):
    """EVAL_ONLY_QUANTIZED_PATH names the round trip's line after the artifact, not after this run's QUANT_BITS
    and COMPRESSOR (which it never uses): an int5 zstd artifact scored by a run at the defaults is int5_zstd."""
    torch.manual_seed(3)
    hp = small_hp(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=300, **settings)
    model = T.GPT(hp)
    quantized = T.quantize_state_dict(model.state_dict(), T.quantized_tensor_groups(model, hp), hp)
    blob = T.serialize_artifact(quantized, hp.compressor, False, hp.pergroup_codec)
    groups = T.quantized_tensor_groups(T.GPT(small_hp(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2,
                                                      vocab_size=300)))
    assert T.exported_as(T.read_artifact("m.ptz", blob), blob, groups) == T.export_name(hp)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-10], "checksum mismatch"),
    (lambda b: b[:50] + bytes([b[50] ^ 1]) + b[51:], "checksum mismatch"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:20], "truncated header"),
    # the header is under the digest: a flipped compressor id, shuffle flag or size byte never reaches torch.load
    (lambda b: b[:4] + bytes([b[4] ^ 1]) + b[5:], "checksum mismatch"),
    (lambda b: b[:5] + bytes([b[5] ^ 1]) + b[6:], "checksum mismatch"),
    (lambda b: b[:8] + bytes([b[8] ^ 1]) + b[9:], "checksum mismatch"),
])
def test_a_damaged_artifact_fails_clearly(tmp_path, damage, message):
    path = tmp_path / "m.ptz"
    quantized = T.quantize_state_dict({"a": torch.randn(300, 300)}, {"a": "attn"}, T.Hyperparameters())
    T.write_artifact(path, T.serialize_artifact(quantized, "zlib", False))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        T.read_artifact(path)


def test_model_read_back_from_disk_matches_the_in_memory_quantized_model(tmp_path):
    torch.manual_seed(2)
    hp = small_hp(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=300, lqer_rank=2,
                  quant_bits=8, embed_quant_bits=8, quant_clip="rowmax", quant_packing="dense")
    model = T.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    quantized = T.quantize_state_dict(model.state_dict(), T.quantized_tensor_groups(model), hp)
    T.write_artifact(tmp_path / "m.ptz", T.serialize_artifact(quantized, "brotli", True))
    in_memory, from_disk = T.GPT(hp), T.GPT(hp)
    in_memory.load_state_dict(T.dequantize_state_dict(quantized), strict=True)
    from_disk.load_state_dict(T.dequantize_state_dict(T.read_artifact(tmp_path / "m.ptz")), strict=True)
    tokens = torch.randint(0, 300, (2, 32))
    assert torch.equal(in_memory(tokens), from_disk(tokens))
    assert torch.allclose(from_disk(tokens), model(tokens), atol=0.05)  # and close to the unquantized model


def test_a_missing_compressor_package_is_a_config_error(monkeypatch):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "brotli" else real_import(name, *a, **k))
    with pytest.raises(T.ConfigError, match="COMPRESSOR='brotli'.*pip install brotli"):
        T.Hyperparameters(compressor="brotli", pack_code=False)


# --- the 04-27 record's packing of LQER's factors and its int8 attention gate, restated from its formulas ---

def record_lqer_asym(a, b, group):
    """The record's asymmetric LQER factors, dequantized: A int2 in [-2, 1] with scale fp16(max|A| / 1.5); B int4
    in [-8, 7] over groups of `group` consecutive values of the flattened B, each with scale fp16(max / 7.5)."""
    sa = (a.abs().max().clamp_min(1e-10) / 1.5).half().float()
    flat = b.reshape(-1, group)
    sb = (flat.abs().max(dim=1).values.clamp_min(1e-10) / 7.5).half().float()
    qa = (a / sa).round().clamp(-2, 1)
    qb = (flat / sb[:, None]).round().clamp(-8, 7)
    return qa * sa, (qb * sb[:, None]).reshape(b.shape)


def record_per_row(x, bits):
    level = 2 ** (bits - 1) - 1
    s = (x.abs().max(dim=1).values.clamp_min(1e-10) / level).half().float()
    return (x / s[:, None]).round().clamp(-level, level) * s[:, None]


@pytest.mark.parametrize("asym, bits", [(True, 16), (False, 4), (False, 16)])
def test_lqer_factors_round_trip_as_the_records_formulas_give_them_and_weigh_what_they_should(asym, bits):
    generator = torch.Generator().manual_seed(bits)
    a, b = torch.randn(96, 4, generator=generator), torch.randn(4, 160, generator=generator)
    hp = T.Hyperparameters(lqer_rank=4, lqer_asym_enabled=asym, lqer_factor_bits=bits)
    packed = T.pack_low_rank(a, b, hp)
    got_a, got_b = T.low_rank_factors(packed)
    if asym:
        want_a, want_b = record_lqer_asym(a, b, 64)
        weight = 96 * 4 + 2 + 4 * 160 + 2 * (4 * 160 // 64)  # int8 values, one fp16 scale of A, one per group of B
    elif bits == 4:
        want_a, want_b = record_per_row(a, 4), record_per_row(b, 4)
        weight = 96 * 4 + 2 * 96 + 4 * 160 + 2 * 4  # int8 values, an fp16 scale per row
    else:
        want_a, want_b = a.half().float(), b.half().float()
        weight = 2 * (96 * 4 + 4 * 160)
    assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b)
    assert sum(t.numel() * t.element_size() for t in packed.values() if torch.is_tensor(t)) == weight
    if asym:
        assert set(packed["a"].unique().tolist()) <= {-2, -1, 0, 1} and packed["b"].abs().max() <= 8


def test_a_matrix_the_group_does_not_divide_falls_back_to_per_row_factors():
    hp = T.Hyperparameters(lqer_rank=3, lqer_asym_enabled=True, lqer_factor_bits=4)
    packed = T.pack_low_rank(torch.randn(10, 3), torch.randn(3, 50), hp)  # 150 values: not groups of 64
    assert "b_group" not in packed and packed["a_scale"].shape == (10,)


def test_the_attention_gate_is_int8_per_row_as_the_record_quantizes_it_and_the_artifact_round_trips(tmp_path):
    hp = small_hp(num_layers=2, model_dim=64, attn_gate="sparse", lqer_rank=2, lqer_top_k=1, lqer_asym_enabled=True,
                  lqer_asym_group=16, gated_attn_quant_gate=True)
    torch.manual_seed(0)
    model = T.GPT(hp)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.gate.weight.normal_(0, 0.3)
    state, groups = model.state_dict(), T.quantized_tensor_groups(model)
    quantized = T.quantize_state_dict(state, groups, hp)
    gates = [name for name in state if name.endswith(".attn.gate.weight")]
    assert len(gates) == 2
    for name in gates:
        w = state[name].float()
        scale = (w.abs().max(dim=1).values.clamp_min(1e-10) / 127).half().float()
        want = (w / scale[:, None]).round().clamp(-127, 127) * scale[:, None]
        entry = quantized[name]
        assert entry["data"].dtype == torch.int8 and entry["scale"].dtype == torch.float16
        assert entry["data"].numel() + 2 * entry["scale"].numel() == w.numel() + 2 * w.size(0)  # bytes: as computed
        assert torch.equal(T.dequantize_state_dict({name: entry})[name], want)
    plain = T.quantize_state_dict(state, groups, dataclasses.replace(hp, gated_attn_quant_gate=False))
    assert all(plain[name]["kind"] == "fp16" for name in gates)
    blob = T.serialize_artifact(quantized, "brotli", False)  # the file holds both forms and reads back as written
    read = T.dequantize_state_dict(T.read_artifact(tmp_path / "a.ptz", blob))
    assert all(torch.equal(read[name], value) for name, value in T.dequantize_state_dict(quantized).items())
    assert sum("b_group" in entry.get("lqer", {}) for entry in quantized.values()) == 1


def record_nearest_neighbour_order(matrix):
    """The 04-27 record's row order, restated: row 0, then the unused row of least L1 distance to the last one
    (float32 sums), the first such row in index order."""
    matrix = matrix.astype(np.float32)
    order, unused = [0], list(range(1, len(matrix)))
    while unused:
        distances = np.abs(matrix[unused] - matrix[order[-1]]).sum(axis=1)
        order.append(unused.pop(int(np.argmin(distances))))
    return order


def test_rows_are_ordered_as_the_record_orders_them_ties_included():
    generator = torch.Generator().manual_seed(0)
    for rows, cols, levels in ((40, 16, 31), (64, 8, 1), (3, 5, 127)):  # levels=1: many equal distances
        q = torch.randint(-levels, levels + 1, (rows, cols), generator=generator, dtype=torch.int8)
        assert T.nearest_neighbour_order(q).tolist() == record_nearest_neighbour_order(q.numpy())


PERGROUP_CODECS = [*("lzma", "brotli", "zstd", "smallest"), pytest.param("lrzip", marks=pytest.mark.skipif(
    not T.compressor_available("lrzip"), reason="the lrzip program is not installed (apt-get install lrzip)"))]


@pytest.mark.parametrize("codec", PERGROUP_CODECS)
def test_pergroup_artifact_round_trips_exactly_grouped_by_kind_column_by_column(tmp_path, codec):
    torch.manual_seed(3)
    hp = small_hp(num_layers=2, model_dim=32, vocab_size=48, lqer_rank=2, compressor="pergroup", pergroup_codec=codec)
    model = T.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    quantized = T.quantize_state_dict(model.state_dict(), T.quantized_tensor_groups(model, hp), hp)
    T.write_artifact(tmp_path / "m.ptz", T.serialize_artifact(quantized, "pergroup", False, codec))
    back = T.read_artifact(tmp_path / "m.ptz")
    assert back.keys() == quantized.keys()
    for name, entry in quantized.items():
        assert back[name].keys() == entry.keys(), name
        for key, value in entry.items():
            same = torch.equal if torch.is_tensor(value) else lambda a, b: a == b
            assert same(back[name][key], value) if key != "lqer" else all(
                torch.equal(back[name][key][k], v) if torch.is_tensor(v) else back[name][key][k] == v
                for k, v in value.items()), (name, key)
    streams = T.pergroup_streams(quantized)
    rest = T.load_plain_state(streams[0], "rest")
    assert rest["groups"][:3] == [["tok_emb.weight"], ["blocks.0.attn.c_q.weight", "blocks.1.attn.c_q.weight"],
                                  ["blocks.0.attn.c_k.weight", "blocks.1.attn.c_k.weight"]]
    assert all("data" not in rest["state"][name] for group in rest["groups"] for name in group)
    c_k = [quantized[f"blocks.{i}.attn.c_k.weight"]["data"] for i in range(2)]  # not reordered: columns in order
    assert streams[3] == b"".join(q.t().contiguous().numpy().tobytes() for q in c_k)
    fc = quantized["blocks.1.mlp.fc.weight"]["data"]  # reordered: the record's order, then columns
    order = record_nearest_neighbour_order(fc.numpy())
    assert rest["state"]["blocks.1.mlp.fc.weight"]["order"].tolist() == order
    fc_group = streams[1 + [g[0] for g in rest["groups"]].index("blocks.0.mlp.fc.weight")]
    assert fc_group[fc.numel():] == fc[order].t().contiguous().numpy().tobytes()


def test_pergroup_refuses_what_it_cannot_honour(monkeypatch):
    with pytest.raises(T.ConfigError, match="QUANT_PACKING"):
        T.Hyperparameters(compressor="pergroup", pergroup_codec="lzma", quant_packing="dense")
    with pytest.raises(T.ConfigError, match="BYTE_SHUFFLE"):
        T.Hyperparameters.from_env({"COMPRESSOR": "pergroup", "PERGROUP_CODEC": "lzma", "BYTE_SHUFFLE": "1"})
    with pytest.raises(T.ConfigError, match="PERGROUP_CODEC"):
        T.Hyperparameters.from_env({"PERGROUP_CODEC": "lzma"})  # without COMPRESSOR=pergroup it does nothing
    monkeypatch.setattr(T.shutil, "which", lambda program: None)
    with pytest.raises(T.ConfigError, match="lrzip program is not installed: apt-get install lrzip, or "
                                            "PERGROUP_CODEC=smallest"):
        T.Hyperparameters(compressor="pergroup")
    T.Hyperparameters(compressor="pergroup", pergroup_codec="smallest")


def record_int6_per_row(t, clip_range=31):
    """The PR #549 family's int6 export (GPTQ-lite), restated: the percentile with the lowest weight MSE, the row
    scale floored at 1/31 and stored in fp16."""
    best = None
    for pct in (0.9990, 0.9995, 0.9999, 0.99999, 1.0):
        row_clip = torch.quantile(t.abs(), pct, dim=1) if pct < 1.0 else t.abs().amax(dim=1)
        s = (row_clip / clip_range).clamp_min(1.0 / clip_range).to(torch.float16)
        q = torch.clamp(torch.round(t / s.float()[:, None]), -clip_range, clip_range)
        err = (t - q * s.float()[:, None]).pow(2).mean().item()
        if best is None or err < best[2]:
            best = (q, s, err)
    return best[0], best[1]


def record_int8_per_row(t):
    """Its int8 tables (the baseline's rule): each row clamped to its 99.99984% quantile, the scale floored at 1/127,
    rounded with the fp32 scale, stored in fp16."""
    clip = torch.quantile(t.abs(), 0.9999984, dim=1)
    clipped = torch.maximum(torch.minimum(t, clip[:, None]), -clip[:, None])
    scale = (clip / 127.0).clamp_min(1.0 / 127.0)
    return torch.clamp(torch.round(clipped / scale[:, None]), -127, 127), scale.to(torch.float16)


@pytest.mark.parametrize("std", [0.02, 3.0])  # 0.02: every row's floor binds; 3.0: none does
def test_the_pr549_presets_export_with_the_records_floors_value_for_value(std):
    torch.manual_seed(5)
    hp = T.Hyperparameters.from_env({"PRESET": "pr703"})[0]
    w, table = torch.randn(48, 700) * std, torch.randn(64, 300) * std
    w[3, 7], table[5, 11] = 40 * std, 60 * std  # outliers past the percentile clips
    quantized = T.quantize_state_dict({"m": w, "e": table}, {"m": "mlp", "e": "embed"}, hp)
    for name, (q, scale) in (("m", record_int6_per_row(w)), ("e", record_int8_per_row(table))):
        entry = quantized[name]
        assert torch.equal(entry["scale"], scale), name
        assert torch.equal(T.unpack_values(entry["data"], entry["bits"], entry["packing"], entry["shape"]), q), name
    default = T.quantize_state_dict({"m": w}, {"m": "mlp"}, T.dataclasses.replace(hp, quant_clip_floor=0.0))
    assert torch.equal(default["m"]["scale"], quantized["m"]["scale"]) == (std > 1)  # the floor binds at 0.02


def record_awq_gptq(w, hessian, clip_sigmas, starts, size, qmax=31, qmax_wide=127, block_size=128):
    """PR #2014's GPTQ with AWQ-lite's protected groups, restated from its script: every row's scale clip_sigmas *
    std / qmax in fp16, the protected columns' the same at qmax_wide; act-order, damping 0.01, blocks of 128."""
    w, rows, cols, perm, w_perm, inverse = records_gptq_order(w, hessian)
    s = (clip_sigmas * w.std(dim=1) / qmax).clamp_min(1e-10).half().float()
    s_wide = (clip_sigmas * w.std(dim=1) / qmax_wide).clamp_min(1e-10).half().float()
    protect = torch.zeros(cols, dtype=torch.bool)
    for start in starts:
        protect[start:start + size] = True
    protect = protect[perm]
    q, work = torch.zeros(rows, cols), w_perm.clone()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block, errors = work[:, i1:i2].clone(), torch.zeros(rows, i2 - i1)
        for j in range(i2 - i1):
            scale, limit = (s_wide, qmax_wide) if protect[i1 + j] else (s, qmax)
            q[:, i1 + j] = torch.clamp(torch.round(block[:, j] / scale), -limit, limit)
            errors[:, j] = (block[:, j] - q[:, i1 + j] * scale) / inverse[i1 + j, i1 + j]
            block[:, j:] -= errors[:, j:j + 1] * inverse[i1 + j, i1 + j:i2][None]
        if i2 < cols:
            work[:, i2:] -= errors @ inverse[i1:i2, i2:]
    return q[:, torch.argsort(perm)], s, s_wide


AWQ_HP = small_hp(awq_lite_enabled=True, clip_k_attn=13.0, quant_bits=6)


def test_awq_lite_rounds_its_groups_at_eight_bits_inside_gptq_as_the_record_does():
    torch.manual_seed(7)
    w = torch.randn(48, 256) * 0.02
    x = torch.randn(600, 256) * torch.linspace(0.2, 2, 256)
    x[:, 5] = 0  # a dead column
    hessian = x.T @ x
    q, s, s_wide = record_awq_gptq(w, hessian, 13.0, [64, 192], 64)
    entry = T.quantize_state_dict({"w": w}, {"w": "attn"}, AWQ_HP, {"w": hessian}, protected={"w": [64, 192]})["w"]
    ours = T.unpack_values(entry["data"], 6, "byte", (48, 256))
    assert torch.equal(ours, q) and torch.equal(entry["scale"].float(), s)
    assert torch.equal(entry["awq"]["scale"].float(), s_wide) and entry["awq"]["starts"].tolist() == [64, 192]
    assert ours[:, 64:128].abs().max() > 31 and ours[:, :64].abs().max() <= 31  # the wider range is used
    restored = T.dequantize_state_dict({"w": entry})["w"]
    wide_columns = torch.zeros(256, dtype=torch.bool)
    wide_columns[64:128] = wide_columns[192:] = True
    expected = torch.where(wide_columns, q * s_wide[:, None], q * s[:, None])
    assert torch.equal(restored, expected)
    plain = T.dequantize_state_dict(T.quantize_state_dict({"w": w}, {"w": "attn"}, AWQ_HP, {"w": hessian}))["w"]
    error = lambda r, cols: ((r - w)[:, cols] @ hessian[cols][:, cols] * (r - w)[:, cols]).sum()
    assert error(restored, wide_columns) < 0.25 * error(plain, wide_columns)  # 8 bits where it was 6


def test_awq_lite_picks_the_groups_with_the_most_activation_weighted_magnitude_per_call():
    """The record's salience: per input column, the RMS of the inputs over every call times the column's mean
    |weight|, summed over a group; the top groups over all matrices with fewer bits than AWQ_LITE_BITS."""
    torch.manual_seed(1)
    hp = dataclasses.replace(AWQ_HP, awq_lite_group_size=32, awq_lite_group_top_k=2)
    state = {"blocks.0.attn.c_q.weight": torch.randn(16, 128), "blocks.1.mlp.fc.weight": torch.randn(16, 96),
             "tok_emb.weight": torch.randn(40, 128)}
    groups = {"blocks.0.attn.c_q.weight": "attn", "blocks.1.mlp.fc.weight": "mlp", "tok_emb.weight": "embed"}
    inputs = {name: torch.randn(200, w.size(1)) * torch.rand(w.size(1)) * 3 for name, w in state.items()}
    passes = {"blocks.0.attn.c_q.weight": 1, "blocks.1.mlp.fc.weight": 3, "tok_emb.weight": 1}
    hessians = {name: torch.cat([x] * passes[name]).T @ torch.cat([x] * passes[name]) for name, x in inputs.items()}
    scores = []
    for name, w in state.items():  # restated: sqrt(sum of squares / count) over every call
        rms = (torch.cat([inputs[name]] * passes[name]).square().mean(dim=0)).sqrt()
        salience = rms * w.abs().mean(dim=0)
        scores += [(salience[first:first + 32].sum().item(), name, first) for first in range(0, w.size(1), 32)]
    expected = {}
    for _, name, first in sorted(scores, reverse=True)[:2]:
        expected.setdefault(name, []).append(first)
    chosen = T.awq_lite_groups(state, groups, hessians, passes, hp)
    assert chosen == expected
    assert T.awq_lite_groups(state, groups, hessians, {}, hp) != chosen  # without the passes, the looped layer wins
    assert T.awq_lite_groups(state, groups, hessians, passes, dataclasses.replace(hp, awq_lite_bits=6)) == {}
    assert T.awq_lite_groups(state, groups, None, passes, hp) == {}  # no calibration, nothing protected


def test_an_awq_lite_artifact_round_trips_through_both_layouts(tmp_path):
    torch.manual_seed(3)
    hp = small_hp(num_layers=2, model_dim=32, vocab_size=64, lqer_rank=2, awq_lite_enabled=True,
                  awq_lite_group_size=16, awq_lite_group_top_k=3)
    model = T.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    groups = T.quantized_tensor_groups(model, hp)
    hessians = T.collect_hessians(model, [torch.randint(0, 64, (2, 32))], NO_AUTOCAST)
    protected = T.awq_lite_groups(model.state_dict(), groups, hessians, T.calls_per_forward(model, groups), hp)
    assert sum(map(len, protected.values())) == 3
    quantized = T.quantize_state_dict(model.state_dict(), groups, hp, hessians, protected=protected)
    assert sum("awq" in entry for entry in quantized.values()) == len(protected)
    expected = T.dequantize_state_dict(quantized)
    for compressor in ("lzma", "pergroup"):
        T.write_artifact(tmp_path / "m.ptz", T.serialize_artifact(quantized, compressor, False, "lzma"))
        back = T.dequantize_state_dict(T.read_artifact(tmp_path / "m.ptz"))
        assert all(torch.equal(back[name], expected[name]) for name in expected), compressor


def test_awq_lite_settings_are_refused_where_they_cannot_hold():
    for env, match in (({"AWQ_LITE_ENABLED": "1", "QUANT_PACKING": "dense"}, "QUANT_PACKING"),
                       ({"AWQ_LITE_ENABLED": "1", "AWQ_LITE_BITS": "9"}, "AWQ_LITE_BITS"),
                       ({"AWQ_LITE_ENABLED": "1", "GPTQ": "0"}, "unless GPTQ=1"),
                       ({"AWQ_LITE_GROUP_SIZE": "32"}, "unless AWQ_LITE_ENABLED=1")):
        with pytest.raises(T.ConfigError, match=match):
            T.Hyperparameters.from_env(env)


def test_an_artifact_of_another_depth_is_refused_naming_the_depth():
    """The depth shapes every block's tensors and the skips': the refusal names NUM_LAYERS, not the settings of the
    first tensor that happens to differ (the skips', or a missing block's MLP)."""
    six, five = (T.GPT(small_hp("smoke", num_layers=layers)) for layers in (6, 5))
    for model, state in ((five, six.state_dict()), (six, five.state_dict())):
        with pytest.raises(T.ConfigError, match=r"blocks, this model \d; set NUM_LAYERS as the run that wrote it did"):
            T.check_artifact_fits(model, state, "a.ptz")
    T.check_artifact_fits(six, T.GPT(small_hp("smoke", num_layers=6)).state_dict(), "a.ptz")  # the same: accepted


def test_awq_lite_is_accepted_exactly_where_it_protects_columns():
    """AWQ-lite widens columns of the matrices GPTQ rounds at fewer bits than AWQ_LITE_BITS (the tables only with
    GPTQ_EMBED=1): where there are none, it would protect nothing, so it is refused, and a preset's is reset."""
    for quant_bits, embed_bits, gptq_embed, awq_bits in itertools.product((6, 8, 16), (7, 8), (0, 1), (7, 8)):
        settings = dict(gptq=True, awq_lite_enabled=True, quant_bits=quant_bits, embed_quant_bits=embed_bits,
                        gptq_embed=bool(gptq_embed), awq_lite_bits=awq_bits)
        hp = small_hp(num_layers=2, model_dim=64, **settings)
        model = T.GPT(hp)
        groups = T.quantized_tensor_groups(model, hp)
        hessians = {name: torch.eye(model.state_dict()[name].size(1)) for name in groups}
        protects = bool(T.awq_lite_groups(model.state_dict(), groups, hessians, {}, hp))
        env = {name.upper(): str(int(value)) for name, value in settings.items()}
        try:
            accepted = T.Hyperparameters.from_env(env)[0].awq_lite_enabled
        except T.ConfigError as error:
            assert "AWQ_LITE_ENABLED=1 has no effect unless" in str(error)
            accepted = False
        assert accepted == protects, settings
    # PR #2014's AWQ-lite under 8-bit matrices and tables: back to its default, and the config line says so
    hp, sources = T.Hyperparameters.from_env({"PRESET": "pr2014", "QUANT_BITS": "8", "EMBED_QUANT_BITS": "8"})
    assert (hp.awq_lite_enabled, sources["awq_lite_enabled"]) == (False, "inert:preset:pr2014")
    assert T.Hyperparameters.from_env({"PRESET": "pr2014", "QUANT_BITS": "8"})[0].awq_lite_enabled  # int7 tables


def test_a_quantization_setting_is_accepted_exactly_where_it_acts():
    """An SDClip k acts where its tensors are quantized with SDClip: the tables' k under EMBED_QUANT_CLIP=sdclip
    whatever the matrices use, and no k, clip, packing or size target at 16 bits (fp16, nothing quantized)."""
    hp = small_hp(num_layers=2, model_dim=64, quant_clip="percentile", embed_quant_clip="sdclip", gptq=False)
    model = T.GPT(hp)
    groups = T.quantized_tensor_groups(model, hp)
    scales = [T.quantize_state_dict(model.state_dict(), groups, dataclasses.replace(hp, clip_k_embed=k))
              ["tok_emb.weight"]["scale"] for k in (4.0, 10.0)]
    assert not torch.equal(*scales)  # the tables' k acts: the setting must be accepted
    env = {"QUANT_CLIP": "percentile", "EMBED_QUANT_CLIP": "sdclip", "CLIP_K_EMBED": "10"}
    assert T.Hyperparameters.from_env(env)[0].clip_k_embed == 10.0
    for refused in ({"EMBED_QUANT_CLIP": "quantile", "CLIP_K_EMBED": "10"},  # the tables' scale is a quantile
                    {"QUANT_BITS": "16", "CLIP_K_MLP": "10"},  # the matrices are fp16
                    {"PRESET": "neon213", "SIZE_TARGET_BYTES": "15000000"},  # everything is fp16: nothing to fit
                    {"PRESET": "neon213", "QUANT_CLIP": "rowmax"}, {"PRESET": "neon213", "QUANT_PACKING": "dense"}):
        with pytest.raises(T.ConfigError, match="has no effect unless"):
            T.Hyperparameters.from_env(refused)
    with pytest.raises(T.ConfigError, match=r"unset CLIP_K_MLP$"):  # its switch given: no preset is suggested
        T.Hyperparameters.from_env({"QUANT_BITS": "16", "CLIP_K_MLP": "10"})
    # GPTQ's clip search runs on the tables alone where only they use a percentile clip
    T.Hyperparameters.from_env({"EMBED_QUANT_CLIP": "percentile", "GPTQ_CLIP_SEARCH": "gptq"})
    # fp16 matrices, int7 tables with SDClip: the size target still scales the tables' k
    assert T.Hyperparameters.from_env({"QUANT_BITS": "16", "SIZE_TARGET_BYTES": "3000000"})[0].quant_bits == 16
    # PR #754's fp16 embedding leaves PR #549's quantile clip of the tables without effect: back to its default
    hp, sources = T.Hyperparameters.from_env({"PRESET": "pr754"})
    assert (hp.embed_quant_clip, sources["embed_quant_clip"]) == ("same", "inert:preset:pr754")


@pytest.mark.parametrize("env, named, unnamed", [
    ({}, "clip:sdclip embed_clip:sdclip clip_floor:0 k_scale:0.500 packing:byte gptq:True", ""),
    ({"QUANT_BITS": "16"}, "embed_bits:7 embed_clip:sdclip clip_floor:0 k_scale:0.500", " clip:"),
    ({"EMBED_QUANT_BITS": "16"}, "embed_bits:16 clip:sdclip clip_floor", "embed_clip:"),
    ({"PRESET": "neon213"}, "bits:16 embed_bits:16 gptq:False lqer_rank:0 time:", "clip"),
])
def test_the_quantization_line_names_a_clip_only_where_tensors_are_quantized(env, named, unnamed):
    """The log names the settings that acted: an all-fp16 export has no clip, k scale or packing to report."""
    hp = T.Hyperparameters.from_env(env)[0]
    line = T.quantization_line(hp, 0.5, hp.gptq, {}, 1.0)
    assert named in line and (not unnamed or unnamed not in line) and line.endswith(" time:1.0s"), line


def test_self_generated_calibration_samples_the_same_sequences_at_any_world_size_and_greedily_at_temperature_0():
    """GPTQ_CALIBRATION=self: GPTQ_SELF_SEQS sequences of GPTQ_SELF_SEQ_LEN tokens from BOS, in batches seeded by
    (SEED, batch) and shared out to the ranks; GPTQ_SELF_TEMPERATURE=0 takes the most likely token every time."""
    hp = small_hp(gptq=True, gptq_calibration="self", gptq_self_seqs=T.SELF_CALIBRATION_BATCH * 2 + 3,
                  gptq_self_seq_len=7)
    torch.manual_seed(0)
    model, bos, cpu = T.GPT(hp, bos_id=1).eval(), 1, torch.device("cpu")
    sample = lambda hp, rank=0, world_size=1: [row.tolist() for batch in T.self_generated_batches(
        model, hp, bos, rank, world_size, cpu, contextlib.nullcontext) for row in batch]
    rows = sample(hp)
    assert len(rows) == hp.gptq_self_seqs and all(len(row) == 7 and row[0] == bos for row in rows)
    assert len({tuple(row) for row in rows}) == len(rows)  # sampled, not repeated
    assert sample(hp, 0, 2) + sample(hp, 1, 2) == rows == sample(hp, 0, 3) + sample(hp, 1, 3) + sample(hp, 2, 3)
    assert sample(dataclasses.replace(hp, gptq_self_temperature=2.0)) != rows
    assert sample(dataclasses.replace(hp, seed=7)) != rows
    greedy = sample(dataclasses.replace(hp, gptq_self_temperature=0.0))
    with torch.no_grad():
        for position in range(1, 7):
            prefix = torch.tensor([row[:position] for row in greedy])
            assert model.logits(prefix)[:, -1].argmax(-1).tolist() == [row[position] for row in greedy]
