"""Trust: every setting is honoured or refused before training, runs never mix, and no signal, NaN, bad shard,
failed write or hostile artifact loses the trained weights or turns into a score."""

import collections
import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import make
import train_gpt as T
from prepare_docs import write_shard
from conftest import REPO, evaluation_only_env, run_script, set_run_env, tiny_env

SCRIPT = str(REPO / "train_gpt.py")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, name", [
    ({"ITERATION": "5"}, "ITERATIONS"),  # typos of ours: refused with the name to use
    ({"NUM_LAYER": "3"}, "NUM_LAYERS"),
    ({"MATRIX_LRR": "0.1"}, "MATRIX_LR"),
    ({"WARMDOWN_FRACT": "0.5"}, "WARMDOWN_FRAC"),
    ({"LQER_ASYM_GROUP": "64"}, "LQER_ASYM_GROUP"),  # names of the records with no same-meaning setting here
    ({"XSA_LAST_N": "4", "XSA_LAYERS": "all"}, "XSA_LAYERS"),  # a record's name and ours for one setting
    ({"TTT_FREEZE_BLOCKS": "2"}, "TTT_PARAMS"),  # a record's value with no equivalent here
    ({"EMA_ENABLED": "0"}, "WEIGHT_AVERAGING"),  # a name the records give different meanings
    ({"SWA_ENABLED": "1"}, "WEIGHT_AVERAGING"),
    ({"VE_ENABLED": "1"}, "VE_LAYERS"),
    ({"EVAL_ONLY_QUANTIZED_PATH": "m.ptz", "SEEDS": "1 2"}, "SEEDS"),
    ({"TTT_EVAL_ONLY": "1", "TTT_ENABLED": "1", "TTT_METHOD": "lora"}, "EVAL_ONLY_QUANTIZED_PATH"),
    ({"TTT_CHUNK_SIZE": "48"}, "TTT_METHOD=lora"),
    ({"PHASED_TTT_NUM_PHASES": "3"}, "PHASED_TTT_NUM_PHASES"),
    ({"MUON_WD": "0.1", "MUON_WEIGHT_DECAY": "0.1"}, "MUON_WEIGHT_DECAY"),  # an alias and its setting together
    ({"WARMDOWN_ITERS": "3500", "WARMDOWN_FRAC": "0.5"}, "WARMDOWN_ITERS"),  # two forms of one setting
    ({"PRESET": "baseline", "WARMDOWN_FRAC": "0.5"}, "WARMDOWN_FRAC"),
    ({"MATRIX_LR": "nan"}, "MATRIX_LR"),  # non-finite
    ({"SCALAR_LR": "inf"}, "SCALAR_LR"),
    ({"MAX_WALLCLOCK_SECONDS": "inf"}, "MAX_WALLCLOCK_SECONDS"),
    ({"MATRIX_LR": "-1"}, "MATRIX_LR"),  # out of range
    ({"TTT_LR": "-0.1"}, "TTT_LR"),
    ({"BETA1": "1.5"}, "BETA1"),
    ({"BETA2": "1"}, "BETA2"),
    ({"MUON_MOMENTUM": "1.0"}, "MUON_MOMENTUM"),
    ({"ADAM_EPS": "0"}, "ADAM_EPS"),
    ({"WARMDOWN_ITERS": "-5"}, "WARMDOWN_ITERS"),
    ({"EMA_DECAY": "1.2"}, "EMA_DECAY"),
    ({"TTT_LR": "0.1"}, "TTT_ENABLED=1"),  # a setting that its switch leaves without effect
    ({"NUM_LOOPS": "0", "LOOP_START": "1"}, "LOOP_START"),
    ({"GPTQ": "0", "GPTQ_DAMP": "0.1"}, "GPTQ=1"),
    ({"TTT_ENABLED": "1", "TTT_METHOD": "chunk", "TTT_LORA_RANK": "4"}, "TTT_METHOD=lora"),
    ({"TTT_ENABLED": "1"}, "TTT_METHOD=chunk or TTT_METHOD=lora"),  # the records' TTT_ENABLED=1 names two methods
    ({"TTT_ENABLED": "1", "TTT_EPOCHS": "2", "TTT_LORA_RANK": "4"}, "TTT_METHOD"),  # settings of both methods
    ({"TTT_ENABLED": "1", "TTT_METHOD": "lora", "PHASED_TTT_ENABLED": "1", "GLOBAL_TTT_RESPECT_DOC_BOUNDARIES": "1"},
     "DOC_ISOLATION"),
    ({"EVAL_STRIDE": "0", "EVAL_DOC_ISOLATED": "1"}, "EVAL_STRIDE > 0 and TTT_EVAL_ONLY=0, or TTT_ENABLED=1 and "
                                                     "TTT_METHOD=chunk"),
    ({"EVAL_ONLY_QUANTIZED_PATH": "a.ptz", "TTT_EVAL_ONLY": "1", "TTT_ENABLED": "1", "TTT_METHOD": "lora",
      "EVAL_DOC_ISOLATED": "1"}, "EVAL_DOC_ISOLATED"),  # TTT alone: no sliding pass
    ({"PRESET": "record", "EVAL_DOC_ISOLATED": "1"}, "EVAL_DOC_ISOLATED"),  # the preset has no sliding pass
    ({"PRESET": "record", "TTT_EVAL_SEQ_LEN": "32"}, "TTT_EVAL_SEQ_LEN=32: .* largest chunk, 48"),  # a window each
    ({"PRESET": "pr2014", "TTT_EVAL_SEQ_LEN": "0", "EVAL_SEQ_LEN": "0", "TRAIN_SEQ_LEN": "32",
      "TRAIN_SEQ_SCHEDULE": "32@1.0"}, "TRAIN_SEQ_LEN=32: .* largest chunk, 48"),
    ({"PRESET": "pr2014", "TTT_CHUNK_SIZE": "16", "TTT_SHORT_SCORE_FIRST_STEPS": "256:8,2000:64",
      "TTT_EVAL_SEQ_LEN": "48"}, "TTT_EVAL_SEQ_LEN=48: .* largest chunk, 64"),  # a short documents' chunk
    ({"QUANT_CLIP": "rowmax", "CLIP_K_MLP": "10"}, "QUANT_CLIP=sdclip"),
    ({"ATTN_GATE": "none", "SMEAR_GATE": "0", "GATE_WINDOW": "8"}, "GATE_WINDOW=8 has no effect"),  # no gate reads it
    ({"SMEAR_GATE_FORM": "blend", "ATTN_GATE": "head", "GATE_WINDOW": "8"}, "GATE_WINDOW=8 has no effect"),
    ({"TIE_EMBEDDINGS": "0", "TIED_EMBED_INIT_STD": "0.1"}, "TIED_EMBED_INIT_STD=0.1 has no effect"),
    ({"QAT_START_LR_SCALE": "0.2", "WARMDOWN_FRAC": "0"}, "QAT never starts"),  # no warmdown: the LR scale stays 1
    ({"WEIGHT_AVERAGING": "swa", "WARMDOWN_FRAC": "0"}, "SWA never starts"),
    ({"WEIGHT_AVERAGING": "ema_swa", "MIN_LR_SCALE": "0.5"}, "SWA_START_LR_SCALE=0.2: must be above MIN_LR_SCALE"),
    ({"PRESET": "pr754", "GPTQ": "1", "GPTQ_EMBED": "0"}, "GPTQ_EMBED=0 has no effect"),  # its tables are fp16
    ({"RUN_ID": "../x"}, "RUN_ID"),  # a name, never a path
    ({"RUN_ID": "a/b"}, "RUN_ID"),
])
def test_a_bad_setting_is_refused_naming_the_variable(env, name):
    with pytest.raises(T.ConfigError, match=name):
        T.Hyperparameters.from_env(env)


def test_a_start_scale_is_checked_only_where_its_technique_runs():
    """SWA's start scale is SWA's: a floor above it refuses SWA, not the default stack, which runs no SWA."""
    assert T.Hyperparameters.from_env({"MIN_LR_SCALE": "0.5"})[0].min_lr_scale == 0.5
    assert T.Hyperparameters.from_env({"PRESET": "neon213", "WEIGHT_AVERAGING": "swa"})[0].kernel_stage_restarts


def test_aliases_apply_with_the_records_meaning_and_say_so():
    hp, sources = T.Hyperparameters.from_env({"MUON_WD": "0.04", "MATRIX_BITS": "5", "SMEAR_GATE_ENABLED": "0"})
    assert (hp.muon_weight_decay, hp.quant_bits, hp.smear_gate) == (0.04, 5, False)
    assert sources["muon_weight_decay"] == "env:MUON_WD(alias)"
    for alias, field in T.SETTING_ALIASES.items():  # every alias points at one of ours
        assert field in {f.name for f in T.dataclasses.fields(T.Hyperparameters)}, alias


