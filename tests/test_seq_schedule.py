"""TRAIN_SEQ_SCHEDULE (PR #2014's progressive training length): with TRAIN_ROWS=packed, each step's longest
document piece follows the schedule's stages, as PR #2014 chooses them; a change re-warms the optimizers' LR
(SEQ_CHANGE_WARMUP_STEPS); the warmup builds every shape the run meets; bad schedules are refused."""

import re

import pytest
import torch

import train_gpt as T
from conftest import set_run_env, tiny_env

PR2014_SCHEDULE = "1024@0.100,2048@0.700,3072@1.000"
PACKED = {"DOC_ISOLATION": "1", "TRAIN_ROWS": "packed"}


def record_plan(schedule):
    """PR #2014's parse, restated: `L@share` items sorted by share alone (ties keep their order), a last share
    below 1 extended to 1."""
    plan = []
    for item in filter(None, (raw.strip() for raw in schedule.split(","))):
        length, share = item.split("@", 1)
        plan.append((float(share), int(length)))
    plan.sort(key=lambda stage: stage[0])
    return plan + ([(1.0, plan[-1][1])] if plan[-1][0] < 1.0 else [])


def record_length(plan, step, iterations, elapsed_ms, max_wallclock_ms, mode):
    """PR #2014's choice, restated: the share of training done (of the wall clock less the GPTQ reserve, or of the
    iterations in step mode or without a cap), clamped to [0, 1]; the first stage whose share is at or above it."""
    if mode == "step" or not max_wallclock_ms:
        done = min(max(step / max(iterations, 1), 0.0), 1.0)
    else:
        done = min(max(elapsed_ms / max_wallclock_ms, 0.0), 1.0)
    for share, length in plan:
        if done <= share:
            return length
    return plan[-1][1]


def hp_of(**env):
    return T.Hyperparameters.from_env({**PACKED, **{k: str(v) for k, v in env.items()}})[0]


@pytest.mark.parametrize("schedule", [PR2014_SCHEDULE, "3072@0.5,1024@0.25", "512@0.3,3072@0.3,1024@0.6"])
@pytest.mark.parametrize("mode", ["wallclock", "step"])
def test_each_step_takes_the_stage_pr2014_takes(schedule, mode):
    hp = hp_of(TRAIN_SEQ_LEN=3072, TRAIN_SEQ_SCHEDULE=schedule, TRAIN_SEQ_SCHEDULE_MODE=mode, ITERATIONS=1000,
               MAX_WALLCLOCK_SECONDS=600, GPTQ_RESERVE_SECONDS=4)
    plan = record_plan(schedule)
    assert hp.train_seq_stages == plan
    budget_ms = 1000 * (600 - 4)
    lengths = set()
    for step, elapsed_ms in [(s, s * 700.0) for s in range(0, 1000, 7)] + [(999, 596_000), (999, 596_001)]:
        expected = record_length(plan, step, 1000, elapsed_ms, budget_ms, mode)
        assert T.piece_len_due(hp, step, elapsed_ms) == expected, (step, elapsed_ms)
        lengths.add(expected)
    assert lengths == {record_length(plan, s, 1000, 0, 0, "step") for s in range(1000)}  # every stage taken
    uncapped = hp_of(TRAIN_SEQ_LEN=3072, TRAIN_SEQ_SCHEDULE=schedule, ITERATIONS=100, MAX_WALLCLOCK_SECONDS=0)
    for step in range(100):  # no cap: shares of ITERATIONS in either mode
        assert T.piece_len_due(uncapped, step, 1e9) == record_length(plan, step, 100, 1e9, 0, "wallclock")


def test_without_a_schedule_every_step_takes_train_seq_len():
    hp = hp_of(TRAIN_SEQ_LEN=256)
    assert hp.train_seq_stages == [] and hp.piece_len == 256
    assert {T.piece_len_due(hp, step, step * 1000.0) for step in range(0, 20000, 97)} == {256}
    assert T.training_shapes(hp, False) == [(256, False), (256, True)]


def test_the_lr_rewarms_after_a_change_as_in_pr2014():
    hp = hp_of(TRAIN_SEQ_LEN=3072, TRAIN_SEQ_SCHEDULE=PR2014_SCHEDULE, SEQ_CHANGE_WARMUP_STEPS=32)
    steps = (100, 101, 115, 130, 131, 500)
    assert [T.lr_rewarm(hp, step, 100) for step in steps] == [1 / 32, 2 / 32, 16 / 32, 31 / 32, 1.0, 1.0]
    assert T.lr_rewarm(hp, 7, None) == 1.0  # no change yet (or the first stage's, at step 0)
    off = hp_of(TRAIN_SEQ_LEN=3072, TRAIN_SEQ_SCHEDULE=PR2014_SCHEDULE)
    assert T.lr_rewarm(off, 100, 100) == 1.0


