"""The GPT and its record techniques: causality, identity at init, depth recurrence, parameter counts, the loss."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import train_gpt as T
from conftest import small_hp

BOS = 1
BASELINE = small_hp("baseline", num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=97)
STACK = small_hp(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=97)
# Every technique at once, including those the default stack leaves off.
EVERYTHING = dataclasses.replace(STACK, bigram_buckets=31, bigram_dim=16, ve_layers="2,3", ve_dim=16,
                                 value_residual=True, backout_layer=3)
ONE_AT_A_TIME = {  # technique: settings that switch it on over the baseline
    "leaky_relu2": dict(mlp_activation="leaky_relu2"), "ortho_init": dict(ortho_init=True),
    "partial_rope": dict(rope_dims=8), "xsa": dict(xsa_layers="all"), "xsa_some": dict(xsa_layers="1,3"),
    "head_gate": dict(attn_gate="head"), "output_gate": dict(attn_gate="output"),
    "sparse_gate": dict(attn_gate="sparse"), "value_residual": dict(value_residual=True),
    "value_embed": dict(ve_layers="1,3", ve_dim=16), "bigram_hash": dict(bigram_buckets=31, bigram_dim=16),
    "smear_gate": dict(smear_gate=True), "ln_scale": dict(ln_scale=True),
    "skip_gates": dict(skip_gates=True), "recurrence": dict(num_loops=2, loop_start=1, loop_end=2, loop_enable_at=0),
    "parallel_lanes": dict(parallel_residuals=True, parallel_start_layer=2), "backout": dict(backout_layer=2),
    "norm_weights": dict(norm_weights=True),
}
# neon213's plain pre-norm block: learnable norms, no resid_mix, no output scales, no U-Net skips.
PLAIN_BLOCKS = dict(norm_weights=True, resid_mix=False, sublayer_scales=False, unet_skips=False)
CONFIGS = {"baseline": BASELINE, "stack": STACK, "everything": EVERYTHING,
           "stack_plain_blocks": dataclasses.replace(STACK, **PLAIN_BLOCKS),
           **{name: dataclasses.replace(BASELINE, **settings) for name, settings in ONE_AT_A_TIME.items()}}


def randomized(model, seed=0, skip=()):
    """Zero-initialized projections and gates would hide most of the model: give every weight a random value
    (except the parameters named in `skip`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(name.startswith(prefix) or f".{prefix}" in name for prefix in skip):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


def build(hp, looping=None):
    torch.manual_seed(0)
    model = T.GPT(hp, bos_id=BOS)
    if looping is not None:
        model.looping = looping
    return model.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_future_token_never_changes_earlier_logits(name):
    hp = CONFIGS[name]
    model = randomized(build(hp, looping=True))
    tokens = torch.randint(2, hp.vocab_size, (2, hp.train_seq_len))
    tokens[:, 20] = BOS  # packed documents
    base = model(tokens)
    for position in (0, 17, 20, 21, hp.train_seq_len - 1):
        changed = tokens.clone()
        changed[:, position] = (changed[:, position] + 1) % hp.vocab_size
        out = model(changed)
        assert torch.allclose(out[:, :position], base[:, :position], atol=1e-5, rtol=0), position
        assert not torch.allclose(out[:, position], base[:, position], atol=1e-3), position


def test_smear_gate_and_bigram_hash_never_reach_across_a_bos():
    model = randomized(build(EVERYTHING))
    tokens = torch.randint(2, 97, (3, 40))
    tokens[:, 25] = BOS
    base = model.embed(tokens)
    for position in (0, 12, 24):  # tokens of the first document
        changed = tokens.clone()
        changed[:, position] = 2 + (changed[:, position] - 1) % 95  # another non-BOS token
        out = model.embed(changed)
        assert torch.equal(out[:, 25:], base[:, 25:])  # the second document's embeddings do not move
        if position + 1 < 25:  # inside a document, the previous token does count
            assert not torch.allclose(out[:, position + 1], base[:, position + 1])
    assert (model.bigram.bucket_ids(tokens)[:, [0, 25]] == 30).all()  # the reserved "no previous token" bucket


@pytest.mark.parametrize("settings, own_parameters", [
    (dict(smear_gate=True), ["smear."]),
    (dict(bigram_buckets=31, bigram_dim=16), ["bigram.table"]),
    (dict(ve_layers="1,3", ve_dim=16), ["value_embed.proj"]),
    (dict(attn_gate="output"), ["gate.weight"]),
    (dict(backout_layer=2), ["backout"]),
])
def test_techniques_meant_to_start_as_the_identity_do(settings, own_parameters):
    hp = dataclasses.replace(BASELINE, **settings)
    model = randomized(build(hp), skip=own_parameters)
    tokens = torch.randint(0, hp.vocab_size, (2, 30))
    with_technique = model(tokens)
    plain = copy_without(model, settings)
    assert torch.equal(with_technique, plain(tokens))
    randomized(model, seed=1)  # the technique is live: once its parameters move, the output does
    assert not torch.allclose(model(tokens), plain(tokens), atol=1e-4)


def test_plain_block_switches_start_as_the_default_block():
    # Norm weights start at 1 (the query's at QK_GAIN_INIT, which commutes with RoPE), resid_mix at [1, 0] and the
    # output scales at 1: with the same matrices, switching them all starts from the same function.
    settings = {name: value for name, value in PLAIN_BLOCKS.items() if name != "unet_skips"}
    default, plain = build(STACK), build(dataclasses.replace(STACK, **settings))
    randomized(default, skip=["resid_mix", "attn_scale", "mlp_scale", "q_gain"])
    with torch.no_grad():
        for block in default.blocks:
            block.attn.q_gain.fill_(STACK.qk_gain_init)
    missing, unexpected = plain.load_state_dict(default.state_dict(), strict=False)
    assert {name.rsplit(".", 2)[-2] for name in missing} == {"attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm"}
    assert {name.rsplit(".", 1)[-1] for name in unexpected} == {"resid_mix", "attn_scale", "mlp_scale", "q_gain"}
    tokens = torch.randint(0, 97, (2, 30))
    assert torch.allclose(plain(tokens), default(tokens), atol=1e-5, rtol=0)
    with torch.no_grad():
        plain.blocks[1].attn.k_norm.weight[:3].mul_(3)  # the weights are live
        plain.final_norm.weight[:5].mul_(2)
    assert not torch.allclose(plain(tokens), default(tokens), atol=1e-3)


def copy_without(model, settings):
    """The same weights with the technique switched off."""
    import copy
    plain = copy.deepcopy(model)
    if "smear_gate" in settings:
        plain.smear = None
    if "bigram_buckets" in settings:
        plain.bigram = None
    if "ve_layers" in settings:
        for block in plain.blocks:
            block.attn.value_embed_scale = None
    if "attn_gate" in settings:
        for block in plain.blocks:
            block.attn.gate = None
    if "backout_layer" in settings:
        plain.backout_layer = 0
    return plain


def test_depth_recurrence_reuses_blocks_in_the_configured_order():
    hp = T.Hyperparameters()  # the default stack: layers 3-5 run three times from 35% of training
    model = T.GPT(hp)
    assert model.layer_order(False) == list(range(11))
    assert model.layer_order(True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    small = build(dataclasses.replace(STACK, num_loops=2, loop_start=1, loop_end=2))
    calls = []
    for index, block in enumerate(small.blocks):
        block.register_forward_hook(lambda module, args, out, index=index: calls.append(index))
    for looping in (False, True):
        calls.clear()
        small.looping = looping
        small(torch.randint(0, 97, (1, 16)))
        assert calls == small.layer_order() == ([0, 1, 2, 1, 2, 1, 2, 3] if looping else [0, 1, 2, 3])


def test_depth_recurrence_adds_no_block_parameters_and_switching_it_on_changes_only_the_computation():
    looped, plain = (dataclasses.replace(STACK, num_loops=loops, loop_start=1, loop_end=2) for loops in (2, 0))
    model, reference = randomized(build(looped, looping=False)), build(plain)
    block_params = lambda m: sum(p.numel() for p in m.blocks.parameters())
    assert block_params(model) == block_params(reference)
    # The only extra parameters: the skip weights and gates of the longer stack's extra U-Net pairs (8 vs 4 layers).
    extra_pairs = len(model.layer_order(True)) // 2 - 4 // 2
    assert T.count_parameters(model)[0] - T.count_parameters(reference)[0] == extra_pairs * 2 * looped.model_dim
    tokens = torch.randint(0, 97, (2, 24))
    before = {name: p.clone() for name, p in model.state_dict().items()}
    ids = [id(p) for p in model.parameters()]
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    off = compiled(tokens)
    model.looping = True  # what `train` does at LOOP_ENABLE_AT
    on = compiled(tokens)
    assert not torch.allclose(on, off, atol=1e-4)  # the compiled model sees the switch
    assert torch.equal(on, model(tokens))
    assert [id(p) for p in model.parameters()] == ids
    changed = [name for name, p in model.state_dict().items() if not torch.equal(before[name], p)]
    assert changed == ["loop_active"]  # the weights file records the layout; nothing else moved
    reloaded = build(looped, looping=False)
    reloaded.load_state_dict(model.state_dict())
    assert reloaded.looping and torch.equal(reloaded(tokens), on)


def test_recurrence_schedule_by_fraction_of_steps_of_time_or_a_step():
    hp = T.Hyperparameters(iterations=1000, max_wallclock_seconds=0, loop_enable_at=0.35)
    assert not T.looping_due(hp, 349, 0) and T.looping_due(hp, 350, 0)
    timed = dataclasses.replace(hp, max_wallclock_seconds=100, gptq=False)
    assert not T.looping_due(timed, 999, 34_999) and T.looping_due(timed, 1, 35_000)
    reserved = dataclasses.replace(timed, gptq=True, gptq_reserve_seconds=20)  # 35% of the 80 s left for training
    assert not T.looping_due(reserved, 999, 27_999) and T.looping_due(reserved, 1, 28_000)
    assert not T.looping_due(dataclasses.replace(hp, loop_enable_at=700), 699, 0)
    assert T.looping_due(dataclasses.replace(hp, loop_enable_at=700), 700, 0)
    assert not T.looping_due(dataclasses.replace(hp, num_loops=0), 999, 0)


def test_parallel_lanes_keep_the_u_net_skips():
    # Layers 2 and 3 are parallel and both receive a skip; one record dropped the skips added after the split.
    hp = dataclasses.replace(BASELINE, parallel_residuals=True, parallel_start_layer=2)
    model = randomized(build(hp))
    assert [block.parallel for block in model.blocks] == [False, False, True, True]
    tokens = torch.randint(0, 97, (2, 24))
    base = model(tokens)
    for index in range(2):
        with torch.no_grad():
            model.skip_weights[index].mul_(2)
        assert not torch.allclose(model(tokens), base, atol=1e-4), index
        base = model(tokens)


def record_parallel_hidden_states(model, tokens):
    """A restatement of the 04-27 record's decoder with parallel lanes (its `_forward_hidden` and `_parallel_block`),
    built from our blocks' parts: at the first parallel layer the stream splits into two lanes before that layer's
    U-Net skip is lerped into lane 0; attention reads resid_mix(lane 0, x0) and the MLP reads lane 1, both from the
    old lanes; lane j = decay_j lane j + route[attention, j] attention + route[MLP, j] MLP; the output is the lanes'
    mean, normed."""
    x0 = model.embed(tokens)
    order = model.layer_order()
    num_encoder, x, skips, lanes = len(order) // 2, x0, [], None
    for position, layer in enumerate(order):
        block = model.blocks[layer]
        if position >= num_encoder and block.parallel and lanes is None:
            lanes = [x, x]
        if position >= num_encoder and skips:
            if lanes is None:
                x = model.add_skip(x, skips.pop(), position - num_encoder)
            else:
                lanes[0] = model.add_skip(lanes[0], skips.pop(), position - num_encoder)
        if lanes is None:
            (x, _), _ = block((x, None), x0)
            if position < num_encoder:
                skips.append(x)
            continue
        mix, decay, route = block.resid_mix, block.lane_decay, block.lane_routing
        attention = block.attn_scale * block.attn(block.sublayer_input(mix[0] * lanes[0] + mix[1] * x0,
                                                                        block.attn_norm))[0]
        mlp = block.mlp_scale * block.mlp(block.sublayer_input(lanes[1], block.mlp_norm))
        lanes = [decay[0] * lanes[0] + route[0, 0] * attention + route[1, 0] * mlp,
                 decay[1] * lanes[1] + route[0, 1] * attention + route[1, 1] * mlp]
    return model.final_norm(0.5 * (lanes[0] + lanes[1]))


@pytest.mark.parametrize("looping", [False, True])
def test_parallel_lanes_compute_the_records_decoder(looping):
    """The routing form (the default stack's, PRESET=record's) against the restatement above, on random weights: the
    attention lane carries itself, not its mix with x0, and the first parallel layer's skip joins the attention lane
    only. Three parallel layers, each receiving a skip; a loop before them."""
    hp = dataclasses.replace(STACK, num_layers=6, parallel_start_layer=3, loop_start=2, loop_end=2, num_loops=1)
    model = randomized(build(hp))
    model.looping = looping
    assert [block.parallel for block in model.blocks] == [False] * 3 + [True] * 3
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        expected, ours = record_parallel_hidden_states(model, tokens), model.hidden_states(tokens)
    assert (ours - expected).abs().max() < 1e-5


def test_xsa_removes_the_own_value_direction_per_kv_group():
    torch.manual_seed(3)
    y, v = torch.randn(2, 7, 8, 16), torch.randn(2, 7, 2, 16)
    out = T.exclusive_self_attention(y, v)
    unit = F.normalize(v, dim=-1).repeat_interleave(4, dim=2)  # query heads 0-3 share KV head 0, 4-7 KV head 1
    assert (out * unit).sum(-1).abs().max() < 1e-5
    assert torch.allclose(out, y - (y * unit).sum(-1, keepdim=True) * unit, atol=1e-6)


def test_partial_rope_rotates_only_the_leading_dims():
    torch.manual_seed(4)
    x = torch.randn(1, 10, 2, 16)
    partial, full = T.Rotary(4, 10000.0, 10)(x), T.Rotary(16, 10000.0, 10)(x)
    assert torch.equal(partial[..., 4:], x[..., 4:]) and not torch.allclose(partial[..., :4], x[..., :4])
    assert torch.allclose(partial[:, 0], x[:, 0]) and torch.allclose(full[:, 0], x[:, 0])  # position 0 is unrotated
    # Rotations keep norms, and the score of two rotated vectors depends on their offset only.
    q, k = torch.randn(16), torch.randn(16)
    rotary = T.Rotary(16, 10000.0, 10)
    at = lambda vector, pos: rotary(vector.expand(1, 10, 1, 16))[0, pos, 0]
    assert torch.allclose(at(q, 5) @ at(k, 3), at(q, 7) @ at(k, 5), atol=1e-5)


def record_rotary_tables(seq_len, rope_dims, base=10000.0, train_seq_len=1024):
    """The PR #549 family's rotary tables for a forward of `seq_len` tokens, restated from its Rotary: above its
    hard-coded training length the base becomes base * (T / 1024) ** (rd / (rd - 2))."""
    if seq_len > train_seq_len:
        base = base * (seq_len / train_seq_len) ** (rope_dims / (rope_dims - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :], base


@pytest.mark.parametrize("seq_len", [640, 1024, 1536, 2048])
def test_the_rotary_base_is_rescaled_above_rope_train_seq_len_as_the_pr549_family_rescales_it(seq_len):
    x = torch.randn(1, seq_len, 1, 64)
    cos, sin, base = record_rotary_tables(seq_len, 16)
    x1, x2 = x[..., :8], x[..., 8:16]
    expected = torch.cat((x1 * cos + x2 * sin, x1 * -sin + x2 * cos, x[..., 16:]), dim=-1)
    assert torch.equal(T.Rotary(16, 10000.0, 2048, rescale_above=1024)(x), expected)
    assert (round(base) == 22082) == (seq_len == 2048)  # the base its 2,048-token runs rotate with
    assert torch.equal(T.Rotary(16, 10000.0, 2048)(x), T.Rotary(16, 10000.0, 2048, rescale_above=4096)(x))
    hp = T.Hyperparameters.from_env({"PRESET": "pr754,smoke"})[0]  # the smoke size keeps the preset's 1,024
    assert T.GPT(hp).blocks[0].attn.rotary.rescale_above == hp.rope_train_seq_len == 1024


def test_attention_gates_start_where_the_records_start_and_compute_their_formulas():
    x = torch.randn(2, 5, 64)
    assert torch.equal(T.AttentionGate("output", 64, 4, 12, 0.5)(x), torch.ones(2, 5, 4, 1))
    assert torch.equal(T.AttentionGate("sparse", 64, 4, 12, 0.5)(x), torch.full((2, 5, 4, 1), 0.5))
    head = T.AttentionGate("head", 64, 4, 12, 0.5)(x)
    assert head.shape == (2, 5, 4, 1) and (head - 0.5).abs().max() < 0.1
    # Once their weights move, each computes its formula: the sparse gate's logits scaled by ATTN_GATE_SCALE, and
    # the window gates reading the first GATE_WINDOW channels only.
    formulas = {"sparse": lambda z: torch.sigmoid(0.25 * z), "output": lambda z: 2 * torch.sigmoid(z),
                "biased": lambda z: torch.sigmoid(z + 4.0), "head": torch.sigmoid}
    for kind, formula in formulas.items():
        gate = T.AttentionGate(kind, 64, 4, 12, 0.25)
        torch.nn.init.normal_(gate.weight)
        source = x if kind in ("head", "biased") else x[..., :12]
        expected = formula(source @ gate.weight.T).unsqueeze(-1)
        assert torch.allclose(gate(x), expected, atol=1e-6), kind
    with pytest.raises(T.ConfigError, match="ATTN_GATE"):
        T.Hyperparameters(attn_gate="head+sparse")


def expected_parameters(hp):
    """Closed form, written from the technique descriptions, independent of the module code."""
    d, heads, layers = hp.model_dim, hp.num_heads, hp.num_layers
    kv = d // heads * hp.num_kv_heads
    hidden = int(round(hp.mlp_mult * d))
    gate = {"none": 0, "head": heads * d, "output": heads * hp.gate_window,
            "sparse": heads * hp.gate_window}[hp.attn_gate]
    head_dim = d // heads
    query_scale = 2 * head_dim + 2 * d if hp.norm_weights else heads  # q/k and sublayer norm weights, or the q gain
    block = (2 * d * d + 2 * d * kv + query_scale + 2 * d * hidden + 2 * d * hp.sublayer_scales
             + 2 * d * hp.resid_mix + gate)
    ve_layers = len(hp.layer_set("ve_layers"))
    total = layers * block + hp.vocab_size * d * (1 if hp.tie_embeddings else 2)
    total += (layers - 1) * hp.value_residual + ve_layers
    total += 6 * sum(hp.parallel_residuals and layer >= hp.parallel_start_layer for layer in range(layers))
    virtual = layers + hp.num_loops * (hp.loop_end - hp.loop_start + 1)
    total += virtual // 2 * d * (2 if hp.skip_gates else 1) * hp.unet_skips + d * hp.norm_weights  # + the final norm
    total += (hp.gate_window + 1) * hp.smear_gate + (hp.backout_layer > 0)
    if hp.bigram_buckets:
        total += hp.bigram_buckets * hp.bigram_dim + hp.bigram_dim * d + 1
    if ve_layers:
        total += hp.vocab_size * hp.ve_dim + hp.ve_dim * kv + 1
    return total


@pytest.mark.parametrize("name", ["baseline", "stack", "everything", "head_gate", "untied", "default_full_size",
                                  "stack_plain_blocks", "norm_weights"])
def test_parameter_counts_match_the_closed_form(name):
    hp = {"untied": dataclasses.replace(EVERYTHING, tie_embeddings=False, attn_gate="head", mlp_mult=3.5),
          "default_full_size": T.Hyperparameters()}.get(name) or CONFIGS[name]
    total, embedding, non_embedding = T.count_parameters(T.GPT(hp))
    assert total == expected_parameters(hp) and total == embedding + non_embedding


def test_baseline_preset_matches_the_challenge_record():
    # The challenge's naive baseline (9x512, 8/4 heads, MLP 2x, vocab 1024, tied) has 17,059,912 parameters.
    hp, _ = T.Hyperparameters.from_env({"PRESET": "baseline"})
    assert T.count_parameters(T.GPT(hp)) == (17_059_912, 524_288, 16_535_624)
    assert T.describe_features(T.GPT(hp), hp) == ("mlp:relu2x2 gqa:8/4 rope_dims:64/64 qk_gain_init:1.5 softcap:30 "
                                                  "tied_embeddings sublayer_scales resid_mix unet_skips")


def test_loss_is_the_cross_entropy_of_the_softcapped_logits_and_mile_reweights_it():
    torch.manual_seed(1)
    model = randomized(build(STACK))
    tokens, targets = torch.randint(0, 97, (3, 20)), torch.randint(0, 97, (3, 20))
    logits = model(tokens)
    assert logits.abs().max() <= STACK.logit_softcap
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.allclose(model(tokens, targets), expected, atol=1e-6)
    per_token = model(tokens, targets, reduction="none")
    assert per_token.shape == targets.shape and torch.allclose(per_token.mean(), expected, atol=1e-6)
    # MiLe: gamma 0 is plain CE; gamma > 0 weights tokens by (1 - e^-H)^gamma with weights of mean 1.
    assert torch.allclose(model(tokens, targets, mile_gamma=torch.tensor(0.0)), expected, atol=1e-6)
    weights = T.mile_weights(logits.flatten(0, 1), torch.tensor(1.1))
    log_p = F.log_softmax(logits.flatten(0, 1), -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    confident = (1 - torch.exp(-entropy)) ** 1.1
    assert torch.allclose(weights, confident / confident.mean(), atol=1e-5)
    weighted = model(tokens, targets, mile_gamma=torch.tensor(1.1))
    assert torch.allclose(weighted, (per_token.flatten() * weights).mean(), atol=1e-6)


@pytest.mark.parametrize("activation, slope", [("leaky_relu2", 0.5), ("leaky_relu2", 0.3), ("relu2", 0.0)])
def test_the_mlp_squares_its_activation_with_the_slope_mlp_leaky_slope_gives(activation, slope):
    torch.manual_seed(0)
    mlp = T.MLP(dataclasses.replace(STACK, mlp_activation=activation, mlp_leaky_slope=0.5 if slope == 0 else slope))
    torch.nn.init.normal_(mlp.proj.weight)
    x = torch.randn(2, 5, 64)
    hidden = x @ mlp.fc.weight.T
    activated = torch.where(hidden > 0, hidden, slope * hidden)  # ReLU^2 (the baseline's) takes no slope
    assert torch.allclose(mlp(x), activated.square() @ mlp.proj.weight.T, atol=1e-5)


def test_output_projections_start_at_zero_and_ortho_init_is_orthogonal_as_ve_proj_init_says():
    model = T.GPT(STACK)
    for block in model.blocks:
        assert block.attn.proj.weight.abs().max() == 0 and block.mlp.proj.weight.abs().max() == 0
        w = block.attn.c_q.weight
        assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)
    # VE_PROJ_INIT: the value embeddings' projection starts at zero, or orthogonal (PR #549's) with ORTHO_INIT or not
    for ortho_init in (True, False):
        projection = lambda init: T.GPT(dataclasses.replace(STACK, ve_layers="1", ve_proj_init=init,
                                                            ortho_init=ortho_init)).value_embed.proj.weight.detach()
        assert projection("zero").abs().max() == 0
        w = projection("ortho")
        assert torch.allclose(w @ w.T, torch.eye(w.size(0)), atol=1e-5)


def test_attention_backend_selection_on_cpu():
    assert T.select_attention("auto", "cpu")[0] == "sdpa"
    for backend in ("fa3", "fa2"):
        with pytest.raises(T.ConfigError, match="ATTN_BACKEND"):
            T.select_attention(backend, "cpu")


def test_sdpa_grouped_query_attention_matches_repeated_heads():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    expected = T._sdpa(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2))
    assert torch.allclose(T._sdpa(q, k, v), expected, atol=1e-6)


@pytest.mark.cuda_path  # about 20 s each: CI's second step, beside the inductor compiles of test_cuda_path
@pytest.mark.parametrize("looping, qat", [(False, False), (True, False), (True, True)])
def test_the_training_step_compiles_as_one_graph_at_every_stage(looping, qat):
    # fullgraph=True turns any graph break into an error; aot_eager traces forward and backward like inductor does.
    hp = dataclasses.replace(EVERYTHING, qat_start_lr_scale=0.5 if qat else 0.0, mile_gamma=1.1)
    model = randomized(build(hp, looping=looping)).train()
    T.set_qat(model, hp, on=qat)
    optimizers = T.Optimizers(model, hp, 0, 1)  # the banks, as in training: matrices and gradients are views
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    tokens, targets = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32))
    loss = compiled(tokens, targets, mile_gamma=torch.tensor(0.5))
    loss.backward()
    assert torch.allclose(loss, model(tokens, targets, mile_gamma=torch.tensor(0.5)), atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())
    for bank in optimizers.banks:  # the compiled backward accumulated into the banks' gradient buffers
        assert bank.grads.abs().sum() > 0
        assert all(p.grad.data_ptr() == bank.grads[i].data_ptr() for i, p in enumerate(bank.params))
    optimizers.step(lr_scale=1.0, momentum=0.9)  # the compiled model sees the banks' in-place update
    with torch.no_grad():
        assert torch.allclose(compiled(tokens, targets), model(tokens, targets), atol=1e-5)


