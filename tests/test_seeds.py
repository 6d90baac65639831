"""The seeds by name: the forms PR #549/#754, PR #703, PR #1392 and neon213 used, each checked against a plain
re-statement of its equation; the presets' parameter counts against closed forms (and the seeds' own logs); QAT on
the export's grid; and every preset trained a few steps at the smoke size through export and its evaluation."""

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

import train_gpt as T
from conftest import run_script, small_hp

BOS = 1


def causal(model, vocab, seq_len=24, position=11):
    """True when no output before `position` changes as the tokens from `position` on change."""
    torch.manual_seed(0)
    tokens = torch.randint(2, vocab, (2, seq_len))
    changed = tokens.clone()
    changed[:, position:] = torch.randint(2, vocab, (2, seq_len - position))
    with torch.no_grad():
        return torch.allclose(model(tokens)[:, :position], model(changed)[:, :position], atol=1e-6)


def perturbed(model, scale=0.05, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


# --- the seed-era SmearGate ---

def test_smear_blend_is_the_seed_equation_with_no_step_across_a_bos():
    torch.manual_seed(0)
    blend = T.SmearBlend(8, BOS)
    with torch.no_grad():
        blend.gate.normal_()
    x, ids = torch.randn(2, 6, 8), torch.randint(2, 50, (2, 6))
    ids[0, 3] = BOS
    s = torch.sigmoid(blend.gate)
    previous = torch.cat([torch.zeros(2, 1, 8), x[:, :-1]], dim=1)
    previous[0, 3] = 0  # a BOS never takes the previous document's last token
    assert torch.allclose(blend(x, ids), (1 - s) * x + s * previous, atol=1e-6)
    fresh = T.SmearBlend(8, BOS)  # g = 0 at init: an even blend
    assert torch.allclose(fresh(x, ids), 0.5 * x + 0.5 * previous, atol=1e-6)


def test_smear_blend_acts_after_the_embedding_norm_and_is_causal():
    hp = small_hp(smear_gate_form="blend", num_loops=0, parallel_residuals=False)
    model = perturbed(T.GPT(hp, bos_id=BOS))
    ids = torch.randint(2, 64, (1, 10))
    normed = F.rms_norm(model.tok_emb(ids), (hp.model_dim,))
    assert torch.allclose(model.embed(ids), model.smear(normed, ids), atol=1e-6)
    assert causal(model, 64)


# --- PR #549's value residual and gated attention ---

def test_lambda_value_residual_is_l0_v0_plus_l1_v():
    hp = small_hp(value_residual=True, value_residual_form="lambda")
    attention = T.CausalSelfAttention(hp, layer=1, attention_fn=T._sdpa)
    assert attention.value_residual.tolist() == [0.5, 0.5]
    with torch.no_grad():
        attention.value_residual.copy_(torch.tensor([0.3, 1.7]))
    v, v0 = torch.randn(2, 5, 1, 16), torch.randn(2, 5, 1, 16)
    assert torch.allclose(attention.mix_value_residual(v, v0), 0.3 * v0 + 1.7 * v)
    sigmoid_form = T.CausalSelfAttention(small_hp(value_residual=True), layer=1, attention_fn=T._sdpa)
    assert torch.allclose(sigmoid_form.mix_value_residual(v, v0), v + 0.5 * v0)  # sigmoid(0) = 0.5
    model = perturbed(T.GPT(small_hp(value_residual=True, value_residual_form="lambda")))
    assert causal(model, 64)


def test_biased_gate_is_sigmoid_of_w_x_plus_b_and_starts_nearly_open():
    gate = T.AttentionGate("biased", 32, 4, window=12, scale=0.5)
    x = torch.randn(2, 5, 32)
    assert torch.allclose(gate(x), torch.full((2, 5, 4, 1), 1 / (1 + math.exp(-4.0))))
    with torch.no_grad():
        gate.weight.normal_()
        gate.bias.normal_()
    expected = torch.sigmoid(x @ gate.weight.T + gate.bias).unsqueeze(-1)
    assert torch.allclose(gate(x), expected, atol=1e-6)
    assert causal(perturbed(T.GPT(small_hp(attn_gate="biased"))), 64)


# --- PR #703's Cache+Backout ---

def backout_model(**overrides):
    hp = small_hp(num_layers=4, num_loops=0, parallel_residuals=False, backout_layer=-2, **overrides)
    model = perturbed(T.GPT(hp))
    model.final_norm = torch.nn.Identity()  # the state the backout acts on, before the final norm
    return model


def test_backout_subtracts_lambda_times_the_cached_state():
    fresh = T.GPT(small_hp(num_layers=4, num_loops=0, parallel_residuals=False, backout_layer=-2, backout_init=0.1))
    assert fresh.backout.item() == pytest.approx(0.1)
    model = backout_model(backout_init=0.1)
    lam = model.backout.item()
    cached = {}
    def keep(module, args, out):  # the state after 4 - 2 layers
        cached["state"] = out[0][0]
    model.blocks[1].register_forward_hook(keep)
    ids = torch.randint(2, 64, (2, 12))
    with torch.no_grad():
        backed_out = model.hidden_states(ids)
        model.backout.zero_()
        plain = model.hidden_states(ids)
    assert torch.allclose(backed_out, plain - lam * cached["state"], atol=1e-5)


def test_backout_read_path_takes_keys_and_values_from_the_cached_state_causally():
    hp = small_hp(num_loops=0, parallel_residuals=False, xsa_layers="", attn_gate="none")
    attention = perturbed(T.CausalSelfAttention(hp, layer=0, attention_fn=T._sdpa))
    x, context = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    head = lambda t, n: t.view(2, 9, n, 16)  # noqa: E731
    q = attention.rotary(F.rms_norm(head(attention.c_q(x), 2), (16,))) * attention.q_gain[:, None]
    k = attention.rotary(F.rms_norm(head(attention.c_k(context), 1), (16,)))
    v = head(attention.c_v(context), 1)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=True).transpose(1, 2)
    assert torch.allclose(attention(x, context=context)[0], attention.proj(y.reshape(2, 9, 32)), atol=1e-5)
    model = backout_model(backout_init=0.1, backout_read=True)
    assert causal(model, 64)
    reading = model.hidden_states(torch.randint(2, 64, (1, 12)))
    model.backout_read = False
    assert not torch.allclose(reading, model.hidden_states(torch.randint(2, 64, (1, 12))))