def test_a_switched_off_setting_is_checked_only_when_set_explicitly():
    fields = {f.name: f for f in T.dataclasses.fields(T.Hyperparameters)}
    default = vars(T.Hyperparameters())
    for field in fields.values():  # every switch names settings, so its condition can be evaluated
        if field.metadata.get("needs"):
            T.switched_on(default, field.metadata["needs"])
    # The choices declared beside a field are the ones the code has.
    for name, table in (("compressor", [*T.COMPRESSORS, "pergroup"]), ("muon_orthogonalizer", T.ORTHOGONALIZERS),
                        ("attn_gate", T.ATTENTION_GATES), ("pergroup_codec", [*T.STREAM_CODECS, "smallest"])):
        assert set(fields[name].metadata["check"].split("|")) == set(table), name
    on = default | dict(bigram_buckets=0, ve_layers="1")
    assert T.switched_on(on, "BIGRAM_BUCKETS > 0 or VE_LAYERS") and not T.switched_on(default, "VE_LAYERS")
    assert T.switched_on(default, "WEIGHT_AVERAGING=ema or ema_swa") and not T.switched_on(default, "TIE_EMBEDDINGS=0")
    chunk_at_stride_0 = default | dict(eval_stride=0, ttt_enabled=True, ttt_method="chunk")
    either = "EVAL_STRIDE > 0, or TTT_ENABLED=1 and TTT_METHOD=chunk"  # alternatives
    assert T.switched_on(default, either) and T.switched_on(chunk_at_stride_0, either)
    assert not T.switched_on(chunk_at_stride_0 | dict(ttt_method="lora"), either)
    T.Hyperparameters.from_env({"EVAL_STRIDE": "0", "EVAL_DOC_ISOLATED": "1", "TTT_ENABLED": "1",
                                "TTT_METHOD": "chunk"})
    # the preset's LOOP_START is not the user's
    hp, _ = T.Hyperparameters.from_env({"PRESET": "smoke", "NUM_LOOPS": "0"})
    assert hp.num_loops == 0
    T.Hyperparameters.from_env({"TTT_ENABLED": "1", "TTT_LORA_RANK": "4", "TTT_WEIGHT_DECAY": "0.5"})


def test_unrelated_variables_are_left_alone():
    env = {"PATH": "/bin", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "0", "NCCL_DEBUG": "INFO", "LOCAL_RANK": "0",
           "TORCHELASTIC_RUN_ID": "x", "OMP_NUM_THREADS": "2", "PYTHONPATH": ".", "ITERATIONS": "7"}
    hp, sources = T.Hyperparameters.from_env(env)
    assert hp.iterations == 7 and sources["iterations"] == "env"


def test_an_evaluation_only_run_refuses_every_setting_it_never_reads_naming_them_all():
    """EVAL_ONLY_QUANTIZED_PATH trains, calibrates and exports nothing: a training, initialization, optimizer,
    averaging or export setting given with it would be ignored, so it is refused, all such names in one message (an
    alias by the name given); a preset's values are not given, and the model's, evaluation's and TTT's are read."""
    only = {"EVAL_ONLY_QUANTIZED_PATH": "a.ptz"}
    with pytest.raises(T.ConfigError) as refused:
        T.Hyperparameters.from_env(dict(only, QUANT_BITS="5", ITERATIONS="100", MUON_WD="0.1", ORTHO_INIT="0",
                                        TRAIN_LOG_EVERY="1", NUM_LAYERS="11"))
    named = re.search(r"so (.*) would have no effect; unset them", str(refused.value)).group(1)
    assert named == "ITERATIONS, TRAIN_LOG_EVERY, ORTHO_INIT, MUON_WD, QUANT_BITS"
    for name in T.unread_when_evaluating_only(T.Hyperparameters):
        default = getattr(T.Hyperparameters, name)
        value = str(int(default)) if isinstance(default, bool) else str(default)
        with pytest.raises(T.ConfigError, match=rf"\b{name.upper()}\b"):
            T.Hyperparameters.from_env(dict(only, **{name.upper(): value or "x"}))
    hp, _ = T.Hyperparameters.from_env(dict(only, PRESET="record", NUM_LAYERS="11", SEED="42", TTT_LORA_RANK="8",
                                            EMBED_BF16="1", PACK_CODE="0", VAL_BATCH_SIZE="65536"))
    assert hp.compressor == "pergroup" and hp.lqer_rank == 4  # set by the preset, unread
    assert set(T.unread_when_evaluating_only(T.Hyperparameters)) == set(T.ALSO_UNREAD_WHEN_EVALUATING_ONLY) | {
        field.name for field in T.dataclasses.fields(T.Hyperparameters) if field.name not in T.READ_WHEN_EVALUATING_ONLY
        and field.name in settings_of_groups(T.GROUPS_UNREAD_WHEN_EVALUATING_ONLY)}


def settings_of_groups(titles):
    """The fields of the `--help` groups titled `titles`, from the usage text."""
    text, names = T.usage(), set()
    for block in re.split(r"\n(?=\S)", text):
        title = block.split(":\n")[0]
        if title in titles:
            names |= {item.split("=")[0].lower() for item in block.split(":\n", 1)[1].split()}
    return names


def test_an_evaluation_only_run_never_reads_a_setting_it_refuses(sample, tmp_path, monkeypatch):
    """What the refusal above rests on, watched in real runs: from the artifact's loading on, the evaluation phases
    (round trip, sliding windows and chunk TTT; then LoRA TTT alone, with a phase of global SGD) read none of those
    fields.
    (Functions that sweep every field, the config hash and the summary, are left out: they read, they do not use.)"""
    train = tiny_env(sample)
    hp, _ = T.Hyperparameters.from_env(train)
    net = T.GPT(hp)  # untrained: the weights are beside the point
    quantized = T.quantize_state_dict(net.state_dict(), T.quantized_tensor_groups(net, hp), hp)
    T.write_artifact(tmp_path / "model.ptz", T.serialize_artifact(quantized, hp.compressor, False))
    reads, recording = collections.defaultdict(set), [False]
    fields = {field.name for field in T.dataclasses.fields(T.Hyperparameters)}
    plain_read = object.__getattribute__

    def watched(self, name):
        if recording[0] and name in fields:
            reads[sys._getframe(1).f_code].add(name)
        return plain_read(self, name)

    def loading(run, net):
        recording[0] = True
        return load_artifact(run, net)
    load_artifact = T.load_artifact_to_evaluate
    monkeypatch.setattr(T.Hyperparameters, "__getattribute__", watched)
    monkeypatch.setattr(T, "load_artifact_to_evaluate", loading)
    evaluating = evaluation_only_env(train, tmp_path / "model.ptz")
    runs = (("chunk", dict(EVAL_STRIDE="128", TTT_ENABLED="1", TTT_METHOD="chunk", TTT_CHUNK_TOKENS="16384",
                           TTT_EPOCHS="1")),
            ("lora", dict(TTT_EVAL_ONLY="1", TTT_ENABLED="1", TTT_METHOD="lora", TTT_LORA_RANK="4", TTT_BATCH_SIZE="64",
                          TTT_CHUNK_SIZE="64", PHASED_TTT_ENABLED="1", PHASED_TTT_PREFIX_DOCS="8",
                          PHASED_TTT_NUM_PHASES="1", GLOBAL_TTT_CHUNK_TOKENS="1024", GLOBAL_TTT_EPOCHS="1")))
    for run_id, ttt in runs:
        for name in set(train).union(*(settings for _, settings in runs)):  # each run gives only its own
            monkeypatch.delenv(name, raising=False)
        set_run_env(monkeypatch, dict(evaluating, RUN_ID=run_id, **ttt), tmp_path)
        recording[0] = False  # until this run loads its artifact
        T.main()
        assert re.search(r"^final_ttt_exact ", (tmp_path / "logs" / f"{run_id}.txt").read_text(), re.M)
    used = set().union(*(names for code, names in reads.items() if len(names) < len(fields) // 2))  # no sweeps
    assert {"eval_stride", "val_batch_size", "ttt_chunk_tokens", "ttt_lora_rank", "global_ttt_lr"} <= used
    read_yet_refused = used & set(T.unread_when_evaluating_only(T.Hyperparameters))
    assert not read_yet_refused, sorted(read_yet_refused)


def baseline_lr_mul(iterations, warmdown_iters, max_wallclock_ms, step, elapsed_ms):
    """The challenge baseline's lr_mul, restated from its train_gpt.py."""
    if max_wallclock_ms is None:
        start = max(iterations - warmdown_iters, 0)
        return max((iterations - step) / max(warmdown_iters, 1), 0.0) if start <= step < iterations else 1.0
    warmdown_ms = warmdown_iters * elapsed_ms / max(step, 1)
    remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def test_warmdown_iters_has_the_baselines_meaning():
    hp, sources = T.Hyperparameters.from_env({"WARMDOWN_ITERS": "300", "ITERATIONS": "1000",
                                              "MAX_WALLCLOCK_SECONDS": "0"})
    assert hp.warmdown_frac == 0 and sources["warmdown_frac"] == "implied:WARMDOWN_ITERS"
    for step in (0, 500, 699, 700, 701, 850, 999, 1000):
        assert T.lr_multiplier(hp, step, 0.0) == baseline_lr_mul(1000, 300, None, step, 0.0), step
    capped, _ = T.Hyperparameters.from_env({"WARMDOWN_ITERS": "1200", "MAX_WALLCLOCK_SECONDS": "600", "GPTQ": "0"})
    for step, elapsed in ((100, 5e3), (10000, 5.2e5), (12000, 5.9e5), (13000, 6.1e5)):
        assert T.lr_multiplier(capped, step, elapsed) == pytest.approx(baseline_lr_mul(20000, 1200, 6e5, step, elapsed))
    assert T.lr_multiplier(capped, 12000, 5.9e5) < 1.0
    baseline, _ = T.Hyperparameters.from_env({"PRESET": "baseline"})
    assert (baseline.warmdown_iters, baseline.warmdown_frac) == (1200, 0.0)


def test_ttt_patterns_that_match_nothing_are_refused_when_the_model_is_built():
    from conftest import small_hp
    model = T.GPT(small_hp())
    T.check_ttt_settings(model, small_hp(ttt_params="blocks.1,attn"))
    for hp, name in ((small_hp(ttt_params="blocks.1,blocks.99"), "TTT_PARAMS"),):
        with pytest.raises(T.ConfigError, match=name):
            T.check_ttt_settings(model, hp)


# --------------------------------------------------------------------------------------------
# Real runs through the command line (a two-layer model: seconds per run)
# --------------------------------------------------------------------------------------------

def roundtrip(log):
    return re.search(r"^final_int6_brotli_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)$", log, re.M).groups()


@pytest.mark.parametrize("overrides, name", [
    (dict(ITERATION=5), "ITERATIONS"),
    (dict(MATRIX_LR="nan"), "MATRIX_LR"),
    (dict(TTT_ENABLED=1, TTT_PARAMS="blocks.99"), "TTT_PARAMS"),  # a model-dependent check, before training
])
def test_the_cli_refuses_a_bad_setting_within_seconds(sample, tmp_path, overrides, name):
    start = time.perf_counter()
    result = run_script([sys.executable, SCRIPT], tiny_env(sample, RUN_ID="bad", **overrides), tmp_path, timeout=60)
    assert result.returncode != 0 and "config error:" in result.stderr and name in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and time.perf_counter() - start < 30
    assert not list(tmp_path.glob("logs/*_raw.pt")) and "step:1/" not in result.stdout


def test_a_second_run_with_the_same_run_id_is_refused_and_the_first_is_intact(sample, tmp_path):
    env = tiny_env(sample, RUN_ID="same", SEED=1)
    assert run_script([sys.executable, SCRIPT], env, tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "logs").iterdir()}
    result = run_script([sys.executable, SCRIPT], dict(env, SEED="2"), tmp_path, timeout=60)
    assert result.returncode != 0 and "RUN_ID='same'" in result.stderr and "OVERWRITE_RUN=1" in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "logs").iterdir()} == before


