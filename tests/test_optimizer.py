"""Orthogonalization, parameter banks, Parallel Muon (one process and torchrun), AdamW routing, clipping, int8
momentum, the schedules, and EMA/SWA."""

import copy
import sys

import pytest
import torch

import muon_worker
import train_gpt as T
from conftest import REPO, run_script, small_hp

sys.path.insert(0, str(REPO / "benchmarks"))
from optimizer_step import DispatchedOperators  # noqa: E402


def random_orthogonal_pair(rows, cols, seed):
    torch.manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, cols))
    v, _ = torch.linalg.qr(torch.randn(cols, cols))
    return u, v


# Five steps land every singular value of a random or condition-100 matrix in these bands: the quintic trades
# exactness for speed (about [0.68, 1.2]); Polar Express's per-step polynomials are tighter (about [0.86, 1.14]).
BANDS = {"quintic": (0.6, 1.25), "polar_express": (0.8, 1.2)}


@pytest.mark.parametrize("method", sorted(T.ORTHOGONALIZERS))
@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 512)])
def test_orthogonalized_random_matrices_have_singular_values_in_the_band(method, shape):
    torch.manual_seed(0)
    singular = torch.linalg.svdvals(T.orthogonalize(torch.randn(shape), 5, method))
    low, high = BANDS[method]
    assert low < singular.min() and singular.max() < high


@pytest.mark.parametrize("method", sorted(T.ORTHOGONALIZERS))
def test_ill_conditioned_matrices_keep_their_singular_vectors(method):
    u, v = random_orthogonal_pair(128, 64, seed=1)
    polar = u @ v.T  # the exact orthogonalization
    for decades, band in ((2, BANDS[method]), (3, (0.1, BANDS[method][1]))):
        out = T.orthogonalize(u @ torch.diag(torch.logspace(0, -decades, 64)) @ v.T, 5, method)
        singular = torch.linalg.svdvals(out)
        assert band[0] < singular.min() and singular.max() < band[1], (decades, singular.min(), singular.max())
        assert (out * polar).sum() / (out.norm() * polar.norm()) > 0.95


def test_batched_orthogonalization_equals_one_matrix_at_a_time():
    torch.manual_seed(2)
    batch = torch.randn(3, 48, 80)
    together = T.orthogonalize(batch, 5, "polar_express")
    for index in range(3):
        torch.testing.assert_close(together[index], T.orthogonalize(batch[index], 5, "polar_express"))


# Polar Express's coefficients as the 04-27 record writes them (full precision, PR #1344).
RECORD_POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def record_newton_schulz(g, steps=5, eps=1e-7):
    """A restatement of the 04-27 record's Newton-Schulz (`zeropower_via_newtonschulz5`, which it compiles): bf16,
    the tall side transposed, normalized by the Frobenius norm, then per step A = X X^T, B = b A + c A A,
    X = a X + B X."""
    x = g.bfloat16()
    transposed = x.size(-2) > x.size(-1)
    x = x.mT if transposed else x
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in RECORD_POLAR_EXPRESS[:steps]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if transposed else x


@pytest.mark.cuda_path  # a compile: CI's second step, with the other proofs of the CUDA path
def test_compiled_orthogonalization_is_the_records_bit_for_bit_in_bf16():
    """Compiled, as the record compiles its own and as a compiled GPU run compiles ours (ParallelMuon), each
    iteration's pointwise steps round to bf16 once; eager rounds each product and sum, 1 to 3% apart after five
    steps. Our coefficients are the record's, to the last digit."""
    assert T.POLAR_EXPRESS_COEFFICIENTS == RECORD_POLAR_EXPRESS
    torch.manual_seed(0)
    grads = torch.randn(2, 48, 16)  # tall: transposed inside
    ours = torch.compile(T.orthogonalize, dynamic=False, fullgraph=True)(grads, 5, "polar_express",
                                                                         dtype=torch.bfloat16)
    record = torch.compile(record_newton_schulz, dynamic=False, fullgraph=True)(grads)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, record)
    eager = T.orthogonalize(grads, 5, "polar_express", dtype=torch.bfloat16)
    assert not torch.equal(eager, record)  # the rounding compile changes