def test_backout_cache_lives_within_one_forward():
    """The cached state is made and read inside one forward pass: nothing is kept between windows, so a
    document-isolated window (it starts at the document's BOS) reads nothing of an earlier document, exactly as
    attention does."""
    model = backout_model(backout_init=0.1, backout_read=True)
    doc = torch.cat([torch.tensor([BOS]), torch.randint(2, 64, (11,))])[None]
    with torch.no_grad():
        alone = model(doc)
        model(torch.randint(2, 64, (3, 12)))  # another window in between
        again = model(doc)
        batched = model(torch.cat([torch.randint(2, 64, (1, 12)), doc]))[1:]  # beside another row of the batch
    assert torch.equal(alone, again) and torch.allclose(alone, batched, atol=1e-5)


# --- PR #1289/#1392's merged lanes ---

def test_merge_lanes_never_exchange_and_end_as_m_lane0_plus_1_minus_m_lane1():
    hp = small_hp(num_layers=3, num_loops=0, parallel_start_layer=1, parallel_form="merge")
    model = perturbed(T.GPT(hp))
    block = model.blocks[2]
    assert not hasattr(block, "lane_routing") and model.lane_merge.item() == pytest.approx(0.5 + 0.0, abs=0.2)
    lane0, lane1, x0 = torch.randn(2, 7, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    (new0, new1), _ = block((lane0, lane1), x0)
    mixed = block.resid_mix[0] * lane0 + block.resid_mix[1] * x0
    attn_out = block.attn(block.attn_norm(mixed) * block.norm_scale)[0] * block.attn_scale
    mlp_out = block.mlp(block.mlp_norm(lane1) * block.norm_scale) * block.mlp_scale
    assert torch.allclose(new0, mixed + attn_out, atol=1e-5)
    assert torch.allclose(new1, lane1 + mlp_out, atol=1e-5)
    m = model.lane_merge
    assert torch.allclose(model.merge((new0, new1)), m * new0 + (1 - m) * new1, atol=1e-6)
    assert causal(model, 64)


def test_merge_lanes_refuse_a_loop_across_the_split():
    with pytest.raises(T.ConfigError, match="PARALLEL_FORM"):
        small_hp(num_layers=6, num_loops=1, loop_start=2, loop_end=4, parallel_start_layer=3,
                 parallel_form="merge").validate()


# --- the PR #549 family's initializations, optimizer routing and averaging ---

def test_value_embedding_projection_init_zero_or_orthogonal():
    zero = T.ValueEmbedding(64, 16, 32, "zero")
    assert zero.proj.weight.abs().sum() == 0
    ortho = T.ValueEmbedding(64, 16, 32, "ortho")
    w = ortho.proj.weight  # (32, 16): orthonormal columns
    assert torch.allclose(w.T @ w, torch.eye(16), atol=1e-5)


def test_table_projections_go_to_adamw_with_the_scalars():
    for optimizer, in_muon in (("muon", True), ("adamw", False)):
        hp = small_hp(bigram_buckets=32, bigram_dim=16, ve_layers="-1", embed_proj_optimizer=optimizer)
        model = T.GPT(hp)
        optimizers = T.Optimizers(model, hp, 0, 1)
        banked = {id(p) for bank in optimizers.banks for p in bank.params}
        scalars = {id(p) for p in optimizers.adam.param_groups[1]["params"]}
        for proj in (model.bigram.proj.weight, model.value_embed.proj.weight):
            assert (id(proj) in banked) == in_muon and (id(proj) in scalars) != in_muon


def test_ema_without_warmup_uses_the_decay_from_the_first_step():
    model = torch.nn.Linear(3, 3)
    for warmup, decay in ((False, 0.997), (True, 1 / 10)):
        hp = dataclasses.replace(small_hp(), ema_decay=0.997, ema_warmup=warmup)
        average = T.WeightAverage(model, hp)
        start = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        average.update(1, 1.0)
        for ema, before, now in zip(average.ema, start, model.parameters()):
            assert torch.allclose(ema, decay * before + (1 - decay) * now)


def test_neon_switches_random_projections_no_embedding_norm_no_softcap():
    hp = small_hp(zero_init_proj=False, embed_norm=False, logit_softcap=0.0, num_loops=0, parallel_residuals=False,
                  smear_gate=False)
    model = T.GPT(hp)
    assert model.blocks[0].attn.proj.weight.abs().sum() > 0 and model.blocks[0].mlp.proj.weight.abs().sum() > 0
    ids = torch.randint(0, 64, (1, 8))
    assert torch.equal(model.embed(ids), model.tok_emb(ids))
    raw = F.linear(model.hidden_states(ids), model.tok_emb.weight)
    assert torch.allclose(model.logits(ids), raw, atol=1e-6)


def test_stage_restarts_decay_the_lr_to_zero_within_each_stage():
    hp = small_hp(conv_k=5, kernel_schedule="1@0,3@0.25,5@0.5", kernel_stage_restarts=True, warmdown_frac=0.0,
                  iterations=100, max_wallclock_seconds=0.0)
    scales = [T.lr_multiplier(hp, step, 0.0) for step in (0, 10, 24, 25, 40, 50, 75, 99)]
    assert scales == pytest.approx([1.0, 0.6, 0.04, 1.0, 0.4, 1.0, 0.5, 0.02])
    with pytest.raises(T.ConfigError, match="KERNEL_STAGE_RESTARTS"):
        dataclasses.replace(hp, warmdown_frac=0.5).validate()


# --- export forms: small tensors and 16-bit tables in fp16, lzma ---

def test_passthrough_numel_and_16_bits_store_fp16():
    hp = small_hp(quant_passthrough_numel=32 * 32, embed_quant_bits=16, bigram_buckets=0)
    model = T.GPT(hp)
    groups = T.quantized_tensor_groups(model, hp)
    assert "tok_emb.weight" not in groups and "blocks.0.attn.c_q.weight" not in groups  # 64x32 table, 32x32 matrix
    assert "blocks.0.mlp.fc.weight" in groups  # 128 x 32 > 1024 elements
    quantized = T.quantize_state_dict(model.state_dict(), groups, hp)
    assert quantized["tok_emb.weight"]["kind"] == "fp16" and quantized["blocks.0.mlp.fc.weight"]["kind"] == "int"
    restored = T.dequantize_state_dict(quantized)
    assert torch.equal(restored["tok_emb.weight"], model.tok_emb.weight.detach().half().float())


def test_lzma_artifact_round_trips(tmp_path):
    hp = small_hp(compressor="lzma")
    model = T.GPT(hp)
    quantized = T.quantize_state_dict(model.state_dict(), T.quantized_tensor_groups(model), hp)
    blob = T.serialize_artifact(quantized, "lzma", False)
    T.write_artifact(tmp_path / "a.ptz", blob)
    back = T.dequantize_state_dict(T.read_artifact(tmp_path / "a.ptz"))
    for name, tensor in T.dequantize_state_dict(quantized).items():
        assert torch.equal(back[name], tensor)


def test_the_other_compressor_is_compared_only_when_installed(monkeypatch):
    hp = small_hp(compressor="brotli")
    model = T.GPT(hp)
    quantized = T.quantize_state_dict(model.state_dict(), T.quantized_tensor_groups(model), hp)
    assert set(T.compressed_sizes_for_log(quantized, hp)) == {"zstd"}

    def missing():
        raise ImportError("no zstandard")
    monkeypatch.setattr(T, "_zstd", missing)
    assert T.compressed_sizes_for_log(quantized, hp) == {}


# --- one QAT grid ---

@pytest.mark.parametrize("method", ["sdclip", "percentile", "rowmax"])
@pytest.mark.parametrize("size_target", [False, True])
def test_qat_fake_quantizes_exactly_onto_the_exported_grid(method, size_target):
    hp = small_hp(num_layers=2, model_dim=64, qat_start_lr_scale=0.2, quant_clip=method, compressor="zlib",
                  size_target_bytes=0)
    model = perturbed(T.GPT(hp), scale=0.05)
    groups = T.quantized_tensor_groups(model, hp)
    if size_target:  # a target that binds: smaller than the artifact at k x 1, so the search picks a coarser grid
        _, blob, _ = T.quantize_to_fit(model.state_dict(), groups, hp, None, 0)
        hp = dataclasses.replace(hp, size_target_bytes=len(blob) - 2000) if method == "sdclip" else hp
    # qat_k_scale's search
    _, _, k_scale = T.quantize_to_fit(model.state_dict(), groups, hp, None, 0, log=lambda *_: None)
    if size_target and method == "sdclip":
        assert k_scale > 1.0
    T.set_qat(model, hp, on=True, k_scale=k_scale)
    quantized, _, exported_scale = T.quantize_to_fit(model.state_dict(), groups, hp, None, 0, log=lambda *_: None,
                                                     qat_k_scale=k_scale)
    assert exported_scale == k_scale
    exported = T.dequantize_state_dict(quantized)
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, T.CastedLinear) and module.qat_grid is not None:
            trained_against = T.fake_quantize(module.weight, *module.qat_grid, module.qat_k_scale)
            assert (trained_against - exported[f"{name}.weight"]).abs().max().item() == 0, name
            checked += 1
    assert checked == len([n for n in groups if groups[n] != "embed"])