def test_default_run_ids_are_unique_within_one_second():
    class OneProcess:
        rank, distributed = 0, False
        broadcast = staticmethod(lambda value: value)
    ids = {T.run_ids(T.Hyperparameters(), OneProcess())[1337] for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(r"\d{8}_\d{6}_[0-9a-f]{6}", i) for i in ids)


def start_and_signal(command, env, cwd, signum, log_name, after_step=3, timeout=120):
    """Launches `command`, waits until the log shows `after_step`, sends `signum`; returns (returncode, log)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRESET")}
    process = subprocess.Popen(command, cwd=cwd, env=dict(clean, **env), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    log = Path(cwd) / "logs" / log_name
    deadline = time.time() + timeout
    while not (log.exists() and f"step:{after_step}/" in log.read_text()):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0].decode()[-3000:]
        time.sleep(0.1)
    process.send_signal(signum)
    output = process.communicate(timeout=timeout)[0].decode()
    return process.returncode, log.read_text(), output


def test_sigint_saves_the_weights_and_finishing_later_scores_as_a_run_that_stopped_there(sample, tmp_path):
    # Constant LR and a step-based recurrence start: the trajectory to step k does not depend on ITERATIONS, so an
    # interrupted long run and a run of k steps hold the same weights at step k.
    env = tiny_env(sample, ITERATIONS=3000, RUN_ID="cut")
    code, log, output = start_and_signal([sys.executable, SCRIPT], env, tmp_path, signal.SIGINT, "cut.txt")
    assert code == 128 + signal.SIGINT, output[-3000:]
    step = int(re.search(r"^interrupted: signal:SIGINT step:(\d+)$", log, re.M).group(1))
    assert f"saved_raw_weights:logs/cut_raw.pt step:{step}" in log and "FINISH_FROM=logs/cut_raw.pt" in log
    assert not list((tmp_path / "logs").glob("cut_model*"))
    finished = run_script([sys.executable, SCRIPT], dict(env, RUN_ID="cut_finished", FINISH_FROM="logs/cut_raw.pt"),
                          tmp_path)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    stopped = run_script([sys.executable, SCRIPT], dict(env, RUN_ID="stopped", ITERATIONS=str(step)), tmp_path)
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    finished_log = (tmp_path / "logs" / "cut_finished.txt").read_text()
    stopped_log = (tmp_path / "logs" / "stopped.txt").read_text()
    assert f"finish_from:logs/cut_raw.pt step:{step}" in finished_log
    assert roundtrip(finished_log) == roundtrip(stopped_log)
    # its warmup builds the evaluation graphs only, on synthetic tokens; a run that trains warms up on training data
    assert "compliance: warmup_data:synthetic " in finished_log
    assert "compliance: warmup_data:training_tokens+synthetic " in stopped_log
    # FINISH_FROM refuses weights of another configuration.
    other = run_script([sys.executable, SCRIPT], dict(env, RUN_ID="other", MODEL_DIM="32",
                                                      FINISH_FROM="logs/cut_raw.pt"), tmp_path)
    assert other.returncode != 0 and "FINISH_FROM" in other.stderr and "config hash" in other.stderr


def test_sigterm_under_torchrun_stops_both_ranks_at_one_step_with_the_weights_saved(sample, tmp_path):
    env = tiny_env(sample, ITERATIONS=3000, RUN_ID="tr", TRAIN_BATCH_TOKENS=2048)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    code, log, output = start_and_signal(command, env, tmp_path, signal.SIGTERM, "tr.txt")
    assert code != 0
    step = int(re.search(r"^interrupted: signal:SIGTERM step:(\d+)$", log, re.M).group(1))
    raw, meta = T.load_raw_weights(tmp_path / "logs" / "tr_raw.pt")
    assert meta["step"] == step and all(torch.isfinite(t).all() for t in raw.values())
    assert "world_size:2" in log
    # Finishing under torchrun too: rank 0 reads the file and sends it, so the other ranks need no copy.
    finished = run_script(command, dict(env, RUN_ID="tr_finished", FINISH_FROM="logs/tr_raw.pt"), tmp_path)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert roundtrip((tmp_path / "logs" / "tr_finished.txt").read_text())


def test_a_run_in_a_larger_program_gives_the_signal_handlers_back_whether_it_ends_or_fails(sample, tmp_path,
                                                                                           monkeypatch):
    # main() in a program of its own (a notebook, a sweep, this suite): during the run the stop handler is in place;
    # after it, the program's own handler is back, so a Ctrl-C later is the program's, not an Interrupted.
    def programs_own(signum, frame):
        pass
    seen = []

    def run_that(fails):
        def recorded(run):
            seen.append(signal.getsignal(signal.SIGTERM) == run.signals._handle == signal.getsignal(signal.SIGINT))
            if fails:
                raise T.RunError("a run that fails")
        return recorded
    previous = {signum: signal.signal(signum, programs_own) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        set_run_env(monkeypatch, tiny_env(sample), tmp_path)
        for fails in (False, True):
            monkeypatch.setattr(T, "train_and_evaluate", run_that(fails))
            monkeypatch.setenv("RUN_ID", f"inside_{fails}")
            with pytest.raises(T.RunError) if fails else contextlib.nullcontext():
                T.main()
            assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is programs_own
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert seen == [True, True]


def test_a_diverging_run_stops_with_no_artifact_and_no_record(sample, tmp_path):
    env = tiny_env(sample, ITERATIONS=40, RUN_ID="nan", MATRIX_LR=1e30, SCALAR_LR=1e30, TIED_EMBED_LR=1e30,
                   GRAD_CLIP_NORM=0, RECORD_DIR=tmp_path / "record")
    result = run_script([sys.executable, SCRIPT], env, tmp_path, timeout=120)
    assert result.returncode != 0 and "train_loss is not finite by step" in result.stderr, result.stderr[-3000:]
    assert "matrix_lr:" in result.stderr
    log = (tmp_path / "logs" / "nan.txt").read_text()
    assert "train_loss is not finite" in log and "step:40/40" not in log
    assert not list((tmp_path / "logs").glob("*.ptz")) and not (tmp_path / "record" / "submission.json").exists()


def test_a_bad_token_in_a_later_shard_is_named_before_training(sample, tmp_path):
    data_dir, _ = sample
    bad_data = tmp_path / "data"
    bad_data.mkdir()
    for path in data_dir.glob("fineweb_*.bin"):
        (bad_data / path.name).symlink_to(path)
    tokens = np.full(20 * 256 + 1, 7, dtype=np.uint16)
    tokens[3000] = 1500
    write_shard(bad_data / "fineweb_train_999999.bin", tokens)  # the last shard, one bad id
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    # two ranks: the shard is in the second rank's share of the scan
    result = run_script(command, tiny_env(sample, DATA_PATH=bad_data, RUN_ID="shard", TRAIN_BATCH_TOKENS=2048),
                        tmp_path, timeout=120)
    assert result.returncode != 0, result.stderr[-3000:]
    message = "fineweb_train_999999.bin holds token id 1500 >= VOCAB_SIZE=1024 (at token 3000)"
    assert message in result.stderr + result.stdout
    log = (tmp_path / "logs" / "shard.txt").read_text()
    assert message in log and "step:1/" not in log


def test_a_failed_artifact_write_keeps_the_raw_weights_and_leaves_no_partial_file(sample, tmp_path):
    (tmp_path / "logs" / "w_model.int6.ptz").mkdir(parents=True)  # the final name cannot be written
    result = run_script([sys.executable, SCRIPT], tiny_env(sample, RUN_ID="w"), tmp_path, timeout=120)
    assert result.returncode != 0 and "could not write the model artifact to logs/w_model.int6.ptz" in result.stderr
    log = (tmp_path / "logs" / "w.txt").read_text()
    assert "saved_raw_weights:logs/w_raw.pt step:6" in log and "could not write the model artifact" in log
    assert "not_finished: export," in log
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == \
        ["index.jsonl", "w.txt", "w_model.int6.ptz", "w_raw.pt"]
    assert not list((tmp_path / "logs" / "w_model.int6.ptz").iterdir())


@pytest.mark.parametrize("overrides, message", [
    (dict(RECORD_DIR="{tmp}/file/record"), "RECORD_DIR="),  # a folder that cannot be made (a file is in the way)
    (dict(TOKENIZER_PATH="{tmp}"), "TOKENIZER_PATH="),  # a folder
    (dict(TOKENIZER_PATH="{tmp}/file"), "is not a SentencePiece model"),
    (dict(DATA_PATH="{tmp}/file"), "DATA_PATH="),
])
def test_unusable_paths_are_named_before_training(sample, tmp_path, overrides, message):
    (tmp_path / "file").write_text("not a model")
    env = tiny_env(sample, RUN_ID="p", **{k: v.format(tmp=tmp_path) for k, v in overrides.items()})
    result = run_script([sys.executable, SCRIPT], env, tmp_path, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# Files: atomic writes, bad shards, hostile artifacts
# --------------------------------------------------------------------------------------------

def test_a_full_disk_leaves_no_partial_file_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "m.ptz"
    target.write_bytes(b"the earlier file")

    def full_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(T.RunError, match=r"could not write the model artifact to .*m\.ptz: the disk is full"):
        T.write_atomically(target, full_disk, "the model artifact")
    assert target.read_bytes() == b"the earlier file" and [p.name for p in tmp_path.iterdir()] == ["m.ptz"]
    # torch.save reports a full disk as a RuntimeError: the same message, no file left.
    monkeypatch.setattr(T.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("enforce fail")))
    with pytest.raises(T.RunError, match="could not write the raw weights"):
        T.write_atomically(tmp_path / "r.pt", lambda f: T.torch.save({}, f), "the raw weights")
    assert [p.name for p in tmp_path.iterdir()] == ["m.ptz"]


def test_every_shard_is_scanned_for_bad_ids_and_ranks_share_the_scan(tmp_path):
    paths = [tmp_path / f"fineweb_train_{i:06d}.bin" for i in range(3)]
    for i, path in enumerate(paths):
        tokens = np.arange(33 * 8) % 100
        if i == 2:
            tokens[40] = 100  # one id out of range, in the last shard
        write_shard(path, tokens)
    files = [str(p) for p in paths]
    shards = [T.load_shard(f) for f in files]
    T.check_token_ids(files[:2], shards[:2], 100)
    with pytest.raises(T.DataError,
                       match=r"fineweb_train_000002\.bin holds token id 100 >= VOCAB_SIZE=100 \(at token 40\)"):
        T.check_token_ids(files, shards, 100)
    # Rank 0 of two scans shard 0 only; the combined maxima (here: rank 1's share added by hand) still find it.
    T.check_token_ids(files, shards, 100, rank=0, world_size=2)
    rank1 = np.zeros(3, dtype=np.int64)
    rank1[1:] = [99, 100]
    with pytest.raises(T.DataError, match="000002"):
        T.check_token_ids(files, shards, 100, rank=0, world_size=2, all_reduce_max=lambda m: np.maximum(m, rank1))


def test_a_shard_that_cannot_be_read_is_named(tmp_path):
    with pytest.raises(T.DataError, match="missing.bin .*cannot be read"):
        T.read_shard_header(str(tmp_path / "missing.bin"))


def artifact_with(payload_size, compressed, compressor_id=3):
    header = T.ARTIFACT_MAGIC + bytes([compressor_id, 0]) + payload_size.to_bytes(8, "little")
    return header + hashlib.sha256(header + compressed).digest() + compressed


def read_in_a_fresh_process(path):
    """(the error reading the artifact at `path` gives, KiB its peak memory grew by), in a process of its own."""
    probe = ("import resource, sys; sys.path.insert(0, sys.argv[1]); import train_gpt as T\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "try:\n    T.read_artifact(sys.argv[2])\nexcept ValueError as error:\n    print(error)\n"
             "print('grew_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    result = subprocess.run([sys.executable, "-c", probe, str(REPO), str(path)], capture_output=True, text=True,
                            timeout=120)
    grew = re.search(r"grew_kib (\d+)", result.stdout)
    assert grew, result.stdout + result.stderr
    return result.stdout, int(grew.group(1))


def test_a_decompression_bomb_is_refused_with_bounded_memory(tmp_path):
    import brotli
    compressor = brotli.Compressor(quality=1)
    zeros = bytes(1 << 24)
    bomb = b"".join(compressor.process(zeros) for _ in range(64)) + compressor.finish()  # 1 GiB of zeros
    path = tmp_path / "bomb.ptz"
    path.write_bytes(artifact_with(1000, bomb))
    error, grew_kib = read_in_a_fresh_process(path)
    assert "decompresses to more bytes, not the 1000 its header records" in error
    assert grew_kib < 64 * 1024
    path.write_bytes(artifact_with(T.ARTIFACT_MAX_PAYLOAD_BYTES + 1, bomb))
    with pytest.raises(ValueError, match="bad header"):
        T.read_artifact(path)


def pergroup_artifact(streams, sizes=None):
    """A per-group artifact of already compressed `streams` ([(codec id, decompressed size, bytes)]), its header and
    digest consistent, so that only the payload is hostile."""
    table = len(streams).to_bytes(4, "little") + b"".join(
        bytes([codec]) + raw.to_bytes(8, "little") + len(data).to_bytes(8, "little") for codec, raw, data in streams)
    total = sum(raw for _, raw, _ in streams) if sizes is None else sizes
    return artifact_with(total, table + b"".join(data for *_, data in streams), compressor_id=T.PERGROUP_ID)


def pergroup_parts():
    hp = T.Hyperparameters(compressor="pergroup", pergroup_codec="lzma")
    quantized = T.quantize_state_dict({"m.mlp.fc.weight": torch.randn(6, 4)}, {"m.mlp.fc.weight": "mlp"}, hp)
    return T.pergroup_streams(quantized)


def test_a_hostile_pergroup_payload_is_refused_before_it_is_used(tmp_path):
    lzma_id = T.STREAM_CODECS["lzma"][0]
    packed = lambda data: (lzma_id, len(data), T.lzma.compress(data))
    rest, group = pergroup_parts()
    path = tmp_path / "m.ptz"
    path.write_bytes(pergroup_artifact([packed(rest), packed(group)]))
    assert T.read_artifact(path)["m.mlp.fc.weight"]["data"].shape == (6, 4)  # the honest file reads back
    cases = {
        "stream table is inconsistent": pergroup_artifact([packed(rest), packed(group)], sizes=len(rest)),
        "does not decompress to the size": pergroup_artifact([packed(rest), (lzma_id, 5, packed(group)[2])]),
        "an lrzip stream has a bad header": pergroup_artifact([packed(rest), (
            T.STREAM_CODECS["lrzip"][0], 24, b"LRZI\0\6" + (1 << 40).to_bytes(8, "little") + bytes(10))]),
        "not a plain tensor state": pergroup_artifact([packed(T.pickle.dumps(print)), packed(group)]),
    }
    state = T.load_plain_state(rest, "rest")
    state["state"]["m.mlp.fc.weight"]["order"] = torch.zeros(6, dtype=torch.int16)
    cases["not a permutation"] = pergroup_artifact([packed(T.torch_bytes(state)), packed(group)])
    cases["no values for m.mlp.fc.weight"] = pergroup_artifact([packed(T.torch_bytes(dict(state, groups=[])))])
    state["state"]["m.mlp.fc.weight"]["shape"] = [1 << 40, 1 << 40]
    cases["shorter than its matrices"] = pergroup_artifact([packed(T.torch_bytes(state)), packed(group)])
    for message, blob in cases.items():
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=message):
            T.read_artifact(path)


def test_a_pergroup_stream_bomb_is_refused_with_bounded_memory(tmp_path):
    bomb = T.lzma.compress(bytes(1 << 28), preset=0)  # 256 MiB of zeros
    path = tmp_path / "bomb.ptz"
    rest = pergroup_parts()[0]
    path.write_bytes(pergroup_artifact([(T.STREAM_CODECS["lzma"][0], len(rest), T.lzma.compress(rest)),
                                        (T.STREAM_CODECS["lzma"][0], 1000, bomb)]))
    error, grew_kib = read_in_a_fresh_process(path)
    assert "does not decompress to the size its table records" in error
    assert grew_kib < 64 * 1024


def test_an_artifact_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    import pickle
    payload = pickle.dumps(Exploit())
    path = tmp_path / "evil.ptz"
    path.write_bytes(artifact_with(len(payload), T.COMPRESSORS["zlib"][1](payload), compressor_id=1))
    with pytest.raises(ValueError, match="not a plain tensor state"):
        T.read_artifact(path)
    assert not marker.exists()


def test_a_nan_score_never_reaches_submission_json():
    log = "x\nsummary_json: " + json.dumps(dict(seed=1, val_loss=float("nan"), val_bpb=float("nan"),
                                                 config_hash="a", code_sha256="c")) + "\n"
    with pytest.raises(ValueError, match="non-finite score"):
        make.submission_from_logs([log])


# The records' "Reproducing" commands, exactly as their READMEs publish them (the torchrun line aside).
COMMAND_03_23 = """NUM_LAYERS=11 BIGRAM_VOCAB_SIZE=1536 XSA_LAST_N=4 \\
EMA_ENABLED=1 EMA_DECAY=0.997 SWA_ENABLED=1 SWA_EVERY=50 \\
ROPE_DIMS=16 LN_SCALE=1 LATE_QAT=1 LATE_QAT_THRESHOLD=0.15 \\
VE_ENABLED=1 VE_DIM=128 VE_LAYERS=9,10 \\
TTT_ENABLED=1 TTT_LR=0.002 TTT_EPOCHS=3 TTT_CHUNK_TOKENS=32768 \\
TTT_FREEZE_BLOCKS=0 TTT_MOMENTUM=0.9 TTT_BATCH_SEQS=32 TTT_GRAD_CLIP=1.0 \\
MUON_WD=0.04 ADAM_WD=0.04 \\
MATRIX_LR=0.025 SCALAR_LR=0.025 TIED_EMBED_LR=0.035 \\
MUON_MOMENTUM=0.99 MUON_MOMENTUM_WARMUP_START=0.92 \\
MUON_MOMENTUM_WARMUP_STEPS=1500 WARMDOWN_ITERS=3500 \\
ITERATIONS=9000 MAX_WALLCLOCK_SECONDS=600 EVAL_STRIDE=64 \\
SEED=1337"""
COMMAND_04_27 = """DATA_DIR=./data \\
VOCAB_SIZE=8192 \\
DATA_PATH=./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved \\
TOKENIZER_PATH=./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \\
CASEOPS_ENABLED=1 \\
ITERATIONS=20000 MAX_WALLCLOCK_SECONDS=600 \\
PHASED_TTT_ENABLED=1 PHASED_TTT_PREFIX_DOCS=2500 PHASED_TTT_NUM_PHASES=3 \\
EMBED_BITS=7 MATRIX_LR=0.026 MIN_LR=0.1 \\
MLP_CLIP_SIGMAS=11.5 ATTN_CLIP_SIGMAS=13.0 EMBED_CLIP_SIGMAS=14.0 \\
GRAD_CLIP_NORM=0.3 TTT_CHUNK_SIZE=48 WARMUP_STEPS=20 MUON_BACKEND_STEPS=5 \\
GLOBAL_TTT_MOMENTUM=0.9 WARMDOWN_FRAC=0.85 BETA2=0.99 \\
TTT_BETA2=0.99 TTT_WEIGHT_DECAY=0.5 TTT_LORA_RANK=80 \\
SPARSE_ATTN_GATE_SCALE=0.5 \\
GPTQ_RESERVE_SECONDS=0.5 GPTQ_CALIBRATION_BATCHES=16 VAL_LOSS_EVERY=0 \\
GATED_ATTN_QUANT_GATE=1 SPARSE_ATTN_GATE_ENABLED=1 GATE_WINDOW=12 \\
SMEAR_GATE_ENABLED=1 \\
LQER_ENABLED=1 LQER_ASYM_ENABLED=1 LQER_RANK=4 LQER_FACTOR_BITS=4 LQER_ASYM_GROUP=64 LQER_TOP_K=3 \\
FUSED_CE_ENABLED=1 COMPRESSOR=pergroup NCCL_NET=Socket \\
SEED=42"""


def command_env(command):
    return dict(item.split("=", 1) for item in command.replace("\\\n", " ").split())


def test_the_03_23_records_command_runs_that_records_method_with_every_name_translated():
    env = command_env(COMMAND_03_23)
    assert len(env) == 35
    hp, sources = T.Hyperparameters.from_env(env)
    assert hp.ttt_method == "chunk" and sources["ttt_method"].startswith("implied:")  # its TTT is chunk SGD
    assert (hp.bigram_buckets, hp.xsa_layers, hp.ve_layers, hp.ttt_params) == (1536, "-4,-3,-2,-1", "9,10", "all")
    # its SWA is never applied, its late QAT never ran
    assert (hp.weight_averaging, hp.qat_start_lr_scale) == ("ema", 0.0)
    assert sources["xsa_layers"] == "env:XSA_LAST_N=4(translated)"
    assert sources["bigram_buckets"] == "env:BIGRAM_VOCAB_SIZE(alias)"
    preset, _ = T.Hyperparameters.from_env({"PRESET": "pr754", "EVAL_SEQ_LEN": "2048"})
    assert hp.layer_set("xsa_layers") == preset.layer_set("xsa_layers") == {7, 8, 9, 10}


def test_the_04_27_records_command_is_accepted_name_by_name_under_its_preset():
    env = command_env(COMMAND_04_27)
    assert len(env) == 44
    for name, value in env.items():  # each of the 44 names alone, then all of them: nothing is refused
        T.Hyperparameters.from_env({"PRESET": "record", name: value})
    hp, sources = T.Hyperparameters.from_env(dict(env, PRESET="record"))
    preset, _ = T.Hyperparameters.from_env({"PRESET": "record", "SEED": "42"})
    differing = {f.name for f in T.dataclasses.fields(hp) if getattr(hp, f.name) != getattr(preset, f.name)}
    assert differing == {"data_dir"}  # the preset is the command: the same settings, the same values
    assert (hp.compressor, hp.pergroup_codec, hp.fused_ce_enabled, hp.lqer_asym_enabled) == \
        ("pergroup", "lrzip", True, True)
    # Its TTT is on by default there, off here: without its preset the refusal names the switch and the preset.
    with pytest.raises(T.ConfigError, match=r"TTT_ENABLED=1.*\(PRESET=record or PRESET=pr2014 sets that\)$"):
        T.Hyperparameters.from_env(env)
    # The 04-29 record's command sets the phases alone, its script's PHASED_TTT_ENABLED being on.
    with pytest.raises(T.ConfigError, match=r"PHASED_TTT_ENABLED=1.*\(PRESET=record or PRESET=pr2014 sets that\)$"):
        T.Hyperparameters.from_env({"PHASED_TTT_NUM_PHASES": "3"})
    with pytest.raises(T.ConfigError, match=r"unset TTT_EPOCHS$"):  # a preset given: its own settings are the fix
        T.Hyperparameters.from_env({"PRESET": "record", "TTT_EPOCHS": "3"})


def test_data_dir_moves_the_default_paths_only():
    hp, sources = T.Hyperparameters.from_env({"DATA_DIR": "/data/pg", "TOKENIZER_PATH": "tok.model"})
    assert hp.data_path == "/data/pg/datasets/fineweb10B_sp1024" and sources["data_path"] == "implied:DATA_DIR"
    assert hp.tokenizer_path == "tok.model"


# --------------------------------------------------------------------------------------------
# Failures that must say what happened and what to do
# --------------------------------------------------------------------------------------------

def test_a_file_named_logs_is_named_as_the_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").write_text("not a folder")
    for overwrite in (False, True):  # OVERWRITE_RUN=1 would not help, and the message does not suggest it
        with pytest.raises(T.ConfigError, match=r"logs is a file, not a folder") as caught:
            T.Logger("logs/run.txt", True, overwrite)
        assert "OVERWRITE_RUN" not in str(caught.value)


def raw_run(tmp_path, path):
    from types import SimpleNamespace
    lines = []
    return SimpleNamespace(rank=0, net=torch.nn.Linear(4, 4), steps_done=3, results={}, run_id="r", config_hash="h",
                           raw_weights_path=str(path), raw_saved=False, log=lines.append), lines


def test_raw_weights_that_logs_cannot_take_go_to_the_temporary_folder(tmp_path, monkeypatch):
    (tmp_path / "blocked").write_text("a file where the folder should be")
    monkeypatch.setattr(T.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    run, lines = raw_run(tmp_path, tmp_path / "blocked" / "r_raw.pt")
    T.save_raw_weights(run)
    assert run.raw_weights_path == str(tmp_path / "tmp" / "r_raw.pt") and run.raw_saved
    assert T.load_raw_weights(run.raw_weights_path)[1]["step"] == 3
    assert any("saved them to" in line for line in lines)
    assert lines[-1].startswith(f"saved_raw_weights:{run.raw_weights_path}")


def test_a_full_disk_is_called_a_full_disk(tmp_path, monkeypatch):
    """torch.save on a full disk says only "unexpected pos 4992 vs 4881"."""
    monkeypatch.setattr(T.torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4992 vs 4881")))
    monkeypatch.setattr(T.shutil, "disk_usage", lambda path: T.shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    monkeypatch.setattr(T.tempfile, "tempdir", str(tmp_path))
    run, _ = raw_run(tmp_path, tmp_path / "logs" / "r_raw.pt")
    with pytest.raises(T.RunError, match=r"the disk is full \(4,096 bytes free\).*the weights are lost"):
        T.save_raw_weights(run)


def test_a_finish_from_run_cut_short_points_back_at_its_raw_file(tmp_path, monkeypatch):
    from types import SimpleNamespace
    from conftest import small_hp
    raw = tmp_path / "a_raw.pt"
    hp = small_hp(finish_from=str(raw))
    model = T.GPT(hp)
    torch.save(dict(model=model.state_dict(), step=5, run_id="a", config_hash="h"), raw)
    run = SimpleNamespace(hp=hp, rank=0, cluster=SimpleNamespace(broadcast=lambda value: value), config_hash="h",
                          results={}, raw_weights_path="logs/b_raw.pt", log=lambda line: None)
    monkeypatch.setattr(T, "run_validation", lambda run, data, model: (1.0, 2.0, 3))
    T.finish_from_raw_weights(run, None, T.Model(model, None, None, None))
    assert run.raw_weights_path == str(raw) and run.raw_saved  # not_finished: names this file, which exists


def test_a_hostile_or_truncated_raw_file_is_refused_in_one_sentence(tmp_path):
    hostile, truncated = tmp_path / "hostile.pt", tmp_path / "truncated.pt"
    torch.save({"model": {}, "step": 1, "payload": collections.OrderedDict(a=Fraction(1, 3))}, hostile)
    torch.save({"model": {"w": torch.ones(1000)}, "step": 1}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    for path, message in ((hostile, "refused unread, since loading it could run code"),
                          (truncated, "damaged or truncated")):
        with pytest.raises(T.ConfigError, match=message) as caught:
            T.load_raw_weights(path)
        assert "weights_only" not in str(caught.value)


def test_the_settings_named_for_a_mismatched_artifact_are_settings():
    fields = {f.name for f in T.dataclasses.fields(T.Hyperparameters)}
    for _, names in T.SHAPING_SETTINGS:
        assert {name.lower() for name in names.split(", ")} <= fields, names
    assert T.shaping_settings("blocks.3.mlp.fc.weight").startswith("MLP_MULT")
    assert T.shaping_settings("blocks.3.mlp_scale") == "SUBLAYER_SCALES" and T.shaping_settings("x") == "MODEL_DIM"


def test_the_calibration_reserve_follows_the_measured_time_and_the_setting_is_its_floor():
    hp = T.Hyperparameters(max_wallclock_seconds=600, gptq_calibration_batches=16, gptq_reserve_seconds=0.5)
    reserve, needed = T.calibration_reserve(hp, 0.25)  # 16 batches of 0.25 s: 4 s, x 1.25, + 1 s
    assert needed == pytest.approx(6.0) and reserve == pytest.approx(6.0)
    floor = T.dataclasses.replace(hp, gptq_reserve_seconds=45.0)
    assert T.calibration_reserve(floor, 0.25) == (45.0, pytest.approx(6.0))


def test_training_and_calibration_end_within_the_cap(sample, tmp_path):
    env = tiny_env(sample, RUN_ID="cap", MAX_WALLCLOCK_SECONDS="8", ITERATIONS="100000", WARMUP_STEPS="1")
    result = run_script([sys.executable, SCRIPT], env, tmp_path, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "cap.txt").read_text()
    reserved = float(re.search(r"^gptq_reserve: .* reserved:([\d.]+)s$", log, re.M).group(1))
    assert reserved >= 1.0 and "stopping_early: wallclock_cap" in log
    read_until = float(re.search(r"^compliance: training_data_read_until:([\d.]+)s max_wallclock:8s within_cap:yes$",
                                 log, re.M).group(1))
    assert read_until <= 8


def test_calibration_never_reads_training_data_after_the_cap(monkeypatch):
    """9 s trained of a 10 s cap, batches of 0.4 s: two fit (ending at 9.4 s and 9.8 s), the third would end past
    the cap and is never read, whatever the reserve was."""
    from types import SimpleNamespace
    now = [100.0]
    monkeypatch.setattr(T.time, "perf_counter", lambda: now[0])

    def batch_of(run, net, loader, step):
        now[0] += 0.4
        read.append(step)
        return {"w": torch.ones(2, 2)}
    read = []
    monkeypatch.setattr(T, "hessians_of_batch", batch_of)
    hp = T.Hyperparameters(max_wallclock_seconds=10, gptq_calibration_batches=5)
    run = SimpleNamespace(hp=hp, results=dict(train_time_ms=9000.0, steps=7), timings=dict(calibration_batch_s=0.4),
                          device=torch.device("cpu"), rank=0, world_size=1, distributed=False)
    monkeypatch.setattr(T, "synchronize", lambda run: None)
    hessians, described = T.hessians_within_the_cap(run, None, None, 100.0)
    assert read == [7, 8] and described == f"batches:2/5 tokens:{2 * hp.train_batch_tokens}"
    assert torch.equal(hessians["w"], 2 * torch.ones(2, 2)) and run.timings["training_data_read_until_s"] <= 10
    run.results["train_time_ms"] = 9900.0  # no batch fits: GPTQ is skipped, never the cap
    assert T.hessians_within_the_cap(run, None, None, now[0])[0] is None


def test_a_graph_that_cannot_compile_is_named_with_the_phase_it_stops_before():
    """The warmup of a run that trains nothing (EVAL_ONLY_QUANTIZED_PATH, FINISH_FROM) stops before the evaluation,
    and says so; a training run's stops before training."""
    from types import SimpleNamespace
    run = SimpleNamespace(attention_name="sdpa")
    for before in ("training", "the evaluation"):
        with pytest.raises(T.ConfigError, match=f"failed in the warmup, before {before} .*set COMPILE=0"):
            named = (T.compile_failures_named(run, before=before) if before != "training"
                     else T.compile_failures_named(run))
            with named:
                raise T.torch._dynamo.exc.Unsupported("a graph break")


