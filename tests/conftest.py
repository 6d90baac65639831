"""Shared fixtures: the repository on sys.path, the real-text corpus beside it, and a small exported dataset."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
sys.path.insert(0, str(REPO / "records"))  # make.py and stats.py, the records tools


@pytest.fixture(scope="session")
def corpus():
    """../shared/corpus (real FineWeb docs and the challenge's tokenizers), or a skip that says why."""
    if not (CORPUS / "fineweb_docs_200.jsonl").is_file():
        pytest.skip(f"the shared corpus is absent ({CORPUS}); these tests need real FineWeb text")
    return CORPUS


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The embedded offline sample (stdlib docstrings), exported by the same code path users run."""
    import prepare_docs
    root = tmp_path_factory.mktemp("sample")
    data_dir, tokenizer = prepare_docs.prepare("stdlib", "stdlib", vocab_size=1024, output_root=root)
    return data_dir, tokenizer


@pytest.fixture(scope="session")
def caseops_sample(tmp_path_factory):
    """The offline sample exported with --caseops: (dataset folder, its tokenizer, the original validation texts)."""
    import prepare_docs
    root = tmp_path_factory.mktemp("caseops")
    data_dir, tokenizer = prepare_docs.prepare("stdlib", "stdlib", vocab_size=1024, output_root=root, caseops=True)
    return data_dir, tokenizer, prepare_docs._stdlib_doc_list(0)[:prepare_docs.STDLIB_VAL_DOCS]


def run_script(args, env_overrides, cwd, timeout=600):
    """Runs a command with the environment cleaned of run settings, plus `env_overrides`; returns the result."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRESET")}
    env.update(env_overrides)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def set_run_env(monkeypatch, env, cwd):
    """For a run in this process (train_gpt.main()): `env` in the environment, cleaned of run settings as run_script
    cleans it, and `cwd` the working directory; monkeypatch restores both."""
    for key in [k for k in os.environ if k in env or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRESET")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.chdir(cwd)


def small_hp(preset="", **overrides):
    """Hyperparameters of a small model: the default stack with its looped segment and parallel lanes placed to fit
    NUM_LAYERS (middle layer looped once, parallel lanes on the last layer), or a preset's model."""
    import train_gpt as T
    layers = overrides.get("num_layers", 4)
    values = dict(num_layers=layers, model_dim=32, num_heads=2, num_kv_heads=1, vocab_size=64, train_seq_len=32,
                  eval_stride=16, loop_start=layers // 2, loop_end=layers // 2, num_loops=1,
                  parallel_start_layer=layers - 1)
    for name in filter(None, preset.split(",")):
        values.update(T.PRESETS[name])
    values.update(overrides)
    return T.Hyperparameters(**values)


def tiny_env(sample, **overrides):
    """The env of a CLI run of a two-layer model on the offline sample (seconds per run), plus `overrides`."""
    data_dir, tokenizer = sample
    env = dict(PRESET="smoke", DATA_PATH=str(data_dir), TOKENIZER_PATH=str(tokenizer), NUM_LAYERS="2", NUM_LOOPS="0",
               PARALLEL_RESIDUALS="0", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_BATCH_TOKENS="1024",
               GRAD_ACCUM_STEPS="1", WARMUP_STEPS="0", EVAL_STRIDE="0", GPTQ_CALIBRATION_BATCHES="2",
               SIZE_TARGET_BYTES="0", TRAIN_LOG_EVERY="1", WARMDOWN_FRAC="0", ITERATIONS="6")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def evaluation_only_env(env, artifact, **settings):
    """A training run's `env` made an evaluation-only run of its `artifact`, plus `settings`: what such a run never
    reads, which it refuses, is left out (and RECORD_DIR, which it cannot go with)."""
    import train_gpt as T
    unread = {name.upper() for name in T.unread_when_evaluating_only(T.Hyperparameters)} | {"RECORD_DIR"}
    return {k: v for k, v in env.items() if k not in unread} | dict(EVAL_ONLY_QUANTIZED_PATH=str(artifact), **settings)