def test_the_warmup_builds_each_stage_in_the_layouts_it_can_meet():
    """PR #2014's COMPILE_SHAPE_WARMUP_LOOP_MODES=auto: its schedule with the recurrence from 0.35 of training."""
    hp = hp_of(TRAIN_SEQ_LEN=3072, TRAIN_SEQ_SCHEDULE=PR2014_SCHEDULE, LOOP_ENABLE_AT=0.35)
    assert T.training_shapes(hp, False) == [(1024, False), (2048, False), (2048, True), (3072, True)]
    assert T.training_shapes(hp, True) == [(1024, True), (2048, True), (3072, True)]
    # The recurrence on another clock (a step, or the schedule in steps under a cap): each stage in both layouts.
    for other_clock in ({"LOOP_ENABLE_AT": 3000}, {"LOOP_ENABLE_AT": 0.35, "TRAIN_SEQ_SCHEDULE_MODE": "step"}):
        hp = hp_of(TRAIN_SEQ_LEN=3072, TRAIN_SEQ_SCHEDULE=PR2014_SCHEDULE, **other_clock)
        assert len(T.training_shapes(hp, False)) == 6


@pytest.mark.parametrize("env, match", [
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,2048"}, "length@share"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0,2048@1"}, r"shares in \(0, 1\]"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,2048@1.5"}, r"shares in \(0, 1\]"),
    ({"TRAIN_SEQ_SCHEDULE": "0@0.5,2048@1"}, "positive"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,3072@1"}, "TRAIN_SEQ_LEN=2048"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,2048@1", "TRAIN_ROWS": "seq"}, "unless TRAIN_ROWS=packed"),
    ({"SEQ_CHANGE_WARMUP_STEPS": "32"}, "unless TRAIN_SEQ_SCHEDULE"),
    ({"TRAIN_SEQ_SCHEDULE_MODE": "step"}, "unless TRAIN_SEQ_SCHEDULE"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,2048@1", "TRAIN_SEQ_SCHEDULE_MODE": "steps"}, "choose wallclock or step"),
    ({"COMPILE_SHAPE_WARMUP": "0"}, "always builds every training shape"),
    ({"COMPILE_SHAPE_WARMUP_ITERS": "3"}, "set WARMUP_STEPS"),
    ({"COMPILE_SHAPE_WARMUP_LOOP_MODES": "both"}, r"layouts it can meet \(auto\)"),
    ({"EVAL_INCLUDE_TAIL": "0"}, "the tail included"),
    ({"ASYM_LOGIT_RESCALE": "maybe"}, "not a valid bool"),
])
def test_a_schedule_or_a_pr2014_switch_that_cannot_be_honoured_is_refused(env, match):
    with pytest.raises(T.ConfigError, match=match):
        T.Hyperparameters.from_env({**PACKED, **env})


def test_pr2014s_switches_for_what_runs_here_are_accepted():
    env = dict(PACKED, TRAIN_SEQ_LEN="3072", ROPE_TRAIN_SEQ_LEN="3072", TRAIN_SEQ_SCHEDULE=PR2014_SCHEDULE,
               TRAIN_SEQ_SCHEDULE_MODE="wallclock", SEQ_CHANGE_WARMUP_STEPS="32", COMPILE_SHAPE_WARMUP="1",
               COMPILE_SHAPE_WARMUP_ITERS="1", COMPILE_SHAPE_WARMUP_LOOP_MODES="auto", EVAL_INCLUDE_TAIL="1",
               ASYM_LOGIT_RESCALE="1")
    hp, _ = T.Hyperparameters.from_env(env)
    assert hp == T.Hyperparameters.from_env({k: v for k, v in env.items() if not k.startswith(
        ("COMPILE_SHAPE", "EVAL_INCLUDE", "ASYM"))})[0]


def test_a_packed_row_is_rescaled_by_its_longest_piece_not_its_length():
    """ROPE_TRAIN_SEQ_LEN with TRAIN_ROWS=packed: attention reaches a piece, so pieces within it rotate as
    trained, and a longer piece rescales by its own length, whatever the row's."""
    x = torch.randn(1, 4096, 1, 64)
    rotary = T.Rotary(16, 10000.0, 2048, rescale_above=1024)
    assert torch.equal(rotary(x, reach=1024), T.Rotary(16, 10000.0, 4096)(x))
    assert torch.equal(rotary(x, reach=2048), T.Rotary(16, 10000.0 * 2 ** (16 / 14), 4096)(x))
    assert not torch.equal(rotary(x), rotary(x, reach=2048))  # the whole row: rescaled by 4096