def test_the_optimizers_compile_the_orthogonalization_when_asked_and_say_so():
    hp = small_hp()
    model = T.GPT(hp)
    assert T.Optimizers(model, hp, 0, 1).describe().endswith("orthogonalize:eager")
    compiled = T.Optimizers(T.GPT(hp), hp, 0, 1, compiled=True)
    assert compiled.muon.orthogonalize is not T.orthogonalize
    assert compiled.describe().endswith("orthogonalize:compiled")


def single_bank_muon(weight, **overrides):
    hp = T.Hyperparameters(**overrides)
    bank = T.ParameterBank([weight], world_size=1)
    return bank, T.ParallelMuon([bank], hp, rank=0, world_size=1)


def test_muoneq_r_normalizes_rows_before_orthogonalizing():
    """With row normalization the update cannot depend on how each gradient row is scaled; without it, it does."""
    torch.manual_seed(3)
    grad = torch.randn(32, 64)
    row_scales = torch.logspace(-2, 2, 32)[:, None]
    for normalize in (True, False):
        updates = []
        for scaled in (grad, grad * row_scales):
            bank, muon = single_bank_muon(torch.nn.Parameter(torch.zeros(32, 64)), muon_row_normalize=normalize)
            bank.grads[0] = scaled
            updates.append(muon.shard_update(0, momentum=0.0))
        assert torch.allclose(*updates, atol=1e-5) == normalize


def test_int8_momentum_round_trip_error_is_within_half_a_step_per_block():
    torch.manual_seed(4)
    x = torch.randn(7, 100) * torch.logspace(-3, 1, 7)[:, None]  # blocks of very different scales; a ragged tail
    codes, scales = T.quantize_int8_blockwise(x)
    assert codes.dtype == torch.int8 and codes.shape == (3, T.INT8_MOMENTUM_BLOCK)
    restored = T.dequantize_int8_blockwise(codes, scales, x)
    errors = (restored - x).abs().flatten()
    bound = (scales / 2).expand(-1, T.INT8_MOMENTUM_BLOCK).flatten()[:x.numel()]
    assert torch.all(errors <= bound * (1 + 1e-5))
    assert errors.max() > 0  # it is lossy: the test would catch a silent fp32 fallback


@pytest.mark.parametrize("settings", [dict(muon_orthogonalizer="quintic", muon_row_normalize=False),
                                      dict(muon_orthogonalizer="polar_express"),
                                      dict(muon_momentum_int8=True)])
def test_muon_descends_on_a_quadratic(settings):
    torch.manual_seed(5)
    target = torch.randn(32, 16)
    weight = torch.nn.Parameter(torch.zeros(32, 16))
    bank, muon = single_bank_muon(weight, muon_weight_decay=0.0, **settings)
    losses = []
    for step in range(150):
        muon.param_groups[0].update(lr=0.1 * (1 - step / 150), momentum=0.9)  # fixed-size steps: decay to converge
        loss = (weight - target).square().sum()
        loss.backward()
        muon.step()
        bank.grads.zero_()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]
    if settings.get("muon_momentum_int8"):
        assert muon.state[0]["codes_scales"][0].dtype == torch.int8
        assert muon.momentum_bytes() < weight.numel() * 4 / 3