def test_the_late_april_records_ttt_names_have_their_meaning_and_contradictions_are_refused():
    lora = {"PRESET": "record"}
    for mask, q_and_v in (("all", (True, True)), ("no_q", (False, True)), ("no_v", (True, False)),
                          ("no_qv", (False, False)), ("NO_QV", (False, False))):
        hp, _ = T.Hyperparameters.from_env(dict(lora, TTT_MASK=mask))
        assert (hp.ttt_q_lora, hp.ttt_v_lora) == q_and_v, mask
    # the records' published form: the mask and the two switches it implies
    hp, sources = T.Hyperparameters.from_env(dict(lora, TTT_MASK="no_qv", TTT_Q_LORA="0", TTT_V_LORA="0"))
    assert (hp.ttt_q_lora, hp.ttt_v_lora, sources["ttt_q_lora"]) == (False, False, "env")
    for env, match in (({"TTT_MASK": "no_qv", "TTT_Q_LORA": "1"}, "TTT_MASK='no_qv' turns TTT_Q_LORA off"),
                       ({"TTT_MASK": "qv"}, "TTT_MASK='qv': choose"),
                       ({"TTT_SHORT_SCORE_FIRST_ENABLED": "1", "TTT_SHORT_SCORE_FIRST_STEPS": "256"}, "tokens:chunk"),
                       ({"TTT_SHORT_SCORE_FIRST_ENABLED": "1", "TTT_SHORT_SCORE_FIRST_STEPS": "0:8"}, "positive"),
                       ({"TTT_SHORT_SCORE_FIRST_ENABLED": "1", "TTT_SHORT_SCORE_FIRST_STEPS": "256:8",
                         "TTT_SHORT_DOC_LEN": "2000", "TTT_SHORT_CHUNK_SIZE": "24"}, "2000:24 is not one of its items"),
                       ({"TTT_SHORT_SCORE_FIRST_STEPS": "256:8"}, "unless .*TTT_SHORT_SCORE_FIRST_ENABLED=1"),
                       ({"TTT_LOCAL_LR_MULT": "-1"}, "TTT_LOCAL_LR_MULT")):
        with pytest.raises(T.ConfigError, match=match):
            T.Hyperparameters.from_env(dict(lora, **env))
    with pytest.raises(T.ConfigError, match="unset TTT_MASK;"):  # the name the user gave
        T.Hyperparameters.from_env({"TTT_MASK": "no_qv"})
    # PR #2014's evaluation settings, as its command gives them
    hp, _ = T.Hyperparameters.from_env(dict(lora, TTT_MASK="no_qv", TTT_LOCAL_LR_MULT="0.75",
                                            TTT_SHORT_SCORE_FIRST_ENABLED="1", TTT_SHORT_DOC_LEN="2000",
                                            TTT_SHORT_CHUNK_SIZE="24", TTT_SHORT_SCORE_FIRST_STEPS="256:8,2000:24"))
    assert hp.short_score_first_steps == [(256, 8), (2000, 24)] and hp.ttt_local_lr_mult == 0.75