# --- self-generated GPTQ calibration ---

def test_self_generated_calibration_is_the_same_at_any_world_size_and_starts_at_bos():
    hp = small_hp(gptq_calibration="self", gptq_self_seqs=20, gptq_self_seq_len=12)
    model = perturbed(T.GPT(hp))
    args = (model, hp, BOS)
    single = list(T.self_generated_batches(*args, 0, 1, torch.device("cpu"), T.contextlib.nullcontext))
    split = [batch for rank in range(3)
             for batch in T.self_generated_batches(*args, rank, 3, torch.device("cpu"), T.contextlib.nullcontext)]
    assert [b.shape for b in single] == [(8, 12), (8, 12), (4, 12)]
    assert all(torch.equal(a, b) for a, b in zip(single, split)) and len(split) == 3
    assert all((b[:, 0] == BOS).all() for b in single)
    assert len({tuple(row.tolist()) for b in single for row in b}) > 1  # sampled, not one repeated sequence


# --- every preset: full size (closed forms), then a few smoke steps end to end ---

def block_params(d, kv_dim, hidden, heads, extra=0):
    attention = d * d + 2 * d * kv_dim + d * d + heads  # c_q, c_k, c_v, proj, q_gain
    mlp = 2 * d * hidden
    return attention + mlp + 2 * d + 2 * d + extra  # attn/mlp scales, resid_mix