def test_a_banked_model_computes_the_same_function_and_gradients():
    hp = small_hp(num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2)
    torch.manual_seed(6)
    banked, plain = T.GPT(hp), None
    plain = copy.deepcopy(banked)
    optimizers = T.Optimizers(banked, hp, rank=0, world_size=1)
    tokens = torch.randint(hp.vocab_size, (3, hp.train_seq_len + 1))
    loss = banked(tokens[:, :-1], tokens[:, 1:])
    assert loss.item() == plain(tokens[:, :-1], tokens[:, 1:]).item()
    loss.backward()
    plain(tokens[:, :-1], tokens[:, 1:]).backward()
    for (name, p), q in zip(banked.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for bank in optimizers.banks:  # every matrix and its gradient live in the bank's storage
        for index, p in enumerate(bank.params):
            assert p.data_ptr() == bank.weights[index].data_ptr() and p.grad.data_ptr() == bank.grads[index].data_ptr()
    # Loading weights (as the warmup's restore does) writes through to the banks.
    banked.load_state_dict(plain.state_dict())
    optimizers.banks[0].weights.mul_(0.5)
    assert torch.equal(optimizers.banks[0].params[0], 0.5 * dict(plain.named_parameters())[
        next(n for n, p in banked.named_parameters() if p is optimizers.banks[0].params[0])])
    assert list(banked.state_dict()) == list(plain.state_dict())


def test_routing_covers_every_parameter_once_and_each_adamw_group_takes_its_own_lr_and_weight_decay():
    rates = dict(tied_embed_lr=0.011, embed_lr=0.022, head_lr=0.033, scalar_lr=0.044, embed_weight_decay=0.055,
                 scalar_weight_decay=0.066)
    for tied in (True, False):
        hp = small_hp(num_layers=3, model_dim=64, tie_embeddings=tied, bigram_buckets=16, ve_layers="1,2",
                      value_residual=True, backout_layer=2, **rates)
        model = T.GPT(hp)
        optimizers = T.Optimizers(model, hp, 0, 1)
        banked = [p for bank in optimizers.banks for p in bank.params]
        assert sorted(map(id, banked + optimizers.replicated)) == sorted(map(id, model.parameters()))
        # 6 matrices per block, the BigramHash and the value-embedding projections; never the untied head
        assert len(banked) == 6 * hp.num_layers + 2
        assert all(len({p.shape for p in bank.params}) == 1 for bank in optimizers.banks)
        tables = optimizers.adam.param_groups[0]["params"]
        assert [p.shape for p in tables] == [(64, 64), (16, 112), (64, 128)]
        assert (model.lm_head is None) == tied and all(p is not getattr(model.lm_head, "weight", None) for p in banked)
        settings = [(group["lr"], group["weight_decay"]) for group in optimizers.adam.param_groups]
        table_lr = hp.tied_embed_lr if tied else hp.embed_lr
        head = [] if tied else [(hp.head_lr, 0.0)]
        assert settings == [(table_lr, hp.embed_weight_decay), (hp.scalar_lr, hp.scalar_weight_decay)] + head
        assert tied or optimizers.adam.param_groups[2]["params"] == [model.lm_head.weight]
        assert any(p is model.blocks[0].attn_scale for p in optimizers.adam.param_groups[1]["params"])


def reference_muon_steps(weights, grads_per_step, lr, momentum, weight_decay, steps=5):
    """Muon written plainly, one matrix at a time: the reference Parallel Muon must reproduce."""
    buffers = [torch.zeros_like(w) for w in weights]
    for grads in grads_per_step:
        for w, g, buf in zip(weights, grads, buffers):
            buf.mul_(momentum).add_(g)
            update = g + momentum * buf
            update = update / update.norm(dim=1, keepdim=True).clamp_min(1e-7)
            update = T.orthogonalize(update, steps, "polar_express") * max(1, w.size(0) / w.size(1)) ** 0.5
            w.mul_(1 - lr * weight_decay).sub_(lr * update)
    return weights


def test_parallel_muon_at_one_process_equals_plain_muon_per_matrix():
    torch.manual_seed(7)
    shapes = [(48, 32), (48, 32), (32, 48), (48, 32), (16, 32)]
    params = [torch.nn.Parameter(torch.randn(shape) * 0.1) for shape in shapes]
    reference = [p.detach().clone() for p in params]
    hp = T.Hyperparameters(matrix_lr=0.05, muon_weight_decay=0.1)
    banks = {}
    for p in params:
        banks.setdefault(p.shape, []).append(p)
    banks = [T.ParameterBank(group, 1) for group in banks.values()]
    muon = T.ParallelMuon(banks, hp, 0, 1)
    muon.param_groups[0]["momentum"] = 0.9
    grads_per_step = [[torch.randn(shape) for shape in shapes] for _ in range(4)]
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        muon.step()
    reference_muon_steps(reference, grads_per_step, lr=0.05, momentum=0.9, weight_decay=0.1)
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-6)


