"""The CUDA path, as far as a CPU can prove it: FlashAttention's wrappers on stand-in packages, bf16 autocast,
thread counts, host syncs per step, the memory estimate. The slow parts (inductor compiles, eight ranks, two nodes)
carry the `cuda_path` marker and run as CI's second step (`python3 -m pytest -q -m cuda_path tests`)."""

import concurrent.futures
import dataclasses
import importlib
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import train_gpt as T
from conftest import REPO, evaluation_only_env, run_script, set_run_env, small_hp, tiny_env
import flash_standins

BOS = 1
SCRIPT = str(REPO / "train_gpt.py")
EVERYTHING = small_hp(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=97, bigram_buckets=31,
                      bigram_dim=16, ve_layers="2,3", ve_dim=16, value_residual=True, backout_layer=3)
NEON = small_hp("neon213", num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=97, loop_start=0,
                loop_end=-1, num_loops=0, parallel_start_layer=-1)


def inject(monkeypatch, fa3=None, fa2=None):
    """Makes the stand-ins importable under the real packages' names (or hides the real ones)."""
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)


def test_the_selector_prefers_fa3_then_fa2_then_sdpa_and_refuses_a_missing_request(monkeypatch):
    inject(monkeypatch, flash_standins.fa3_module(), flash_standins.fa2_module())
    assert T.select_attention("auto", "cuda")[0] == "fa3"
    assert T.select_attention("fa2", "cuda")[0] == "fa2"
    assert T.select_attention("auto", "cpu")[0] == "sdpa"  # the real kernels need CUDA tensors
    assert T.select_attention("auto", "cuda", half_precision=False)[0] == "sdpa"  # FA takes no fp32
    with pytest.raises(T.ConfigError, match="AUTOCAST=off"):
        T.select_attention("fa3", "cuda", half_precision=False)
    inject(monkeypatch, None, flash_standins.fa2_module())
    assert T.select_attention("auto", "cuda")[0] == "fa2"
    with pytest.raises(T.ConfigError, match="ATTN_BACKEND='fa3' is not available"):
        T.select_attention("fa3", "cuda")
    inject(monkeypatch, None, None)
    assert T.select_attention("auto", "cuda")[0] == "sdpa"
    with pytest.raises(T.ConfigError, match="ATTN_BACKEND='fa2'"):
        T.select_attention("fa2", "cuda")


@pytest.mark.parametrize("backend, returns_lse", [("fa3", False), ("fa3", True), ("fa2", False)])
def test_flash_wrappers_match_sdpa_forward_and_backward_with_grouped_query_heads(monkeypatch, backend, returns_lse):
    fa3, fa2 = flash_standins.fa3_module(returns_lse), flash_standins.fa2_module()
    inject(monkeypatch, fa3, fa2)
    name, flash = T.select_attention(backend, "cuda")
    assert name == backend
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 24, heads, 16, dtype=torch.bfloat16, requires_grad=True) for heads in (4, 2, 2))
    out = flash(q, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = T._sdpa(q2, k2, v2)
    expected_grads = torch.autograd.grad(expected.float().square().sum(), (q2, k2, v2))
    assert out.shape == (2, 24, 4, 16) and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected.float(), atol=2e-2)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got.float(), want.float(), atol=5e-2, rtol=5e-2)
    module = fa3 if backend == "fa3" else fa2
    assert module.calls[-1] == dict(shape=(2, 24, 4, 16), kv_heads=2, causal=True)  # K/V were not repeated


@pytest.mark.parametrize("hp", [EVERYTHING, NEON], ids=["everything", "neon213"])
def test_a_model_on_fa3_under_bf16_autocast_trains_like_the_sdpa_model(monkeypatch, hp):
    # The stand-in refuses mixed or fp32 inputs as the kernels do: every tensor reaching attention must be bf16.
    inject(monkeypatch, flash_standins.fa3_module(returns_lse=True), None)
    _, flash = T.select_attention("fa3", "cuda")
    torch.manual_seed(0)
    tokens = torch.randint(2, hp.vocab_size, (2, hp.train_seq_len + 1))
    losses, grads = [], []
    for attention_fn in (flash, T._sdpa):
        torch.manual_seed(0)
        model = T.GPT(hp, attention_fn, bos_id=BOS)
        model.looping = hp.num_loops > 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], abs=2e-2)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_bf16_autocast_keeps_master_weights_logits_loss_and_optimizer_state_in_fp32():
    hp = dataclasses.replace(EVERYTHING, mile_gamma=1.1)
    torch.manual_seed(0)
    model = T.GPT(hp, bos_id=BOS)
    model.looping = True
    optimizers = T.Optimizers(model, hp, 0, 1, update_dtype=torch.bfloat16)
    linear_outputs = []
    hooks = [m.register_forward_hook(lambda m, i, out: linear_outputs.append(out.dtype))
             for m in model.modules() if isinstance(m, T.CastedLinear)]
    tokens = torch.randint(2, hp.vocab_size, (2, hp.train_seq_len + 1))
    with T.autocast_context("bf16", "cpu")():
        logits = model.logits(tokens[:, :-1])
        loss = model(tokens[:, :-1], tokens[:, 1:], mile_gamma=torch.tensor(0.5))
    loss.backward()
    assert set(linear_outputs) == {torch.bfloat16}  # the matrices ran in bf16
    assert logits.dtype == loss.dtype == torch.float32  # softcap and cross-entropy in fp32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in model.parameters() if p.grad is not None)
    seen = []
    original = optimizers.muon.orthogonalize
    optimizers.muon.orthogonalize = lambda g, *a, **k: seen.append(k.get("dtype")) or original(g, *a, **k)
    optimizers.step(lr_scale=1.0, momentum=0.9)
    assert seen and set(seen) == {torch.bfloat16}  # the update is computed as on the GPU
    assert all(p.dtype == torch.float32 for p in model.parameters())  # and applied to fp32 masters
    momentum = [t for state in optimizers.muon.state.values() for t in state.values()]
    adam = [t for state in optimizers.adam.state.values() for key, t in state.items() if key != "step"]
    assert momentum and adam and all(t.dtype == torch.float32 for t in momentum + adam)
    for h in hooks:
        h.remove()