def test_the_records_lqer_switch_is_lqer_rank():
    assert T.Hyperparameters.from_env({"LQER_ENABLED": "1"})[0].lqer_rank == 4  # the records' default rank
    hp, sources = T.Hyperparameters.from_env({"LQER_ENABLED": "1", "LQER_RANK": "2"})
    assert hp.lqer_rank == 2 and sources["lqer_rank"] == "env"
    assert T.Hyperparameters.from_env({"PRESET": "record", "LQER_ENABLED": "0"})[0].lqer_rank == 0
    with pytest.raises(T.ConfigError, match="LQER_ENABLED=0 is LQER_RANK=0"):
        T.Hyperparameters.from_env({"LQER_ENABLED": "0", "LQER_RANK": "4"})


# Every name PR #2014's script reads (its hyperparameter dump in the 04-30 reproduction log, and the variables it
# reads outside that class), as its published commands could set them.
PR2014_NAMES = """
ADAM_EPS ADAM_WD ARTIFACT_DIR ATTN_CLIP_SIGMAS ATTN_OUT_GATE_ENABLED ATTN_OUT_GATE_SRC AWQ_LITE_BITS AWQ_LITE_ENABLED
AWQ_LITE_GROUP_SIZE AWQ_LITE_GROUP_TOP_K BETA1 BETA2 CASEOPS_ENABLED COMPILE_SHAPE_WARMUP COMPILE_SHAPE_WARMUP_ITERS
COMPILE_SHAPE_WARMUP_LOOP_MODES COMPRESSOR DATA_DIR EMA_DECAY EMBED_BITS EMBED_CLIP_SIGMAS EMBED_LR EMBED_WD
ENABLE_LOOPING_AT EVAL_INCLUDE_TAIL EVAL_SEQ_LEN EVAL_STRIDE FUSED_CE_ENABLED GATE_WINDOW GATED_ATTN_ENABLED
GATED_ATTN_INIT_STD GATED_ATTN_QUANT_GATE GLOBAL_TTT_BATCH_SEQS GLOBAL_TTT_CHUNK_TOKENS GLOBAL_TTT_EPOCHS
GLOBAL_TTT_GRAD_CLIP GLOBAL_TTT_LR GLOBAL_TTT_MOMENTUM GLOBAL_TTT_RESPECT_DOC_BOUNDARIES GLOBAL_TTT_WARMUP_CHUNKS
GLOBAL_TTT_WARMUP_START_LR GPTQ_CALIBRATION_BATCHES GPTQ_RESERVE_SECONDS GRAD_CLIP_NORM ITERATIONS LN_SCALE
LOGIT_SOFTCAP LOOP_END LOOP_START LQER_ASYM_ENABLED LQER_ASYM_GROUP LQER_ENABLED LQER_FACTOR_BITS LQER_GAIN_SELECT
LQER_RANK LQER_SCOPE LQER_TOP_K MATRIX_BITS MATRIX_CLIP_SIGMAS MATRIX_LR MAX_WALLCLOCK_SECONDS MIDRUN_CAP_LOG_UPDATES
MIDRUN_CAP_SCHEDULE MIN_LR MLP_CLIP_SIGMAS MLP_MULT MODEL_DIM MUON_BACKEND_STEPS MUON_MOMENTUM
MUON_MOMENTUM_WARMUP_START MUON_MOMENTUM_WARMUP_STEPS MUON_ROW_NORMALIZE MUON_WD NUM_HEADS NUM_KV_HEADS NUM_LAYERS
NUM_LOOPS PARALLEL_FINAL_LANE PARALLEL_START_LAYER PHASED_TTT_ENABLED PHASED_TTT_NUM_PHASES PHASED_TTT_PREFIX_DOCS
QK_GAIN_INIT ROPE_BASE ROPE_DIMS ROPE_TRAIN_SEQ_LEN ROPE_YARN RUN_ID SCALAR_LR SEED SEQ_CHANGE_WARMUP_STEPS
SKIP_GATES_ENABLED SMEAR_GATE_ENABLED SPARSE_ATTN_GATE_ENABLED SPARSE_ATTN_GATE_INIT_STD SPARSE_ATTN_GATE_SCALE
TIE_EMBEDDINGS TIED_EMBED_INIT_STD TIED_EMBED_LR TOKENIZER_PATH DATA_PATH TRAIN_BATCH_TOKENS TRAIN_LOG_EVERY
TRAIN_SEQ_LEN TRAIN_SEQ_SCHEDULE TRAIN_SEQ_SCHEDULE_MODE TTT_BATCH_SIZE TTT_BETA1 TTT_BETA2 TTT_CHUNK_SIZE
TTT_ENABLED TTT_EVAL_BATCHES TTT_EVAL_SEQ_LEN TTT_GRAD_STEPS TTT_K_LORA TTT_LOCAL_LR_MULT TTT_LORA_LR TTT_LORA_RANK
TTT_MASK TTT_MLP_LORA TTT_O_LORA TTT_OPTIMIZER TTT_Q_LORA TTT_SHORT_BETA2 TTT_SHORT_CHUNK_SIZE TTT_SHORT_DOC_LEN
TTT_SHORT_LORA_ENABLED TTT_SHORT_LORA_LR TTT_SHORT_LORA_RANK TTT_SHORT_SCORE_FIRST_ENABLED
TTT_SHORT_SCORE_FIRST_STEPS TTT_SHORT_WEIGHT_DECAY TTT_TRAIN_MAX_DOC_LEN TTT_TRAIN_MIN_DOC_LEN TTT_V_LORA
TTT_WARM_START_MEAN_DOC_LEN TTT_WARM_START_MEAN_ENABLED TTT_WARM_START_MEAN_MOMENTUM TTT_WEIGHT_DECAY
VAL_BATCH_TOKENS VAL_DOC_FRACTION VAL_LOSS_EVERY VOCAB_SIZE WARMDOWN_FRAC WARMDOWN_ITERS WARMUP_STEPS XSA_LAST_N
ASYM_LOGIT_RESCALE TTT_EVAL_ONLY QUANTIZE_ONLY PREQUANT_ONLY FORCE_STOP_STEP TTT_LORA_ALPHA TTT_WARM_START_A
LOAD_ARTIFACT_PATH CONTROL_TENSOR_NAME_PATTERNS
""".split()


