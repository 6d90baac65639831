"""The neon SwiGLU-Conv family: causal depthwise convs on Q/K/V/Intent and on the SwiGLU gate, the Intent gate,
and kernels that grow without changing the function."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

import train_gpt as T
from conftest import small_hp

BOS = 1
NEON = small_hp(num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=97, mlp_activation="swiglu",
                conv_k=7, mlp_conv_k=5, intent_gate=True, kernel_schedule="1@0,3@0.3,7@0.6",
                norm_weights=True, resid_mix=False, sublayer_scales=False, unet_skips=False)  # neon213's plain block


def build(hp, seed=0):
    torch.manual_seed(seed)
    return T.GPT(hp, bos_id=BOS)


def randomize_active_taps(model, seed=0):
    """Random values on the active taps only, as training would leave them (masked taps stay exactly zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, T.CausalConv):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * module.tap_mask)
        for module in model.modules():
            if isinstance(module, T.CastedLinear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.2)
    return model


@pytest.mark.parametrize("taps", [1, 9, 21])
def test_the_neon213_preset_has_the_spec_parameter_count(taps):
    # neon.md section 1, recounted from neon213's code: (total with the tied embedding, non-embedding) by kernel size.
    spec = {1: (26_368_384, 20_076_928), 9: (26_491_264, 20_199_808), 21: (26_675_584, 20_384_128)}[taps]
    fixed, _ = T.Hyperparameters.from_env({"PRESET": "neon213", "CONV_K": str(taps), "MLP_CONV_K": str(taps),
                                           "KERNEL_SCHEDULE": ""})
    total, embedding, non_embedding = T.count_parameters(T.GPT(fixed))
    assert (total, non_embedding) == spec and embedding == 16384 * 384
    grown, _ = T.Hyperparameters.from_env({"PRESET": "neon213"})  # allocated at 21, grown on neon213's schedule
    assert grown.kernel_stages[0] == (0.0, 1) and grown.kernel_stages[-1][1] == 21
    model = T.GPT(grown)
    model.grow_kernels(taps)
    assert model.kernel_sizes() == [taps] and T.count_parameters(model)[0] == spec[0]


def test_the_last_tap_is_the_current_token_and_the_conv_is_causal():
    conv = T.CausalConv(3, 4, small_hp(conv_k=4))
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3))
    impulse = torch.zeros(1, 8, 3)
    impulse[0, 2] = 1.0
    out = conv(impulse)[0, :, 0]
    # output t = sum_j w_j x_{t-3+j}: the impulse at t=2 shows w_3 at t=2, w_2 at t=3, ... and nothing before t=2
    assert out.tolist() == [0.0, 0.0, 4.0, 3.0, 2.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("taps", [1, 3, 7])
def test_a_future_token_never_changes_earlier_logits_at_every_kernel_size(taps):
    model = build(NEON)
    model.grow_kernels(taps)
    randomize_active_taps(model).eval()
    tokens = torch.randint(2, 97, (2, 32))
    base = model(tokens)
    for position in (0, 9, 31):
        changed = tokens.clone()
        changed[:, position] = (changed[:, position] + 1) % 97
        out = model(changed)
        assert torch.allclose(out[:, :position], base[:, :position], atol=1e-5, rtol=0)
        assert not torch.allclose(out[:, position], base[:, position], atol=1e-4)


def train_steps(model, hp, optimizers, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        tokens = torch.randint(2, hp.vocab_size, (4, 33), generator=generator)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizers.step(lr_scale=1.0, momentum=0.9)
        optimizers.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("start, grown", [(1, 3), (3, 5), (1, 7)])
def test_growth_preserves_the_function_exactly_and_training_goes_on(start, grown):
    hp = dataclasses.replace(NEON, kernel_schedule=f"{start}@0,{grown}@0.5", conv_init="random", grad_clip_norm=0.0)
    model = build(hp)
    optimizers = T.Optimizers(model, hp, 0, 1)
    train_steps(model, hp, optimizers, 5, seed=1)
    convs = [m for m in model.modules() if isinstance(m, T.CausalConv)]
    assert all(m.active_k == start for m in convs)
    for m in convs:  # the taps not yet grown stayed exactly zero through AdamW, weight decay and clipping
        assert torch.all(m.weight[:, :m.max_k - start] == 0) and torch.any(m.weight[:, m.max_k - start:] != 0)
    tokens = torch.randint(2, 97, (3, 32))
    with torch.no_grad():
        before = model(tokens)
        model.grow_kernels(grown)
        after = model(tokens)
    assert torch.equal(before, after)  # bit for bit in fp32
    assert [m.active_k for m in convs] == [min(grown, m.max_k) for m in convs]
    train_steps(model, hp, optimizers, 3, seed=2)
    for m in convs:  # the new taps learn
        assert torch.any(m.weight[:, m.max_k - min(grown, m.max_k):m.max_k - start] != 0)


def test_the_schedule_grows_kernels_at_fractions_or_steps():
    hp = dataclasses.replace(NEON, iterations=100, max_wallclock_seconds=0)
    assert [T.kernel_taps_due(hp, step, 0) for step in (0, 29, 30, 59, 60, 99)] == [1, 1, 3, 3, 7, 7]
    by_step = dataclasses.replace(hp, kernel_schedule="1@0,5@40")
    assert [T.kernel_taps_due(by_step, step, 0) for step in (39, 40)] == [1, 5]
    assert T.kernel_taps_due(dataclasses.replace(hp, kernel_schedule=""), 50, 0) is None
    for schedule in ("3@0.5", "5@0,3@0.5", "1@0,9@0.5", "1@0,x@0.5"):  # no start, shrinking, beyond CONV_K, garbage
        with pytest.raises(T.ConfigError, match="KERNEL_SCHEDULE"):
            dataclasses.replace(hp, kernel_schedule=schedule)
    with pytest.raises(T.ConfigError, match="MLP_CONV_K"):
        dataclasses.replace(hp, mlp_activation="relu2")


def test_growth_under_compile_needs_no_recompile():
    torch._dynamo.reset()  # other tests compiled GPT.forward too: count only this model's compilations
    compilations = []

    def counting_backend(graph, example_inputs):
        compilations.append(graph)
        return graph.forward

    model = build(NEON)
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True, dynamic=False)
    tokens = torch.randint(2, 97, (2, 32))
    compiled(tokens[:, :-1], tokens[:, 1:]).backward()
    model.grow_kernels(3)
    loss = compiled(tokens[:, :-1], tokens[:, 1:])
    assert torch.allclose(loss, model(tokens[:, :-1], tokens[:, 1:]))
    assert len(compilations) == 1


def test_intent_gate_multiplies_the_attention_output_by_the_sigmoid_of_its_projection():
    gated = dataclasses.replace(NEON, conv_k=0, mlp_conv_k=0, kernel_schedule="", mlp_activation="leaky_relu2")
    plain = dataclasses.replace(gated, intent_gate=False)
    model, reference = build(gated), build(plain)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if ".c_i." not in k})
    with torch.no_grad():
        for block, ref_block in zip(model.blocks, reference.blocks):
            block.attn.c_i.weight.zero_()  # sigmoid(0) = 1/2 on every channel
            block.attn.proj.weight.normal_()
            ref_block.attn.proj.weight.copy_(block.attn.proj.weight * 0.5)
    tokens = torch.randint(2, 97, (2, 32))
    torch.testing.assert_close(model(tokens), reference(tokens))
    assert (~torch.isclose(model(tokens), build(gated)(tokens))).any()