def test_autocast_settings_are_honoured_or_refused():
    assert T.autocast_name("auto", "cuda") == "bf16" and T.autocast_name("auto", "cpu") == "off(fp32)"
    assert T.autocast_name("bf16", "cpu") == "bf16" and T.autocast_name("off", "cuda") == "off(fp32)"
    with T.autocast_context("off", "cuda")():
        assert not torch.is_autocast_enabled("cuda")
    for env, name in (({"AUTOCAST": "fp16"}, "AUTOCAST"), ({"COMPILE": "true"}, "COMPILE")):
        with pytest.raises(T.ConfigError, match=name):
            T.Hyperparameters.from_env(env)


def test_omp_num_threads_is_honoured_and_logged(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert T.cpu_threads("1", 1) == "threads:1(OMP_NUM_THREADS)"
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(T.os, "cpu_count", lambda: 8)
        assert T.cpu_threads("", 4) == "threads:2(cpu_count/local_world_size)"
        assert torch.get_num_threads() == 2
        with pytest.raises(T.ConfigError, match="OMP_NUM_THREADS"):
            T.cpu_threads("two", 1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.cuda_path
def test_a_whole_run_under_bf16_autocast_scores_within_bf16_noise_of_fp32(sample, tmp_path):
    # Training, validation, GPTQ calibration, the round-trip, sliding windows and TTT, all on the bf16 path.
    runs = {autocast: ([sys.executable, SCRIPT], tiny_env(
        sample, AUTOCAST=autocast, RUN_ID=autocast, EVAL_STRIDE=128, TTT_ENABLED=1, TTT_CHUNK_TOKENS=10000,
        TTT_EPOCHS=1, TTT_BATCH_SEQS=4, OMP_NUM_THREADS=1, VAL_LOSS_EVERY=3)) for autocast in ("off", "bf16")}
    summaries = {}
    for autocast, log in run_logs_side_by_side(runs, tmp_path).items():
        assert f"autocast:{'bf16' if autocast == 'bf16' else 'off(fp32)'} threads:1(OMP_NUM_THREADS)" in log
        summaries[autocast] = json.loads(re.search(r"^summary_json: (.*)$", log, re.M).group(1))
    for metric in ("pre_quant_val_bpb", "final_int6_brotli_roundtrip_val_bpb", "final_sliding_window_val_bpb",
                   "final_ttt_val_bpb"):
        # bf16 rounds activations to 8 bits of mantissa; over six steps the scores moved by about 0.001 bpb
        assert summaries["bf16"][metric] == pytest.approx(summaries["off"][metric], abs=0.005), metric
        assert summaries["bf16"][metric] != summaries["off"][metric], metric  # the bf16 path did run


# The optimizer paths a step can take: the global clip with fp32 state (the default), or each rank's own clip with
# bf16 state, int8 momentum, AdamW on its side stream (one stream here) and an SWA of the EMA.
OPTIMIZER_PATHS = {"global clip": {}, "local clip, bf16 and int8 state, swa": dict(
    GRAD_CLIP_LOCAL=1, MUON_BF16_STATE=1, EMBED_BF16=1, MUON_MOMENTUM_INT8=1, ADAMW_SIDE_STREAM=1,
    WEIGHT_AVERAGING="ema_swa", SWA_EVERY=2, SWA_START_LR_SCALE=1.0)}
# What reads a tensor's value back to the host, which on a GPU waits for the device to reach it.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("optimizer_path", OPTIMIZER_PATHS)
def test_a_step_that_logs_nothing_never_blocks_the_host_on_the_device(sample, tmp_path, monkeypatch, optimizer_path):
    """Counts the calls that would block the host on a GPU (device synchronize, a tensor's value read back, as by
    .item() or bool(), collectives on the device group, a blocking copy to the device) between the start of one
    training step and the next, in a real in-process run."""
    events, training = [], [False]

    def counted(kind, original):
        def wrapper(*args, **kwargs):
            if training[0]:
                events.append(kind)
            return original(*args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    original_to = torch.Tensor.to

    def to(tensor, *args, **kwargs):  # a copy to a device from pageable memory waits for the kernels queued before it
        names_device = any(isinstance(arg, (torch.device, str)) for arg in args) or "device" in kwargs
        if training[0] and names_device and sys._getframe(1).f_code.co_filename == T.__file__:
            events.append("to(device)")
        return original_to(tensor, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.cuda, "synchronize", counted("cuda.synchronize", torch.cuda.synchronize))
    monkeypatch.setattr(T, "synchronize", counted("synchronize", T.synchronize))
    monkeypatch.setattr(T, "all_reduce", counted("all_reduce", T.all_reduce))
    monkeypatch.setattr(T, "train_step", counted("step", T.train_step))
    monkeypatch.setattr(T.Logger, "__call__", counted("log", T.Logger.__call__))
    original_train = T.train

    def train(run, data, model):
        training[0] = True
        try:
            return original_train(run, data, model)
        finally:
            training[0] = False
    monkeypatch.setattr(T, "train", train)
    env = tiny_env(sample, ITERATIONS=24, TRAIN_LOG_EVERY=8, RUN_ID="syncs", MILE_GAMMA=1.1, WEIGHT_AVERAGING="ema",
                   QAT_START_LR_SCALE=0.5, WARMDOWN_FRAC=0.5, NUM_LOOPS=1, LOOP_START=1, LOOP_END=1)
    env.update({key: str(value) for key, value in OPTIMIZER_PATHS[optimizer_path].items()})
    set_run_env(monkeypatch, env, tmp_path)
    T.main()
    steps, current = [], None
    for kind in events:
        if kind == "step":
            current = []
            steps.append(current)
        elif current is not None:
            current.append(kind)
    assert len(steps) == 24
    quiet = {n: calls for n, calls in enumerate(steps, 1) if "log" not in calls}
    assert len(quiet) >= 11 and not {1, 10, 16, 24} & set(quiet)  # steps 1-10, 16 and 24 log
    assert {n: calls for n, calls in quiet.items() if calls} == {}
    assert "synchronize" in steps[15] and "item" in steps[15]  # a logged step reads the loss, on an exact clock
    log = (tmp_path / "logs" / "syncs.txt").read_text()
    assert "qat: enabled at step:19" in log and "recurrence: activated at step:9" in log  # quiet steps 20-23: both on
    took = re.search(r"^optimizer: .* grads:(\w+) momentum:(\w+) tables:(\w+) clip:([\w.()]+) ", log, re.M).groups()
    assert took == (("fp32", "fp32", "fp32", "0.3(global)") if optimizer_path == "global clip" else
                    ("bf16", "int8", "bf16", "0.3(local)"))
    exported = re.search(r"^weight_averaging: exported (\w+)", log, re.M).group(1)
    assert exported == ("ema" if optimizer_path == "global clip" else "swa")  # the SWA collected on quiet steps too


@pytest.mark.cuda_path  # with the other compile proofs, in CI's second step
def test_a_graph_that_cannot_compile_stops_the_warmup_with_the_settings_that_avoid_it(sample, tmp_path, monkeypatch):
    """An attention that dynamo cannot trace under fullgraph (here it reads a value back to the host, as a
    FlashAttention build without registered kernels would call into an opaque extension) fails the warmup, before
    training, with COMPILE=0 named instead of a compiler traceback."""
    def untraceable(q, k, v, docs=None):
        if q.float().abs().sum().item() < 0:  # a host read: a graph break, an error under fullgraph
            raise AssertionError
        return T._sdpa.__wrapped__(q, k, v, docs)

    untraceable.__wrapped__ = T._sdpa
    monkeypatch.setattr(T, "_sdpa", untraceable)
    set_run_env(monkeypatch, tiny_env(sample, COMPILE=1, WARMUP_STEPS=1, RUN_ID="nocompile"), tmp_path)
    try:
        with pytest.raises(T.ConfigError, match=r"torch.compile failed in the warmup, before training .*set COMPILE=0"):
            T.main()
    finally:
        torch._dynamo.reset()
    log = (tmp_path / "logs" / "nocompile.txt").read_text()
    assert re.search(r"^error: ConfigError: torch.compile failed .* phase:warmup$", log, re.M)
    assert not re.search(r"^(saved_)?raw_weights:", log, re.M)  # nothing had trained, so nothing to save
    assert not (tmp_path / "logs" / "nocompile_raw.pt").exists()


class FakeRun:
    """What estimate_memory and out_of_memory_advice read of a Run."""

    def __init__(self, hp, world_size=1, grad_accum_steps=1, autocast="off"):
        torch.manual_seed(0)
        self.hp, self.world_size, self.grad_accum_steps = hp, world_size, grad_accum_steps
        self.device = torch.device("cpu")
        self.model = T.GPT(hp, bos_id=BOS)
        self.model.looping = hp.num_loops > 0
        self.optimizers = T.Optimizers(self.model, hp, 0, world_size)
        self.seqs_per_step = hp.train_batch_tokens // hp.train_seq_len
        self.autocast = T.autocast_context(autocast, "cpu")


@pytest.mark.parametrize("autocast, state", [("off", "int8"), ("bf16", "int8"), ("bf16", "bf16")])
def test_the_memory_estimate_matches_what_a_step_allocates(autocast, state):
    """int8: int8 Muon momentum; bf16: the records' bf16 bank gradients and momentum, and bf16 tables."""
    hp = dataclasses.replace(EVERYTHING, train_batch_tokens=8 * 32, weight_averaging="ema_swa",
                             muon_momentum_int8=state == "int8", muon_bf16_state=state == "bf16",
                             embed_bf16=state == "bf16")
    run = FakeRun(hp, autocast=autocast)
    estimate = T.estimate_memory(run, run.model, run.optimizers)
    params = list(run.model.parameters())
    assert estimate.weights == sum(p.numel() * p.element_size() for p in params)
    assert estimate.averages == 2 * sum(p.numel() * 4 for p in params)  # the averages are fp32
    assert (estimate.weights < estimate.averages / 2) == (state == "bf16")
    assert estimate.micro_batch_seqs == 8
    # Activations: the measured bytes autograd saves for a real 8-sequence micro-batch.
    measured = T.saved_activation_bytes(run.model, 8, hp.train_seq_len, hp.vocab_size, run.autocast, run.device)
    assert estimate.activations == pytest.approx(measured, rel=0.01)
    tokens = torch.randint(0, hp.vocab_size, (8, hp.train_seq_len + 1))
    with run.autocast():
        run.model(tokens[:, :-1], tokens[:, 1:]).backward()
    run.optimizers.step(lr_scale=1.0, momentum=0.9)
    actual = run.optimizers.muon.momentum_bytes() + run.optimizers.adam_state_bytes()
    assert actual == pytest.approx(estimate.optimizer, rel=0.02)


def test_the_muon_share_of_the_estimate_falls_with_the_world_size():
    hp = dataclasses.replace(EVERYTHING, train_batch_tokens=8 * 32)
    one, eight = (T.estimate_memory(fake, fake.model, fake.optimizers)
                  for fake in (FakeRun(hp), FakeRun(hp, world_size=8)))
    adam = 2 * sum(p.numel() * 4 for p in FakeRun(hp).optimizers.replicated)
    # Each rank keeps momentum for its share of whole matrices: a bank of n matrices is padded to a multiple of 8.
    padded = sum(b.grads.numel() for b in FakeRun(hp, world_size=8).optimizers.banks)
    assert eight.optimizer - adam == padded // 8 * 4
    assert one.optimizer - adam == sum(b.weights.numel() for b in FakeRun(hp).optimizers.banks) * 4
    assert eight.micro_batch_seqs == 1 and eight.activations < one.activations / 6
    # Parallel Muon's buffers: the reduce-scatter's shard (1/8 of the padded gradients) and the all-gather's
    # updates (all of them, in the update dtype: fp32 on the CPU), none on one rank.
    assert one.collectives == 0 and eight.collectives == padded // 8 * 4 + padded * 4
    assert eight.total == (eight.weights + eight.grads + eight.optimizer + eight.averages + eight.activations
                           + eight.collectives)


def test_the_measured_peak_is_logged_beside_the_estimate_and_warns_near_capacity(monkeypatch):
    # The CUDA allocator's statistics, stood in for on the CPU: 46 GiB allocated and 133 GiB reserved of 139 GiB.
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 46 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 133 * 2**30)
    properties = type("Properties", (), {"total_memory": 139 * 2**30})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    estimate = T.MemoryEstimate(weights=2**30, grads=2**30, optimizer=2**30, averages=0, activations=37 * 2**30,
                                micro_batch_seqs=48, collectives=0)
    lines = []
    advice = "out of device memory ...: set GRAD_ACCUM_STEPS=16"
    T.log_measured_memory(torch.device("cuda"), estimate, lines.append, advice)
    assert lines[0] == ("memory_measured: peak_allocated:47104MiB peak_reserved:136192MiB estimate:40960MiB "
                        "allocated/estimate:1.15 of device:142336MiB (warmup training steps)")
    assert lines[1].startswith("warning: the warmup's steps reserved over 95%")
    assert lines[1].endswith("GRAD_ACCUM_STEPS=16")
    lines.clear()
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 120 * 2**30)
    T.log_measured_memory(torch.device("cuda"), estimate, lines.append, "x: y")
    assert len(lines) == 1  # under 95%: no warning
    T.log_measured_memory(torch.device("cpu"), estimate, lines.append, "x: y")
    assert len(lines) == 1  # the CPU has no allocator statistics: nothing is claimed


def test_out_of_memory_names_the_setting_and_the_value_to_try():
    hp = dataclasses.replace(EVERYTHING, train_batch_tokens=16 * 32)
    advice = T.out_of_memory_advice(FakeRun(hp, world_size=2, grad_accum_steps=2))
    assert "set GRAD_ACCUM_STEPS=4 " in advice and "micro-batch of 4 sequences of 32 tokens" in advice
    assert "lower TRAIN_BATCH_TOKENS=512" in T.out_of_memory_advice(FakeRun(hp, world_size=8, grad_accum_steps=2))


def test_a_step_out_of_device_memory_stops_the_run_with_the_advice_and_the_weights(sample, tmp_path):
    # A device that runs out of memory at step 3: simulated by a micro-batch that raises torch.OutOfMemoryError.
    env = tiny_env(sample, RUN_ID="oom", GRAD_ACCUM_STEPS=1, TRAIN_BATCH_TOKENS=2048)
    code = (f"import sys, torch; sys.argv = [{SCRIPT!r}]; sys.path.insert(0, {str(REPO)!r}); import train_gpt as T\n"
            "original = T.accumulate_and_step\n"
            "def step(run, model, loader, index, *rest):\n"
            "    if index == 2: raise torch.OutOfMemoryError('CUDA out of memory (simulated)')\n"
            "    return original(run, model, loader, index, *rest)\n"
            "T.accumulate_and_step = step\n"
            "try:\n    T.main()\nexcept T.RunError as e:\n    sys.exit(f'error: {e}')\n")
    result = run_script([sys.executable, "-c", code], env, tmp_path)
    assert result.returncode == 1
    assert "set GRAD_ACCUM_STEPS=2 (the micro-batch halves" in result.stderr
    log = (tmp_path / "logs" / "oom.txt").read_text()
    assert "memory_estimate: per_gpu:" in log and "FINISH_FROM=" in log
    assert "saved_raw_weights:logs/oom_raw.pt step:2" in log


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCORES = ("final_int6_brotli_roundtrip_val_bpb", "final_sliding_window_val_bpb", "final_ttt_val_bpb")


def distributed_env(sample, run_id, grad_accum_steps, **overrides):
    # 8 sequences per step: one per rank and micro-step at every layout below; TTT batches 8 sequences too.
    return tiny_env(sample, RUN_ID=run_id, TRAIN_BATCH_TOKENS=2048, GRAD_ACCUM_STEPS=grad_accum_steps, EVAL_STRIDE=128,
                    TTT_ENABLED=1, TTT_CHUNK_TOKENS=10000, TTT_EPOCHS=1, TTT_BATCH_SEQS=8, NUM_LOOPS=1, LOOP_START=1,
                    LOOP_END=1, WARMDOWN_FRAC=0.5, **overrides)


def run_log(command, env, cwd, run_id):
    result = run_script(command, env, cwd, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return (cwd / "logs" / f"{run_id}.txt").read_text()


def run_logs_side_by_side(runs, cwd):
    """{run_id: (command, env)}, every run started at once -> {run_id: its log}. Inductor lowers a graph on one core,
    and CI's machine has two."""
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        logs = {run_id: pool.submit(run_log, command, env, cwd, run_id) for run_id, (command, env) in runs.items()}
    return {run_id: log.result() for run_id, log in logs.items()}


def assert_same_run(one, many):
    losses = lambda log: {int(s): float(v) for s, v in re.findall(r"^step:(\d+)/\d+ train_loss:([\d.]+)", log, re.M)}
    assert sorted(losses(one)) == sorted(losses(many)) == list(range(1, 7))
    for step, loss in losses(one).items():
        assert abs(loss - losses(many)[step]) <= 2e-4, (step, loss, losses(many)[step])
    summary = lambda log: json.loads(re.search(r"^summary_json: (.*)$", log, re.M).group(1))
    for metric in SCORES:
        assert summary(many)[metric] == pytest.approx(summary(one)[metric], rel=1e-4), metric


@pytest.fixture(scope="module")
def one_process(sample, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("one")
    return run_log([sys.executable, SCRIPT], distributed_env(sample, "ws1", 8), cwd, "ws1")


@pytest.mark.cuda_path
def test_eight_ranks_match_one_process_with_muon_sharded_over_eight(sample, tmp_path, one_process):
    env = distributed_env(sample, "ws8", 1)
    eight = run_log([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", SCRIPT],
                    env, tmp_path, "ws8")
    assert "world_size:8 grad_accum_steps:1" in eight and "threads:1(OMP_NUM_THREADS)" in eight
    assert_same_run(one_process, eight)
    hp, _ = T.Hyperparameters.from_env(env)
    model = T.GPT(hp)
    padded = sum(bank.grads.numel() for bank in T.Optimizers(model, hp, 0, 8).banks)  # whole matrices per rank
    assert f"muon_momentum_bytes_per_rank:{padded // 8 * 4} " in eight
    unsharded = sum(bank.weights.numel() for bank in T.Optimizers(T.GPT(hp), hp, 0, 1).banks) * 4
    assert f"muon_momentum_bytes_per_rank:{unsharded} " in one_process


@pytest.mark.cuda_path
def test_two_nodes_without_a_shared_disk_match_one_process_and_only_the_first_writes(sample, tmp_path, one_process):
    port, nodes = free_port(), []
    data_dir, tokenizer = sample
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        shutil.copytree(data_dir, cwd / "data")  # each node reads its own copy: nothing on disk is shared
        shutil.copy(tokenizer, cwd / "tokenizer.model")
        env = distributed_env(sample, "nodes", 2, DATA_PATH=str(cwd / "data"),
                              TOKENIZER_PATH=str(cwd / "tokenizer.model"), RECORD_DIR="record")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
                    f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=pg"]
        clean = {k: v for k, v in T.os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRESET")}
        nodes.append((cwd, subprocess.Popen(launcher + [SCRIPT], cwd=cwd, env={**clean, **env}, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    for cwd, process in nodes:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-3000:]
    first, second = nodes[0][0], nodes[1][0]
    log = (first / "logs" / "nodes.txt").read_text()
    assert "world_size:4 grad_accum_steps:2" in log
    assert_same_run(one_process, log)
    assert (first / "logs" / "nodes_model.int6.ptz").is_file() and (first / "record" / "train_seed1337.log").is_file()
    written = sorted(str(p.relative_to(second)) for p in second.rglob("*") if p.is_file() and "data" not in p.parts)
    assert written == ["tokenizer.model"], written  # the second node wrote nothing: no log, artifact or record


def compile_counts(log):
    return {phase: int(n) for phase, n in re.findall(r"^compile: after:(\w+) graphs:(\d+)$", log, re.M)}


def compared_runs(sample, tmp_path, **settings):
    """The same tiny run compiled with inductor (fullgraph, static shapes) and eager: (compiled log, eager log)."""
    runs = {}
    for compiled in ("1", "0"):
        env = {k: v for k, v in tiny_env(sample, RUN_ID=f"compile{compiled}", COMPILE=compiled, **settings).items()
               if v != "None"}  # a setting given as None is dropped from tiny_env's
        runs[f"compile{compiled}"] = ([sys.executable, SCRIPT], env)
    logs = run_logs_side_by_side(runs, tmp_path)
    return logs["compile1"], logs["compile0"]


def assert_compiled_matches_eager(compiled, eager, metrics):
    losses = lambda log: [float(v) for v in re.findall(r"^step:\d+/\d+ train_loss:([\d.]+)", log, re.M)]
    assert len(losses(compiled)) == len(losses(eager)) > 0
    for a, b in zip(losses(compiled), losses(eager)):  # inductor fuses and reorders float math: 1e-3 nats
        assert abs(a - b) <= 1e-3, (losses(compiled), losses(eager))
    summary = lambda log: json.loads(re.search(r"^summary_json: (.*)$", log, re.M).group(1))
    for metric in metrics:
        assert summary(compiled)[metric] == pytest.approx(summary(eager)[metric], abs=1e-3), metric


# The script with every torch.compile on dynamo's aot_eager backend: the graphs, their shapes and guards as inductor
# would see them, without inductor's compile time.
SCRIPT_ON_AOT_EAGER = [sys.executable, "-c",
                       f"import sys, torch; sys.argv = [{SCRIPT!r}]; sys.path.insert(0, {str(REPO)!r})\n"
                       "compile = torch.compile\n"
                       "torch.compile = lambda *args, **kwargs: compile(*args, **{**kwargs, 'backend': 'aot_eager'})\n"
                       "import train_gpt as T\nT.main()\n"]


def assert_every_graph_built_in_the_warmup(log):
    counts = compile_counts(log)
    assert set(counts) == {"warmup", "training", "evaluation"}, counts
    assert counts["warmup"] == counts["training"] == counts["evaluation"] > 0, counts
    assert not re.search(r"^warning: .* compiled after the warmup", log, re.M)


@pytest.mark.cuda_path
def test_both_compile_scopes_build_every_graph_in_the_warmup_and_train_as_eager(sample, tmp_path):
    # The default stack with inductor through every layout a run goes through: before and after the recurrence, QAT
    # switched on mid-run, MiLe's gamma and the LR changing every step, the validations at step 0 (unlooped) and
    # step 4 (looped), the evaluation graph (round trip, sliding windows, TTT's scoring) and TTT's adapting graph.
    # The warmup builds them all (training unlooped and looped, evaluation looped and, for the step-0 validation,
    # unlooped, TTT's train-mode graph); training and evaluation build none.
    settings = dict(ITERATIONS=8, WARMUP_STEPS=2, NUM_LOOPS=1, LOOP_START=1, LOOP_END=1, PARALLEL_RESIDUALS=1,
                    PARALLEL_START_LAYER=1, WARMDOWN_FRAC=0.5, QAT_START_LR_SCALE=0.5, MILE_GAMMA=1.1, EVAL_STRIDE=128,
                    TTT_ENABLED=1, TTT_CHUNK_TOKENS=10000, TTT_EPOCHS=1, TTT_BATCH_SEQS=4, VAL_LOSS_EVERY=4)
    envs = {scope: tiny_env(sample, RUN_ID=scope, COMPILE="0" if scope == "eager" else "1", **settings,
                            **({} if scope == "eager" else dict(COMPILE_SCOPE=scope)))
            for scope in ("block", "model", "eager")}
    logs = run_logs_side_by_side({scope: ([sys.executable, SCRIPT], env) for scope, env in envs.items()}, tmp_path)
    for scope in ("block", "model"):
        compiled = logs[scope]
        assert f"compile:True(scope:{scope})" in compiled and "qat: enabled" in compiled
        assert "recurrence: activated at step:3 " in compiled
        assert re.search(r"^step:0/8 val_loss:", compiled, re.M) and re.search(r"^step:4/8 val_loss:", compiled, re.M)
        assert_every_graph_built_in_the_warmup(compiled)
        assert_compiled_matches_eager(compiled, logs["eager"], SCORES)
    # An evaluation-only run builds its graphs before the evaluation clock: chunk TTT's training pass (8 rows) and a
    # phase's global SGD (4 rows) included.
    artifact = tmp_path / "logs" / "block_model.int6.ptz"
    env = evaluation_only_env(envs["block"], artifact, RUN_ID="evaluated", TTT_BATCH_SEQS="8",
                              PHASED_TTT_ENABLED="1", PHASED_TTT_PREFIX_DOCS="16", PHASED_TTT_NUM_PHASES="1",
                              GLOBAL_TTT_CHUNK_TOKENS="2048", GLOBAL_TTT_BATCH_SEQS="4")
    log = run_log(SCRIPT_ON_AOT_EAGER, env, tmp_path, "evaluated")  # the shapes and guards are the point
    assert "eval_only: artifact:" in log and "\nfinal_ttt_exact val_loss:" in log
    for rows in (8, 4):
        assert re.search(rf"^warmup_ttt_training: .* rows:{rows} ", log, re.M), rows
    counts = compile_counts(log)
    assert counts["warmup"] == counts["evaluation"] > 0 and "training" not in counts, counts
    assert not re.search(r"^warning: .* compiled after the warmup", log, re.M)



@pytest.mark.cuda_path
def test_packed_rows_build_their_training_and_global_sgd_graphs_in_the_warmup(sample, tmp_path):
    """TRAIN_ROWS=packed with phased chunk TTT (dynamo's aot_eager backend, the shapes and guards being the point):
    the training rows of 512 and the global SGD's 8 spans (rows of 2 sequences of 128, one per step) are compiled in
    the warmup, and nothing after it."""
    env = tiny_env(sample, RUN_ID="packed", COMPILE="1", WARMUP_STEPS="1", DOC_ISOLATION="1", TRAIN_ROWS="packed",
                   GRAD_ACCUM_STEPS="8", TRAIN_BATCH_TOKENS="4096", TRAIN_SEQ_LEN="128", ITERATIONS="3",
                   TTT_ENABLED="1", TTT_CHUNK_TOKENS="4096", TTT_EPOCHS="1", TTT_BATCH_SEQS="4",
                   PHASED_TTT_ENABLED="1", PHASED_TTT_PREFIX_DOCS="16", PHASED_TTT_NUM_PHASES="1",
                   GLOBAL_TTT_CHUNK_TOKENS="2048", GLOBAL_TTT_BATCH_SEQS="32")
    log = run_log(SCRIPT_ON_AOT_EAGER, env, tmp_path, "packed")
    assert re.search(r"^warmup_ttt_training: seq_len:128 rows:4 params:", log, re.M)  # chunk TTT: a row each
    assert re.search(r"^warmup_ttt_training: seq_len:256 rows:8 pieces:128 params:", log, re.M)
    assert re.search(r"^ttt_phase: 1/1 ", log, re.M) and "\nfinal_ttt_exact val_loss:" in log
    assert_every_graph_built_in_the_warmup(log)

# Each seed's stack at smoke size, small tables, through its export and its own evaluation: sliding windows, chunk TTT
# (pr754, pr703), per-document LoRA TTT with phases (record, pr2014). Nothing is compiled after the warmup: for pr2014,
# whose 4 steps take its schedule's pieces of 64, 128 (unlooped, then looped) and 256, neither. Every torch.compile of
# these runs is on dynamo's aot_eager backend: what is tested is which graphs dynamo builds and when (their shapes and
# guards), which inductor would only take minutes to lower on CI's two cores (the three seeds: 145 s, against 55 s;
# inductor's own lowering is tested on the default stack and neon213 below). Three layers (five with the loops) keep
# the records' dynamic-shape TTT trace short. The seeds run in the suite, the records in the CUDA-path step.
RECORD_COMPILE_SETTINGS = dict(NUM_LAYERS="3", LOOP_START="1", LOOP_END="1", PARALLEL_START_LAYER="2",
                               GLOBAL_TTT_CHUNK_TOKENS="2048", GLOBAL_TTT_BATCH_SEQS="4", TTT_CHUNK_SIZE="128",
                               TTT_BATCH_SIZE="16", SIZE_TARGET_BYTES="0")
PRESET_COMPILE_SETTINGS = {
    "record": RECORD_COMPILE_SETTINGS,
    "pr2014": dict(RECORD_COMPILE_SETTINGS, ITERATIONS="4", GRAD_ACCUM_STEPS="4",  # packed: a step's 4 spans
                   TTT_SHORT_SCORE_FIRST_STEPS="256:32,2000:64"),
    "pr754": dict(BIGRAM_BUCKETS="64", BIGRAM_DIM="16", VE_DIM="16", TTT_CHUNK_TOKENS="16384", TTT_EPOCHS="1",
                  TTT_BATCH_SEQS="4"),
    "pr703": dict(BIGRAM_BUCKETS="64", BIGRAM_DIM="16", VE_DIM="16", TTT_CHUNK_TOKENS="16384", TTT_EPOCHS="1",
                  TTT_BATCH_SEQS="4"),
    "pr1392": dict(VE_DIM="16"),
}
# The scores each seed's run ends with, besides its round trip; pr1392 calibrates on sequences it generates.
PRESET_EVALUATIONS = {"pr754": ["final_sliding_window", "final_ttt"], "pr703": ["final_sliding_window", "final_ttt"],
                      "pr1392": ["final_sliding_window"]}
# The precision of state each preset's script has (MUON_BF16_STATE, MUON_MOMENTUM_INT8, EMBED_BF16): the 04-04 record
# under pr1392 keeps fp32 bank gradients and momentum; every one of them leaves its token tables in bf16.
PRESET_STATE = {"record": "grads:bf16 momentum:bf16 tables:bf16", "pr2014": "grads:bf16 momentum:bf16 tables:bf16",
                "pr754": "grads:bf16 momentum:bf16 tables:bf16",
                "pr703": "grads:bf16 momentum:int8 tables:bf16", "pr1392": "grads:fp32 momentum:fp32 tables:bf16"}


@pytest.mark.parametrize("preset", [pytest.param(name, marks=pytest.mark.cuda_path) for name in ("record", "pr2014")]
                         + ["pr1392", "pr703", "pr754"])
def test_each_preset_compiles_every_graph_in_the_warmup(preset, sample, caseops_sample, tmp_path):
    a_record = preset in ("record", "pr2014")
    data_dir, tokenizer = caseops_sample[:2] if a_record else sample
    env = dict(PRESET=f"{preset},smoke", DATA_PATH=str(data_dir), TOKENIZER_PATH=str(tokenizer), ITERATIONS="3",
               MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_BATCH_TOKENS="1024", GRAD_ACCUM_STEPS="1",
               WARMUP_STEPS="1", RUN_ID="compiled", COMPILE="1", COMPILE_SCOPE="block", EVAL_STRIDE="256")
    env.update(PRESET_COMPILE_SETTINGS[preset])  # block: a fraction of the compile time; both scopes are tested above
    log = run_log(SCRIPT_ON_AOT_EAGER, env, tmp_path, "compiled")
    assert "compile:True(scope:block)" in log and "\nfinal_" in log
    assert re.search(rf"^optimizer: .* {PRESET_STATE[preset]} ", log, re.M)
    assert_every_graph_built_in_the_warmup(log)
    if preset in PRESET_EVALUATIONS:  # through the seed's export and its own evaluation
        export = T.export_name(T.Hyperparameters.from_env({"PRESET": f"{preset},smoke"})[0])
        for name in [f"final_{export}_roundtrip"] + PRESET_EVALUATIONS[preset]:
            assert f"\n{name}_exact val_loss:" in log, name
    if preset == "pr1392":
        assert "gptq_calibration: self_generated seqs:8 seq_len:128" in log
    if a_record:  # the per-document TTT forward is built in the warmup, before the phases run
        where = lambda line: re.search(rf"^{line}", log, re.M).start()
        assert where(r"ttt_lora: compiled \(dynamic shapes\)") < where("warmup:done")
        assert f"ttt_phase: {'3/3' if preset == 'record' else '1/1'}" in log
    if preset == "pr2014":
        assert re.findall(r"^growth_stage:seq_len:(\d+) ", log, re.M) == ["64", "128", "256"]


@pytest.mark.cuda_path
def test_neon213_grows_its_kernels_under_inductor_without_a_recompile(sample, tmp_path):
    compiled, eager = compared_runs(sample, tmp_path, PRESET="neon213,smoke", ITERATIONS=8, WARMUP_STEPS=1,
                                    CONV_K=5, MLP_CONV_K=3, KERNEL_SCHEDULE="1@0,3@0.5,5@0.75",
                                    GPTQ_CALIBRATION_BATCHES=None, SIZE_TARGET_BYTES=None)  # fp16: no GPTQ, no k
    assert "kernel_growth: taps:3 at step:4 " in compiled and "kernel_growth: taps:5 at step:6 " in compiled
    assert compile_counts(compiled) == dict(warmup=2, training=2, evaluation=2)  # train and evaluation graphs only
    assert_compiled_matches_eager(compiled, eager, ["final_fp16_brotli_roundtrip_val_bpb"])


@pytest.mark.cuda_path
def test_the_prepared_gpu_check_runs_its_cpu_miniature(sample, tmp_path, capsys, monkeypatch):
    data_dir, tokenizer = sample
    out = tmp_path / "gpu_check.md"
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--data-path", str(data_dir),
               "--tokenizer-path", str(tokenizer), "--out", str(out), "--benchmark-steps", "2"]
    result = run_script(command, {}, tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    assert table in result.stdout and "FAILED" not in table
    for row in ("| device | cpu |", "| attention fa3 | not available here |", "| attention sdpa vs sdpa (fwd+bwd) |",
                "| attention sdpa over packed documents vs sdpa (fwd+bwd) |", "| attention fa2 over packed documents |",
                "| attention flex over packed documents | not available here |",
                "| document block mask, one packed row of 1,024 tokens | ",
                "create_block_mask's at 512 tokens: equal |",
                "| default stack, COMPILE_SCOPE=block: first step, looping:True (compile) |",
                "| default stack, COMPILE_SCOPE=block: untimed warmup |",
                "| default stack, COMPILE_SCOPE=block: graphs after warmup / training / evaluation |",
                "| default stack, COMPILE_SCOPE=block: memory per GPU |",
                "| GPTQ calibration against its reserve |", "| quantization |", "| artifact | bytes_code:",
                "| evaluation: round trip | val_bpb ", "| evaluation: sliding window | val_bpb ",
                "| evaluation: chunk TTT on the artifact | val_bpb ",
                "| evaluation: PRESET=record's TTT (lora, phased) on the artifact | val_bpb ",
                "| default stack, COMPILE_SCOPE=block: looping:False |",
                "| default stack, COMPILE_SCOPE=model: looping:True |",
                "| default stack + FUSED_CE_ENABLED=1: what ran | the same math unfused",
                "| default stack + FUSED_CE_ENABLED=1, COMPILE_SCOPE=block: looping:True |",
                "| default stack + FUSED_MLP_ENABLED=1: what ran | the same math unfused",
                "| default stack + ADAMW_SIDE_STREAM=1: what ran | main |",
                "| fused kernels | not available here (Triton does not drive cpu) |",
                "| profile, default stack: looping:True | ", "| profile, looping:True: kernel 1 | ",
                "| PRESET=pr754 at the record's batch: looping:False | ",
                "| PRESET=record FUSED_CE_ENABLED=0 FUSED_MLP_ENABLED=1 ADAMW_SIDE_STREAM=1 (sp1024 data), "
                "DOC_ISOLATION: looping:True | ",
                "| PRESET=record FUSED_CE_ENABLED=0 FUSED_MLP_ENABLED=1 ADAMW_SIDE_STREAM=1: what FUSED_MLP_ENABLED "
                "ran | the same math unfused",
                "| PRESET=pr754 at the record's batch, MUON_BF16_STATE=0 EMBED_BF16=0: looping:False | ",
                "| default stack + ADAMW_SIDE_STREAM=1, COMPILE_SCOPE=block: looping:True |",
                "| PRESET=record (sp1024 data), DOC_ISOLATION: looping:True |", "| PRESET=baseline: looping:False |",
                "| PRESET=record TRAIN_ROWS=packed | not run in the CPU miniature |",
                "| PRESET=pr2014 (sp1024 data), DOC_ISOLATION: looping:False pieces:32 |",
                "| PRESET=pr2014 (sp1024 data), DOC_ISOLATION: looping:True pieces:128 |"):
        assert row in table, row
    # Each TTT is held to the whole evaluation clock of the runs that use it: chunk TTT's (pr754's) has the sliding
    # pass, LoRA TTT's (PRESET=record's) has none.
    ttt_total = r"\| evaluation: {} on the artifact \| .* with the artifact's read \([\d.]+ s\) and {}: \d+ s \|"
    assert re.search(ttt_total.format("chunk TTT", "the round trip and the sliding pass"), table)
    assert re.search(ttt_total.format(re.escape("PRESET=record's TTT (lora, phased)"), "the round trip"), table)
    # PRESET=record's TTT ran: its three phases, their prefix scaled to this split's documents, kept apart.
    ttt_log = (tmp_path / "gpu_check_runs" / "logs" / "check_ttt_lora.txt").read_text()
    documents, prefix = map(int, re.search(r"^ttt_phased: total_docs:(\d+) prefix_docs:(\d+) .* num_phases:3 ",
                                           ttt_log, re.M).groups())
    assert prefix == max(round(documents * 2500 / 50000), 3)
    assert re.search(r"^features: .* doc_isolation\b", ttt_log, re.M)
    # Every row is in the file as soon as it is measured; a phase that no longer fits the budget is listed, not run.
    skipped = tmp_path / "skipped.md"
    result = run_script(command[:-4] + ["--out", str(skipped), "--budget-seconds", "0"], {}, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| device | cpu |" in skipped.read_text() and skipped.read_text().count("| SKIPPED |") == 15
    # --phases: a subset, the rest not run; a name that is not a phase is refused before anything runs.
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    result = run_script(command[:-4] + ["--out", str(skipped), "--budget-seconds", "0", "--phases",
                                        "profile_rows,end_to_end"], {}, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.findall(r"^\| (\w+) \| not measured", skipped.read_text(), re.M) == ["end_to_end", "profile_rows"]
    gpu_check = importlib.import_module("gpu_check")
    with pytest.raises(SystemExit, match="2"):
        gpu_check.parse_args(command[2:-4] + ["--phases", "profile"])
    assert "--phases: profile not among attention, fused_kernels, end_to_end" in capsys.readouterr().err
