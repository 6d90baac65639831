"""Behaviour pinned: one fixed smoke run through every phase (training with the recurrence switching on, GPTQ
calibration, export, round trip, sliding windows, chunk TTT) logs the losses and scores written here. A change that
moves any of them changed what the script computes; one that only moves code leaves them as they are.

Its text is made up here from a seeded generator, the same on every Python version: the offline sample is the
running Python's own docstrings, which differ from one version to the next. The values were logged by this machine's
kind (two CPU cores, Python 3.11, torch 2.13.0+cpu), which CI shares; torch 2.9.1 and, on Python 3.12, torch 2.11.0
log the same bits there. The tolerances leave room for other CPU kernels' summation orders, not for a change of the
math: a 1% change of the Muon LR moves the third step's loss by 4e-4 and the scores by 9e-4. Finer changes of the
export can hide inside them (10% more GPTQ damping moves the round trip by 2e-5): test_export.py holds GPTQ itself."""

import hashlib
import itertools
import json
import random
import re
import sys

import pytest

from conftest import REPO, run_script

SCRIPT = str(REPO / "train_gpt.py")
SETTINGS = dict(PRESET="smoke", NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", LOOP_START="1",
                LOOP_END="2", PARALLEL_START_LAYER="3", TRAIN_BATCH_TOKENS="2048", GRAD_ACCUM_STEPS="2",
                ITERATIONS="12", WARMUP_STEPS="2", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="6",
                GPTQ_CALIBRATION_BATCHES="2", SIZE_TARGET_BYTES="0", EVAL_STRIDE="128", TTT_ENABLED="1",
                TTT_METHOD="chunk", TTT_CHUNK_TOKENS="8192", TTT_EPOCHS="1", TTT_BATCH_SEQS="8", RUN_ID="pinned")
PINNED_LOSSES = {1: 6.9281, 2: 6.7599, 3: 6.3959, 4: 6.1752, 5: 6.0901, 6: 6.0017, 7: 5.8181, 8: 5.6201, 9: 5.7169,
                 10: 5.5, 11: 5.4296, 12: 5.368}  # step: train loss, as logged
PINNED_SCORES = dict(pre_quant_val_bpb=1.9524378538, final_int6_brotli_roundtrip_val_bpb=1.9527566744,
                     final_sliding_window_val_bpb=1.9523704523, final_ttt_val_bpb=1.9520053644)
MADE_UP_DIGEST = "1c4b056d0e6a719b"  # sha256 of the 1,500 documents joined by newlines, first 16 hex digits
LOSS_TOLERANCE = 1.5e-4  # the log rounds losses to 4 decimals
SCORE_TOLERANCE = 5e-5


def made_up_documents(count, seed=0):
    """`count` documents of made-up words (one to three syllables) drawn with Zipf's frequencies, in sentences.
    Only the seeded Mersenne Twister's draws decide them, and those are the same on every Python version."""
    rng = random.Random(seed)
    syllables = [consonant + vowel for consonant in "bdfgklmnprstvz" for vowel in "aeiou"]
    lexicon = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)})
    rng.shuffle(lexicon)  # the frequent words are not the alphabetically first
    cumulative = list(itertools.accumulate(1 / rank for rank in range(1, len(lexicon) + 1)))

    def sentence():
        return " ".join(rng.choices(lexicon, cum_weights=cumulative, k=rng.randint(5, 15))).capitalize() + "."
    return [" ".join(sentence() for _ in range(rng.randint(2, 10))) for _ in range(count)]


@pytest.fixture(scope="module")
def pinned_data(tmp_path_factory):
    """The made-up corpus exported as the sample is (150 validation documents, a 1,024-token BPE)."""
    import prepare_docs
    root = tmp_path_factory.mktemp("made_up")
    source = root / "made_up.jsonl"
    source.write_text("".join(json.dumps(dict(text=text)) + "\n" for text in made_up_documents(1500)))
    return prepare_docs.prepare(str(source), name="made_up", vocab_size=1024, num_val_docs=150,
                                output_root=root / "data")


def test_the_made_up_text_is_the_same_on_every_python():
    """The corpus, pinned by its digest: a change of the generator, or of Python's draws, would change it."""
    digest = hashlib.sha256("\n".join(made_up_documents(1500)).encode()).hexdigest()[:16]
    assert digest == MADE_UP_DIGEST, digest


@pytest.fixture(scope="module")
def pinned_log(pinned_data, tmp_path_factory):
    data_dir, tokenizer = pinned_data
    cwd = tmp_path_factory.mktemp("pinned")
    env = dict(SETTINGS, DATA_PATH=str(data_dir), TOKENIZER_PATH=str(tokenizer))
    result = run_script([sys.executable, SCRIPT], env, cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return (cwd / "logs" / "pinned.txt").read_text()


def test_the_smoke_run_goes_through_every_phase(pinned_log):
    for line in ("recurrence: activated at step:", "gptq_calibration: batches:2 ", "quantization: bits:6 ",
                 "\nfinal_int6_brotli_roundtrip_exact ", "\nfinal_sliding_window_exact ", "\nfinal_ttt_exact ",
                 "\nstep:6/12 val_loss:"):
        assert line in pinned_log, line


def test_the_train_losses_are_the_pinned_ones(pinned_log):
    losses = {int(s): float(v) for s, v in re.findall(r"^step:(\d+)/\d+ train_loss:([\d.]+)", pinned_log, re.M)}
    assert sorted(losses) == sorted(PINNED_LOSSES)
    for step, loss in PINNED_LOSSES.items():
        assert losses[step] == pytest.approx(loss, abs=LOSS_TOLERANCE), step


def test_the_scores_are_the_pinned_ones(pinned_log):
    summary = json.loads(re.search(r"^summary_json: (.*)$", pinned_log, re.M).group(1))
    for field, value in PINNED_SCORES.items():
        assert summary[field] == pytest.approx(value, abs=SCORE_TOLERANCE), field