def test_swiglu_with_the_hydra_conv_matches_its_formula():
    hp = dataclasses.replace(NEON, conv_init="random")
    mlp = build(hp).blocks[0].mlp
    with torch.no_grad():
        mlp.proj.weight.normal_()
    x = torch.randn(2, 16, 64)
    conv = mlp.gate_conv
    gate_input = F.conv1d(F.pad(x.transpose(1, 2), (conv.max_k - 1, 0)), (conv.weight * conv.tap_mask).unsqueeze(1),
                          groups=64).transpose(1, 2)
    expected = (F.silu(gate_input @ mlp.fc.weight.T) * (x @ mlp.up.weight.T)) @ mlp.proj.weight.T
    torch.testing.assert_close(mlp(x), expected)


def test_identity_init_starts_as_the_model_without_convs():
    with_convs = dataclasses.replace(NEON, conv_init="identity")
    without = dataclasses.replace(NEON, conv_k=0, mlp_conv_k=0, kernel_schedule="")
    model, reference = build(with_convs), build(without)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "conv" not in k})
    with torch.no_grad():
        for m in list(model.modules()) + list(reference.modules()):
            if isinstance(m, T.CastedLinear) and m.zero_init:
                m.weight.fill_(0.01)
    tokens = torch.randint(2, 97, (2, 32))
    # The conv itself is exact (x * 1 + zeros); the projection after it reads a transposed view, and its matmul may
    # sum in another order: equal up to float rounding.
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-6)
    conv = model.blocks[0].attn.convs["q"]
    x = torch.randn(2, 32, 64)
    assert torch.equal(conv(x), x)


def test_the_artifact_keeps_the_kernels_and_their_size():
    model = build(NEON)
    model.grow_kernels(3)
    randomize_active_taps(model)
    groups = T.quantized_tensor_groups(model)
    assert "blocks.0.attn.c_i.weight" in groups and "blocks.0.mlp.up.weight" in groups
    assert not any("convs" in name or "gate_conv" in name for name in groups)  # the kernels stay fp16
    restored = build(NEON)
    restored.load_state_dict(T.dequantize_state_dict(T.quantize_state_dict(model.state_dict(), groups, NEON)))
    assert restored.kernel_sizes() == [3]  # the masks travel with the weights
    kernel = model.blocks[1].attn.convs["v"].weight
    torch.testing.assert_close(restored.blocks[1].attn.convs["v"].weight, kernel.half().float())