# Every other name that the challenge's baseline (train_gpt.py) or a script of a 10-minute record reads
# (records/track_10min_16mb, all .py files, at the May 3 snapshot), found by `os.environ.get("NAME"`,
# `os.environ["NAME"]` and the 03-24 ternary record's own `_e("NAME"`; leaving out the data download's
# MATCHED_FINEWEB_* and torchrun's RANK, LOCAL_RANK, WORLD_SIZE.
RECORD_SCRIPT_NAMES = """
ADAM_WEIGHT_DECAY BANK_SPLIT BIGRAM_DIM BIGRAM_HASH_BUCKETS BIGRAM_HASH_DIM BIGRAM_VOCAB_SIZE BLOCK_LARS_MIN_SCALE
BLOCK_LARS_TRUST CANON_AC_LAYERS CLIP_MULT_EARLY CLIP_MULT_LATE CLIP_MULT_LOOP CLIP_MULT_MID DATASETS_DIR
DISABLE_LAYER0_ATTN DTG_ENABLED EMA_ENABLED EMBEDDING_DIM EVAL_BATCH_SEQS EVAL_BATCH_SIZE EVAL_NTK_ALPHA
EVAL_ONLY_PATH EVAL_ONLY_QUANTIZED_PATH FP16_EMBED_EXPORT FP16_KEEP_NAME_PATTERNS FP16_PASSTHROUGH_PATTERNS
FP_STORAGE GATED_ATTENTION GATE_ATTN_OUT GATE_ATTN_SRC GATE_MLP_OUT GATE_WIDTH GLOBAL_TTT_DOC_LIMIT GPTQ_AR_SELFGEN
GPTQ_BATCH_SIZE GPTQ_BLOCK_SIZE GPTQ_CALIB_BATCHES GPTQ_CALIB_SAMPLES GPTQ_ENABLED GPTQ_RESERVE_MS GPTQ_TEMPERATURE
HEAD_LR HESSIAN_CLIP_LAMBDA INT4_LAYERS INT4_STEP INT6_LAYER_END INT6_LAYER_START INT8_FULL_RANGE_PATTERNS
INT8_KEEP_FLOAT_FP32_NAME_PATTERNS LATE_QAT LATE_QAT_THRESHOLD LAWA_ENABLED LAWA_FREQ LAWA_K LOOP_LAYER_BITS
LOOP_LAYER_CLIP_SIGMAS LOOP_PHASE2_AT LORA_LR LORA_RANK MATRIX_LR_EARLY MATRIX_LR_LATE MIXED_QUANT MLP_HIDDEN
MTP_LOSS_WEIGHT MTP_NUM_HEADS MUON_BETA2 MUON_WEIGHT_DECAY NEGATIVE_SLOPE N_INT6_LAYERS PARALLEL_RESIDUAL
PARALLEL_RESIDUAL_START PARALLEL_START_LAYER_IS_PHYSICAL POLAR_EXPRESS POST_GPTQ_EVAL_ONLY PRUNE_RATIO QAT
QAT_ENABLED QAT_INT6 QAT_THRESHOLD QUANT_CLIP_RANGE RECUR_LAYERS RECUR_START_STEP REPEAT_UNTIE_MLP
REPEAT_UNTIE_MLP_LAYERS SKIP_POST_TRAIN_EVAL SLIDING_WINDOW_ENABLED SLOT_ENABLED SLOT_LR SLOT_STEPS SMEAR_GATE
SMEAR_GATE_WIDTH SWA_ENABLED SWA_EVERY SWA_START_FRAC SW_EVAL_BATCH TARGET_MB TRAIN_FILES TRIGRAM TTT_BATCH_SEQS
TTT_CHUNK_TOKENS TTT_DEBUG_BYPASS TTT_DOC_LIMIT TTT_ENTROPY_HIGH TTT_ENTROPY_LOW TTT_EPOCHS TTT_FREEZE_BLOCKS
TTT_GRAD_CLIP TTT_HEARTBEAT_SECONDS TTT_LR TTT_MOMENTUM TTT_NS_STEPS TTT_ONLY TTT_ONLY_EVAL TTT_OUTPUT_DIR
UNTIE_LOOP_MLPS USE_GPTQ USE_INT6 USE_SMEARGATE USE_ZSTD VALUE_RESIDUAL VAL_BATCH_SIZE VAL_FILES VAL_MAX_TOKENS
VE_DIM VE_ENABLED VE_LAYERS WD_TAPER_FINAL_MULT WD_TAPER_START_FRAC WEIGHT_DECAY ZSTD_LEVEL
ACTIVATION ADAM_LR ATTN_PROJ_TYPE BATCH_SCHEDULE_FRACTION BATCH_TOKENS_START BIGRAM_HASH BITNET_GROUP_SIZE
CHURN_LOG_EVERY COMPILE_MODE CORR_WEIGHT_LR DIFF_ATTN EMBED_DIM EVAL_DEPTH_RECURRENCE LOGIT_HEAD_TYPE MATRIX_OPTIMIZER
MLP_GROUPS MTP_HEADS REFINER REFINER_KERNEL ROPE_TYPE SEQ_LEN_START SEQ_SCHEDULE_FRACTION SLIDING_BATCH_SIZE
SLIDING_EVAL SLIDING_EVAL_STRIDE SMEAR SOFTCAP_TYPE TEMP_SCALING TRAINING_DEPTH_RECURRENCE TVERSKY_FEATURE_POOLS
TVERSKY_MEMBERSHIP TVERSKY_NUM_FEATURES UNTIE_AT_FRACTION WARMDOWN_FRACTION YARN_MAX_LEN
""".split()