def test_the_local_clip_is_the_global_clip_at_one_process():
    """GRAD_CLIP_LOCAL clips before the (absent) collectives, from the fp32 bank gradients: the same bits at one
    process. Its other world sizes: the torchrun test below."""
    global_clip, _ = muon_worker.train(0, 1)
    local_clip, _ = muon_worker.train(0, 1, local_clip=True)
    assert all(torch.equal(local_clip[name], value) for name, value in global_clip.items())
    described = T.Optimizers(T.GPT(muon_worker.config(local_clip=True)), muon_worker.config(local_clip=True), 0, 1)
    assert " clip:0.05(local) " in described.describe()
    with pytest.raises(T.ConfigError, match="GRAD_CLIP_LOCAL"):
        T.Hyperparameters.from_env({"GRAD_CLIP_LOCAL": "1", "GRAD_CLIP_NORM": "0"})


def test_clipping_uses_the_global_norm():
    hp = small_hp(num_layers=2, model_dim=64, grad_clip_norm=0.01)
    model = T.GPT(hp)
    optimizers = T.Optimizers(model, hp, 0, 1)
    tokens = torch.randint(hp.vocab_size, (2, hp.train_seq_len + 1))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    norm = torch.stack([g.norm() for g in expected]).norm()
    assert norm > 0.01
    optimizers.clip_global_norm()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g * 0.01 / (norm + 1e-6))


def test_sum_of_squares_is_the_fp32_sum_over_tensors_of_any_dtype():
    torch.manual_seed(0)
    tensors = [torch.randn(3, 5), torch.randn(7).bfloat16(), torch.randn(2, 2), torch.randn(4, 4).bfloat16()]
    expected = sum(t.double().square().sum() for t in tensors)
    total = T.sum_of_squares(tensors)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total.double(), expected, rtol=1e-6, atol=0)
    assert T.sum_of_squares([]) == 0


@pytest.mark.parametrize("variant", [{}, dict(grad_clip_local=True), dict(muon_bf16_state=True, embed_bf16=True)])
def test_an_optimizer_step_runs_as_many_operators_for_six_layers_as_for_two(variant):
    """The host's work in a step (clip, AdamW, Muon, zeroing, the EMA) grows with the banks, not with the tensors:
    six layers have twice the small gains and gates of two and the same bank shapes."""
    counts = []
    for layers in (2, 6):
        hp = small_hp(num_layers=layers, grad_clip_norm=0.01, **variant)
        model = T.GPT(hp)
        optimizers, average = T.Optimizers(model, hp, 0, 1), T.WeightAverage(model, hp)
        tokens = torch.randint(hp.vocab_size, (2, hp.train_seq_len + 1))
        for step in (1, 2):  # the second step: AdamW's and Muon's state exist
            model(tokens[:, :-1], tokens[:, 1:]).backward()
            with DispatchedOperators() as dispatched:
                optimizers.step(lr_scale=1.0, momentum=0.95)
                optimizers.zero_grad()
                average.update(step, lr_scale=1.0)
        counts.append((len(optimizers.replicated), dispatched.counts))
    (replicated_two, two), (replicated_six, six) = counts
    assert replicated_six > 2 * replicated_two > 0
    assert two == six
    assert "aten.zeros_like" not in six  # the optimizers' state is made in the first step only


