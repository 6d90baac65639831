"""Hyperparameters from the environment, their errors, `--help`, and the table that documents them
(docs/configuration.md)."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as T
from conftest import run_script

REPO = Path(__file__).resolve().parent.parent


def test_env_vars_are_typed_and_override_presets():
    hp, sources = T.Hyperparameters.from_env({"PRESET": "smoke", "NUM_LAYERS": "6", "TIE_EMBEDDINGS": "false",
                                              "MATRIX_LR": "0.02"})
    assert hp.num_layers == 6 and hp.tie_embeddings is False and hp.matrix_lr == 0.02
    assert hp.model_dim == T.PRESETS["smoke"]["model_dim"]
    assert sources["num_layers"] == "env" and sources["model_dim"] == "preset:smoke" and sources["seed"] == "default"


@pytest.mark.parametrize("env, name", [
    ({"NUM_LAYERS": "nine"}, "NUM_LAYERS"),
    ({"COMPILE": "maybe"}, "COMPILE"),
    ({"PRESET": "huge"}, "PRESET"),
    ({"MODEL_DIM": "500"}, "MODEL_DIM"),  # 500 is not divisible by 8 heads
    ({"NUM_KV_HEADS": "3"}, "NUM_HEADS"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE"),
    ({"COMPRESSOR": "lz4"}, "COMPRESSOR"),
    ({"ATTN_BACKEND": "flash"}, "ATTN_BACKEND"), ({"ATTN_BACKEND": "flex"}, "ATTN_BACKEND"),
    ({"ITERATIONS": "0"}, "ITERATIONS"),
    ({"SEED": "7", "SEEDS": "1 2"}, "SEED=7 has no effect with SEEDS='1 2'"),  # each seed's run takes its own
])
def test_bad_settings_fail_early_naming_the_env_var(env, name):
    with pytest.raises(T.ConfigError, match=name):
        T.Hyperparameters.from_env(env)


@pytest.mark.parametrize("env, message", [
    ({"TTT_Q_LORA": "0"}, "TTT_Q_LORA=0 has no effect unless TTT_ENABLED=1 and TTT_METHOD=lora"),
    ({"KERNEL_STAGE_RESTARTS": "1", "KERNEL_SCHEDULE": "1@0,3@0.5", "CONV_K": "3"}, "KERNEL_STAGE_RESTARTS=1: "),
    ({"MLP_ACTIVATION": "gelu"}, "MLP_ACTIVATION='gelu'"),
])
def test_a_refusal_spells_the_value_as_the_variable_takes_it(env, message):
    """A switch reads 1 or 0 in the message, as the user writes it, not Python's True or False."""
    with pytest.raises(T.ConfigError, match=re.escape(message)):
        T.Hyperparameters.from_env(env)


@pytest.mark.parametrize("env, message", [
    ({"KERNEL_STAGE_RESTARTS": "1"}, "KERNEL_STAGE_RESTARTS=1 has no effect unless KERNEL_SCHEDULE"),
    ({"GLOBAL_TTT_RESPECT_DOC_BOUNDARIES": "1"}, "has no effect unless TTT_ENABLED=1 and PHASED_TTT_ENABLED=1"),
    ({"GPTQ_CLIP_SEARCH": "gptq", "GPTQ_DAMP": "-1"}, "has no effect unless GPTQ=1 and QUANT_CLIP=percentile"),
    ({"RECORD_AUTHOR": "A. Person"}, "has no effect unless RECORD_DIR or RECORD_NAME"),  # no folder to write it in
])
def test_a_setting_whose_switch_is_off_is_refused_for_that_before_anything_else_its_value_breaks(env, message):
    """Naming the missing switch first: fixing the value's other complaint first would only lead to this one."""
    with pytest.raises(T.ConfigError, match=re.escape(message)):
        T.Hyperparameters.from_env(env)


@pytest.mark.parametrize("gates, reads_window", [
    ({"ATTN_GATE": "none", "SMEAR_GATE": "0"}, False), ({"ATTN_GATE": "head", "SMEAR_GATE_FORM": "blend"}, False),
    ({"ATTN_GATE": "sparse", "SMEAR_GATE": "0"}, True), ({"ATTN_GATE": "output", "SMEAR_GATE": "0"}, True),
    ({"ATTN_GATE": "none"}, True),  # the scalar SmearGate reads it
])
def test_a_default_no_gate_reads_refuses_no_model_narrower_than_it(gates, reads_window):
    """GATE_WINDOW's default (12) is checked against MODEL_DIM only where a gate reads it: a model of width 8 without
    those gates builds and runs; with one of them it is refused, naming the setting to lower."""
    env = dict(MODEL_DIM="8", NUM_HEADS="2", NUM_KV_HEADS="2", ROPE_DIMS="4", NUM_LAYERS="2", NUM_LOOPS="0",
               PARALLEL_RESIDUALS="0", VOCAB_SIZE="64", **gates)
    if reads_window:
        with pytest.raises(T.ConfigError, match=re.escape("GATE_WINDOW=12: must be in 1..MODEL_DIM=8")):
            T.Hyperparameters.from_env(env)
        env["GATE_WINDOW"] = "8"
    hp, _ = T.Hyperparameters.from_env(env)
    logits = T.GPT(hp).logits(torch.randint(0, 64, (1, 16)))
    assert logits.shape == (1, 16, 64) and torch.isfinite(logits).all()