def test_a_run_follows_the_schedule_and_warms_up_every_shape_it_meets(sample, tmp_path, monkeypatch):
    """In-process, with every packed forward's piece length and every LR factor recorded: the warmup builds the
    four shapes of `32@0.34,64@0.67,128@1` with the recurrence from half of the 6 steps; training takes 32, 32,
    32, 64, 64, 128 (shares of ITERATIONS), with the LR at half on each change's step (SEQ_CHANGE_WARMUP_STEPS=2);
    GPTQ's calibration reads the last stage's pieces; the logged MFU counts each step at its shape."""
    pieces, lr_scales = [], []
    original_documents, original_step = T.packed_documents, T.Optimizers.step

    def recorded_documents(input_ids, bos_id, cu_seqlens=None, block_mask=False, piece_len=0):
        if input_ids.shape == (1, 512):  # a training row: 4 sequences of 128 per micro-batch
            pieces.append(piece_len)
        return original_documents(input_ids, bos_id, cu_seqlens, block_mask, piece_len)

    def recorded_step(self, lr_scale, momentum):
        lr_scales.append(lr_scale)
        return original_step(self, lr_scale, momentum)

    def recorded_throughput(run, net, clock, step_avg_ms):
        counted.update(clock.shapes)
        return original_throughput(run, net, clock, step_avg_ms)
    counted, original_throughput = {}, T.throughput
    monkeypatch.setattr(T, "packed_documents", recorded_documents)
    monkeypatch.setattr(T.Optimizers, "step", recorded_step)
    monkeypatch.setattr(T, "throughput", recorded_throughput)
    env = tiny_env(sample, **PACKED, RUN_ID="schedule", GRAD_ACCUM_STEPS=8, TRAIN_BATCH_TOKENS=4096,
                   TRAIN_SEQ_LEN=128, TRAIN_SEQ_SCHEDULE="32@0.34,64@0.67,128@1", TRAIN_SEQ_SCHEDULE_MODE="step",
                   SEQ_CHANGE_WARMUP_STEPS=2, ROPE_TRAIN_SEQ_LEN=128, NUM_LOOPS=1, LOOP_START=1, LOOP_END=1,
                   LOOP_ENABLE_AT=0.5, WARMUP_STEPS=6, GPTQ_CALIBRATION_BATCHES=2)
    set_run_env(monkeypatch, env, tmp_path)
    T.main()
    log = (tmp_path / "logs" / "schedule.txt").read_text()
    warmup = re.findall(r"^warmup_step:\d+/6 looping:(\w+) pieces:(\d+) ", log, re.M)
    shapes = [("False", "32"), ("False", "64"), ("True", "64"), ("True", "128")]  # 6 steps among 4, in order
    assert warmup == [shapes[step * 4 // 6] for step in range(6)]
    training = [32, 32, 32, 64, 64, 128]
    micro_batches = lambda lengths: [length for length in lengths for _ in range(8)]
    assert pieces == micro_batches([int(p) for _, p in warmup]) + micro_batches(training) + [128] * 16
    assert lr_scales == [1.0] * 6 + [1.0, 1.0, 1.0, 0.5, 1.0, 0.5]
    assert re.search(r"^features: .* doc_isolation\(packed_rows,pieces:32@0\.34/64@0\.67/128@1\)$", log, re.M)
    assert re.search(r"^growth_stage:seq_len:32 progress:0\.000 step:0$", log, re.M)
    assert re.search(r"^growth_stage:seq_len:64 progress:0\.500 step:3$", log, re.M)
    assert re.search(r"^growth_stage_rewarmup:start step:3 steps:2 seq_len:64$", log, re.M)
    assert re.search(r"^growth_stage_rewarmup:start step:5 steps:2 seq_len:128$", log, re.M)
    assert re.search(r"^recurrence: activated at step:3 ", log, re.M)
    met = {(length, step >= 3) for step, length in enumerate(training)}
    assert met <= {(int(p), looping == "True") for looping, p in warmup}  # nothing left to build on the clock
    assert counted == {(False, 32): 3, (True, 64): 2, (True, 128): 1}  # the steps the logged MFU counts, by shape


def test_benchmark_mode_times_each_stage_of_the_schedule(sample, tmp_path, monkeypatch):
    env = tiny_env(sample, **PACKED, RUN_ID="bench_schedule", GRAD_ACCUM_STEPS=8, TRAIN_BATCH_TOKENS=4096,
                   TRAIN_SEQ_LEN=128, TRAIN_SEQ_SCHEDULE="32@0.34,64@0.67,128@1", NUM_LOOPS=1, LOOP_START=1,
                   LOOP_END=1, BENCHMARK_STEPS=1)
    set_run_env(monkeypatch, env, tmp_path)
    T.main()
    log = (tmp_path / "logs" / "bench_schedule.txt").read_text()
    timed = re.findall(r"^benchmark: looping:(\w+) steps:1 ms_per_step:[\d.]+ tokens_per_s_per_gpu:\d+ pieces:(\d+)$",
                       log, re.M)
    assert timed == [(looping, length) for length in ("32", "64", "128") for looping in ("False", "True")]