@pytest.mark.parametrize("nproc", [2, 3])
def test_parallel_muon_under_torchrun_matches_one_process(nproc, tmp_path):
    """Reduce-scatter, sharded momentum and all-gather over banks that nproc does not divide, with global-norm
    clipping: the same parameters as one process on the whole batch. Everything is fp32 on the CPU, so the only
    difference is the order of the gradient sums (about 1e-7 relative). After 4 steps the Muon matrices agree to
    1e-5; AdamW's normalized steps amplify rounding where a gradient nearly cancels, hence 1e-4 for the rest, still
    20x below one step of the smallest AdamW LR. (On GPU both sides would orthogonalize in bf16 alike.)"""
    prefix = tmp_path / "params"
    variants = ["adam_last", "bf16", "local_clip"] if nproc == 2 else []
    result = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                         str(REPO / "tests" / "muon_worker.py"), str(prefix)] + variants, {}, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reference, reference_momentum_bytes = muon_worker.train(0, 1)
    banked = {f"{name}.weight" for name, module in T.GPT(muon_worker.config()).named_modules()
              if isinstance(module, T.CastedLinear)}
    saved = [torch.load(f"{prefix}.rank{rank}.pt") for rank in range(nproc)]
    for rank, state in enumerate(saved):
        for name, value in reference.items():
            tolerance = 1e-5 if name in banked else 1e-4
            torch.testing.assert_close(state["params"][name], value, rtol=0, atol=tolerance, msg=f"rank {rank} {name}")
            assert torch.equal(state["params"][name], saved[0]["params"][name])  # replicas stay identical
        # Momentum is sharded: each rank holds ceil(bank / nproc) matrices of every bank.
        assert state["momentum_bytes"] < reference_momentum_bytes * (1 / nproc + 0.25)
    if nproc == 2:  # AdamW after Muon (ADAMW_SIDE_STREAM's other extreme): the same bits at two processes
        for rank, state in enumerate(saved):
            adam_last = torch.load(f"{prefix}.adam_last.rank{rank}.pt")["params"]
            assert all(torch.equal(adam_last[name], value) for name, value in state["params"].items())
        # The records' bf16 state (each rank's bank gradients rounded to bf16, then summed in bf16; bf16 tables):
        # the replicas stay identical. (One process rounds the whole batch's gradient instead, so the result
        # depends on the world size by that rounding, which AdamW's normalized steps amplify: as in the records.)
        bf16 = [torch.load(f"{prefix}.bf16.rank{rank}.pt")["params"] for rank in range(nproc)]
        assert bf16[0]["tok_emb.weight"].dtype == torch.bfloat16
        assert all(torch.equal(bf16[0][name], bf16[1][name]) for name in bf16[0])
        assert not torch.equal(bf16[0]["blocks.0.mlp.fc.weight"], saved[0]["params"]["blocks.0.mlp.fc.weight"])
        # GRAD_CLIP_LOCAL: each rank clips its own gradient; the same parameters as one process that clips each
        # share's gradient and steps on their mean, and not those of the clip of the averaged gradient.
        local = [torch.load(f"{prefix}.local_clip.rank{rank}.pt")["params"] for rank in range(nproc)]
        restated = muon_worker.train_with_clipped_shares(nproc)
        for name, value in restated.items():
            tolerance = 1e-5 if name in banked else 1e-4
            torch.testing.assert_close(local[0][name], value, rtol=0, atol=tolerance, msg=name)
            assert torch.equal(local[0][name], local[1][name])
        assert not torch.allclose(local[0]["blocks.0.mlp.fc.weight"], saved[0]["params"]["blocks.0.mlp.fc.weight"],
                                  rtol=0, atol=1e-4)


def test_adamw_after_muon_gives_the_same_bits_and_the_side_stream_needs_cuda():
    """ADAMW_SIDE_STREAM lets AdamW's step run beside Muon's, in any interleaving: they touch disjoint tensors. On the
    CPU (no streams) the other extreme, AdamW after Muon, stands for it; two processes: the torchrun test above."""
    in_order, _ = muon_worker.train(0, 1)
    adam_last, _ = muon_worker.train(0, 1, adam_last=True)
    assert in_order.keys() == adam_last.keys() and all(torch.equal(adam_last[n], v) for n, v in in_order.items())
    optimizers = T.Optimizers(T.GPT(muon_worker.config()), T.dataclasses.replace(muon_worker.config(),
                              adamw_side_stream=True), 0, 1)
    assert optimizers.side_stream is None and " adamw_stream:main " in optimizers.describe()