def test_a_presets_value_whose_switch_you_turned_off_returns_to_its_default_and_says_so():
    """PR #2014's packed rows need document isolation: with DOC_ISOLATION=0 they, and the length schedule they carry,
    have no effect, so nothing may read them (the loader once still made packed rows, the log still a schedule)."""
    hp, sources = T.Hyperparameters.from_env({"PRESET": "pr2014", "DOC_ISOLATION": "0"})
    assert (hp.train_rows, hp.train_seq_schedule, hp.seq_change_warmup_steps, hp.piece_len) == ("seq", "", 0, 0)
    for name in ("train_rows", "train_seq_schedule", "seq_change_warmup_steps"):
        assert sources[name] == "inert:preset:pr2014", name
    hp, sources = T.Hyperparameters.from_env({"PRESET": "pr2014"})
    assert (hp.train_rows, hp.piece_len, sources["train_rows"]) == ("packed", 3072, "preset:pr2014")
    # An inert value you set is still refused, not reset: you asked for it. So is one whose switch only the preset
    # set, now reset; the message says why that switch is off.
    with pytest.raises(T.ConfigError, match="TRAIN_ROWS='packed' has no effect unless DOC_ISOLATION=1"):
        T.Hyperparameters.from_env({"PRESET": "pr2014", "DOC_ISOLATION": "0", "TRAIN_ROWS": "packed"})
    with pytest.raises(T.ConfigError, match=re.escape(
            "SEQ_CHANGE_WARMUP_STEPS=4 has no effect unless TRAIN_SEQ_SCHEDULE; set that too, or unset "
            "SEQ_CHANGE_WARMUP_STEPS (TRAIN_SEQ_SCHEDULE, which PRESET=pr2014 sets, has no effect either: it needs "
            "TRAIN_ROWS=packed)")):
        T.Hyperparameters.from_env({"PRESET": "pr2014", "DOC_ISOLATION": "0", "SEQ_CHANGE_WARMUP_STEPS": "4"})


CONFIGURATION_DOC = REPO / "docs" / "configuration.md"


def readme_table():
    """{ENV_VAR: default cell} from the configuration table (docs/configuration.md)."""
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", CONFIGURATION_DOC.read_text(), re.M)
    return dict(rows)


def test_the_configuration_table_has_the_code_groups_in_order_each_with_its_settings():
    rows = re.findall(r"^\| (?:\*\*(.+?)\*\*.*?|`([A-Z0-9_]+)`) \|", CONFIGURATION_DOC.read_text(), re.M)
    expected = []
    for field in dataclasses.fields(T.Hyperparameters):
        if field.metadata.get("group"):
            expected.append((field.metadata["group"], ""))
        expected.append(("", field.name.upper()))
    assert len(expected) > len(dataclasses.fields(T.Hyperparameters)) + 10 and rows == expected


def test_help_lists_every_setting_by_group_and_every_preset_and_starts_nothing(tmp_path):
    result = run_script([sys.executable, str(REPO / "train_gpt.py"), "--help"], {}, tmp_path)
    assert result.returncode == 0 and not (tmp_path / "logs").exists()
    for field in dataclasses.fields(T.Hyperparameters):
        assert re.search(rf"(^|\s){field.name.upper()}=", result.stdout), field.name
        if field.metadata.get("group"):
            assert f"\n{field.metadata['group']}:\n" in result.stdout
    assert all(name in result.stdout for name in T.PRESETS) and "docs/configuration.md" in result.stdout
    refused = run_script([sys.executable, str(REPO / "train_gpt.py"), "--iterations", "3"], {}, tmp_path)
    assert refused.returncode == 1 and "takes no arguments" in refused.stderr and not (tmp_path / "logs").exists()
    # `--help | head`: a reader that closes the pipe early (here before the text is written) gets no traceback
    reader_gone = subprocess.Popen([sys.executable, str(REPO / "train_gpt.py"), "--help"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=tmp_path)
    reader_gone.stdout.close()
    assert reader_gone.wait(timeout=120) == 0 and reader_gone.stderr.read() == b""


def test_readme_table_documents_every_env_var_with_its_default():
    table = readme_table()
    fields = {f.name.upper(): f.default for f in dataclasses.fields(T.Hyperparameters)}
    assert set(table) == set(fields)
    for name, default in fields.items():
        assert table[name] == ("\"\"" if default == "" else str(default)), \
            f"README default of {name} is {table[name]!r}, the code says {default!r}"


def test_only_the_hyperparameters_block_reads_the_environment():
    allowed = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"}  # torchrun's (and threads)
    source = (REPO / "train_gpt.py").read_text().splitlines()
    lines = [(n, line) for n, line in enumerate(source, 1) if "os.environ" in line]
    assert any("environ = os.environ if environ is None" in line for _, line in lines)  # Hyperparameters.from_env
    for number, line in lines:
        if "environ = os.environ if environ is None" in line:
            continue
        names = set(re.findall(r"[\"']([A-Z_]+)[\"']", line))
        assert names and names <= allowed, \
            f"train_gpt.py:{number} reads the environment outside Hyperparameters: {line.strip()}"


def test_readme_test_command_is_what_ci_runs():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    command = re.search(r"```bash\n(.*?)\n```", readme.split("## Quick start")[1], re.S).group(1).splitlines()[-1]
    assert command in ci, f"the README's last quick-start line is not in .ci/run: {command}"