def test_participation_ratio_against_its_closed_form():
    generator = torch.Generator().manual_seed(3)
    isotropic = torch.randn(20000, 16, generator=generator)
    assert T.participation_ratio(isotropic) == pytest.approx(16, rel=0.02)
    low_rank = torch.randn(5000, 3, generator=generator) @ torch.randn(3, 16, generator=generator)
    assert 1.0 <= T.participation_ratio(low_rank) <= 3.0 + 1e-6
    one_direction = torch.randn(500, 1, generator=generator) * torch.ones(1, 16) + 7.0  # the mean does not count
    assert T.participation_ratio(one_direction) == pytest.approx(1.0)
    scales = torch.tensor([1.0, 1.0, 0.0, 0.0])  # two equal directions and two dead ones: PR = (1+1)^2 / (1+1) = 2
    assert T.participation_ratio(torch.randn(50000, 4, generator=generator) * scales) == pytest.approx(2.0, rel=0.02)


def test_activation_prs_cover_every_kind_and_layer_within_bounds():
    model = randomize_active_taps(build(NEON))
    prs = T.activation_prs(model, torch.randint(2, 97, (4, 32)), lambda: torch.autocast("cpu", enabled=False))
    assert sorted(prs) == ["i", "k", "q", "residual", "v"]
    head_dim = NEON.model_dim // NEON.num_heads
    for kind, values in prs.items():
        assert len(values) == NEON.num_layers
        assert all(1.0 <= v <= (NEON.model_dim if kind == "residual" else head_dim) + 1e-6 for v in values), kind
    assert not any(hook for m in model.modules() for hook in m._forward_hooks.values())  # removed afterwards
    plain = T.activation_prs(build(small_hp(num_layers=2)), torch.randint(2, 64, (2, 16)),
                             lambda: torch.autocast("cpu", enabled=False))
    assert sorted(plain) == ["k", "q", "residual", "v"]  # no convs: the projections themselves


def test_sampling_is_greedy_at_temperature_zero_and_reproducible():
    model = randomize_active_taps(build(NEON)).eval()
    prompt = [1, 5, 9]
    greedy = T.sample_tokens(model, prompt, 6, 0.0, 0, 32, torch.Generator().manual_seed(0))
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[3:]
    assert T.sample_tokens(model, prompt, 6, 1.0, 1, 32, torch.Generator().manual_seed(0)) == greedy  # top-1 = greedy
    sampled = [T.sample_tokens(model, prompt, 8, 1.5, 0, 32, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_a_run_grows_its_kernels_on_schedule_and_exports_them(sample, tmp_path):
    import sys
    from conftest import REPO, run_script
    data_dir, tokenizer = sample
    env = dict(PRESET="neon213,smoke", DATA_PATH=str(data_dir), TOKENIZER_PATH=str(tokenizer), ITERATIONS="8",
               WARMUP_STEPS="1", EVAL_STRIDE="0", RUN_ID="neon", CONV_K="5", MLP_CONV_K="3", NUM_LAYERS="2",
               KERNEL_SCHEDULE="1@0,3@0.5,5@0.75", PR_EVERY="4", GEN_PROMPT="def main", GEN_TOKENS="12")
    result = run_script([sys.executable, str(REPO / "train_gpt.py")], env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "neon.txt").read_text()
    assert "kernel_growth: taps:3 at step:4 " in log and "kernel_growth: taps:5 at step:6 " in log
    assert len(re.findall(r"^kernel_growth: .* optimizers:restarted$", log, re.M)) == 2  # each stage restarts them
    assert "\nfinal_fp16_brotli_roundtrip_exact val_loss:" in log  # its fp16 export, scored on plain windows
    assert ("mlp:swiglux4 gqa:4/2 rope_dims:32/32 qk_gain_init:1 no_softcap tied_embeddings no_embed_norm "
            "random_init_proj norm_weights conv_qkvi:5 intent_gate mlp_gate_conv:3 "
            "kernel_schedule:1@0,3@0.5,5@0.75(init:random)") in log
    assert re.search(r"^pr: step:4 q:[\d./]+ k:[\d./]+ v:[\d./]+ i:[\d./]+ residual:[\d./]+$", log, re.M)
    assert re.search(r"^sample: prompt:'def main' tokens:12 temperature:0.8 top_k:50 seed:1337\n"
                     r"sample_text: ['\"]def main", log, re.M)
    hp, _ = T.Hyperparameters.from_env(env)
    model = T.GPT(hp)
    model.load_state_dict(T.dequantize_state_dict(T.read_artifact(tmp_path / "logs" / "neon_model.fp16.ptz")))
    assert model.kernel_sizes() == [3, 5]  # the MLP conv stops at its 3 taps