def test_lr_schedule_by_steps_and_by_wall_clock():
    hp = T.Hyperparameters(iterations=1000, warmdown_frac=0.2, max_wallclock_seconds=0)
    assert T.lr_multiplier(hp, 0, 0) == 1.0 and T.lr_multiplier(hp, 800, 0) == pytest.approx(1.0)
    assert T.lr_multiplier(hp, 900, 0) == pytest.approx(0.5) and T.lr_multiplier(hp, 1000, 0) == 0.0
    timed = T.Hyperparameters(warmdown_frac=0.1, max_wallclock_seconds=12, gptq_reserve_seconds=2, min_lr_scale=0.1)
    # Under a cap the fraction is of the 12 - 2 = 10 s training budget (the GPTQ calibration reserve is not
    # training time), whatever the step; MIN_LR_SCALE floors the end.
    assert T.lr_multiplier(timed, 3, 5000) == 1.0
    assert T.lr_multiplier(timed, 3, 9500) == pytest.approx(0.5)
    assert T.lr_multiplier(timed, 3, 9990) == pytest.approx(0.1)
    no_warmdown = T.Hyperparameters(warmdown_frac=0)
    assert no_warmdown.warmdown_frac == 0 and T.lr_multiplier(no_warmdown, 10**6, 0) == 1.0


def test_muon_momentum_warmup():
    hp = T.Hyperparameters(muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500)
    assert T.muon_momentum(hp, 0) == pytest.approx(0.85)
    assert T.muon_momentum(hp, 250) == pytest.approx(0.90)
    assert T.muon_momentum(hp, 10_000) == pytest.approx(0.95)


def scripted_average(mode, steps=30, **overrides):
    """A WeightAverage fed known weights w_t = t at LR scale 1 - t / steps. Returns (model, average, the initial
    weights, the EMA after every step as replayed here, independently of the implementation)."""
    hp = small_hp(num_layers=1, weight_averaging=mode, **overrides)
    model = T.GPT(hp)
    initial = [p.detach().clone() for p in model.parameters()]
    average = T.WeightAverage(model, hp)
    ema, emas = [w.clone() for w in initial], []
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        average.update(step, lr_scale=1 - step / steps)
        decay = min(hp.ema_decay, step / (9 + step))  # (1 + t) / (10 + t) with t = step - 1 updates before
        ema = [decay * e + (1 - decay) * step for e in ema]
        emas.append(ema)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-1.0)  # the live weights, which an average must replace
    return model, average, initial, emas


def test_the_exported_ema_is_the_exponential_average_it_claims():
    model, average, _, emas = scripted_average("ema", ema_decay=0.9)
    assert average.apply() == "weight_averaging: exported ema(decay:0.9 updates:30)"
    for p, expected in zip(model.parameters(), emas[-1]):
        torch.testing.assert_close(p.detach(), expected)


def test_the_exported_swa_is_the_mean_of_its_snapshots():
    # LR scale 1 - t/30 is below 0.5 from step 16; every 5 steps: snapshots at 20, 25 and 30.
    model, average, _, emas = scripted_average("swa", swa_every=5, swa_start_lr_scale=0.5)
    assert "swa(every:5 below_lr_scale:0.5 snapshots:3)" in average.apply()
    assert all(torch.all(p == 25.0) for p in model.parameters())
    model, average, _, emas = scripted_average("ema_swa", swa_every=5, swa_start_lr_scale=0.5, ema_decay=0.9)
    assert "snapshots:3) of ema(decay:0.9" in average.apply()
    for p, *snapshots in zip(model.parameters(), emas[19], emas[24], emas[29]):
        torch.testing.assert_close(p.detach(), sum(snapshots) / 3)


def test_without_averaging_or_snapshots_the_live_weights_are_exported():
    for mode, overrides in (("none", {}), ("swa", dict(swa_every=1000))):
        model, average, _, _ = scripted_average(mode, **overrides)
        assert "live_weights" in average.apply()
        assert all(torch.all(p == -1.0) for p in model.parameters())