def foreign_names(names):
    ours = {field.name.upper() for field in T.dataclasses.fields(T.Hyperparameters)}
    applied = ours | set(T.SETTING_ALIASES) | set(T.RECORD_TRANSLATIONS)
    return applied, [name for name in names if name not in applied]


def test_no_name_pr2014s_script_reads_is_ignored():
    """Each is one of ours, an alias, a translation, or refused: a name read by nobody here must raise."""
    applied, foreign = foreign_names(PR2014_NAMES)
    assert len(PR2014_NAMES) == len(set(PR2014_NAMES)) == 156
    assert {"TRAIN_SEQ_SCHEDULE", "ASYM_LOGIT_RESCALE", "EVAL_INCLUDE_TAIL"} <= applied
    assert {"MIDRUN_CAP_SCHEDULE", "TTT_WARM_START_MEAN_ENABLED", "LOAD_ARTIFACT_PATH"} <= set(foreign)
    for name in foreign:
        with pytest.raises(T.ConfigError, match=f"{name}='1' is a setting of the challenge records"):
            T.Hyperparameters.from_env({"PRESET": "record", name: "1"})


def test_no_name_the_baseline_or_a_records_script_reads_is_ignored():
    applied, foreign = foreign_names(RECORD_SCRIPT_NAMES)
    assert len(RECORD_SCRIPT_NAMES) == len(set(RECORD_SCRIPT_NAMES) - set(PR2014_NAMES)) == 165
    assert {"BIGRAM_VOCAB_SIZE", "TTT_FREEZE_BLOCKS", "VE_ENABLED"} <= applied
    for name in foreign:
        with pytest.raises(T.ConfigError, match=f"{name}='1' is a setting of the challenge records"):
            T.Hyperparameters.from_env({name: "1"})
    # the baseline's own: its float tensors kept in fp32 at export
    with pytest.raises(T.ConfigError, match="use VECTORS_FP32 instead"):
        T.Hyperparameters.from_env({"INT8_KEEP_FLOAT_FP32_NAME_PATTERNS": "attn_scale"})
    with pytest.raises(T.ConfigError, match="use MUON_ORTHOGONALIZER instead"):  # the 04-06 record's, off by default
        T.Hyperparameters.from_env({"POLAR_EXPRESS": "0"})
    with pytest.raises(T.ConfigError, match=r"use COMPILE and COMPILE_SCOPE \(torch.compile's default mode\) instead"):
        T.Hyperparameters.from_env({"COMPILE_MODE": "reduce-overhead"})  # the ternary record's CUDA graphs