def pr549_family_params(vocab=1024, layers=11, d=512, hidden=1536, bigram=1536, extra=0):
    kv_dim = 256
    tables = vocab * d + bigram * 128 + 128 * d + 1 + vocab * 128 + 128 * kv_dim + 1  # tokens, BigramHash, VE
    # then the VE scales, the smear gate and the skips
    return tables + layers * block_params(d, kv_dim, hidden, 8) + 2 + d + (layers // 2) * d + extra


def neon213_params(k):
    d, vocab = 384, 16384
    block = 4 * d * d + d * d + 4 * d * k + 2 * 64 + d * k + 3 * d * 1536 + 2 * d
    return vocab * d + 8 * block + d


PRESET_PARAMS = {
    # PR #549's own log says model_params:26928220 (records/.../2026-03-23_LeakyReLU_LegalTTT_ParallelMuon).
    "pr754": pr549_family_params(),
    "pr703": pr549_family_params(extra=1),  # the backout multiple
    # The SP4096 record's log says 34401372; #1392 adds the seed-era SmearGate (512), and our U-Net skips have a
    # slot for each of the 6 encoder layers of the looped stack (the record's 5 skipped the sixth): +2 x 512.
    "pr1392": (4096 * 512 + 4096 * 128 + 128 * 256 + 1 + 11 * block_params(512, 256, 2048, 8) + 2 + 512 + 1
               + 2 * 6 * 512),
    "neon213": neon213_params(1),  # NeonBench's table: 26,368,384 at k = 1, 26,675,584 at k = 21
}


@pytest.mark.parametrize("preset", sorted(PRESET_PARAMS))
def test_each_preset_builds_at_full_size_with_the_closed_form_parameter_count(preset):
    hp = T.Hyperparameters.from_env({"PRESET": preset})[0]
    model = T.GPT(hp)
    assert T.count_parameters(model)[0] == PRESET_PARAMS[preset]
    if preset == "pr754":
        assert PRESET_PARAMS[preset] == 26_928_220
    if preset == "neon213":
        assert PRESET_PARAMS[preset] == 26_368_384
        model.grow_kernels(21)
        assert T.count_parameters(model)[0] == neon213_params(21) == 26_675_584
    logits = model(torch.randint(0, hp.vocab_size, (1, 16)))
    assert logits.shape == (1, 16, hp.vocab_size) and torch.isfinite(logits).all()


# Each seed at smoke size through its export and its own evaluation (sliding windows, chunk TTT), compiled:
# test_cuda_path.py's test_each_preset_compiles_every_graph_in_the_warmup. PRESET=neon213,smoke runs end to end,
# through its fp16 export and plain round trip, in test_neon.py.


def test_smoke_keeps_a_seeds_step_counted_schedule_as_its_share_of_the_run():
    full, smoke = (T.Hyperparameters.from_env({"PRESET": p})[0] for p in ("pr754", "pr754,smoke"))
    assert (full.warmdown_iters, full.warmdown_frac) == (3500, 0.0)
    assert (smoke.warmdown_iters, smoke.warmdown_frac) == (0, pytest.approx(3500 / 6756, abs=1e-3))
    looped = T.Hyperparameters.from_env({"PRESET": "pr1392,smoke"})[0]
    assert looped.loop_enable_at == pytest.approx(3000 / 5450, abs=1e-3)
    assert T.Hyperparameters.from_env({"PRESET": "baseline,smoke"})[0].warmdown_frac == pytest.approx(0.087, abs=1e-3)
    assert T.Hyperparameters.from_env({"PRESET": "smoke"})[0].warmdown_frac == T.Hyperparameters.warmdown_frac
    # 0.997 fixed over 300 steps would not do
    assert T.Hyperparameters.from_env({"PRESET": "pr754,smoke"})[0].ema_warmup
    assert not T.Hyperparameters.from_env({"PRESET": "pr754"})[0].ema_warmup


@pytest.mark.parametrize("preset", ["pr754", "pr703"])
def test_a_seeds_chunk_ttt_adapts_on_most_of_the_smoke_split(preset, sample):
    """Score-first chunk TTT never trains on its last chunk: at its own 32,768 tokens the offline split would be one
    chunk, scored and never adapted on. At the smoke size it walks chunks small enough to adapt on nine tenths."""
    full, smoke = (T.Hyperparameters.from_env({"PRESET": p})[0] for p in (preset, f"{preset},smoke"))
    assert full.ttt_chunk_tokens == 32768 and smoke.ttt_enabled and smoke.ttt_method == "chunk"
    targets = len(T.load_validation_tokens(sorted(sample[0].glob("fineweb_val_*.bin")))) - 1
    chunks = -(-targets // smoke.ttt_chunk_tokens)
    assert (chunks - 1) / chunks >= 0.9, (targets, smoke.ttt_chunk_tokens)


# What PRESET=record changes in the default stack: docs/seeds.md's "PRESET=record" section lists each of these.
RECORD_CHANGES = {
    "data_path": "./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
    "tokenizer_path": "./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
    "vocab_size": 8192, "caseops_enabled": True, "doc_isolation": True, "eval_stride": 0,
    "min_lr_scale": 0.1, "lqer_rank": 4, "gptq_reserve_seconds": 0.5, "train_log_every": 500,
    "val_loss_every": 0, "ttt_enabled": True, "ttt_method": "lora", "ttt_lora_rank": 80, "ttt_beta2": 0.99,
    "ttt_weight_decay": 0.5, "phased_ttt_enabled": True,
    "phased_ttt_prefix_docs": 2500, "phased_ttt_num_phases": 3, "fused_ce_enabled": True,
    "lqer_factor_bits": 4, "lqer_asym_enabled": True, "gated_attn_quant_gate": True, "compressor": "pergroup",
    "muon_bf16_state": True, "embed_bf16": True, "ema_warmup": False, "vectors_fp32": False,
}


def test_the_record_preset_is_the_default_stack_with_the_record_s_data_evaluation_and_export():
    default, record = T.Hyperparameters(), T.Hyperparameters.from_env({"PRESET": "record"})[0]
    changed = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)
               if getattr(record, f.name) != getattr(default, f.name) and f.name != "preset"}
    assert changed == RECORD_CHANGES
    # Its EVAL_DOC_ISOLATED=1 waits for a sliding pass: without one it has no effect, so it stays at its default.
    assert T.Hyperparameters.from_env({"PRESET": "record", "EVAL_STRIDE": "64"})[0].eval_doc_isolated
    # The default stack at SP8192: 48 parameters fewer than the record's logged model_params:35945671 (docs/seeds.md).
    record_params = T.count_parameters(T.GPT(record))[0]
    assert record_params == T.count_parameters(T.GPT(default))[0] + (8192 - 1024) * 512 == 35_945_623