def pr549_muon_steps(weights, grads_per_step, lr, momentum, weight_decay, steps=5):
    """PR #549's Muon at one process, restated from its script: the gradient cast to bf16, a bf16 momentum buffer, a
    bf16 Nesterov update, the quintic in bf16 on it, and the step applied to the fp32 weight."""
    a, b, c = T.QUINTIC_COEFFICIENTS[0]
    buffers = [torch.zeros_like(w, dtype=torch.bfloat16) for w in weights]
    for grads in grads_per_step:
        for w, g, buf in zip(weights, grads, buffers):
            g = g.bfloat16()
            buf.mul_(momentum).add_(g)
            x = g.add(buf, alpha=momentum)
            x = x / (x.norm() + 1e-7)
            for _ in range(steps):
                gram = x @ x.T
                x = a * x + (b * gram + c * (gram @ gram)) @ x  # #549 scales A A, not A
            w.mul_(1 - lr * weight_decay).add_(x.to(w.dtype), alpha=-lr)  # wide or square: no shape scale
    return weights


def test_muon_bf16_state_is_pr549s_bank_precision():
    """MUON_BF16_STATE at one process, with #549's quintic and bf16 orthogonalization, takes the same steps as #549's
    Muon to the bit; the fp32 state does not."""
    shapes = [(32, 64), (32, 64), (48, 48)]
    torch.manual_seed(8)
    initial = [torch.randn(shape) * 0.1 for shape in shapes]
    grads_per_step = [[torch.randn(shape) for shape in shapes] for _ in range(4)]
    reference = pr549_muon_steps([w.clone() for w in initial], grads_per_step, lr=0.05, momentum=0.9,
                                 weight_decay=0.04)
    for bf16_state in (True, False):
        hp = T.Hyperparameters(matrix_lr=0.05, muon_weight_decay=0.04, muon_orthogonalizer="quintic",
                               muon_row_normalize=False, muon_bf16_state=bf16_state)
        params = [torch.nn.Parameter(w.clone()) for w in initial]
        grad_dtype = torch.bfloat16 if bf16_state else None
        banks = [T.ParameterBank(params[:2], 1, torch.bfloat16, grad_dtype),
                 T.ParameterBank(params[2:], 1, torch.bfloat16, grad_dtype)]
        muon = T.ParallelMuon(banks, hp, 0, 1, update_dtype=torch.bfloat16)
        muon.param_groups[0]["momentum"] = 0.9
        for grads in grads_per_step:
            for p, g in zip(params, grads):
                p.grad.copy_(g)
            muon.launch_reduce_scatters()
            muon.step()
        same = [torch.equal(p.detach(), r) for p, r in zip(params, reference)]
        assert all(same) if bf16_state else not any(same), (bf16_state, same)
        assert {state["buffer"].dtype for state in muon.state.values()} == {grad_dtype or torch.float32}


def test_embed_bf16_stores_and_updates_the_tables_in_bf16():
    """EMBED_BF16: every token table is a bf16 parameter with bf16 AdamW moments, so an update below half a bf16 step
    is lost, as in the records; the lookups are the exact bf16 values in fp32. The fp32 tables keep it."""
    hp = small_hp(num_layers=2, model_dim=64, bigram_buckets=16, ve_layers="1", tied_embed_lr=1e-6,
                  embed_weight_decay=0.0)
    tokens = torch.randint(hp.vocab_size, (2, hp.train_seq_len + 1), generator=torch.Generator().manual_seed(9))
    for bf16 in (True, False):
        torch.manual_seed(9)
        model = T.GPT(T.dataclasses.replace(hp, embed_bf16=bf16))  # GPT applies EMBED_BF16 itself
        with torch.no_grad():
            model.tok_emb.weight.fill_(1.0)  # bf16's step at 1.0 is 2^-7; AdamW's first step is about the LR
        optimizers = T.Optimizers(model, hp, 0, 1)
        tables = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        assert len(tables) == 3 and {m.weight.dtype for m in tables} == {torch.bfloat16 if bf16 else torch.float32}
        lookup = model.tok_emb(tokens)
        assert lookup.dtype == torch.float32 and torch.equal(lookup, model.tok_emb.weight.float()[tokens])
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizers.step(lr_scale=1.0, momentum=0.9)
        moments = optimizers.adam.state[model.tok_emb.weight]["exp_avg"]
        assert moments.dtype == model.tok_emb.weight.dtype
        assert torch.all(model.tok_emb.weight == 1.0) == bf16
        assert ("tables:bf16" in optimizers.describe()) == bf16