def block_region_graphs(num_layers):
    """(graphs compiled, loss, eager loss) of a forward and backward of the default stack at `num_layers` under
    COMPILE_SCOPE=block, looped, with dynamo's aot_eager backend (the graphs dynamo builds, without inductor)."""
    torch._dynamo.reset()
    hp = small_hp(num_layers=num_layers, num_loops=2, loop_start=1, loop_end=num_layers - 2)
    assert hp.ln_scale and hp.parallel_residuals  # a factor per layer; sequential and parallel blocks
    torch.manual_seed(0)
    model = T.GPT(hp)
    model.looping = True
    compiled = T.train_model_of(model, use_compile=True, varlen=False, scope="block", backend="aot_eager")
    tokens = torch.randint(0, hp.vocab_size, (2, hp.train_seq_len + 1), generator=torch.Generator().manual_seed(1))
    before = T.compiled_graphs()
    loss = compiled(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    graphs = T.compiled_graphs() - before
    torch._dynamo.reset()
    return graphs, loss.detach(), model(tokens[:, :-1], tokens[:, 1:]).detach()


def test_compile_scope_block_builds_one_graph_per_block_structure_whatever_the_depth():
    # Layers differ only in their LN-scale factor (a tensor, not a folded constant) and their index: 5 layers
    # (9 virtual) and 9 layers (21 virtual) need the same graphs: the first block (no V yet), the sequential
    # blocks, the first parallel block (it splits the stream), the output.
    (shallow, loss, eager), (deep, _, _) = block_region_graphs(5), block_region_graphs(9)
    assert shallow == deep <= 4, (shallow, deep)
    assert torch.allclose(loss, eager, atol=1e-5)  # the regions compute the eager forward


def causal_attention_in_matmuls(q, k, v, docs=None):
    """Causal attention, (B, T, H, D) as the model's backends take it, in plain matmuls that torch's FLOP counter
    sees (as bmm), each query head reading its grouped K/V head. `docs` changes which scores count, not the FLOPs."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5
    future = torch.ones(q.size(2), q.size(2), dtype=torch.bool).triu(1)
    return (scores.masked_fill(future, float("-inf")).softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("preset", ["smoke", "baseline,smoke", "pr754,smoke", "neon213,smoke", "record,smoke"])
def test_mfus_flops_per_token_are_torchs_count_of_a_forward_and_backward(preset):
    # MFU's numerator against torch's FLOP counter over a forward and backward with the loop on. The matrices
    # (addmm, mm) agree to 0.1%: the attention gates' and the SmearGate's few products per token are not in the
    # formula. Attention (bmm) follows PaLM's convention: torch counts the whole square of scores, the formula its
    # causal half.
    from torch.utils.flop_counter import FlopCounterMode
    hp = T.Hyperparameters.from_env({"PRESET": preset, "CASEOPS_ENABLED": "0"})[0]
    torch.manual_seed(0)
    model = T.GPT(hp, attention_fn=causal_attention_in_matmuls)
    model.looping = True
    tokens = torch.randint(2, hp.vocab_size, (2, hp.train_seq_len + 1), generator=torch.Generator().manual_seed(1))
    counter = FlopCounterMode(display=False)
    with counter:
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    counted = {str(op).split(".")[-1]: flops / tokens[:, 1:].numel() for op, flops in
               counter.get_flop_counts()["Global"].items()}
    passes = len(model.layer_order())
    attention = 6 * passes * hp.train_seq_len * hp.model_dim
    matrices = T.training_flops_per_token(model, hp.train_seq_len) - attention
    assert matrices == pytest.approx(counted.get("addmm", 0) + counted["mm"], rel=1e-3), counted
    assert attention == counted["bmm"] / 2


def test_the_training_logs_mfu_counts_each_step_at_the_layout_and_piece_length_it_ran():
    # A run that looped only its last steps, under a length schedule: its MFU so far is the step-weighted mean of
    # what each shape alone would give in the same time, not the current shape's rate over every step.
    import re
    import types
    hp = T.Hyperparameters.from_env({"PRESET": "record,smoke", "CASEOPS_ENABLED": "0"})[0]
    model = T.GPT(hp)
    run = types.SimpleNamespace(hp=hp, device_name="NVIDIA H100 80GB HBM3", world_size=2)
    shapes = {(False, 64): 10, (False, 256): 6, (True, 256): 4}
    model.looping = True  # the current layout, which the first 16 steps did not run

    def logged_mfu(counts):
        clock = T.TrainingClock(step=20, elapsed_ms=1.0)
        clock.shapes.update(counts)
        return float(re.search(r"mfu:([\d.]+)%", T.throughput(run, model, clock, step_avg_ms=1.0 / 20)).group(1))

    alone = {shape: logged_mfu({shape: 20}) for shape in shapes}
    assert alone[False, 64] < alone[False, 256] < alone[True, 256]
    mean = sum(n * alone[shape] for shape, n in shapes.items()) / 20
    assert logged_mfu(shapes) == pytest.approx(mean, abs=0.11)  # each figure is rounded to 0.1%