def small_record_run(preset, caseops_sample, tmp_path, **settings):
    """A run of PRESET=<preset>,smoke with 4 layers of width 64 on the CaseOps sample; returns its log."""
    data_dir, tokenizer, _ = caseops_sample
    env = dict(PRESET=f"{preset},smoke", DATA_PATH=str(data_dir), TOKENIZER_PATH=str(tokenizer), NUM_LAYERS="4",
               LOOP_START="1", LOOP_END="2", PARALLEL_START_LAYER="3", MODEL_DIM="64", NUM_HEADS="2",
               NUM_KV_HEADS="1", RUN_ID=preset, GLOBAL_TTT_BATCH_SEQS="4",
               TTT_CHUNK_SIZE="128", SIZE_TARGET_BYTES="0", **settings)
    result = run_script(["python3", str(T.__file__)], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return (tmp_path / "logs" / f"{preset}.txt").read_text()


def test_the_record_preset_runs_at_smoke_size_through_caseops_and_phased_ttt(caseops_sample, tmp_path):
    log = small_record_run("record", caseops_sample, tmp_path, ITERATIONS="3", TRAIN_BATCH_TOKENS="1024",
                           GRAD_ACCUM_STEPS="1", WARMUP_STEPS="0")
    assert "bytes_from:caseops_sidecar caseops_roundtrip:ok" in log
    # No sliding pass, as the record: the last windows are the round trip's, which never isolate documents.
    assert "compliance: eval_mode:plain seq_len:256 stride:256 doc_isolated:False " in log
    assert not re.search(r"^final_sliding_window", log, re.M)
    assert re.search(r"^ttt_phased: total_docs:150 prefix_docs:12 suffix_docs:138 num_phases:3 "
                     r"boundaries:\[4, 8, 12\]$", log, re.M)
    assert "ttt: method:lora (per-document LoRA)" in log and "ttt_phase: 3/3 documents:12" in log
    # The miniature's phases train as the record's do: each on all its scored targets but its last chunk's.
    phases = re.findall(r"^ttt_phase: \d/3 documents:\d+ scored_targets:(\d+) trained_targets:(\d+) ", log, re.M)
    assert len(phases) == 3 and all(0 < int(trained) < int(scored) for scored, trained in phases), phases
    assert "\nfinal_ttt_exact val_loss:" in log


# What PRESET=pr2014 changes in PRESET=record: docs/seeds.md's "PR #2014" section lists each of these.
PR2014_CHANGES = {
    "train_rows": "packed", "train_seq_len": 3072, "train_seq_schedule": "1024@0.100,2048@0.700,3072@1.000",
    "seq_change_warmup_steps": 32, "qk_gain_init": 5.25, "gptq_reserve_seconds": 4.0, "awq_lite_enabled": True,
    "eval_seq_len": 3072, "ttt_eval_seq_len": 3072, "ttt_q_lora": False, "ttt_v_lora": False,
    "ttt_local_lr_mult": 0.75, "ttt_batch_size": 24, "ttt_short_score_first_enabled": True,
    "ttt_short_score_first_steps": "256:8,2000:24", "phased_ttt_num_phases": 1,
}
# The hyperparameters PR #2014's seed-42 run logged (the 04-30 reproduction's train_seed42_repro.log: its command's
# values and its script's defaults), under the names its script reads, for every one that has a meaning here. Left
# out: EVAL_STRIDE=1536, which no pass of its script reads (here it would add a sliding pass), and EMBED_LR, which
# its tied embeddings leave unread, as here (where it is refused when given).
PR2014_LOGGED = {
    "ADAM_EPS": "1e-08", "ADAM_WD": "0.02", "AWQ_LITE_BITS": "8", "AWQ_LITE_ENABLED": "1", "AWQ_LITE_GROUP_SIZE": "64",
    "AWQ_LITE_GROUP_TOP_K": "1", "BETA1": "0.9", "BETA2": "0.99", "CASEOPS_ENABLED": "1", "COMPILE_SHAPE_WARMUP": "1",
    "COMPILE_SHAPE_WARMUP_ITERS": "1", "COMPILE_SHAPE_WARMUP_LOOP_MODES": "auto", "COMPRESSOR": "pergroup",
    "EMA_DECAY": "0.9965", "EMBED_BITS": "7", "EMBED_CLIP_SIGMAS": "14.0", "EMBED_WD": "0.085",
    "ENABLE_LOOPING_AT": "0.35", "EVAL_INCLUDE_TAIL": "1", "EVAL_SEQ_LEN": "3072", "FUSED_CE_ENABLED": "1",
    "GATE_WINDOW": "12", "GATED_ATTN_QUANT_GATE": "1", "GLOBAL_TTT_BATCH_SEQS": "32",
    "GLOBAL_TTT_CHUNK_TOKENS": "32768", "GLOBAL_TTT_EPOCHS": "1", "GLOBAL_TTT_GRAD_CLIP": "1.0",
    "GLOBAL_TTT_LR": "0.001", "GLOBAL_TTT_MOMENTUM": "0.9", "GLOBAL_TTT_RESPECT_DOC_BOUNDARIES": "1",
    "GLOBAL_TTT_WARMUP_CHUNKS": "0", "GLOBAL_TTT_WARMUP_START_LR": "0.0", "GPTQ_CALIBRATION_BATCHES": "16",
    "GPTQ_RESERVE_SECONDS": "4.0", "GRAD_CLIP_NORM": "0.3", "ITERATIONS": "20000", "LN_SCALE": "1",
    "LOGIT_SOFTCAP": "30.0", "LOOP_END": "5", "LOOP_START": "3", "LQER_ASYM_ENABLED": "1", "LQER_ASYM_GROUP": "64",
    "LQER_ENABLED": "1", "LQER_FACTOR_BITS": "4", "LQER_RANK": "4", "LQER_TOP_K": "3", "MATRIX_BITS": "6",
    "MATRIX_LR": "0.026", "MAX_WALLCLOCK_SECONDS": "600.0", "MIN_LR": "0.1", "MLP_CLIP_SIGMAS": "11.5",
    "ATTN_CLIP_SIGMAS": "13.0", "MLP_MULT": "4.0", "MODEL_DIM": "512", "MUON_BACKEND_STEPS": "5",
    "MUON_MOMENTUM": "0.97", "MUON_MOMENTUM_WARMUP_START": "0.92", "MUON_MOMENTUM_WARMUP_STEPS": "1500",
    "MUON_ROW_NORMALIZE": "1", "MUON_WD": "0.095", "NUM_HEADS": "8", "NUM_KV_HEADS": "4", "NUM_LAYERS": "11",
    "NUM_LOOPS": "2", "PARALLEL_START_LAYER": "8", "PHASED_TTT_NUM_PHASES": "1", "PHASED_TTT_PREFIX_DOCS": "2500",
    "QK_GAIN_INIT": "5.25", "ROPE_BASE": "10000.0", "ROPE_DIMS": "16", "ROPE_TRAIN_SEQ_LEN": "3072",
    "SCALAR_LR": "0.02", "SEQ_CHANGE_WARMUP_STEPS": "32", "SKIP_GATES_ENABLED": "1", "SMEAR_GATE_ENABLED": "1",
    "SPARSE_ATTN_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_SCALE": "0.5", "TIE_EMBEDDINGS": "1",
    "TIED_EMBED_INIT_STD": "0.005", "TIED_EMBED_LR": "0.03", "TRAIN_BATCH_TOKENS": "786432", "TRAIN_LOG_EVERY": "500",
    "TRAIN_SEQ_LEN": "3072", "TRAIN_SEQ_SCHEDULE": "1024@0.100,2048@0.700,3072@1.000",
    "TRAIN_SEQ_SCHEDULE_MODE": "wallclock", "TTT_BATCH_SIZE": "24", "TTT_BETA1": "0.0", "TTT_BETA2": "0.99",
    "TTT_CHUNK_SIZE": "48", "TTT_ENABLED": "1", "TTT_EVAL_SEQ_LEN": "3072", "TTT_GRAD_STEPS": "1", "TTT_K_LORA": "1",
    "TTT_LOCAL_LR_MULT": "0.75", "TTT_LORA_LR": "0.0001", "TTT_LORA_RANK": "80", "TTT_MASK": "no_qv",
    "TTT_MLP_LORA": "1", "TTT_O_LORA": "1", "TTT_Q_LORA": "0", "TTT_SHORT_CHUNK_SIZE": "24",
    "TTT_SHORT_DOC_LEN": "2000", "TTT_SHORT_SCORE_FIRST_ENABLED": "1", "TTT_SHORT_SCORE_FIRST_STEPS": "256:8,2000:24",
    "TTT_V_LORA": "0", "TTT_WEIGHT_DECAY": "0.5", "VAL_BATCH_TOKENS": "524288", "VAL_LOSS_EVERY": "0",
    "VOCAB_SIZE": "8192", "WARMDOWN_FRAC": "0.85", "WARMDOWN_ITERS": "0", "WARMUP_STEPS": "20", "XSA_LAST_N": "11",
}


def test_the_pr2014_preset_is_the_record_preset_with_pr2014s_changes():
    record, pr2014 = (T.Hyperparameters.from_env({"PRESET": name})[0] for name in ("record", "pr2014"))
    changed = {f.name: getattr(pr2014, f.name) for f in dataclasses.fields(pr2014)
               if getattr(pr2014, f.name) != getattr(record, f.name) and f.name != "preset"}
    assert changed == PR2014_CHANGES


def test_pr2014s_logged_configuration_given_beside_its_preset_changes_nothing():
    """Every value PR #2014's run logged is the preset's: given explicitly (where an explicit variable wins), it
    leaves the configuration as the preset makes it. XSA_LAST_N=11 names the 11 layers that "all" names. Its
    ROPE_TRAIN_SEQ_LEN=3072 is unread there (ROPE_YARN=0): here it rescales only a forward reaching past 3,072
    tokens, which the preset never runs, so the preset leaves it at 0, as unread. Its TTT_SHORT_DOC_LEN=2000 and
    TTT_SHORT_CHUNK_SIZE=24 are unread beside its TTT_SHORT_SCORE_FIRST_STEPS, there and here (they must be one of
    its items, 2000:24): the preset leaves them at their defaults, so that other steps need no other pair."""
    preset = T.Hyperparameters.from_env({"PRESET": "pr2014"})[0]
    logged, sources = T.Hyperparameters.from_env({"PRESET": "pr2014", **PR2014_LOGGED})
    assert logged.layer_set("xsa_layers") == preset.layer_set("xsa_layers") == set(range(11))
    assert max(preset.train_seq_len, preset.eval_seq_len, preset.ttt_eval_seq_len) == logged.rope_train_seq_len
    assert logged.short_score_first_steps == preset.short_score_first_steps == [(256, 8), (2000, 24)]
    assert dataclasses.replace(logged, xsa_layers="all", rope_train_seq_len=0, ttt_short_doc_len=512,
                               ttt_short_chunk_size=0) == preset
    assert sources["ttt_q_lora"] == "env" and sources["train_seq_schedule"] == "env"


def test_the_pr2014_preset_runs_at_smoke_size_through_its_schedule_and_ttt(caseops_sample, tmp_path):
    log = small_record_run("pr2014", caseops_sample, tmp_path, ITERATIONS="10", TRAIN_BATCH_TOKENS="2048",
                           WARMUP_STEPS="4", TRAIN_LOG_EVERY="1",
                           TTT_SHORT_SCORE_FIRST_STEPS="256:32,2000:64")  # fewer TTT steps than 256:8,2000:24
    assert re.findall(r"^warmup_step:\d/4 looping:(\w+) pieces:(\d+) ", log, re.M) == [
        ("False", "64"), ("False", "128"), ("True", "128"), ("True", "256")]  # the recurrence from 0.35 of the run
    assert re.findall(r"^growth_stage:seq_len:(\d+) progress:[\d.]+ step:(\d+)$", log, re.M) == [
        ("64", "0"), ("128", "2"), ("256", "8")]
    # The LR's re-warmup after each change is the same share of the smoke run's 300 steps as of #2014's 4,888.
    assert len(re.findall(r"^growth_stage_rewarmup:start step:\d+ steps:2 ", log, re.M)) == 2
    assert re.search(r"^ttt_phased: total_docs:150 prefix_docs:12 suffix_docs:138 num_phases:1 "
                     r"boundaries:\[12\]$", log, re.M)
    assert re.search(r"short_docs_upto_256:32 short_docs_upto_2000:64 ", log)
    assert re.search(r" awq_lite:int8:\S+@\d+ ", log)
    assert "\nfinal_ttt_exact val_loss:" in log
