"""
train_gpt.py: one self-contained script for the parameter-golf speedrun.

Train the best language model whose artifact (this file's bytes + the compressed weights) fits in
16,000,000 bytes, in 10 minutes on 8xH100, scored by bits per byte on the FineWeb validation split.

    torchrun --standalone --nproc_per_node=8 train_gpt.py     # a record-style run
    python3 train_gpt.py                                      # one process, CUDA or CPU
    PRESET=smoke python3 train_gpt.py                         # tiny CPU run on the offline sample

Every knob is an environment variable declared once in `Hyperparameters` (`--help` lists them by group;
docs/configuration.md has the table).
Sections, in order: hyperparameters, data, model, optimizer, quantization/export, evaluation, main, and the
settings of other scripts (the baseline's and the records' names, applied, translated or refused).
"""

import ast
import base64
import bisect
import contextlib
import copy
import dataclasses
import datetime
import difflib
import functools
import errno
import glob
import hashlib
import io
import itertools
import json
import lzma
import math
import os
import pickle
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import tokenize
import traceback
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# ============================================================================================
# HYPERPARAMETERS
# ============================================================================================


class ConfigError(ValueError):
    """A bad setting: the message names the environment variable or file to fix."""


def setting(default, check="", needs="", group=""):
    """A field of `Hyperparameters` with its rules, in one place: `check` is its range (a key of RANGE_CHECKS) or its
    choices ("a|b|c"); `needs` is the switch without which it has no effect (see `switched_on`), so that one set
    explicitly while switched off is refused rather than ignored. `group` opens a group of settings (`--help`)."""
    return dataclasses.field(default=default, metadata=dict(check=check, needs=needs, group=group))


def as_given(value):
    """A setting's value as its variable spells it in a message: a switch as 1 or 0, anything else quoted."""
    return int(value) if isinstance(value, bool) else repr(value)


RANGE_CHECKS = {">0": (lambda v: v > 0, "must be positive"), ">=0": (lambda v: v >= 0, "must be zero or positive"),
                "[0,1)": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
                "[0,1]": (lambda v: 0 <= v <= 1, "must be in [0, 1]")}
CHUNK_TTT, LORA_TTT = "TTT_ENABLED=1 and TTT_METHOD=chunk", "TTT_ENABLED=1 and TTT_METHOD=lora"
# What quantization settings need: bits below 16 (at 16 a tensor is stored as fp16), and, for an SDClip k, SDClip as
# the row scale of the tensors it is the k of (the matrices' QUANT_CLIP; the tables' EMBED_QUANT_CLIP, or same).
QUANTIZED_BITS = "5 or 6 or 7 or 8"
MATRICES_QUANTIZED, TABLES_QUANTIZED = f"QUANT_BITS={QUANTIZED_BITS}", f"EMBED_QUANT_BITS={QUANTIZED_BITS}"
ANY_QUANTIZED = f"{MATRICES_QUANTIZED}, or {TABLES_QUANTIZED}"
# AWQ-lite gives its bits to columns of the matrices GPTQ rounds at fewer bits (the tables only with GPTQ_EMBED=1)
AWQ_LITE_PROTECTS = ("GPTQ=1 and QUANT_BITS < AWQ_LITE_BITS, or GPTQ=1 and GPTQ_EMBED=1 and "
                     "EMBED_QUANT_BITS < AWQ_LITE_BITS")
SDCLIP_MATRICES = f"QUANT_CLIP=sdclip and {MATRICES_QUANTIZED}"
SDCLIP_TABLES = (f"EMBED_QUANT_CLIP=sdclip and {TABLES_QUANTIZED}, "
                 f"or EMBED_QUANT_CLIP=same and QUANT_CLIP=sdclip and {TABLES_QUANTIZED}")
# The passes that score in windows of EVAL_SEQ_LEN, which EVAL_DOC_ISOLATED keeps inside documents: the sliding pass
# and chunk TTT (the round trip's plain windows are TRAIN_SEQ_LEN's, never isolated; LoRA TTT's are its own).
EVAL_WINDOWS = f"EVAL_STRIDE > 0 and TTT_EVAL_ONLY=0, or {CHUNK_TTT}"
PHASED_TTT = "TTT_ENABLED=1 and PHASED_TTT_ENABLED=1"
SHORT_SCORE_FIRST = f"{LORA_TTT} and TTT_SHORT_SCORE_FIRST_ENABLED=1"
RECORD_FOLDER = "RECORD_DIR or RECORD_NAME"  # a run that writes a records folder (its submission.json's fields)
GATES_READ_WINDOW = "ATTN_GATE=output or sparse, or SMEAR_GATE=1 and SMEAR_GATE_FORM=scalar"


def switched_on(values, condition):
    """Whether a `needs` condition holds for the settings' `values` ({field: value}): alternatives joined by ", or ",
    each a set of clauses joined by " and ", each clause "NAME=a or b" (the value is one of them; booleans are 1 and 0),
    "NAME < NAME" (two numbers compared), or "NAME or NAME > 0" (any of them is set: nonzero, or a nonempty
    string)."""
    def clause_holds(clause):
        if " < " in clause:
            low, high = (values[name.lower()] for name in clause.split(" < "))
            return low < high
        if "=" in clause:
            name, allowed = clause.split("=", 1)
            value = values[name.lower()]
            return str(int(value) if isinstance(value, bool) else value) in allowed.split(" or ")
        set_ = lambda value: bool(value.strip()) if isinstance(value, str) else bool(value)
        return any(set_(values[name.lower()]) for name in clause.replace(" > 0", "").split(" or "))
    return any(all(clause_holds(clause) for clause in alternative.split(" and "))
               for alternative in condition.split(", or "))


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Every setting of a run. The environment variable is the field name in upper case."""

    # named bundles of defaults (baseline, pr754, pr703, pr1392, neon213, record, pr2014, smoke; "pr1392,smoke"
    # applies both in order); empty = none
    preset: str = setting("", group="run and data")
    # name of logs/<RUN_ID>.txt and of the artifacts (letters, digits, . _ -); empty = a timestamp plus a random
    # suffix
    run_id: str = ""
    # allow a RUN_ID whose log already exists (its files are replaced); off = such a run is refused
    overwrite_run: bool = False
    # raw weights (logs/<RUN_ID>_raw.pt) of an interrupted or crashed run: skip training, then calibrate, export and
    # evaluate them
    finish_from: str = ""
    # an artifact (.ptz) to evaluate with this run's evaluation settings; nothing is trained, calibrated or exported,
    # so the settings only those read are refused
    eval_only_quantized_path: str = ""
    # with EVAL_ONLY_QUANTIZED_PATH: TTT only, the round-trip and sliding evaluations skipped (the records'
    # TTT_EVAL_ONLY)
    ttt_eval_only: bool = False
    seed: int = 1337  # seeds initialization (and sampling), not the data order, as in the challenge
    # training data order: -1 = the challenge's (the sorted shards read as one stream); >= 0 = windows shuffled per
    # epoch from (DATA_SEED, epoch, shard)
    data_seed: int = -1
    seeds: str = ""  # several seeds run one after another (e.g. "1337 42 2025"), each its own log; empty = SEED
    # the records' DATA_DIR: the folder that replaces ./data in the default DATA_PATH and TOKENIZER_PATH; empty =
    # ./data
    data_dir: str = ""
    data_path: str = "./data/datasets/fineweb10B_sp1024"  # folder of fineweb_train_*.bin / fineweb_val_*.bin shards
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"  # SentencePiece model that made the shards
    vocab_size: int = setting(1024, ">0")  # must equal the tokenizer's vocabulary size
    # when set, each seed leaves its log, the counted code and its index lines here; records/make.py builds the rest
    record_dir: str = ""
    # submission.json "name"; with RECORD_DIR empty, the record goes to
    # records/track_10min_16mb/<date>_<RECORD_NAME>/
    record_name: str = ""
    # submission.json "author" (kept from the folder's submission.json when empty)
    record_author: str = setting("", needs=RECORD_FOLDER)
    record_github_id: str = setting("", needs=RECORD_FOLDER)  # submission.json "github_id" (likewise)
    record_blurb: str = setting("", needs=RECORD_FOLDER)  # submission.json "blurb" (likewise)

    iterations: int = setting(20000, ">0", group="schedule and batch")  # maximum number of optimizer steps
    # training-time cap (warmup, validation and export excluded); 0 = none
    max_wallclock_seconds: float = setting(600.0, ">=0")
    # untimed compile/warmup steps on training data, undone before training starts
    warmup_steps: int = setting(20, ">=0")
    # global batch in tokens per optimizer step, at every world size (the records' since March)
    train_batch_tokens: int = setting(786_432, ">0")
    # training sequence length (the records' since March; the baseline's 1024 is PRESET=baseline)
    train_seq_len: int = setting(2048, ">0")
    grad_accum_steps: int = setting(0, ">=0")  # micro-steps per optimizer step; 0 = 8 // WORLD_SIZE as in the challenge
    # seq: each micro-batch is rows of TRAIN_SEQ_LEN cut from the stream, a document crossing a row's end going on
    # in the next row; packed: each micro-batch is one row, its whole span of the stream, with every document cut
    # into pieces of at most TRAIN_SEQ_LEN from its own start (the 04-27 record's DocumentPackingLoader), and the
    # phases' global SGD packed as the record packs it (see adapt_on_chunk)
    train_rows: str = setting("seq", "seq|packed", "DOC_ISOLATION=1")
    # the longest piece of TRAIN_ROWS=packed by stage (PR #2014's progressive length): comma-separated L@share
    # items; each step takes the first stage whose share is at or above the share of training done, a last share
    # below 1 keeps its L to the end, and the largest L must be TRAIN_SEQ_LEN; empty = TRAIN_SEQ_LEN throughout
    train_seq_schedule: str = setting("", needs="TRAIN_ROWS=packed")
    # what TRAIN_SEQ_SCHEDULE's shares count: wallclock = the LR schedule's (of the training budget under
    # MAX_WALLCLOCK_SECONDS, else of ITERATIONS); step = of ITERATIONS even under a cap
    train_seq_schedule_mode: str = setting("wallclock", "wallclock|step", "TRAIN_SEQ_SCHEDULE")
    # after a stage change at a step s > 0, the LR is multiplied by (step - s + 1) / N for N steps (the optimizers'
    # LR only: the warmdown's scale, which QAT, SWA and MiLe follow, is left alone); 0 = none
    seq_change_warmup_steps: int = setting(0, ">=0", "TRAIN_SEQ_SCHEDULE")
    train_log_every: int = setting(200, ">=0")  # log the train loss every N steps
    # evaluate on the full validation split every N steps; 0 = only at the end
    val_loss_every: int = setting(1000, ">=0")
    val_batch_size: int = setting(524_288, ">0")  # validation tokens per forward pass, summed over ranks

    # the model's defaults: the leaderboard's strongest stack; PRESET=baseline is the challenge baseline
    num_layers: int = setting(11, ">0", group="model: size")  # physical transformer blocks
    model_dim: int = setting(512, ">0")  # residual width
    num_heads: int = setting(8, ">0")  # query heads
    num_kv_heads: int = setting(4, ">0")  # key/value heads (grouped-query attention)
    mlp_mult: float = setting(4.0, ">0")  # MLP hidden width = MLP_MULT * MODEL_DIM
    # relu2 (the baseline's relu^2), leaky_relu2 (LeakyReLU(slope)^2) or swiglu
    mlp_activation: str = setting("leaky_relu2", "relu2|leaky_relu2|swiglu")
    mlp_leaky_slope: float = setting(0.5, needs="MLP_ACTIVATION=leaky_relu2")  # negative slope of leaky_relu2
    tie_embeddings: bool = True  # share the token embedding with the output head
    tied_embed_init_std: float = setting(0.005, ">=0", "TIE_EMBEDDINGS=1")  # std of the tied embedding at init
    ortho_init: bool = True  # orthogonal init of every random matrix of at least 64 x 64
    # the attention output and MLP down projections start at zero (the baseline's); off = PyTorch's default init
    # (neon213)
    zero_init_proj: bool = True
    logit_softcap: float = setting(30.0, ">=0")  # logits = c * tanh(logits / c); 0 = no softcap (neon213)

    rope_base: float = setting(10000.0, ">0", group="model: attention")  # rotary embedding base
    rope_dims: int = 16  # leading head dims that get RoPE (partial RoPE); 0 = the whole head
    # a forward whose attention reaches T > this many tokens (a row's length; a packed row's longest piece) rotates
    # with the base rescaled to base * (T / this)^(d / (d - 2)) over its d rotary dims (the PR #549 family
    # hard-codes 1024, so its 2,048-token runs use a base of about 22,082); 0 = never
    rope_train_seq_len: int = setting(0, ">=0")
    qk_gain_init: float = 5.0  # initial per-head gain on the normalized queries
    xsa_layers: str = "all"  # layers with exclusive self-attention: all, or comma-separated indices; empty = none
    # per-head gate on the attention output: none, head, biased (PR #549's), output or sparse
    attn_gate: str = setting("sparse", "none|head|biased|output|sparse")
    # s in the sparse gate sigmoid(s * W x[:GATE_WINDOW])
    attn_gate_scale: float = setting(0.5, needs="ATTN_GATE=sparse")
    # input channels read by the output and sparse attention gates and by the scalar SmearGate
    gate_window: int = setting(12, needs=GATES_READ_WINDOW)
    value_residual: bool = False  # every later layer's V also reads layer 0's V (the form: VALUE_RESIDUAL_FORM)
    # sigmoid: v + sigmoid(a) v0, a = 0 (ResFormer); lambda: l0 v0 + l1 v, l = (0.5, 0.5) (PR #549's)
    value_residual_form: str = setting("sigmoid", "sigmoid|lambda", "VALUE_RESIDUAL=1")
    ve_layers: str = ""  # layers whose V gets the shared value embedding (comma-separated); empty = none
    ve_dim: int = setting(128, ">0", "VE_LAYERS")  # width of the value-embedding table
    # the value-embedding projection starts at zero (the identity), or ortho (orthogonal, as in the PR #549 family)
    ve_proj_init: str = setting("zero", "zero|ortho", "VE_LAYERS")

    # causal depthwise conv on Q, K, V (and the Intent) after their projections: kernel taps; 0 = off
    # the neon SwiGLU-Conv family: causal depthwise convolutions, growable kernels
    conv_k: int = setting(0, ">=0", group="model: the neon SwiGLU-Conv family")
    # causal depthwise conv on the input of the SwiGLU gate branch (the "Hydra" conv); 0 = off
    mlp_conv_k: int = setting(0, ">=0")
    # growth of every conv, e.g. 1@0,3@0.1,5@0.2 (taps@fraction of training, or @step if >= 1); empty = full size
    # from the start
    kernel_schedule: str = ""
    # random (U(+-1/sqrt(k)) on the active taps, as neon213) or identity (the current-token tap is 1)
    conv_init: str = setting("random", "random|identity", "CONV_K or MLP_CONV_K > 0")
    # a fourth projection (through its conv) whose sigmoid gates the attention output per channel
    intent_gate: bool = False

    # rows of the BigramHash table (one is reserved for "no previous token"); 0 = off
    bigram_buckets: int = setting(0, group="model: embedding side")
    bigram_dim: int = setting(112, ">0", "BIGRAM_BUCKETS > 0")  # width of the BigramHash table
    smear_gate: bool = True  # SmearGate: mix a gated share of the previous token's embedding in (never across a BOS)
    # attention and the neon convs never read across a BOS inside a packed row or window (VarLenAttn record)
    doc_isolation: bool = False
    # scalar: x + lam sigmoid(w x[:GATE_WINDOW]) x_prev on the raw embedding (identity at init); blend: (1 -
    # sigmoid(g)) x + sigmoid(g) x_prev per channel after the norm, g = 0 (the seed-era form)
    smear_gate_form: str = setting("scalar", "scalar|blend", "SMEAR_GATE=1")
    # RMSNorm of the embedding output (the baseline's); off = neon213, whose embedding feeds the first block as is
    embed_norm: bool = True

    # learnable RMSNorm weights (neon213): per channel on sublayer inputs and the final norm, per head dim on Q and
    # K (the Q weight starts at QK_GAIN_INIT and replaces the per-head gain)
    norm_weights: bool = setting(False, group="model: normalization, residual topology and loss")
    ln_scale: bool = True  # scale each sublayer input by 1/sqrt(layer + 1)
    # learned per-channel scales on every attention and MLP output (the baseline's attn_scale / mlp_scale)
    sublayer_scales: bool = True
    # each block's input blends the residual with the embedding output x0, per channel (the baseline's resid_mix)
    resid_mix: bool = True
    unet_skips: bool = True  # U-Net skips: the first half of the virtual stack feeds the second half in reverse order
    # U-Net skips enter through a learned sigmoid gate instead of a plain add (with UNET_SKIPS)
    skip_gates: bool = setting(True, needs="UNET_SKIPS=1")
    num_loops: int = setting(2, ">=0")  # depth recurrence: extra passes over layers LOOP_START..LOOP_END; 0 = off
    loop_start: int = setting(3, needs="NUM_LOOPS > 0")  # first layer of the looped segment
    loop_end: int = setting(5, needs="NUM_LOOPS > 0")  # last layer of the looped segment (inclusive)
    # recurrence starts at this fraction of training (of the wall-clock cap if set); >= 1: a step
    loop_enable_at: float = setting(0.35, ">=0", "NUM_LOOPS > 0")
    parallel_residuals: bool = True  # two residual lanes with learned routing from PARALLEL_START_LAYER on
    parallel_start_layer: int = setting(8, needs="PARALLEL_RESIDUALS=1")  # first physical layer with parallel lanes
    # routing: both outputs reach both lanes through learned 2x2 weights, lanes averaged at the end; merge: the
    # lanes never exchange and end as m lane0 + (1 - m) lane1, m = 0.5 (PR #1289/#1392)
    parallel_form: str = setting("routing", "routing|merge", "PARALLEL_RESIDUALS=1")
    # Cache+Backout: subtract a learned multiple of the state after this many virtual layers (< 0: all but the last
    # -N); 0 = off
    backout_layer: int = 0
    # initial multiple of the cached state that is subtracted (0 = the identity; PR #703: 0.1)
    backout_init: float = setting(0.0, needs="BACKOUT_LAYER")
    # layers after the cache compute attention keys and values from the cached state (PR #703)
    backout_read: bool = setting(False, needs="BACKOUT_LAYER")
    # MiLe entropy-weighted training loss exponent, decayed with the LR in warmdown; 0 = plain CE
    mile_gamma: float = setting(0.0, ">=0")

    # the optimizer's defaults: the current record's; PRESET=baseline restores the baseline's
    matrix_lr: float = setting(0.026, ">=0", group="optimizer")  # Muon LR for the block matrices
    scalar_lr: float = setting(0.02, ">=0")  # AdamW LR for gains, gates, scales and skip weights
    # AdamW LR for the token tables (tokens, BigramHash, VE) with tied embeddings
    tied_embed_lr: float = setting(0.03, ">=0", "TIE_EMBEDDINGS=1")
    # AdamW LR for the token tables when the embeddings are untied
    embed_lr: float = setting(0.6, ">=0", "TIE_EMBEDDINGS=0")
    head_lr: float = setting(0.008, ">=0", "TIE_EMBEDDINGS=0")  # AdamW LR for the output head when untied
    embed_weight_decay: float = setting(0.085, ">=0")  # AdamW decoupled weight decay of the token tables
    # the token tables are bf16 parameters, updated by AdamW in bf16 and evaluated in bf16 (the records, whose
    # .bfloat16() model cast leaves every nn.Embedding in bf16); off = fp32 master tables
    embed_bf16: bool = False
    # AdamW decoupled weight decay of the gains, gates, scales and skip weights
    scalar_weight_decay: float = setting(0.02, ">=0")
    beta1: float = setting(0.9, "[0,1)")  # AdamW beta1
    beta2: float = setting(0.99, "[0,1)")  # AdamW beta2
    adam_eps: float = setting(1e-8, ">0")  # AdamW epsilon
    muon_momentum: float = setting(0.97, "[0,1)")  # Muon momentum after its warmup
    # Muon momentum at step 0
    muon_momentum_warmup_start: float = setting(0.92, "[0,1)", "MUON_MOMENTUM_WARMUP_STEPS > 0")
    muon_momentum_warmup_steps: int = setting(1500, ">=0")  # steps of the linear Muon momentum warmup
    # quintic (Newton-Schulz, the baseline's) or polar_express
    muon_orthogonalizer: str = setting("polar_express", "quintic|polar_express")
    muon_backend_steps: int = setting(5, ">0")  # orthogonalization iterations per Muon update
    muon_row_normalize: bool = True  # MuonEq-R: normalize each row of the momentum update before orthogonalizing
    # Muon decoupled weight decay (smaller weights also compress better)
    muon_weight_decay: float = setting(0.095, ">=0")
    muon_momentum_int8: bool = False  # keep the Muon momentum in blockwise int8 (1/4 of the fp32 memory)
    # the PR #549 family's bank precision: gradients cast to bf16 before the reduce-scatter, the momentum and the
    # Nesterov update kept in bf16 (with MUON_MOMENTUM_INT8 the momentum stays int8)
    muon_bf16_state: bool = False
    # who trains the BigramHash and value-embedding projections: muon, or adamw with the scalars (the PR #549
    # family)
    embed_proj_optimizer: str = setting("muon", "muon|adamw", "BIGRAM_BUCKETS > 0 or VE_LAYERS")
    # clip the global gradient norm (of the gradient averaged over ranks); 0 = off
    grad_clip_norm: float = setting(0.3, ">=0")
    # clip each rank's own gradient by its own norm before any communication, as the banked records do: Muon then
    # orthogonalizes each bank as its reduce-scatter lands, not after the last; one process: the same clip
    grad_clip_local: bool = setting(False, needs="GRAD_CLIP_NORM > 0")
    # the LR decays linearly to 0 over this final fraction of training (time under a cap)
    warmdown_frac: float = setting(0.85, "[0,1]")
    # the baseline's warmdown in steps (converted with the measured step time under a cap); > 0 replaces
    # WARMDOWN_FRAC
    warmdown_iters: int = setting(0, ">=0")
    # floor of the LR scale during the warmdown
    min_lr_scale: float = setting(0.0, "[0,1)", "WARMDOWN_FRAC or WARMDOWN_ITERS > 0")
    # neon213's regime: every KERNEL_SCHEDULE stage restarts the optimizers (state reset) and decays its LR linearly
    # to 0 within the stage
    kernel_stage_restarts: bool = setting(False, needs="KERNEL_SCHEDULE")

    # exported weights: none (live), ema, swa, or ema_swa (SWA snapshots of the EMA)
    weight_averaging: str = setting("ema", "none|ema|swa|ema_swa", group="weight averaging")
    ema_decay: float = setting(0.9965, "[0,1)", "WEIGHT_AVERAGING=ema or ema_swa")  # EMA decay per step
    # warm the decay up as min(EMA_DECAY, (1 + t) / (10 + t)); off = EMA_DECAY from the first step (the records')
    ema_warmup: bool = setting(True, needs="WEIGHT_AVERAGING=ema or ema_swa")
    swa_every: int = setting(50, ">0", "WEIGHT_AVERAGING=swa or ema_swa")  # SWA takes a snapshot every N steps...
    # ...once the LR scale is below this
    swa_start_lr_scale: float = setting(0.2, needs="WEIGHT_AVERAGING=swa or ema_swa")

    # window length of the final evaluations; 0 = TRAIN_SEQ_LEN
    eval_seq_len: int = setting(0, ">=0", group="evaluation and score-first test-time training")
    eval_stride: int = setting(64, ">=0")  # sliding-window stride of the final evaluation; 0 = no sliding pass
    # Windows never read across a BOS (context comes from the same document only): the sliding pass's and chunk TTT's.
    eval_doc_isolated: bool = setting(False, needs=EVAL_WINDOWS)
    # eval time budget: TTT stops adapting (never scoring) when it would run over
    eval_budget_seconds: float = setting(600.0, ">=0")
    # val_bpb counts the original text's bytes from the CaseOps byte sidecar (prepare_docs.py --caseops)
    caseops_enabled: bool = False
    ttt_enabled: bool = False  # score-first TTT after the sliding evaluation (the method: TTT_METHOD)
    # chunk (the LegalTTT records' chunk SGD) or lora (the 04-27 record's per-document LoRA); empty = the one the
    # other TTT settings name
    ttt_method: str = setting("", "|chunk|lora", "TTT_ENABLED=1")
    # sgd, or adamw (adam: the 04-27 record's spelling of it); empty = sgd for chunk, adamw for lora
    ttt_optimizer: str = setting("", "|sgd|adamw|adam", "TTT_ENABLED=1")
    # chunk: TTT scores, then adapts on, the validation stream in chunks of this many tokens
    ttt_chunk_tokens: int = setting(32768, ">0", CHUNK_TTT)
    ttt_epochs: int = setting(3, ">=0", CHUNK_TTT)  # chunk: passes over each scored chunk
    ttt_lr: float = setting(0.002, ">=0", CHUNK_TTT)  # chunk: peak TTT learning rate, cosine-decayed over chunks
    ttt_momentum: float = setting(0.9, "[0,1)", CHUNK_TTT)  # chunk: SGD momentum, or AdamW beta1
    ttt_batch_seqs: int = setting(32, ">0", CHUNK_TTT)  # chunk: sequences per TTT step, summed over ranks
    ttt_grad_clip: float = setting(1.0, ">=0", CHUNK_TTT)  # chunk: TTT gradient-norm clip; 0 = off
    # chunk: what adapts: all, or comma-separated name patterns (e.g. blocks.8,blocks.9)
    ttt_params: str = setting("all", needs=CHUNK_TTT)
    ttt_lora_rank: int = setting(96, ">0", LORA_TTT)  # lora: rank of each document's adapters
    # lora: adapter outputs are scaled by TTT_LORA_ALPHA / TTT_LORA_RANK (PR #1767)
    ttt_lora_alpha: float = setting(144.0, ">=0", LORA_TTT)
    # lora: a new document resets B only, A stays warm within a phase (PR #1767); off = A re-drawn too
    ttt_warm_start_a: bool = setting(True, needs=LORA_TTT)
    ttt_lora_lr: float = setting(0.0001, ">=0", LORA_TTT)  # lora: adapter learning rate (constant)
    # lora: the adapters' optimizer runs at TTT_LORA_LR times this (the late-April records' local LR multiplier;
    # the phases' global SGD keeps GLOBAL_TTT_LR)
    ttt_local_lr_mult: float = setting(1.0, ">=0", LORA_TTT)
    # lora: each document is scored, then trained on, in chunks of this many targets
    ttt_chunk_size: int = setting(48, ">0", LORA_TTT)
    # lora: batches of short documents are scored and trained on in smaller chunks (PR #2014's short-document
    # score-first): TTT_SHORT_SCORE_FIRST_STEPS, or else TTT_SHORT_DOC_LEN and TTT_SHORT_CHUNK_SIZE
    ttt_short_score_first_enabled: bool = setting(False, needs=LORA_TTT)
    # lora: L:C items (e.g. 256:8,2000:24): a batch whose longest document has at most L tokens (its targets + 1, as
    # the record counts them) takes chunks of C targets, the smallest such L deciding; longer ones TTT_CHUNK_SIZE
    ttt_short_score_first_steps: str = setting("", needs=SHORT_SCORE_FIRST)
    # lora: without TTT_SHORT_SCORE_FIRST_STEPS, the one step TTT_SHORT_DOC_LEN:TTT_SHORT_CHUNK_SIZE; with it, the
    # pair, unless left at its defaults, must be one of its items (the record then ignores the pair)
    ttt_short_doc_len: int = setting(512, ">0", SHORT_SCORE_FIRST)
    ttt_short_chunk_size: int = setting(0, ">=0", SHORT_SCORE_FIRST)  # lora: see TTT_SHORT_DOC_LEN; 0 = TTT_CHUNK_SIZE
    # lora: a chunk's context is at most this many tokens of its own document; 0 = EVAL_SEQ_LEN (else TRAIN_SEQ_LEN);
    # it must hold the largest chunk, which is scored in one window
    ttt_eval_seq_len: int = setting(0, ">=0", LORA_TTT)
    ttt_batch_size: int = setting(64, ">0", LORA_TTT)  # lora: documents adapted side by side (longest batches first)
    ttt_grad_steps: int = setting(1, ">0", LORA_TTT)  # lora: optimizer steps on each scored chunk
    ttt_weight_decay: float = setting(1.0, ">=0", LORA_TTT)  # lora: decoupled weight decay of the adapters
    ttt_beta1: float = setting(0.0, "[0,1)", LORA_TTT)  # lora: AdamW beta1, or SGD momentum
    ttt_beta2: float = setting(0.999, "[0,1)", LORA_TTT)  # lora: AdamW beta2
    # lora: adapters on Q (the output head always has them; the records' TTT_MASK=no_q or no_qv turns this off)
    ttt_q_lora: bool = setting(True, needs=LORA_TTT)
    ttt_k_lora: bool = setting(True, needs=LORA_TTT)  # lora: adapters on K
    ttt_v_lora: bool = setting(True, needs=LORA_TTT)  # lora: adapters on V (TTT_MASK=no_v or no_qv: off)
    # lora: adapters on the attention output, reading the block's normed input
    ttt_o_lora: bool = setting(True, needs=LORA_TTT)
    ttt_mlp_lora: bool = setting(True, needs=LORA_TTT)  # lora: a dim -> dim adapter beside each MLP
    # phased TTT (PR #1610/#1626): after each phase of scored documents, global SGD on all of them
    phased_ttt_enabled: bool = setting(False, needs="TTT_ENABLED=1")
    # the first N documents form the phased prefix: in stream order (chunk), in the longest-first queue's (lora)
    phased_ttt_prefix_docs: int = setting(2000, ">0", PHASED_TTT)
    # the prefix is cut into this many phases of equal document counts
    phased_ttt_num_phases: int = setting(1, ">0", PHASED_TTT)
    # peak SGD learning rate of a phase's global SGD, cosine-decayed over its chunks
    global_ttt_lr: float = setting(0.001, ">=0", PHASED_TTT)
    # SGD momentum of the global SGD (a fresh optimizer each phase)
    global_ttt_momentum: float = setting(0.9, ">=0", PHASED_TTT)
    global_ttt_epochs: int = setting(1, ">=0", PHASED_TTT)  # passes over each chunk of the global SGD
    # the global SGD walks the scored tokens in chunks of this many; the last chunk is not trained on
    global_ttt_chunk_tokens: int = setting(32768, ">0", PHASED_TTT)
    global_ttt_batch_seqs: int = setting(32, ">0", PHASED_TTT)  # sequences per global SGD step, summed over ranks
    global_ttt_grad_clip: float = setting(1.0, ">=0", PHASED_TTT)  # global SGD gradient-norm clip; 0 = off
    # the global SGD's LR rises linearly over this many chunks, then decays
    global_ttt_warmup_chunks: int = setting(0, ">=0", PHASED_TTT)
    global_ttt_warmup_start_lr: float = setting(0.0, ">=0", PHASED_TTT)  # the LR of the first warmup chunk
    # the global SGD's sequences never attend across a BOS; follows DOC_ISOLATION, and a value that differs from it
    # is refused
    global_ttt_respect_doc_boundaries: bool = setting(True, needs=PHASED_TTT)

    # log participation ratios of Q/K/V/Intent (per head) and of each block's output every N steps; 0 = off
    pr_every: int = setting(0, ">=0", group="diagnostics")
    gen_prompt: str = ""  # at the end, sample text from the round-tripped model after this prompt; empty = no sample
    gen_tokens: int = setting(64, ">=0", "GEN_PROMPT")  # tokens to sample
    gen_temperature: float = setting(0.8, ">=0", "GEN_PROMPT")  # sampling temperature; 0 = greedy
    gen_top_k: int = setting(50, ">=0", "GEN_PROMPT")  # sample among the k most likely tokens; 0 = all

    # bits of the projection matrices (5..8), per-row symmetric with an fp16 scale; 16 = stored as fp16, not
    # quantized
    quant_bits: int = setting(6, group="quantization and export")
    # bits of the token tables (tokens, BigramHash, VE); 16 = fp16 (PR #754's fp16 embedding, neon213's fp16 export)
    embed_quant_bits: int = 7
    # row scale: sdclip (k * row std), percentile (GPTQ-lite search), quantile (the baseline's fixed 99.99984th
    # percentile) or rowmax
    quant_clip: str = setting("sdclip", "sdclip|percentile|quantile|rowmax",
                              f"{MATRICES_QUANTIZED}, or EMBED_QUANT_CLIP=same and {TABLES_QUANTIZED}")
    # the token tables' row scale, as QUANT_CLIP's choices (quantile: the PR #549 family's int8 tables); same =
    # QUANT_CLIP
    embed_quant_clip: str = setting("same", "same|sdclip|percentile|quantile|rowmax", TABLES_QUANTIZED)
    # the least clip of a row: its scale is at least this / qmax (the PR #549 family's 1.0: 1/31 at int6); 0 = a
    # 2^-20 floor only
    quant_clip_floor: float = setting(0.0, ">=0", ANY_QUANTIZED)
    clip_k_mlp: float = setting(11.5, ">0", SDCLIP_MATRICES)  # SDClip k of the MLP matrices
    # SDClip k of the attention and other projection matrices
    clip_k_attn: float = setting(13.0, ">0", SDCLIP_MATRICES)
    clip_k_embed: float = setting(14.0, ">0", SDCLIP_TABLES)  # SDClip k of the token tables
    # byte (an int8 per value) or dense (bit-packed)
    quant_packing: str = setting("byte", "byte|dense", ANY_QUANTIZED)
    gptq: bool = True  # full-Hessian GPTQ rounding (matrices and the tied embedding); off = round to nearest
    # the Hessians' inputs: train (fresh training batches) or self (sequences the model samples itself, PR
    # #1019/#1392)
    gptq_calibration: str = setting("train", "train|self", "GPTQ=1")
    # global training batches (after the last step) whose activations give the Hessians
    gptq_calibration_batches: int = setting(16, ">=0", "GPTQ=1 and GPTQ_CALIBRATION=train")
    # sequences the model samples for GPTQ_CALIBRATION=self (split over ranks)
    gptq_self_seqs: int = setting(64, ">0", "GPTQ=1 and GPTQ_CALIBRATION=self")
    # their length in tokens, each started from BOS
    gptq_self_seq_len: int = setting(2048, ">0", "GPTQ=1 and GPTQ_CALIBRATION=self")
    gptq_self_temperature: float = setting(0.8, ">=0", "GPTQ=1 and GPTQ_CALIBRATION=self")  # their sampling temperature
    # the least time taken off MAX_WALLCLOCK_SECONDS for calibration; the reserve is the larger of this and the
    # calibration time measured in the warmup
    gptq_reserve_seconds: float = setting(0.0, ">=0", "GPTQ=1")
    gptq_block_size: int = setting(128, ">0", "GPTQ=1")  # columns per GPTQ block
    gptq_damp: float = setting(0.01, ">=0", "GPTQ=1")  # GPTQ damping, a fraction of the mean Hessian diagonal
    # how GPTQ-lite's quantile is chosen for a matrix GPTQ rounds: rtn (by the round-to-nearest error, then one GPTQ)
    # or gptq (GPTQ once per candidate, keeping the lowest weight MSE: the SP4096 record's)
    gptq_clip_search: str = setting("rtn", "rtn|gptq", "GPTQ=1 and QUANT_CLIP=percentile, or GPTQ=1 and "
                                                        "GPTQ_EMBED=1 and EMBED_QUANT_CLIP=percentile")
    # GPTQ also rounds the tied embedding (the 04-27 record's); off = its rows round to nearest (the SP4096 record's)
    gptq_embed: bool = setting(True, needs=f"GPTQ=1 and {TABLES_QUANTIZED}")
    # AWQ-lite (PR #1953/#2014): the AWQ_LITE_GROUP_TOP_K groups of AWQ_LITE_GROUP_SIZE input columns with the most
    # activation-weighted magnitude, over every matrix GPTQ rounds at fewer bits, get AWQ_LITE_BITS (a finer row scale)
    awq_lite_enabled: bool = setting(False, needs=AWQ_LITE_PROTECTS)
    awq_lite_bits: int = setting(8, needs="AWQ_LITE_ENABLED=1")  # the protected columns' bits (at most 8: int8)
    awq_lite_group_top_k: int = setting(1, ">0", "AWQ_LITE_ENABLED=1")  # groups protected, over all matrices
    awq_lite_group_size: int = setting(64, ">0", "AWQ_LITE_ENABLED=1")  # input columns per group
    lqer_rank: int = setting(0, ">=0")  # LQER: rank of the fp16 correction of the worst-quantized matrices; 0 = off
    lqer_top_k: int = setting(3, ">=0", "LQER_RANK > 0")  # matrices that get the LQER correction
    # LQER's factors in the artifact: 16 = fp16; 2..8 = symmetric per row at that many bits (the records' name)
    lqer_factor_bits: int = setting(16, needs="LQER_RANK > 0")
    # the 04-27 record's packing of LQER's factors: A int2 with one scale, B int4 with a scale per LQER_ASYM_GROUP
    lqer_asym_enabled: bool = setting(False, needs="LQER_RANK > 0")
    lqer_asym_group: int = setting(64, ">0", "LQER_ASYM_ENABLED=1")  # values of B per scale
    # the attention gate's weights as int8 per row, fp16 scales (the records' name); off = fp16
    gated_attn_quant_gate: bool = setting(False, needs="ATTN_GATE=head or biased or output or sparse")
    # STE quantization-aware training from when the LR scale falls below this; 0 = off
    qat_start_lr_scale: float = setting(0.0, ">=0")
    # scale every SDClip k to the finest grid whose artifact fits; 0 = use the k's as given
    size_target_bytes: int = setting(16_000_000, ">=0", f"{SDCLIP_MATRICES}, or QUANT_CLIP=sdclip and "
                                                         f"EMBED_QUANT_CLIP=same or sdclip and {TABLES_QUANTIZED}")
    # float tensors of at most this many elements are stored as fp16, not quantized (the PR #549 family: 65536); 0 =
    # quantize every matrix
    quant_passthrough_numel: int = setting(0, ">=0", ANY_QUANTIZED)
    # the float vectors kept out of quantization (gains, scales, lane weights) in fp32, as the baseline keeps its
    # control tensors; off = fp16, as every record since PR #549 stores every tensor it does not quantize
    vectors_fp32: bool = True
    # zstd (level 22), brotli (quality 11), lzma (preset 6, PR #549's) or zlib (level 9) over the whole file, or
    # pergroup: the integer matrices grouped by kind, laid out column by column, some rows reordered, and each group
    # compressed on its own (the 04-27 record's); a missing package or program is an error
    compressor: str = setting("brotli", "zstd|brotli|lzma|zlib|pergroup")
    # the codec of each per-group stream: lrzip (ZPAQ level 9, the record's; the lrzip program), lzma (preset 9
    # extreme), brotli (quality 11), zstd (level 22), or smallest (of lzma, brotli and zstd, stream by stream)
    pergroup_codec: str = setting("lrzip", "lrzip|lzma|brotli|zstd|smallest", "COMPRESSOR=pergroup")
    # de-interleave the payload's even and odd bytes before compressing
    byte_shuffle: bool = setting(False, needs="COMPRESSOR=zstd or brotli or lzma or zlib")
    # count and ship this file packed (comments and docstrings removed, compressed, self-extracting); 0 = the raw
    # file
    pack_code: bool = True

    device: str = setting("auto", "auto|cuda|cpu", group="systems")  # auto, cuda or cpu
    # torch.compile (inductor): auto = on CUDA only, 1 = on any device (the CPU needs a C++ compiler), 0 = eager
    compile: str = setting("auto", "auto|1|0")
    # model: the whole forward as one graph per layout, as the records compile it; block: one graph per distinct
    # block structure, shared by every layer and loop pass like it, plus the output head and loss (a fraction of the
    # compile time; its step time on a GPU is the GPU check's to measure)
    compile_scope: str = setting("model", "model|block", "COMPILE=auto or 1")
    # auto = bf16 on CUDA, fp32 on the CPU; bf16 = bf16 autocast and Muon updates on any device; off = fp32
    autocast: str = setting("auto", "auto|bf16|off")
    # auto (FA3, then FA2, then SDPA; with DOC_ISOLATION on a compiled GPU run, flex before SDPA), fa3, fa2, sdpa, or
    # flex: FlexAttention with a block mask over packed documents (SDPA for causal rows)
    attn_backend: str = setting("auto", "auto|fa3|fa2|flex|sdpa")
    # > 0: after the warmup, time this many steps per layout, print speed and memory, and stop
    benchmark_steps: int = setting(0, ">=0")
    # the training loss through a fused Triton kernel of the softcapped cross-entropy (the records' name): the same
    # math without fp32 logits in memory; where Triton cannot run, the unfused math, and the log says so
    fused_ce_enabled: bool = setting(False, needs="LOGIT_SOFTCAP > 0")
    # the training MLP's up projection and its (Leaky)ReLU^2 in one Triton kernel, and the backward's through its
    # derivative in another (the 04-27 record's fused MLP): the same math with one (tokens, hidden) pass less each
    # way; where Triton cannot run, the unfused math, and the log says so
    fused_mlp_enabled: bool = setting(False, needs="MLP_ACTIVATION=relu2 or leaky_relu2")
    # AdamW's step on a side CUDA stream while Parallel Muon orthogonalizes (the 04-27 record's overlap); the same
    # updates; without CUDA, one stream (the optimizer: line says which)
    adamw_side_stream: bool = False

    @classmethod
    def from_env(cls, environ=None):
        """Defaults, then the preset, then explicit env vars. Returns (hparams, {field: source}). A variable that
        looks like a setting but is not one of ours (a typo, a name of the baseline or the records) is accepted as
        an alias of the same meaning or refused, never ignored."""
        environ = os.environ if environ is None else environ
        preset_names = [name for name in environ.get("PRESET", "").split(",") if name.strip()]
        for name in preset_names:
            if name not in PRESETS:
                raise ConfigError(f"PRESET={environ['PRESET']!r}: {name!r} is unknown; choose from "
                                  f"{sorted(PRESETS)[1:]}")
        preset_values, preset_sources = {}, {}
        for index, name in enumerate(preset_names):
            values = dict(PRESETS[name])
            if name == "smoke":  # a seed's step-counted schedule keeps its share of the run at the smoke size
                for earlier in preset_names[:index]:
                    values.update(SMOKE_SCHEDULES.get(earlier, {}))
            preset_values.update(values)
            preset_sources.update(dict.fromkeys(values, f"preset:{name}"))
        types = {field.name: field.type for field in dataclasses.fields(cls)}
        values, sources = {}, {}
        for name, (env_name, raw, source) in settings_in_environ(environ, types).items():
            values[name], sources[name] = _parse_env(env_name, raw, types[name]), source
        for name in types:
            if name not in values:
                if name in preset_values:
                    values[name], sources[name] = preset_values[name], preset_sources[name]
                else:
                    sources[name] = "default"
        # The baseline's step-based warmdown and the records' fraction are two forms of one setting: the steps
        # replace the default fraction; both given is refused by `validate`.
        if values.get("warmdown_iters", 0) > 0 and sources["warmdown_frac"] == "default":
            values["warmdown_frac"], sources["warmdown_frac"] = 0.0, "implied:WARMDOWN_ITERS"
        if values.get("data_dir"):  # the records' DATA_DIR moves the default paths, never ones given explicitly
            for name in ("data_path", "tokenizer_path"):
                if not sources[name].startswith("env"):
                    default = values.get(name, getattr(cls, name))
                    values[name] = os.path.join(values["data_dir"], os.path.relpath(default, "./data"))
                    sources[name] = "implied:DATA_DIR"
        if values.get("ttt_enabled") and not values.get("ttt_method"):
            values["ttt_method"], sources["ttt_method"] = ttt_method_named(sources)
        values = {field.name: getattr(cls, field.name) for field in dataclasses.fields(cls)} | values
        reset_inert_preset_values(cls, values, sources)
        # A setting whose switch is off is refused first: its switch is what to fix, whatever else its value breaks.
        refuse_inert_settings(cls, values, sources)
        refuse_settings_unread_when_evaluating_only(cls, values, sources)
        # The global SGD runs the model, whose attention stays within documents exactly when DOC_ISOLATION=1: the
        # record's GLOBAL_TTT_RESPECT_DOC_BOUNDARIES=1 goes with its DOC_ISOLATION=1, and the two are set alike.
        isolated = values["doc_isolation"]
        if sources["global_ttt_respect_doc_boundaries"].startswith(("default", "inert:")):  # not given for this run
            values["global_ttt_respect_doc_boundaries"] = isolated
            sources["global_ttt_respect_doc_boundaries"] = "implied:DOC_ISOLATION"
        elif values["global_ttt_respect_doc_boundaries"] != isolated:
            raise ConfigError(f"GLOBAL_TTT_RESPECT_DOC_BOUNDARIES={int(values['global_ttt_respect_doc_boundaries'])}: "
                              f"the global SGD's attention stays within documents exactly when DOC_ISOLATION=1 (here "
                              f"{int(isolated)}); set the two alike")
        if sources["seed"].startswith("env") and values["seeds"].strip():  # each seed's run takes its own
            raise ConfigError(f"SEED={values['seed']} has no effect with SEEDS={values['seeds']!r}, whose runs each "
                              f"take one of its seeds; unset SEED (and list every seed in SEEDS)")
        return cls(**values), sources

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Each field's own check, then the rules between fields. World-size-independent: `setup` checks the batch
        against the world size."""
        for field in dataclasses.fields(self):
            value, check = getattr(self, field.name), field.metadata.get("check")
            if field.type is float and not math.isfinite(value):  # nan and inf pass no range check
                raise ConfigError(f"{field.name.upper()}={value!r}: must be finite")
            if check in RANGE_CHECKS and not RANGE_CHECKS[check][0](value):
                raise ConfigError(f"{field.name.upper()}={value!r}: {RANGE_CHECKS[check][1]}")
            if check and check not in RANGE_CHECKS and value not in check.split("|"):
                choices = [choice for choice in check.split("|") if choice]
                raise ConfigError(f"{field.name.upper()}={value!r}: choose {', '.join(choices[:-1])} or {choices[-1]}")
        self.seed_list(), self.kernel_stages, self.layer_set("xsa_layers"), self.layer_set("ve_layers")  # parsed
        self.short_score_first_steps, self.train_seq_stages  # parsed
        def require(ok, env_name, why):
            if not ok:
                raise ConfigError(f"{env_name}={as_given(getattr(self, env_name.lower()))}: {why}")
        for rule in (rules_of_run_and_data, rules_of_model, rules_of_training, rules_of_export, rules_of_evaluation):
            rule(self, require)

    @functools.cached_property  # parsed once: the training loop asks every step
    def kernel_stages(self):
        """KERNEL_SCHEDULE as [(when, taps)] in order: when < 1 is a fraction of training, >= 1 a step."""
        try:
            stages = [(float(when), int(taps)) for taps, when in
                      (item.strip().split("@") for item in self.kernel_schedule.split(",") if item.strip())]
        except ValueError:
            raise ConfigError(f"KERNEL_SCHEDULE={self.kernel_schedule!r}: expected taps@when items, e.g. "
                              f"1@0,3@0.1,5@0.2") from None
        taps = [k for _, k in stages]
        if stages and (stages[0][0] != 0 or taps != sorted(taps) or taps[0] < 1
                       or [w for w, _ in stages] != sorted(w for w, _ in stages)):
            raise ConfigError(f"KERNEL_SCHEDULE={self.kernel_schedule!r}: must start @0 with at least 1 tap, and grow "
                              f"in order (kernels only grow, so that the function is preserved)")
        if stages and taps[-1] > max(self.conv_k, self.mlp_conv_k):
            raise ConfigError(f"KERNEL_SCHEDULE={self.kernel_schedule!r}: grows to {taps[-1]} taps, beyond CONV_K="
                              f"{self.conv_k} / MLP_CONV_K={self.mlp_conv_k}, the allocated sizes")
        return stages

    @functools.cached_property
    def short_score_first_steps(self):
        """[(longest document in tokens, chunk size)] in ascending order: TTT_SHORT_SCORE_FIRST_STEPS, else the pair
        TTT_SHORT_DOC_LEN:TTT_SHORT_CHUNK_SIZE; [] unless TTT_SHORT_SCORE_FIRST_ENABLED=1."""
        if not self.ttt_short_score_first_enabled:
            return []
        pair = (self.ttt_short_doc_len, self.ttt_short_chunk_size or self.ttt_chunk_size)
        items = [item.strip() for item in self.ttt_short_score_first_steps.split(",") if item.strip()]
        if not items:
            return [pair]
        try:
            steps = sorted((int(limit), int(chunk)) for limit, chunk in (item.replace("=", ":").split(":")
                                                                         for item in items))
        except ValueError:
            raise ConfigError(f"TTT_SHORT_SCORE_FIRST_STEPS={self.ttt_short_score_first_steps!r}: expected "
                              f"tokens:chunk items, e.g. 256:8,2000:24") from None
        if any(limit <= 0 or chunk <= 0 for limit, chunk in steps):
            raise ConfigError(f"TTT_SHORT_SCORE_FIRST_STEPS={self.ttt_short_score_first_steps!r}: document lengths "
                              f"and chunk sizes must be positive")
        defaults = (type(self).ttt_short_doc_len, type(self).ttt_short_chunk_size)
        if (self.ttt_short_doc_len, self.ttt_short_chunk_size) != defaults and pair not in steps:
            raise ConfigError(f"TTT_SHORT_DOC_LEN={self.ttt_short_doc_len} with TTT_SHORT_CHUNK_SIZE="
                              f"{self.ttt_short_chunk_size}: TTT_SHORT_SCORE_FIRST_STEPS decides the chunks (the "
                              f"record ignores the pair beside it), and {pair[0]}:{pair[1]} is not one of its items; "
                              f"add it there or unset the pair")
        return steps

    @functools.cached_property  # parsed once: the training loop asks every step
    def train_seq_stages(self):
        """TRAIN_SEQ_SCHEDULE as [(share of training, longest piece)] in order of share, the last at share 1; []
        without a schedule. Stages of equal share keep their order (the first is the one taken, as in PR #2014)."""
        items = [item.strip() for item in self.train_seq_schedule.split(",") if item.strip()]
        if not items:
            return []
        try:
            stages = sorted(((float(share), int(length)) for length, share in (item.split("@") for item in items)),
                            key=lambda stage: stage[0])
        except ValueError:
            raise ConfigError(f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r}: expected length@share items, e.g. "
                              f"1024@0.1,2048@0.7,3072@1.0") from None
        if any(length <= 0 or not 0 < share <= 1 for share, length in stages):
            raise ConfigError(f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r}: lengths must be positive and shares "
                              f"in (0, 1]")
        if max(length for _, length in stages) != self.train_seq_len:
            raise ConfigError(f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r}: its longest length must be "
                              f"TRAIN_SEQ_LEN={self.train_seq_len}, which lays out the micro-batches (as in PR #2014)")
        return stages + ([(1.0, stages[-1][1])] if stages[-1][0] < 1 else [])

    @property
    def ttt_adapter_lr(self):
        """The learning rate of LoRA TTT's adapters: TTT_LORA_LR times TTT_LOCAL_LR_MULT."""
        return self.ttt_lora_lr * self.ttt_local_lr_mult

    @property
    def piece_len(self):
        """The longest document piece of TRAIN_ROWS=packed at the end of training (TRAIN_SEQ_SCHEDULE's last stage,
        else TRAIN_SEQ_LEN); 0 = rows cut documents instead."""
        if self.train_rows != "packed":
            return 0
        return self.train_seq_stages[-1][1] if self.train_seq_stages else self.train_seq_len

    def seed_list(self):
        """SEEDS as integers (space- or comma-separated), or [SEED]."""
        try:
            seeds = [int(item) for item in self.seeds.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(f"SEEDS={self.seeds!r}: expected integers separated by spaces or commas") from None
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"SEEDS={self.seeds!r}: a seed is repeated")
        return seeds or [self.seed]

    def config_hash(self, data_digest):
        """Identifies the configuration a result belongs to: every setting except the per-run ones (seed, names,
        folders; the data is identified by `data_digest` instead of its path). Runs with different hashes must not
        be pooled."""
        per_run = {"seed", "seeds", "run_id", "overwrite_run", "finish_from", "eval_only_quantized_path", "record_dir",
                   "data_dir", "data_path", "tokenizer_path",
                   "record_name", "record_author", "record_github_id", "record_blurb"}
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in per_run}
        return hashlib.sha256(json.dumps([settings, data_digest], sort_keys=True).encode()).hexdigest()[:16]

    def layer_set(self, name):
        """The layer indices of a list setting (XSA_LAYERS, VE_LAYERS): "all", "" or comma-separated indices, where
        a negative index counts from the last layer (-1), so that "-4,-3,-2,-1" is the records' XSA_LAST_N=4 at
        any depth (a seed's preset then also holds at the smoke size)."""
        spec = getattr(self, name).strip()
        if spec == "all":
            return set(range(self.num_layers))
        try:
            layers = {int(item) for item in spec.split(",") if item.strip()}
        except ValueError:
            raise ConfigError(f"{name.upper()}={spec!r}: expected all, empty, or comma-separated layer "
                              f"indices") from None
        if any(not -self.num_layers <= layer < self.num_layers for layer in layers):
            raise ConfigError(f"{name.upper()}={spec!r}: indices must be in -{self.num_layers}..{self.num_layers - 1} "
                              f"(NUM_LAYERS={self.num_layers})")
        return {layer % self.num_layers for layer in layers}


# The rules between settings; each field's own range or choices is checked by `Hyperparameters.validate`, which
# passes `require(ok, env_name, why)`: a refusal naming the variable and its value.
def rules_of_run_and_data(hp, require):
    require(re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)?", hp.run_id) is not None, "RUN_ID",
            "must be a plain name (letters, digits, '.', '_', '-'; not a path)")
    require(hp.vocab_size <= 65536, "VOCAB_SIZE", "shards store uint16 tokens, so at most 65536")
    require(hp.data_seed >= -1, "DATA_SEED", "must be -1 (the challenge's order) or a seed >= 0")
    require(not hp.ttt_eval_only or hp.eval_only_quantized_path, "TTT_EVAL_ONLY",
            "names no artifact: set EVAL_ONLY_QUANTIZED_PATH to the .ptz to evaluate (a run writes "
            "logs/<RUN_ID>_model.<format>.ptz)")
    require(not hp.ttt_eval_only or hp.ttt_enabled, "TTT_EVAL_ONLY", "evaluates TTT only: set TTT_ENABLED=1")
    if hp.eval_only_quantized_path:
        for name, busy in (("finish_from", hp.finish_from), ("record_dir", hp.record_dir),
                           ("seeds", len(hp.seed_list()) > 1), ("benchmark_steps", hp.benchmark_steps)):
            require(not busy, name.upper(), "cannot go with EVAL_ONLY_QUANTIZED_PATH, which trains nothing")


def rules_of_model(hp, require):
    head_dim = hp.model_dim // hp.num_heads
    require(hp.model_dim % hp.num_heads == 0, "MODEL_DIM", f"must be divisible by NUM_HEADS={hp.num_heads}")
    require(hp.num_heads % hp.num_kv_heads == 0, "NUM_HEADS", f"must be divisible by NUM_KV_HEADS={hp.num_kv_heads}")
    require(hp.attn_backend != "flex" or hp.doc_isolation, "ATTN_BACKEND",
            "=flex is FlexAttention over packed documents, which DOC_ISOLATION=1 asks for; without it attention is "
            "SDPA's: set ATTN_BACKEND=sdpa or auto")
    require(head_dim % 2 == 0, "MODEL_DIM", "MODEL_DIM / NUM_HEADS must be even for RoPE")
    require(0 <= hp.rope_dims <= head_dim and hp.rope_dims % 2 == 0, "ROPE_DIMS",
            f"must be even and at most the head dim MODEL_DIM / NUM_HEADS = {head_dim}")
    require(not hp.rope_train_seq_len or (hp.rope_dims or head_dim) >= 4, "ROPE_TRAIN_SEQ_LEN",
            "rescales the base by (T / it)^(d / (d - 2)): it needs at least 4 rotary dims (ROPE_DIMS)")
    require(hp.mlp_conv_k == 0 or hp.mlp_activation == "swiglu", "MLP_CONV_K",
            "needs MLP_ACTIVATION=swiglu (it convolves the gate branch)")
    require(not hp.kernel_stages or max(hp.conv_k, hp.mlp_conv_k) > 0, "KERNEL_SCHEDULE", "needs CONV_K or MLP_CONV_K")
    # checked only where a gate reads it: the default 12 must not refuse a narrower model without those gates
    require(not switched_on(vars(hp), GATES_READ_WINDOW) or 0 < hp.gate_window <= hp.model_dim, "GATE_WINDOW",
            f"must be in 1..MODEL_DIM={hp.model_dim}")
    require(hp.bigram_buckets == 0 or hp.bigram_buckets >= 2, "BIGRAM_BUCKETS", "0 (off) or at least 2")
    if hp.num_loops:
        require(0 <= hp.loop_start <= hp.loop_end < hp.num_layers, "LOOP_END",
                f"need 0 <= LOOP_START={hp.loop_start} <= LOOP_END < NUM_LAYERS={hp.num_layers} (or NUM_LOOPS=0)")
    if hp.parallel_residuals:
        require(0 <= hp.parallel_start_layer < hp.num_layers, "PARALLEL_START_LAYER",
                f"must be a layer below NUM_LAYERS={hp.num_layers} (or PARALLEL_RESIDUALS=0)")
        straddles = hp.num_loops and hp.loop_start < hp.parallel_start_layer <= hp.loop_end
        require(hp.parallel_form == "routing" or not straddles, "PARALLEL_FORM",
                f"=merge keeps two lanes to the end, so the looped layers {hp.loop_start}..{hp.loop_end} must not "
                f"straddle PARALLEL_START_LAYER={hp.parallel_start_layer}")
    virtual = hp.num_layers + hp.num_loops * (hp.loop_end - hp.loop_start + 1)
    require(-hp.num_layers < hp.backout_layer < virtual, "BACKOUT_LAYER",
            f"must be below the {virtual} virtual layers, or above -NUM_LAYERS={-hp.num_layers} (counted from the end)")


def rules_of_training(hp, require):
    require(hp.train_batch_tokens % hp.train_seq_len == 0, "TRAIN_BATCH_TOKENS",
            f"must be a multiple of TRAIN_SEQ_LEN={hp.train_seq_len}")
    require(not (hp.warmdown_iters > 0 and hp.warmdown_frac > 0), "WARMDOWN_ITERS",
            f"and WARMDOWN_FRAC={hp.warmdown_frac} are two forms of the warmdown; set one (WARMDOWN_ITERS=0 to "
            f"use the fraction, WARMDOWN_FRAC=0 to use the steps)")
    # QAT and SWA start when the LR scale falls below theirs: it must fall, and below their start
    decays = hp.warmdown_frac > 0 or hp.warmdown_iters > 0 or hp.kernel_stage_restarts
    for switch, on, name in (("QAT_START_LR_SCALE", hp.qat_start_lr_scale > 0, "qat_start_lr_scale"),
                             ("WEIGHT_AVERAGING", "swa" in hp.weight_averaging, "swa_start_lr_scale")):
        if on:
            require(decays, switch, f"{name[:3].upper()} never starts: without a warmdown (WARMDOWN_FRAC=0 and "
                    f"WARMDOWN_ITERS=0) the LR scale stays 1, never below {name.upper()}; set one of them")
            require(getattr(hp, name) > hp.min_lr_scale, name.upper(),
                    f"must be above MIN_LR_SCALE={hp.min_lr_scale}, or the LR scale never falls below it")
    require(hp.train_rows == "seq" or hp.data_seed == -1, "TRAIN_ROWS",
            "packed reads each micro-batch as one span of the stream: set DATA_SEED=-1")
    require(not (hp.fused_ce_enabled and hp.mile_gamma > 0), "FUSED_CE_ENABLED",
            "computes the loss without the logits whose entropy MILE_GAMMA weights by; set one of them")
    if hp.kernel_stage_restarts:
        require(hp.warmdown_frac == 0 and hp.warmdown_iters == 0, "KERNEL_STAGE_RESTARTS",
                "replaces the warmdown with a decay per stage; set WARMDOWN_FRAC=0 and WARMDOWN_ITERS=0")
        require(hp.max_wallclock_seconds == 0 or all(when < 1 for when, _ in hp.kernel_stages), "KERNEL_SCHEDULE",
                "must give its stages as fractions of training (taps@0.25) under a wall-clock cap with "
                "KERNEL_STAGE_RESTARTS=1, so that each stage's decay knows where it ends")


def rules_of_export(hp, require):
    for name in ("quant_bits", "embed_quant_bits"):
        require(5 <= getattr(hp, name) <= 8 or getattr(hp, name) == FP16_BITS, name.upper(),
                "must be 5..8, or 16 (fp16, not quantized)")
    require(2 <= hp.lqer_factor_bits <= 8 or hp.lqer_factor_bits == FP16_BITS, "LQER_FACTOR_BITS",
            "must be 2..8, or 16 (fp16)")
    require(not hp.gptq or hp.gptq_calibration_batches > 0, "GPTQ_CALIBRATION_BATCHES", "must be positive with GPTQ=1")
    if hp.gptq and hp.gptq_calibration == "self":
        require(hp.gptq_self_seq_len <= max(hp.train_seq_len, hp.eval_seq_len), "GPTQ_SELF_SEQ_LEN",
                f"must not exceed TRAIN_SEQ_LEN={hp.train_seq_len} or EVAL_SEQ_LEN={hp.eval_seq_len} (the "
                f"longest positions the model has)")
    if hp.quant_bits == hp.embed_quant_bits == FP16_BITS:
        for name in ("gptq", "lqer_rank", "qat_start_lr_scale"):
            require(not getattr(hp, name), name.upper(), "has no effect when QUANT_BITS=EMBED_QUANT_BITS=16 "
                    "(nothing is quantized); set it to 0")
    require(not (hp.gptq and hp.max_wallclock_seconds) or hp.gptq_reserve_seconds < hp.max_wallclock_seconds,
            "GPTQ_RESERVE_SECONDS", f"must be below MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds}")
    if hp.pack_code and not compressor_available("brotli"):
        raise ConfigError("PACK_CODE=1: packing the code compares brotli with LZMA, and brotli is not installed "
                          "(pip install brotli, or PACK_CODE=0 to count the raw file)")
    require(not hp.awq_lite_enabled or 2 <= hp.awq_lite_bits <= 8, "AWQ_LITE_BITS", "must be 2 to 8 (int8 values)")
    require(not hp.awq_lite_enabled or hp.quant_packing == "byte", "QUANT_PACKING",
            "must be byte with AWQ_LITE_ENABLED=1: a matrix holds values of two widths")
    if hp.compressor == "pergroup":
        require(hp.quant_packing == "byte", "QUANT_PACKING", "must be byte with COMPRESSOR=pergroup, which lays out "
                "the bytes of each integer matrix itself")
        missing = [codec for codec in pergroup_codecs(hp.pergroup_codec) if not compressor_available(codec)]
        if hp.pergroup_codec == "lrzip" and missing:
            raise ConfigError("COMPRESSOR=pergroup compresses with lrzip (PERGROUP_CODEC=lrzip, the record's), and the "
                              "lrzip program is not installed: apt-get install lrzip, or PERGROUP_CODEC=smallest for "
                              "the same layout with the compressors of this script")
        if missing:
            raise ConfigError(f"PERGROUP_CODEC={hp.pergroup_codec}: {', '.join(missing)} is not installed "
                              f"(pip install {' '.join(PIP_NAMES[codec] for codec in missing)})")
    elif not compressor_available(hp.compressor):
        raise ConfigError(f"COMPRESSOR={hp.compressor!r}: its package is not installed "
                          f"(pip install {PIP_NAMES[hp.compressor]})")


def rules_of_evaluation(hp, require):
    require(hp.val_batch_size >= hp.train_seq_len, "VAL_BATCH_SIZE",
            f"must hold one TRAIN_SEQ_LEN={hp.train_seq_len} window")
    require(hp.eval_stride <= (hp.eval_seq_len or hp.train_seq_len), "EVAL_STRIDE", "must not exceed EVAL_SEQ_LEN")
    require(hp.ttt_eval_seq_len <= max(hp.train_seq_len, hp.eval_seq_len), "TTT_EVAL_SEQ_LEN",
            f"must not exceed the longest positions the model has (TRAIN_SEQ_LEN={hp.train_seq_len}, "
            f"EVAL_SEQ_LEN={hp.eval_seq_len})")
    require(not hp.ttt_enabled or hp.ttt_method != "", "TTT_METHOD", "choose chunk or lora with TTT_ENABLED=1")
    if hp.ttt_enabled and hp.ttt_method == "lora":  # each chunk is scored in one window: else targets go unscored
        context = next(name for name in ("ttt_eval_seq_len", "eval_seq_len", "train_seq_len") if getattr(hp, name))
        largest = max([hp.ttt_chunk_size] + [chunk for _, chunk in hp.short_score_first_steps])
        require(largest <= getattr(hp, context), context.upper(),
                f"per-document TTT scores each chunk in one window of at most this many positions, so it must hold "
                f"the largest chunk, {largest} targets (TTT_CHUNK_SIZE, TTT_SHORT_SCORE_FIRST_STEPS)")


# neon213's Muon growth run (k = 1 for 5,000 steps, then +2 taps every 3,000 steps up to 21 at step 32,000 of 35,000)
# as fractions of training, so that it scales to any run length.
NEON_KERNEL_SCHEDULE = ",".join(f"{k}@{0 if k == 1 else (5000 + 3000 * (k - 3) // 2) / 35000:.3f}"
                                for k in range(1, 22, 2))

# The PR #549 family (the record LeakyReLU_LegalTTT_ParallelMuon: its script's defaults and its README's command), the
# parent of PR #754 and PR #703: 11L 512d MLP3x LeakyReLU(0.5)^2, XSA on the last 4 layers, partial RoPE 16/64 (its
# base rescaled above 1,024 tokens, hard-coded in its rotary), LN scale, VE128 on the last 2, BigramHash 1536x128, the
# seed-era SmearGate, plain U-Net skips; Muon 0.025 (WD 0.04, momentum 0.92 -> 0.99), AdamW 0.025/0.035 (WD 0.04,
# betas 0.9/0.95) that also trains the table projections; bf16 bank gradients and momentum, bf16 tables (its
# .bfloat16() model cast); EMA 0.997 with no warmup (its SWA was collected and never applied); a 3500-step
# warmdown; GPTQ-lite int6 with int8 tables, small tensors in fp16, lzma; sliding stride 64 and score-first SGD TTT.
PR549_FAMILY = dict(
    mlp_mult=3.0, rope_dims=16, rope_train_seq_len=1024, qk_gain_init=1.5, xsa_layers="-4,-3,-2,-1", attn_gate="none",
    ve_layers="-2,-1", ve_dim=128, ve_proj_init="ortho", bigram_buckets=1536, bigram_dim=128, smear_gate=True,
    smear_gate_form="blend", skip_gates=False, num_loops=0, parallel_residuals=False, train_batch_tokens=786_432,
    train_seq_len=2048, eval_seq_len=2048, iterations=9000, train_log_every=500, val_loss_every=4000, matrix_lr=0.025,
    scalar_lr=0.025, tied_embed_lr=0.035, embed_weight_decay=0.04, scalar_weight_decay=0.04, beta2=0.95,
    muon_momentum=0.99, muon_orthogonalizer="quintic", muon_row_normalize=False, muon_weight_decay=0.04,
    embed_proj_optimizer="adamw", muon_bf16_state=True, embed_bf16=True, warmdown_iters=3500, warmdown_frac=0.0,
    ema_decay=0.997, ema_warmup=False,
    quant_bits=6, embed_quant_bits=8, quant_clip="percentile", embed_quant_clip="quantile", quant_clip_floor=1.0,
    gptq=False, quant_passthrough_numel=65536, vectors_fp32=False, compressor="lzma", eval_stride=64,
    ttt_enabled=True, ttt_lr=0.002, ttt_epochs=3, ttt_chunk_tokens=32768, ttt_momentum=0.9, ttt_batch_seqs=32,
    ttt_grad_clip=1.0, ttt_params="all",
    ttt_optimizer="sgd", ttt_method="chunk",
)

# The best public record (2026-04-27 SP8192_LQER_SparseGate_BOSSmearFix_9HpStack, 1.06107587): the default stack
# (its architecture) on SP8192 with CaseOps, document-isolated attention in training and evaluation, MIN_LR 0.1,
# LQER rank 4 on the 3 worst matrices, per-group lrzip compression, GPTQ reserve 0.5 s, and phased TTT over a
# 2,500-document prefix in 3 phases (global SGD 0.001, momentum 0.9, 1 epoch, 32K chunks), composed with its
# per-document LoRA TTT (rank 80, alpha 144, warm A, AdamW 1e-4 with betas (0, 0.99) and weight decay 0.5,
# 48-token chunks, 64 documents at a time, contexts of 2,048); bf16 bank gradients, momentum and token table, and
# its fixed EMA decay, as in its script. Attention is FA3's varlen path where FA3 is installed, as in the record,
# else FlexAttention on a compiled GPU run, else SDPA with a block-diagonal mask. No sliding pass: the record runs
# none, and on the eval clock it would take TTT's time (EVAL_STRIDE=64 adds it, document-isolated). README:
# "PRESET=record"; PRESET=pr2014 builds on it.
RECORD_0427 = dict(
    data_path="./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
    tokenizer_path="./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", vocab_size=8192,
    caseops_enabled=True,
    doc_isolation=True, eval_stride=0, eval_doc_isolated=True, min_lr_scale=0.1, lqer_rank=4,
    gptq_reserve_seconds=0.5, train_log_every=500, val_loss_every=0, ttt_enabled=True, ttt_method="lora",
    ttt_lora_rank=80, ttt_beta2=0.99, ttt_weight_decay=0.5,
    phased_ttt_enabled=True, phased_ttt_prefix_docs=2500, phased_ttt_num_phases=3, fused_ce_enabled=True,
    lqer_factor_bits=4, lqer_asym_enabled=True, gated_attn_quant_gate=True, compressor="pergroup",
    muon_bf16_state=True, embed_bf16=True, ema_warmup=False, vectors_fp32=False,
)

# A preset is a named set of defaults; PRESET=a,b applies a, then b; any env var set explicitly still wins.
PRESETS = {
    "": {},
    # The challenge's naive baseline (9x512, MLP 2x relu^2, full RoPE, none of the record techniques).
    "baseline": dict(
        num_layers=9, mlp_mult=2.0, mlp_activation="relu2", ortho_init=False, rope_dims=0, qk_gain_init=1.5,
        xsa_layers="", attn_gate="none", smear_gate=False, ln_scale=False, skip_gates=False, num_loops=0,
        parallel_residuals=False,
        matrix_lr=0.04, scalar_lr=0.04, tied_embed_lr=0.05, embed_weight_decay=0.0, scalar_weight_decay=0.0,
        beta2=0.95, muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500,
        muon_orthogonalizer="quintic", muon_row_normalize=False, muon_weight_decay=0.0, grad_clip_norm=0.0,
        embed_bf16=True, warmdown_iters=1200, warmdown_frac=0.0, train_batch_tokens=524_288, train_seq_len=1024,
        weight_averaging="none",
        # Its export and score: int8 per row at the 99.99984th percentile, tensors of at most 65,536 elements kept,
        # zlib level 9, and the plain round-trip evaluation (no sliding window), so its last line is
        # final_int8_zlib_roundtrip_exact, comparable with the baseline's 1.2244.
        quant_bits=8, embed_quant_bits=8, quant_clip="quantile", gptq=False, quant_passthrough_numel=65536,
        size_target_bytes=0, compressor="zlib", eval_stride=0,
    ),
    # PR #754 (11L Parallel Muon + LN scale + LeakyReLU^2 MLP3x + legal TTT, 1.1215): PR #549's script and command
    # (the record LeakyReLU_LegalTTT_ParallelMuon) with zstd-22 and an fp16 token embedding. Where #754 is silent,
    # #549's command: BigramHash 1536, WARMDOWN_ITERS 3500, ITERATIONS 9000. Its late QAT never ran under
    # torch.compile (the records' constant-folded flag), so it is off here, as it was in effect.
    "pr754": PR549_FAMILY | dict(compressor="zstd", embed_quant_bits=16),
    # PR #703 (PR #549 + MiLe decay + 8-bit Muon + 1.04x LR + Cache+Backout, 1.1176 on 4xB200): MiLe gamma 1.1
    # decayed with the LR, int8 Muon momentum, every LR of #549 times 1.04, the state after layer 7 cached (-3: all
    # but the last three of 11), read by layers 8-10's keys and values, and backed out with a learned 0.1.
    # Otherwise #549, its lzma export included.
    "pr703": PR549_FAMILY | dict(
        mile_gamma=1.1, muon_momentum_int8=True, matrix_lr=0.025 * 1.04, scalar_lr=0.025 * 1.04,
        tied_embed_lr=0.035 * 1.04, backout_layer=-3, backout_init=0.1, backout_read=True, compressor="lzma",
    ),
    # PR #1392 (SP4096 + depth recurrence + parallel residuals + QK-gain + brotli, 1.1020): 11L 512d MLP4x, XSA on
    # all layers, layers 4-5 once more from step 3000, two lanes from layer 7 with a learned merge (PR #1289),
    # QK-gain 5, MuonEq-R, partial RoPE 16/64, LN scale, VE128 on 9-10, the seed-era SmearGate, full GPTQ int6 on
    # 128 self-generated sequences, brotli. Where #1392 is silent, its parent the SP4096 record (2026-04-04): its
    # LRs, WD 0.090, EMA 0.997, warmdown 0.667, gated skips, byte-shuffled brotli, int8 embeddings rounded to
    # nearest, GPTQ once per candidate quantile, bf16 tables, no TTT.
    "pr1392": dict(
        data_path="./data/datasets/fineweb10B_sp4096", tokenizer_path="./data/tokenizers/fineweb_4096_bpe.model",
        vocab_size=4096, mlp_mult=4.0, rope_dims=16, rope_train_seq_len=2048, qk_gain_init=5.0, xsa_layers="all",
        attn_gate="none",
        ve_layers="-2,-1", ve_dim=128, ve_proj_init="ortho", smear_gate=True, smear_gate_form="blend",
        num_loops=1, loop_start=4, loop_end=5, loop_enable_at=3000, parallel_residuals=True, parallel_start_layer=7,
        parallel_form="merge", train_batch_tokens=786_432, train_seq_len=2048, eval_seq_len=2048,
        train_log_every=500, val_loss_every=4000,
        matrix_lr=0.02, scalar_lr=0.02, tied_embed_lr=0.03, embed_weight_decay=0.090, scalar_weight_decay=0.02,
        beta2=0.95, muon_momentum=0.99, muon_orthogonalizer="quintic", muon_row_normalize=True,
        muon_weight_decay=0.090, embed_bf16=True, warmdown_frac=0.667, ema_decay=0.997, ema_warmup=False,
        quant_bits=6, embed_quant_bits=8, quant_clip="percentile", embed_quant_clip="quantile", quant_clip_floor=1.0,
        quant_passthrough_numel=65536, vectors_fp32=False, gptq_calibration="self", gptq_self_seqs=128,
        gptq_self_seq_len=2048,
        gptq_reserve_seconds=45.0, gptq_clip_search="gptq", gptq_embed=False, compressor="brotli", byte_shuffle=True,
    ),
    # neon213 (NeonBench's Muon growth run, stages 1-11): 8 plain pre-norm blocks of width 384, 6 heads, learnable
    # RMSNorm weights (QK-norm per head dim), Intent-gated attention with convs on Q/K/V/I, SwiGLU 1536 with the
    # Hydra conv, every kernel grown 1 -> 21 on its schedule, vocabulary 16384, PyTorch's default init (no zero
    # projections, no embedding norm, no softcap); its regime: 35,000 steps of 64 x 256 tokens, Polar Express Muon
    # at 0.01 (momentum 0.95, no WD) on the block matrices, AdamW 3e-4 (wd 0.1, betas 0.9/0.999) on the rest, clip
    # 1, each stage restarting the optimizers and decaying its LR to 0; exported in fp16. 26,675,584 parameters at
    # k = 21. PRESET=neon213,smoke is the same family at the smoke size.
    "neon213": dict(
        data_path="./data/datasets/fineweb10B_sp16384", tokenizer_path="./data/tokenizers/fineweb_16384_bpe.model",
        vocab_size=16384, num_layers=8, model_dim=384, num_heads=6, num_kv_heads=6, mlp_mult=4.0,
        mlp_activation="swiglu", rope_dims=0, qk_gain_init=1.0, xsa_layers="", attn_gate="none", smear_gate=False,
        norm_weights=True, ln_scale=False, sublayer_scales=False, resid_mix=False, unet_skips=False, num_loops=0,
        parallel_residuals=False, conv_k=21, mlp_conv_k=21, intent_gate=True, kernel_schedule=NEON_KERNEL_SCHEDULE,
        ortho_init=False, zero_init_proj=False, embed_norm=False, logit_softcap=0.0,
        tied_embed_init_std=384 ** -0.5 / 3 ** 0.5,  # the std of its U(+-1/sqrt(384)) Linear init of the tied table
        iterations=35_000, max_wallclock_seconds=0.0, train_seq_len=256, train_batch_tokens=16_384,
        matrix_lr=0.01, muon_momentum=0.95, muon_momentum_warmup_steps=0, muon_orthogonalizer="polar_express",
        muon_row_normalize=False, muon_weight_decay=0.0, tied_embed_lr=3e-4, scalar_lr=3e-4, embed_weight_decay=0.1,
        scalar_weight_decay=0.1, beta2=0.999, grad_clip_norm=1.0, warmdown_frac=0.0, kernel_stage_restarts=True,
        weight_averaging="none", quant_bits=16, embed_quant_bits=16, gptq=False, eval_stride=0,
    ),
    "record": RECORD_0427,
    # PR #2014 (2026-04-30, 1.05759; by the challenge's issue #2127 the best result without the train/validation
    # overlap): the record above with 3,072-token pieces reached through its length schedule (1,024 to 10% of the
    # training budget, 2,048 to 70%, then 3,072; 32 steps of LR re-warmup after each change) on packed rows, QK
    # gain 5.25, a 4 s GPTQ reserve, AWQ-lite (the most salient 64-column group kept at 8 bits), evaluation rows of
    # 3,072, and its per-document TTT: no Q or V adapters, a local LR of 0.75 x, 24 documents a batch, chunks of 8
    # and 24 tokens for batches of documents of at most 256 and 2,000 tokens, and one global SGD phase over the
    # 2,500-document prefix. Its EVAL_STRIDE=1536 is read by no pass of its script: no sliding pass here either.
    "pr2014": RECORD_0427 | dict(
        train_rows="packed", train_seq_len=3072, train_seq_schedule="1024@0.100,2048@0.700,3072@1.000",
        seq_change_warmup_steps=32, qk_gain_init=5.25, gptq_reserve_seconds=4.0, awq_lite_enabled=True,
        eval_seq_len=3072, ttt_eval_seq_len=3072, ttt_q_lora=False, ttt_v_lora=False, ttt_local_lr_mult=0.75,
        ttt_batch_size=24, ttt_short_score_first_enabled=True, ttt_short_score_first_steps="256:8,2000:24",
        phased_ttt_num_phases=1,
    ),
    # A miniature of the model on the offline sample (`python3 data/prepare_docs.py stdlib`): minutes on 2 CPU
    # cores. It sets sizes and positions only, so PRESET=baseline,smoke is the baseline at the same size.
    "smoke": dict(
        data_path="./data/datasets/stdlib_sp1024", tokenizer_path="./data/tokenizers/stdlib_1024_bpe.model",
        vocab_size=1024, num_layers=6, model_dim=128, num_heads=4, num_kv_heads=2, loop_start=2, loop_end=3,
        parallel_start_layer=4, train_seq_len=256, train_batch_tokens=4096, grad_accum_steps=2, iterations=300,
        warmup_steps=2, max_wallclock_seconds=0.0, muon_momentum_warmup_steps=100,
        train_log_every=25, val_loss_every=0, val_batch_size=16384, eval_seq_len=0,
        gptq_self_seqs=8, gptq_self_seq_len=128,
    ),
}


# PRESET=<seed>,smoke: the seed's schedule points given in steps become the same share of the smoke run, taken
# from the seed's own logged step count, so that a few hundred CPU steps still warm down and loop where it did;
# and its fixed EMA decay is warmed up, since 0.997 over 300 steps would export 40% of the initial weights.
SMOKE_SCHEDULES = {
    "baseline": dict(warmdown_iters=0, warmdown_frac=round(1200 / 13_780, 3)),  # 1,200 of its 13,780 steps
    # The chunk TTT of #754 and #703 adapts on chunks of 1,024 tokens where theirs take 32,768: the smoke split of
    # some 28,000 tokens is then 28 chunks, 27 of them trained on, where one chunk of 32,768 would train on none.
    "pr754": dict(warmdown_iters=0, warmdown_frac=round(3500 / 6_756, 3), ema_warmup=True,  # 3,500 of its 6,756 steps
                  ttt_chunk_tokens=1024),
    "pr703": dict(warmdown_iters=0, warmdown_frac=round(3500 / 7_185, 3), ema_warmup=True,  # of #549's 7,185 steps
                  ttt_chunk_tokens=1024),
    "pr1392": dict(loop_enable_at=round(3000 / 5_450, 3), ema_warmup=True),  # step 3,000 of the SP4096 record's 5,450
    # The record's prefix is 2,500 of the 50,000 validation documents: a smoke validation split of a few hundred
    # documents keeps three phases of a few documents each, one batch of 4 each. Their global SGD walks chunks of
    # 1,024 tokens where the record's walk 32,768: a phase never trains on its last chunk, which would be its whole
    # prefix of a few thousand tokens. Its sidecar comes from prepare_docs.py --caseops.
    "record": dict(phased_ttt_prefix_docs=12, ttt_batch_size=4, global_ttt_chunk_tokens=1024,
                   data_path="./data/datasets/stdlib_sp1024_caseops",
                   tokenizer_path="./data/tokenizers/stdlib_1024_bpe_caseops.model", ema_warmup=True),
}
# PR #2014's: the record's, with its length schedule at the smoke size (pieces of 64, 128, then 256) and the LR's
# re-warmup after each change the same share of the run (32 of its 4,888 steps), and 8 micro-batches: packed rows
# take a step's 8 spans one per micro-batch.
SMOKE_SCHEDULES["pr2014"] = SMOKE_SCHEDULES["record"] | dict(
    train_seq_schedule="64@0.100,128@0.700,256@1.000",
    seq_change_warmup_steps=round(32 * PRESETS["smoke"]["iterations"] / 4_888), ttt_eval_seq_len=0, grad_accum_steps=8)


def _parse_env(env_name, raw, typ):
    try:
        if typ is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(raw)
    except ValueError:
        raise ConfigError(f"{env_name}={raw!r} is not a valid {typ.__name__}") from None


# TTT_ENABLED=1 means chunk SGD TTT in the 03-23 LegalTTT record and per-document LoRA TTT in the 04-27 record.
# Here TTT_METHOD says which; left empty, the method is the one the other TTT settings given belong to.
def ttt_method_named(sources):
    """(method, source) from the TTT settings given in the environment; refused when they name none or both."""
    given = lambda needs: [f.name.upper() for f in dataclasses.fields(Hyperparameters)
                           if f.metadata.get("needs") == needs and sources.get(f.name, "default").startswith("env")]
    chunk, lora = given(CHUNK_TTT), given(LORA_TTT)
    if chunk and lora:
        raise ConfigError(f"TTT settings of two methods are set: {', '.join(chunk)} (chunk SGD TTT) and "
                          f"{', '.join(lora)} (per-document LoRA TTT); set TTT_METHOD=chunk or TTT_METHOD=lora and "
                          f"unset the other method's settings")
    if not chunk and not lora:
        raise ConfigError("TTT_ENABLED=1 names two methods: chunk SGD TTT in the 03-23 LegalTTT record, per-document "
                          "LoRA TTT in the 04-27 record; set TTT_METHOD=chunk or TTT_METHOD=lora")
    return ("chunk", f"implied:{chunk[0]}") if chunk else ("lora", f"implied:{lora[0]}")


def given_name(name, sources):
    """The variable that set field `name`: its own, or the alias given (MUON_WD for muon_weight_decay)."""
    return re.match(r"env:?([A-Z0-9_]*)", sources[name]).group(1) or name.upper()


def refuse_inert_settings(cls, values, sources):
    """A setting given explicitly while its switch is off would be ignored: refused (a preset's value is reset, by
    reset_inert_preset_values, which runs first). `values`: every field's, before the checks of `validate`."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for field in fields.values():
        needs = field.metadata.get("needs")
        if needs and sources[field.name].startswith("env") and not switched_on(values, needs):
            given = given_name(field.name, sources)
            switches = re.findall(r"[A-Z][A-Z0-9_]+", needs)
            reset = [f"{name}, which PRESET={sources[name.lower()].rsplit(':', 1)[1]} sets, has no effect either: it "
                     f"needs {fields[name.lower()].metadata['needs']}" for name in switches
                     if sources[name.lower()].startswith("inert:")]
            left_off = not values["preset"] and not any(sources[name.lower()].startswith("env") for name in switches)
            raise ConfigError(f"{field.name.upper()}={as_given(values[field.name])} has no effect unless "
                              f"{needs}; set that too, or unset {given}" + "".join(f" ({why})" for why in reset)
                              + (presets_switching_on(cls, needs) if left_off else ""))


# What an evaluation-only run (EVAL_ONLY_QUANTIZED_PATH) never reads: it trains, calibrates and exports nothing,
# and the artifact's weights replace every initialization. The settings of these groups but the two read there, and
# the others named.
GROUPS_UNREAD_WHEN_EVALUATING_ONLY = ("optimizer", "weight averaging", "quantization and export")
READ_WHEN_EVALUATING_ONLY = ("embed_bf16", "pack_code")  # the tables' dtype in the forward; the code bytes counted
ALSO_UNREAD_WHEN_EVALUATING_ONLY = (
    "data_seed", "iterations", "max_wallclock_seconds", "warmup_steps", "train_batch_tokens", "grad_accum_steps",
    "train_seq_schedule", "train_seq_schedule_mode", "seq_change_warmup_steps", "train_log_every", "val_loss_every",
    "tied_embed_init_std", "ortho_init", "zero_init_proj", "qk_gain_init", "conv_init", "backout_init",  # inits
    "kernel_schedule", "loop_enable_at",  # the artifact holds the grown taps and whether the layers loop
    "mile_gamma", "fused_ce_enabled", "adamw_side_stream", "pr_every")  # the training loss and step


def unread_when_evaluating_only(cls):
    """The fields an evaluation-only run never reads, in field order."""
    group, names = "", []
    for field in dataclasses.fields(cls):
        group = field.metadata.get("group") or group
        if (group in GROUPS_UNREAD_WHEN_EVALUATING_ONLY and field.name not in READ_WHEN_EVALUATING_ONLY
                or field.name in ALSO_UNREAD_WHEN_EVALUATING_ONLY):
            names.append(field.name)
    return names


def refuse_settings_unread_when_evaluating_only(cls, values, sources):
    """EVAL_ONLY_QUANTIZED_PATH with a training, calibration or export setting given, which would be ignored: refused,
    naming every one at once (a preset's values are not given: they stay, unread)."""
    if not values["eval_only_quantized_path"]:
        return
    given = [given_name(name, sources) for name in unread_when_evaluating_only(cls) if sources[name].startswith("env")]
    if given:
        raise ConfigError(f"EVAL_ONLY_QUANTIZED_PATH scores an artifact: nothing is trained, calibrated or exported, "
                          f"and its weights replace every initialization, so {', '.join(given)} would have no "
                          f"effect; unset {'it' if len(given) == 1 else 'them'} (the model's settings apply, and must "
                          f"be the artifact's, and so do the evaluation and TTT settings)")


def presets_switching_on(cls, needs):
    """Where neither a preset nor the switch is given, the presets that switch `needs` on: a record's script has its
    own defaults (the 04-27 record's TTT is on unless TTT_ENABLED=0), so its published command, which does not
    restate them, runs here under its preset."""
    defaults = {field.name: field.default for field in dataclasses.fields(cls)}
    names = [name for name, preset in PRESETS.items() if name not in ("", "smoke")
             and switched_on(defaults | preset, needs)]
    return (f"; a seed's or record's command runs here under its preset, which sets its script's defaults "
            f"(PRESET={' or PRESET='.join(names)} sets that)") if names else ""


def reset_inert_preset_values(cls, values, sources):
    """A preset's value whose switch you turned off has no effect: it goes back to its default, so that nothing reads
    it, and its source says so (`inert:preset:<name>`). Until none is left, since a reset can switch another off
    (DOC_ISOLATION=0 under PRESET=pr2014: TRAIN_ROWS, then TRAIN_SEQ_SCHEDULE, then its re-warmup)."""
    inert = True
    while inert:
        inert = [field for field in dataclasses.fields(cls) if field.metadata.get("needs")
                 and sources[field.name].startswith("preset") and not switched_on(values, field.metadata["needs"])]
        for field in inert:
            values[field.name], sources[field.name] = field.default, "inert:" + sources[field.name]


# ============================================================================================
# DATA
# ============================================================================================
# Shard format of the challenge: 256 little-endian int32 (magic, version, token count, zeros), then uint16 tokens.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4


class DataError(ConfigError):
    """A shard or tokenizer file that cannot be used: the message names the file and the env var that points to it."""


def read_shard_header(path):
    """Validates magic, version and file size; returns the token count."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    except OSError as error:
        raise DataError(f"{path} (in DATA_PATH) cannot be read: {error.strerror}") from None
    if size < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a challenge shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    if num_tokens < 0 or size != SHARD_HEADER_BYTES + 2 * num_tokens:
        raise DataError(f"{path}: header says {num_tokens} tokens, so {SHARD_HEADER_BYTES + 2 * num_tokens} bytes, "
                         f"but the file has {size} (truncated or corrupted; download or export it again)")
    return num_tokens


def load_shard(path):
    """The shard's tokens as a read-only uint16 memmap (validated first)."""
    num_tokens = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(num_tokens,))


def how_to_get_data(data_path):
    """What brings DATA_PATH's shards and their tokenizer: for the CaseOps records' folder, their download command."""
    variant = os.path.basename(os.path.normpath(data_path)).removeprefix("fineweb10B_")
    if variant.endswith("_lossless_caps_caseops_v1_reserved"):  # PR #1729's export on the Hub, the record's data
        return (f"MATCHED_FINEWEB_REPO_ID=romeerp/parameter-golf-caseops-v1 python3 data/cached_challenge_fineweb.py "
                f"--variant {variant}")
    return "data/cached_challenge_fineweb.py (a download) or data/prepare_docs.py (an export)"


def shard_files(data_path, split):
    if not os.path.isdir(data_path):
        raise ConfigError(f"DATA_PATH={data_path!r} is {'a file' if os.path.exists(data_path) else 'missing'}, not a "
                          f"folder of shards; get them with {how_to_get_data(data_path)}")
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_[0-9]*.bin")))  # not the CaseOps byte sidecars
    if not files:
        raise ConfigError(f"DATA_PATH={data_path!r} holds no fineweb_{split}_*.bin shards; get them with "
                          f"{how_to_get_data(data_path)}")
    return files


def load_byte_sidecar(val_files):
    """The CaseOps byte sidecar beside each validation shard (fineweb_val_bytes_NNNNNN.bin, the shard format), whole."""
    counts = []
    for path in val_files:
        folder, name = os.path.split(path)
        sidecar = os.path.join(folder, name.replace("fineweb_val_", "fineweb_val_bytes_"))
        if not os.path.isfile(sidecar):
            raise ConfigError(f"CASEOPS_ENABLED=1 but {sidecar} is missing: export DATA_PATH with data/prepare_docs.py "
                              f"--caseops (or download a CaseOps dataset), or unset CASEOPS_ENABLED")
        counts.append(np.asarray(load_shard(sidecar), dtype=np.int64))
    return np.concatenate(counts)


def caseops_signs(val_files, sp):
    """What marks data as CaseOps (a byte sidecar beside the validation shards, a tokenizer holding the operators as
    pieces): scored without CASEOPS_ENABLED=1, its bytes would be counted from the transformed text."""
    signs = ["a byte sidecar beside the validation shards"] if any(
        os.path.isfile(path.replace("fineweb_val_", "fineweb_val_bytes_")) for path in val_files) else []
    if all(sp.piece_to_id(op) != sp.unk_id() for op in CASE_OPERATORS):
        signs.append("a tokenizer with the CaseOps operators as pieces")
    return signs


# the challenge's loader takes each step as 8 contiguous spans (one per GPU of 8), each one token long
STREAM_CHUNKS = 8


def document_starts(input_ids, bos_id, piece_len=0):
    """(B, T) bool: the positions that start a document, each row's first and every BOS; with `piece_len`
    (TRAIN_ROWS=packed), also every piece_len-th position from each such start, as the 04-27 record cuts documents."""
    starts = input_ids == bos_id
    starts[:, 0] = True
    if piece_len:
        starts = starts | (offsets_from(starts) % piece_len == 0)
    return starts


def offsets_from(starts):
    """(B, T): each position's distance to the last start at or before it (starts: (B, T) bool, column 0 set)."""
    positions = torch.arange(starts.size(1), device=starts.device).expand_as(starts)
    return positions - torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), dim=1).values


CU_SEQLENS_BUCKET = 64  # the records pad cu_seqlens to a multiple of 64 entries, so compile sees few lengths


def cu_seqlens_of(starts):
    """FlashAttention's cumulative sequence lengths over the flattened (B, T) rows: every document start, then
    B * T, repeated up to a multiple of CU_SEQLENS_BUCKET entries (the repeats are empty sequences, which the kernel
    skips). The length depends on the data, so this runs outside the compiled graph: on the host for training batches
    (TrainLoader), with one host sync elsewhere (VarlenDocuments). The length is also marked dynamic, so a compiled
    graph serves every bucket; should a build specialize it anyway, the buckets bound the recompiles."""
    flat = torch.nonzero(starts.flatten()).flatten()
    entries = -(-(flat.numel() + 1) // CU_SEQLENS_BUCKET) * CU_SEQLENS_BUCKET
    cu_seqlens = F.pad(flat, (0, entries - flat.numel()), value=starts.numel()).to(torch.int32)
    torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
    return cu_seqlens


def to_device(tensor, device):
    """A host tensor on `device`. On a GPU, an asynchronous copy from pinned memory: the host goes on queueing work
    (a copy from pageable memory waits for every kernel queued before it). Elsewhere (or device None), the tensor."""
    if device is None or device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class TrainBatch(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: Optional[torch.Tensor]  # see cu_seqlens_of; None unless the loader has varlen_bos_id


class TrainLoader:
    """Deterministic training batches that do not depend on the world size. Global row g of optimizer step s goes
    to micro-batch g // (rows per micro-batch) of WORLD_SIZE * GRAD_ACCUM_STEPS, so the global batch, and thus the
    math, is the same at any world size; `batch(step, micro_step)` can be asked for in any order.

    DATA_SEED < 0, the challenge's order: the sorted shards are one cyclic token stream, read from the start; step s
    takes the next TRAIN_BATCH_TOKENS + 8 tokens as 8 contiguous spans, each cut into rows of TRAIN_SEQ_LEN (the
    span's extra token is its last target), exactly the tokens the baseline's loader gives step s (with fewer rows
    than 8 per step, gcd(rows, 8) spans). DATA_SEED >= 0: the shards are cut into windows of TRAIN_SEQ_LEN + 1 tokens,
    and every epoch visits each shard's windows in an order drawn from (DATA_SEED, epoch, shard), shard after shard.
    Either way more shards only add batches after those of the shards already present (in the first pass).
    """

    def __init__(self, files, seq_len, seqs_per_step, data_seed, rank=0, world_size=1, grad_accum_steps=1,
                 varlen_bos_id=None, piece_len=0):
        self.shards = [load_shard(f) for f in files]
        self.seq_len, self.seqs_per_step, self.data_seed = seq_len, seqs_per_step, data_seed
        self.varlen_bos_id = varlen_bos_id  # set: each batch carries its cu_seqlens (DOC_ISOLATION on FlashAttention)
        self.piece_len = piece_len  # set: TRAIN_ROWS=packed, each micro-batch one row of pieces of at most this
        self.rank, self.world_size, self.grad_accum_steps = rank, world_size, grad_accum_steps
        self.seqs_per_micro = seqs_per_step // (world_size * grad_accum_steps)
        self.shard_offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.shards])])
        self.stream_chunks = math.gcd(seqs_per_step, STREAM_CHUNKS)
        windows = [(len(s) - 1) // seq_len for s in self.shards]
        self.window_offsets = np.concatenate([[0], np.cumsum(windows)])
        self.num_windows = int(self.window_offsets[-1])
        if self.num_windows < seqs_per_step:
            raise ConfigError(f"the training shards hold {self.num_windows} windows of TRAIN_SEQ_LEN={seq_len}, fewer "
                              f"than one batch of {seqs_per_step}; lower TRAIN_BATCH_TOKENS or add shards")
        micro_batches = world_size * grad_accum_steps
        if piece_len and micro_batches % self.stream_chunks:  # a micro-batch would join two of a step's spans
            raise ConfigError(f"TRAIN_ROWS=packed makes each micro-batch one span of the stream, but a step's "
                              f"{self.stream_chunks} spans do not divide among WORLD_SIZE x GRAD_ACCUM_STEPS = "
                              f"{micro_batches} micro-batches; make that a multiple of {self.stream_chunks}")
        self._epoch, self._order = -1, None

    def _window_order(self, epoch):
        if epoch != self._epoch:
            orders = [self.window_offsets[shard] + np.random.default_rng([self.data_seed, epoch, shard]).permutation(
                self.window_offsets[shard + 1] - self.window_offsets[shard]) for shard in range(len(self.shards))]
            self._epoch, self._order = epoch, np.concatenate(orders)
        return self._order

    def global_window_ids(self, step):
        first = step * self.seqs_per_step
        positions = np.arange(first, first + self.seqs_per_step)
        ids = np.empty(self.seqs_per_step, dtype=np.int64)
        for epoch in np.unique(positions // self.num_windows):  # a batch may straddle two epochs
            in_epoch = positions // self.num_windows == epoch
            ids[in_epoch] = self._window_order(int(epoch))[positions[in_epoch] % self.num_windows]
        return ids

    def row_starts(self, step, rows):
        """Stream positions of global rows `rows` (an array) of optimizer step `step`."""
        if self.data_seed < 0:
            per_span = self.seqs_per_step // self.stream_chunks
            span, row = np.divmod(rows, per_span)
            step_tokens = self.seqs_per_step * self.seq_len + self.stream_chunks
            return step * step_tokens + span * (per_span * self.seq_len + 1) + row * self.seq_len
        ids = self.global_window_ids(step)[rows]
        shard = np.searchsorted(self.window_offsets, ids, side="right") - 1
        return self.shard_offsets[shard] + (ids - self.window_offsets[shard]) * self.seq_len

    def read_stream(self, start, count):
        """`count` tokens from position `start` of the cyclic stream of all shards (across shard ends and wraps)."""
        pieces, position = [], int(start) % int(self.shard_offsets[-1])
        while count > 0:
            shard = int(np.searchsorted(self.shard_offsets, position, side="right")) - 1
            offset = position - int(self.shard_offsets[shard])
            piece = self.shards[shard][offset:offset + count]
            pieces.append(piece)
            count -= len(piece)
            position = (position + len(piece)) % int(self.shard_offsets[-1])
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def batch(self, step, micro_step, device=None, piece_len=None):
        """TrainBatch: int64 (inputs, targets) of shape (seqs_per_micro, seq_len) for this rank and micro-step (with
        TRAIN_ROWS=packed, (1, seqs_per_micro * seq_len), in pieces of at most `piece_len`, the loader's unless
        given), and with varlen_bos_id their cu_seqlens, found here on the host. On a GPU the tensors travel in
        asynchronous copies from pinned memory: the host does not wait for the GPU to reach the copy, so it keeps
        queueing work ahead (a pageable copy, or cu_seqlens found on the device, would stall it every micro-step)."""
        piece_len = self.piece_len if piece_len is None else piece_len
        chunk = self.rank * self.grad_accum_steps + micro_step
        starts = self.row_starts(step, np.arange(chunk * self.seqs_per_micro, (chunk + 1) * self.seqs_per_micro))
        if piece_len:  # TRAIN_ROWS=packed: the same tokens, the micro-batch's span as one row
            rows = np.asarray(self.read_stream(starts[0], len(starts) * self.seq_len + 1), dtype=np.int64)[None]
        else:
            rows = np.empty((len(starts), self.seq_len + 1), dtype=np.int64)
            for row, start in enumerate(starts):
                rows[row] = self.read_stream(start, self.seq_len + 1)
        rows = torch.from_numpy(rows)
        cu_seqlens = (cu_seqlens_of(document_starts(rows[:, :-1], self.varlen_bos_id, piece_len))
                      if self.varlen_bos_id is not None else None)
        rows = to_device(rows, device)
        if cu_seqlens is not None and rows.is_cuda:
            cu_seqlens = to_device(cu_seqlens, device)
            torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
        return TrainBatch(rows[:, :-1], rows[:, 1:], cu_seqlens)


def check_token_ids(files, shards, vocab_size, rank=0, world_size=1, all_reduce_max=None):
    """Every token id of every shard below VOCAB_SIZE, before anything trains: each rank scans its share of the
    shards (a vectorized max over the memory map, about 0.1 s per 800M tokens from the page cache), the maxima are
    combined, and the first bad shard is named with the id and its position."""
    maxima = np.zeros(len(shards), dtype=np.int64)
    share = range(len(shards) * rank // world_size, len(shards) * (rank + 1) // world_size)
    for index in share:
        maxima[index] = int(shards[index].max()) if len(shards[index]) else 0
    if all_reduce_max is not None:
        maxima = all_reduce_max(maxima)
    for index in np.flatnonzero(maxima >= vocab_size):
        position = int(np.argmax(np.asarray(shards[index]) >= vocab_size))
        raise DataError(f"{files[index]} holds token id {int(shards[index][position])} >= VOCAB_SIZE={vocab_size} (at "
                        f"token {position}); re-export or re-download this shard, or fix VOCAB_SIZE / DATA_PATH")


def load_validation_tokens(files):
    """The whole validation split, concatenated, as one int32 tensor."""
    tokens = np.concatenate([np.asarray(load_shard(f)) for f in files]).astype(np.int32)
    if tokens.size < 2:
        raise ConfigError(f"the validation shards {files} hold fewer than 2 tokens")
    return torch.from_numpy(tokens)


def load_tokenizer(path, vocab_size, data_path=None):
    if not os.path.isfile(path):
        get = f"; get it with {how_to_get_data(data_path)}" if data_path and not os.path.exists(path) else ""
        raise ConfigError(f"TOKENIZER_PATH={path!r} "
                          f"{'is a folder, not a file' if os.path.isdir(path) else 'does not exist'}{get}")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as error:
        reason = "cannot be read" if not os.access(path, os.R_OK) else "is not a SentencePiece model"
        raise ConfigError(f"TOKENIZER_PATH={path!r} {reason} ({str(error).strip()[:120]})") from None
    if sp.vocab_size() != vocab_size:
        raise ConfigError(f"TOKENIZER_PATH={path!r} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}; "
                          f"set VOCAB_SIZE={sp.vocab_size()} or use the matching tokenizer")
    if sp.piece_to_id("\u2581") == sp.unk_id():
        # Without a standalone "▁" piece the leading-space bytes are miscounted (parameter-golf issue #897).
        raise ConfigError(f"TOKENIZER_PATH={path!r}: '\u2581' is not a piece of its own, so val_bpb would miscount "
                          f"bytes")
    return sp


def build_byte_luts(sp, vocab_size):
    """Per-token UTF-8 byte counts as the challenge defines them (techniques.md 1.3).

    A target y after token x covers base_bytes[y] + (has_leading_space[y] and not is_boundary[x]) bytes: the "▁"
    of a piece is one space byte, except right after BOS (or another control token), where decoding drops it.
    """
    base_bytes = np.zeros(vocab_size, dtype=np.int64)
    has_leading_space = np.zeros(vocab_size, dtype=bool)
    is_boundary = np.ones(vocab_size, dtype=bool)
    for token in range(sp.vocab_size()):
        if sp.is_control(token) or sp.is_unknown(token) or sp.is_unused(token):
            continue
        is_boundary[token] = False
        if sp.is_byte(token):
            base_bytes[token] = 1
            continue
        piece = sp.id_to_piece(token)
        if piece.startswith("\u2581"):
            has_leading_space[token], piece = True, piece[1:]
        base_bytes[token] = len(piece.encode("utf-8"))
    return base_bytes, has_leading_space, is_boundary


def target_byte_counts(tokens, luts):
    """The bytes of every target: entry p is the UTF-8 size of token p + 1 after token p (numpy or torch, int)."""
    base_bytes, has_leading_space, is_boundary = luts
    tokens = np.asarray(tokens, dtype=np.int64)
    prev, cur = tokens[:-1], tokens[1:]
    return base_bytes[cur] + (has_leading_space[cur] & ~is_boundary[prev])


def count_target_bytes(tokens, luts):
    """Bytes covered by tokens[1:] given their predecessors tokens[:-1]."""
    return int(target_byte_counts(tokens, luts).sum())


def check_tokenizer_and_bytes(sp, tokens, luts, max_tokens=1 << 21, roundtrip_docs=256):
    """Start-up self-checks on the documents (BOS-delimited) of the first `max_tokens` of the validation split: all
    of them where the split fits, the last one included, so that the bytes checked are then the val_bytes.

    1. The denominator is the real UTF-8 size of the text: document by document, the LUT byte count equals the
       length of the SentencePiece decode.
    2. The tokenizer is the one that made the shards (check_reencoding).
    """
    whole = len(tokens) <= max_tokens
    tokens = np.asarray(tokens[:max_tokens], dtype=np.int64)
    bos_positions = np.flatnonzero(tokens == sp.bos_id())
    if len(bos_positions) < 2 or bos_positions[0] != 0:
        raise ConfigError("the validation split must be BOS-delimited documents starting with BOS; re-export the "
                          "shards")
    ends = [*bos_positions[1:], len(tokens)] if whole else bos_positions[1:]  # a cut-off document is not checked
    docs = [tokens[a + 1:b].tolist() for a, b in zip(bos_positions, ends)]
    decoded = sp.decode(docs)
    total = 0
    for index, (doc, text) in enumerate(zip(docs, decoded)):
        lut, utf8 = count_target_bytes([sp.bos_id()] + doc, luts), len(text.encode("utf-8"))
        if lut != utf8:
            raise ConfigError(f"byte accounting self-check failed on validation document {index}: the LUT counts {lut} "
                              f"bytes, the decoded text has {utf8}; val_bpb cannot be trusted with this tokenizer")
        total += utf8
    check_reencoding(sp, docs[:roundtrip_docs], decoded[:roundtrip_docs])
    return len(docs), total


def check_reencoding(sp, docs, decoded):
    """The tokenizer is the one that made the shards: BPE encoding is canonical, so re-encoding a decoded document
    gives back its tokens for essentially every document with the right tokenizer, and for none with a wrong one."""
    matches = sum(sp.encode(text) == list(doc) for doc, text in zip(docs, decoded))
    if matches < 0.9 * len(docs):
        raise ConfigError(f"TOKENIZER_PATH does not match the shards in DATA_PATH: only {matches} of {len(docs)} "
                          f"validation documents re-encode to their own tokens")


class TargetBytes:
    """The UTF-8 bytes of each validation target (from the LUTs, or from the CaseOps sidecar), with prefix sums so
    that the bytes of any set of scored ranges are an exact integer sum."""

    def __init__(self, counts):
        self.prefix = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
        self.total = int(self.prefix[-1])

    def of(self, windows):
        """Bytes of the scored ranges [score_from, end) of (start, score_from, end) windows."""
        if not len(windows):
            return 0
        windows = np.asarray(windows, dtype=np.int64)
        return int((self.prefix[windows[:, 2]] - self.prefix[windows[:, 1]]).sum())


# --- CaseOps: a lossless case transform before tokenization (credit: PR #1729's lossless caps, the 04-18 record) ---
# Every maximal run of ASCII letters is written in lowercase behind an operator that says how to restore it: TITLE
# (first letter upper, the rest lower; also a lone capital), ALLCAPS (two or more letters, all upper), or one
# CAPNEXT before each capital of a mixed-case run. An operator character in the text is written behind ESCAPE.
# Nothing else changes, so the tokenizer shares one piece between "the", "The" and "THE". The operators are
# private-use characters that the CaseOps tokenizer holds as pieces of their own, and val_bpb counts the bytes of
# the original text through the per-token byte sidecar (fineweb_val_bytes_*.bin), never the operators' bytes.
CASE_TITLE, CASE_ALLCAPS, CASE_CAPNEXT, CASE_ESCAPE = "\ue001", "\ue002", "\ue003", "\ue004"
CASE_OPERATORS = (CASE_TITLE, CASE_ALLCAPS, CASE_CAPNEXT, CASE_ESCAPE)
_LETTER_RUN = re.compile(r"[A-Za-z]+")
_OPERATOR = re.compile("[\ue001-\ue004]")
_CASE_CODE = re.compile("\ue004([\\s\\S])|\ue001([a-z])|\ue002([a-z]+)|\ue003([a-z])|([\ue001-\ue004])")


def _case_word(match):
    word = match.group(0)
    if word.islower():
        return word
    if word[0].isupper() and (len(word) == 1 or word[1:].islower()):
        return CASE_TITLE + word.lower()
    if word.isupper():
        return CASE_ALLCAPS + word.lower()
    first = CASE_TITLE + word[0].lower() if word[0].isupper() else word[0]  # a mixed-case run: TITLE, then CAPNEXTs
    return first + "".join(CASE_CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def case_encode(text):
    """The CaseOps form of `text` (exactly invertible by case_decode)."""
    return _LETTER_RUN.sub(_case_word, _OPERATOR.sub(lambda m: CASE_ESCAPE + m.group(0), text))


def _case_restore(match):
    escaped, title, allcaps, capnext, stray = match.groups()
    if stray is not None:
        raise ValueError(f"CaseOps operator U+{ord(stray):04X} is not followed by what it applies to")
    return escaped if escaped is not None else (title or allcaps or capnext).upper()


def case_decode(text):
    """The original text of a CaseOps string; ValueError on a malformed one."""
    return _CASE_CODE.sub(_case_restore, text)


def caseops_byte_luts(sp, vocab_size):
    """(bytes of each token's surface text, operator ids, escape id) for the CaseOps sidecar: operators and control
    tokens count 0, byte-fallback pieces 1, other pieces their text with "▁" as one space."""
    surface = np.zeros(vocab_size, dtype=np.int64)
    for token in range(sp.vocab_size()):
        if sp.is_control(token) or sp.is_unknown(token) or sp.is_unused(token):
            continue
        surface[token] = 1 if sp.is_byte(token) else len(sp.id_to_piece(token).replace("\u2581", " ").encode("utf-8"))
    operators = [sp.piece_to_id(op) for op in CASE_OPERATORS]
    if any(token == sp.unk_id() or sp.encode(op) != [token] for op, token in zip(CASE_OPERATORS, operators)):
        raise ConfigError("CASEOPS_ENABLED=1 needs a CaseOps tokenizer (its operators U+E001..U+E004 as pieces of "
                          "their own): export the data with data/prepare_docs.py --caseops, or set TOKENIZER_PATH")
    surface[operators] = 0
    return surface, operators, operators[-1]


def caseops_token_bytes(tokens, byte_luts):
    """The byte sidecar of a token stream: for each token, the UTF-8 bytes of the original text it stands for (an
    escaped operator is text of its own; operators, their escape and BOS stand for none)."""
    surface, operators, escape = byte_luts
    tokens = np.asarray(tokens, dtype=np.int64)
    counts, literal = surface[tokens].copy(), -1
    for position in np.flatnonzero(np.isin(tokens, operators)).tolist():  # in order: ESCAPE ESCAPE is one ESCAPE
        if position == literal:
            counts[position] = len(CASE_OPERATORS[0].encode("utf-8"))
        elif tokens[position] == escape:
            literal = position + 1
    return counts


class CaseOpsCheck(NamedTuple):
    documents: int
    sidecar_bytes: int  # what val_bpb divides by
    tokens_differing: int  # pieces (a byte-fallback run as one) whose sidecar count differs from the decoded text's
    bytes_differing: int  # sidecar minus decoded text, in bytes


NORMALIZATION_PROBE = "x\uff1a\u00a0\ufb01  y"  # a fullwidth colon, a no-break space, a ligature, two spaces


def tokenizer_normalizes(sp):
    """Whether the tokenizer changes text before it encodes it (NFKC, whitespace folding: the challenge's and the
    04-27 record's do; ours for --caseops does not), so that its tokens cannot give back the original text."""
    return sp.normalize(NORMALIZATION_PROBE).replace("\u2581", " ").strip() != NORMALIZATION_PROBE


def check_caseops(sp, tokens, sidecar, rank=0, world_size=1, all_reduce_min=lambda index: index, roundtrip_docs=256):
    """The CaseOps start-up check, on every validation document: the byte sidecar covers the tokens, each
    document's decoded text is a well-formed CaseOps string that case_decode inverts and case_encode rebuilds, and
    the sidecar counts, token by token, the UTF-8 bytes of the original text the tokens stand for. The records'
    exporter (PR #1729's) counts the surfaces SentencePiece gives each piece, so a run of byte-fallback pieces is
    compared whole (it gives a character's bytes to its last piece), and may count fewer. With a normalizing tokenizer
    (tokenizer_normalizes) it counts the text before normalization, which the tokens cannot give back ("\u2122" for
    "TM"), so up to 1 piece in 10 of a document may differ; the departures are counted. At about 1 s per MB of text,
    the documents are shared out over the ranks (every world_size-th); `all_reduce_min` gives every rank the first
    failing document, so all of them refuse it with the same message."""
    tokens, sidecar = np.asarray(tokens, dtype=np.int64), np.asarray(sidecar, dtype=np.int64)
    if len(sidecar) != len(tokens):
        raise DataError(f"the byte sidecar holds {len(sidecar)} entries for {len(tokens)} validation tokens; "
                        f"re-export DATA_PATH with data/prepare_docs.py --caseops")
    bos_positions = np.flatnonzero(tokens == sp.bos_id()).tolist()
    if not bos_positions or bos_positions[0] != 0:
        raise ConfigError("the validation split must be BOS-delimited documents starting with BOS; re-export the "
                          "shards")
    bounds = list(zip(bos_positions, bos_positions[1:] + [len(tokens)]))
    document = lambda index: tokens[bounds[index][0] + 1:bounds[index][1]].tolist()
    sample = [document(index) for index in range(min(roundtrip_docs, len(bounds)))]
    check_reencoding(sp, sample, sp.decode(sample))
    counted = caseops_token_bytes(tokens, caseops_byte_luts(sp, sp.vocab_size()))
    per_document = lambda values: np.add.reduceat(values, bos_positions)
    sums, lengths = per_document(counted).tolist(), np.diff(bos_positions + [len(tokens)])
    # Where the sidecar departs from the tokens: single pieces, and runs of byte-fallback pieces taken whole (the
    # exporter gives a character's bytes to the last piece of it), each marked at its last token.
    byte_piece = np.array([sp.is_byte(token) for token in range(sp.vocab_size())])[tokens]
    run_end = byte_piece & ~np.append(byte_piece[1:], False)
    run_sum = lambda values: np.diff(np.concatenate([[0], np.cumsum(np.where(byte_piece, values, 0))[run_end]]))
    over = np.zeros(len(tokens), dtype=np.int64)
    over[run_end] = run_sum(sidecar) - run_sum(counted)
    over[~byte_piece] = (sidecar - counted)[~byte_piece]
    normalizes = tokenizer_normalizes(sp)
    if normalizes:
        off = (per_document((over != 0).astype(np.int64)) * 10 > lengths).tolist()
    else:  # only byte-fallback runs may count less
        off = (per_document(((over != 0) & ~run_end | (over > 0)).astype(np.int64)) > 0).tolist()
    mine = range(rank, len(bounds), world_size)
    texts = sp.decode([document(index) for index in mine])
    verdict = lambda index, text: caseops_failure(index, text, sums[index], off[index], exact=not normalizes)
    failing = (index for index, text in zip(mine, texts) if verdict(index, text))
    first = all_reduce_min(next(failing, len(bounds)))
    if first < len(bounds):
        raise verdict(first, sp.decode(document(first)))
    return CaseOpsCheck(len(bounds), int(sidecar.sum()), int((over != 0).sum()), int(over.sum()))


def caseops_failure(index, text, counted, off, exact=True):
    """The DataError of validation document `index` (decoded `text`; its tokens stand for `counted` bytes; `off`:
    the sidecar departs from them beyond what check_caseops allows), or None if it passes. Not `exact`: the
    tokenizer normalizes, so the decoded text need not be case_encode's output (NFKC turns "\u2122" into a raw "TM"
    after the transform ran) and the original text is out of reach: only the form and the sidecar are checked."""
    try:
        original = case_decode(text)
    except ValueError as error:
        return DataError(f"validation document {index} is not a CaseOps string ({error}); DATA_PATH was not "
                         f"exported with --caseops, or TOKENIZER_PATH is not its tokenizer")
    if exact and case_encode(original) != text:
        return DataError(f"validation document {index} does not round-trip through CaseOps: the transform is not "
                         f"the one that made DATA_PATH")
    if exact and counted != len(original.encode("utf-8")):
        return DataError(f"validation document {index}: its tokens stand for {counted} bytes, its original text has "
                         f"{len(original.encode('utf-8'))}; TOKENIZER_PATH is not the tokenizer that made DATA_PATH")
    if off:
        return DataError(f"byte sidecar of validation document {index} counts other bytes than its tokens stand for; "
                         f"it is not this data's, and val_bpb cannot be trusted with it")
    return None


# ============================================================================================
# MODEL
# ============================================================================================
# The challenge baseline's spine (pre-norm blocks, QK-RMSNorm, per-head query gain, RoPE, grouped-query attention,
# resid_mix, U-Net skips, zero-initialized output projections, tied embeddings, tanh softcap) with the record
# techniques, each behind its env var and credited where it is defined. `GPT.hidden_states` is the whole model:
# embed (token + BigramHash, SmearGate), then the virtual layer order (depth recurrence) with U-Net skips and
# parallel lanes, then Cache+Backout.


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; with NORM_WEIGHTS a learnable per-channel weight (neon213's norms), else none."""

    def __init__(self, dim, learnable, init=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), float(init))) if learnable else None

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), None if self.weight is None else self.weight.to(x.dtype))


class CastedLinear(nn.Linear):
    """fp32 master weight, used in the activations' dtype (bf16 under autocast)."""

    def __init__(self, in_features, out_features, zero_init=False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        if zero_init:
            nn.init.zeros_(self.weight)
        self.qat_grid = None  # (bits, clip method, clip k, floor) of the export grid when QAT is on (see set_qat)
        self.register_buffer("qat_on", torch.zeros(()), persistent=False)
        self.register_buffer("qat_k_scale", torch.ones(()), persistent=False)  # the size target's scale of k

    def weight_in(self, dtype):
        """The weight the forward multiplies by, in `dtype`."""
        w = self.weight
        if self.qat_grid is not None:  # straight-through: the forward sees the quantized weight, the gradient is w's
            w = w + self.qat_on * (fake_quantize(w, *self.qat_grid, self.qat_k_scale) - w).detach()
        return w.to(dtype)

    def forward(self, x):
        return F.linear(x, self.weight_in(x.dtype))


class TokenTable(nn.Embedding):
    """A token table whose lookups are fp32 whatever its storage: EMBED_BF16 stores it in bf16 (see
    store_tables_in_bf16), and the exact bf16 values then enter the fp32 residual stream."""

    def forward(self, input_ids):
        return super().forward(input_ids).float()


def store_tables_in_bf16(model):
    """EMBED_BF16 (GPT applies it): every token table becomes a bf16 parameter (so AdamW's moments and updates are
    bf16 too), as after the records' `.bfloat16()` model cast, which their restore pass undoes for everything but
    the tables."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.to(torch.bfloat16)


class PackedDocuments(NamedTuple):
    """Where the documents of packed rows are (DOC_ISOLATION): a row's first position and every BOS start one."""
    ids: torch.Tensor  # (B, T) the document index of each position, counted along the row
    offsets: torch.Tensor  # (B, T) each position's offset inside its document
    cu_seqlens: Optional[torch.Tensor] = None  # FlashAttention's varlen bounds (cu_seqlens_of), found before the model
    block_mask: object = None  # FlexAttention's BlockMask of the documents (ATTN_BACKEND=flex), once per forward
    piece_len: int = 0  # TRAIN_ROWS=packed: no document piece is longer (FlashAttention's max_seqlen)


def packed_documents(input_ids, bos_id, cu_seqlens=None, block_mask=False, piece_len=0):
    starts = document_starts(input_ids, bos_id, piece_len)
    ids = starts.cumsum(1)
    return PackedDocuments(ids=ids, offsets=offsets_from(starts), cu_seqlens=cu_seqlens,
                           block_mask=document_block_mask(ids) if block_mask else None, piece_len=piece_len)


FLEX_BLOCK = 128  # FlexAttention's default block of queries and of keys


def document_block_mask(ids, block=FLEX_BLOCK):
    """FlexAttention's block mask of causal attention inside each document of the rows (ids: (B, T) document
    indices, non-decreasing along a row). Its blocks wholly outside every document are skipped, not computed and
    discarded. Built from each block's first and last document index, in (T / block)² work, where create_block_mask
    would evaluate the mask at all T² pairs (9.7e9 for the 98,304-token rows of TRAIN_ROWS=packed). A key block
    before a query block meets it iff it ends in the document the query block starts in; the whole block pair is
    attended iff both lie in one document, the query block being whole (a ragged last block is never full)."""
    rows, length = ids.shape
    count = -(-length // block)
    first = ids[:, ::block]
    last = ids[:, (torch.arange(count, device=ids.device) * block + block - 1).clamp(max=length - 1)]
    query_block = torch.arange(count, device=ids.device)[:, None]
    earlier = query_block > query_block.T  # [query block, key block]: the key block is wholly before
    whole = (query_block + 1) * block <= length
    full = earlier & whole & (first[:, None, :] == last[:, :, None])
    meets = (earlier & (last[:, None, :] == first[:, :, None])) | (query_block == query_block.T)
    partial = meets & ~full

    def ordered(blocks):  # each query block's number of key blocks, and their indices first (as create_block_mask)
        blocks = blocks[:, None].to(torch.int32)
        return blocks.sum(-1, dtype=torch.int32), torch.argsort(blocks, dim=-1, descending=True, stable=True).int()

    def same_document_causal(batch, head, query, key):
        return (query >= key) & (ids[batch, query] == ids[batch, key])
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block,
                                    mask_mod=same_document_causal, seq_lengths=(length, length))


def _sdpa(q, k, v, docs=None):
    # (B, T, H, D) in and out; SDPA wants heads first. With documents, a block-diagonal causal mask.
    mask = None
    if docs is not None:
        same_doc = docs.ids[:, :, None] == docs.ids[:, None, :]
        mask = (same_doc & torch.ones_like(same_doc).tril())[:, None]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


def _flex(q, k, v, docs=None):
    """ATTN_BACKEND=flex: SDPA for causal rows; over packed documents, FlexAttention with their block mask (credit:
    PyTorch's FlexAttention and its document masking), where SDPA would compute the dense mask's every block.
    Compiled with the model it is one fused kernel; eager, a slow reference."""
    if docs is None or docs.block_mask is None:
        return _sdpa(q, k, v, docs)
    y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=docs.block_mask,
                       enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


_flex.takes_block_mask = True


def _load_flash_attention(backend):
    """FlashAttention's causal (B, T, H, D) kernel, or None when that package is not importable. With documents it
    calls the variable-length entry point over the flattened rows, one sequence per document (cu_seqlens)."""
    try:
        if backend == "fa3":
            import flash_attn_interface as package
        else:
            import flash_attn as package
        flash_attn_func = package.flash_attn_func
    except (ImportError, AttributeError):
        return None
    varlen = getattr(package, "flash_attn_varlen_func", None)

    def first(out):
        return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE

    def flash(q, k, v, docs=None):
        if docs is None:
            return first(flash_attn_func(q, k, v, causal=True))
        if varlen is None:
            raise ConfigError(f"DOC_ISOLATION=1 needs flash_attn_varlen_func, which this {backend} build lacks; "
                              f"set ATTN_BACKEND=sdpa")
        B, T = q.shape[:2]
        cu_seqlens = docs.cu_seqlens if docs.cu_seqlens is not None else cu_seqlens_of(docs.offsets == 0)  # eager
        longest = min(docs.piece_len, T) if docs.piece_len else T
        out = first(varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, cu_seqlens, longest,
                           longest, causal=True))
        return out.view(B, T, *out.shape[1:])
    flash.has_varlen = varlen is not None
    return flash


def uses_varlen(hp, attention_name):
    """DOC_ISOLATION on FlashAttention: the documents go to its varlen entry point as cu_seqlens."""
    return hp.doc_isolation and attention_name in ("fa3", "fa2")


def check_doc_isolation(hp, attention_name, attention_fn, device_type="cpu"):
    """DOC_ISOLATION on FlashAttention needs its varlen entry point; SDPA takes a block-diagonal mask, which a GPU
    cannot hold over the long rows of TRAIN_ROWS=packed."""
    if uses_varlen(hp, attention_name) and not getattr(attention_fn, "has_varlen", False):
        raise ConfigError(f"DOC_ISOLATION=1 needs flash_attn_varlen_func, which this {attention_name} build lacks; "
                          f"set ATTN_BACKEND=sdpa")
    if hp.train_rows == "packed" and attention_name == "sdpa" and device_type == "cuda":
        raise ConfigError("TRAIN_ROWS=packed makes each micro-batch one row, whose dense mask SDPA would build (its "
                          "length squared): install FlashAttention, or compile (COMPILE=1, ATTN_BACKEND=auto or flex) "
                          "for FlexAttention, or set TRAIN_ROWS=seq")


def select_attention(requested, device_type, half_precision=True, documents=False, compiled=False):
    """Returns (name, fn). FA3, then FA2, then PyTorch SDPA; an explicit request that cannot be met is an error.
    FlashAttention takes only fp16/bf16 activations, so without autocast (`half_precision` False) it is skipped.
    Over packed `documents`, a compiled CUDA run without FlashAttention takes FlexAttention before SDPA's mask."""
    candidates = ["fa3", "fa2", "flex", "sdpa"] if requested == "auto" else [requested]
    for name in candidates:
        if name == "sdpa":
            return name, _sdpa
        if name == "flex":
            if requested == "flex" and device_type != "cuda":
                raise ConfigError("ATTN_BACKEND=flex: FlexAttention has no backward on the CPU; set ATTN_BACKEND=sdpa "
                                  "(the same attention, through a dense mask)")
            if requested == "flex" or (documents and compiled and device_type == "cuda"):
                return name, _flex
            continue
        if device_type == "cuda" and half_precision:
            fn = _load_flash_attention(name)
            if fn is not None:
                return name, fn
    if device_type == "cuda" and not half_precision:
        raise ConfigError(f"ATTN_BACKEND={requested!r} needs bf16 activations, but AUTOCAST=off runs fp32: "
                          f"set AUTOCAST=auto or ATTN_BACKEND=sdpa")
    raise ConfigError(f"ATTN_BACKEND={requested!r} is not available here (FlashAttention needs CUDA and its package)")


class Rotary(nn.Module):
    """Rotary position embedding on the first `dims` channels of each head; the rest carry no position (partial
    RoPE, credit: the PartialRoPE record). Tables are precomputed for the longest sequence, but for a forward whose
    attention reaches further than `rescale_above` (when set), whose base is rescaled as the PR #549 family's rotary
    does (NTK-aware). A packed row's attention reaches its longest piece, not its length."""

    def __init__(self, dims, base, max_seq_len, rescale_above=0):
        super().__init__()
        self.dims, self.base, self.rescale_above = dims, base, rescale_above
        cos, sin = self.tables(base, max_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, base, length, device=None):
        inv_freq = 1.0 / base ** (torch.arange(0, self.dims, 2, dtype=torch.float32, device=device) / self.dims)
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    def forward(self, x, reach=0):  # x: (B, T, H, D); rotates the two halves of the first `dims` channels as pairs
        seq_len = x.size(1)
        reach = min(reach, seq_len) if reach else seq_len  # reach: a packed row's longest piece
        if self.rescale_above and reach > self.rescale_above:
            cos, sin = self.tables(self.base * (reach / self.rescale_above) ** (self.dims / (self.dims - 2)),
                                   seq_len, x.device)
        elif seq_len > self.cos.size(1):  # a packed row (TRAIN_ROWS=packed): positions along it, as the record's
            cos, sin = self.tables(self.base, seq_len, x.device)
        else:
            cos, sin = self.cos[:, :seq_len], self.sin[:, :seq_len]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x[..., :self.dims].chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
        return rotated if self.dims == x.size(-1) else torch.cat((rotated, x[..., self.dims:]), dim=-1)


def exclusive_self_attention(y, v):
    """XSA (arXiv 2603.09078; credit: the XSA records): remove from each head's output its component along the
    token's own value vector, so attention carries what the other tokens add. GQA-aware: the query heads of a KV
    group share one unit vector, broadcast without repeating K/V. y: (B, T, H, D), v: (B, T, H_kv, D)."""
    B, T, H, D = y.shape
    grouped = y.reshape(B, T, v.size(2), H // v.size(2), D)
    unit = F.normalize(v, dim=-1).unsqueeze(3)
    return (grouped - (grouped * unit).sum(-1, keepdim=True) * unit).reshape(B, T, H, D)


ATTENTION_GATES = ("none", "head", "biased", "output", "sparse")
BIASED_GATE_INIT = 4.0  # PR #549's gated attention starts its bias here: sigmoid(4) = 0.982, nearly open


class AttentionGate(nn.Module):
    """A per-head multiplicative gate on the attention output, before the output projection; one kind at a time.
      head:   sigmoid(W x), W (H, d) ~ N(0, 0.005): about 0.5 at init (credit: Qwen's gated attention, arXiv
              2505.06708, as in the GatedAttn record).
      biased: sigmoid(W x + b), W (H, d) zero, b = BIASED_GATE_INIT: 0.982 at init (PR #549's GATED_ATTENTION).
      output: 2 sigmoid(W x[:window]), W zero: exactly 1 at init (credit: the attention-output-gate record, PR #1667).
      sparse: sigmoid(s W x[:window]), W zero: 0.5 at init, 96 parameters a layer (credit: the SparseGate record)."""

    def __init__(self, kind, model_dim, num_heads, window, scale):
        super().__init__()
        self.kind, self.window, self.scale = kind, window, scale
        full_width = kind in ("head", "biased")
        self.weight = nn.Parameter(torch.zeros(num_heads, model_dim if full_width else window))
        self.bias = nn.Parameter(torch.full((num_heads,), BIASED_GATE_INIT)) if kind == "biased" else None
        if kind == "head":
            nn.init.normal_(self.weight, std=0.005)

    def forward(self, x):  # x: the block's normed input (B, T, d) -> (B, T, H, 1)
        source = x if self.weight.size(1) == x.size(-1) else x[..., :self.window]
        z = F.linear(source, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.kind == "output":
            gate = 2 * torch.sigmoid(z)
        else:
            gate = torch.sigmoid(self.scale * z if self.kind == "sparse" else z)
        return gate.unsqueeze(-1)


class CausalConv(nn.Module):
    """A causal depthwise Conv1d over time, on (B, T, C) (credit: neon213's SwiGLU-Conv). Output t reads inputs
    t-k+1..t; the last tap multiplies the current token. The kernel is allocated at its full size MAX_K, and a mask
    holds the taps that are not yet grown at zero: growing unmasks taps on the far-past side, whose weights are
    still exactly zero (their gradient was masked), so the function is unchanged bit for bit, no tensor changes
    shape, the optimizer state carries on (the new taps start with zero moments), and torch.compile does not
    recompile. The mask is a buffer, so a reloaded artifact knows its kernel size."""

    def __init__(self, channels, max_k, hp):
        super().__init__()
        self.max_k = max_k
        self.weight = nn.Parameter(torch.zeros(channels, max_k))
        self.register_buffer("tap_mask", torch.zeros(max_k))
        stages = hp.kernel_stages
        taps = min(stages[0][1] if stages else max_k, max_k)
        self.grow(taps)
        with torch.no_grad():
            if hp.conv_init == "random":  # neon213: PyTorch's Conv1d init U(+-1/sqrt(fan_in)), fan_in = the active taps
                self.weight[:, max_k - taps:].uniform_(-taps ** -0.5, taps ** -0.5)  # (k = 1: a random scale and sign)
            else:  # identity: the model starts as if there were no conv
                self.weight[:, -1] = 1.0

    @property
    def active_k(self):
        return int(self.tap_mask.sum().item())

    def grow(self, taps):
        """Make the last `taps` taps (at most MAX_K) active; never shrinks."""
        taps = min(taps, self.max_k)
        self.tap_mask[self.max_k - taps:] = 1.0

    def forward(self, x, docs=None):
        kernel = (self.weight * self.tap_mask).to(x.dtype)
        if docs is not None:
            return self.within_documents(x, kernel, docs)
        padded = F.pad(x.transpose(1, 2), (self.max_k - 1, 0))
        return F.conv1d(padded, kernel.unsqueeze(1), groups=kernel.size(0)).transpose(1, 2)

    def within_documents(self, x, kernel, docs):
        """The same conv as a sum of shifted copies, each tap masked where it would reach before its document."""
        out = x * kernel[:, -1]
        for back in range(1, self.max_k):
            reaches = (docs.offsets >= back).unsqueeze(-1).to(x.dtype)
            out = out + F.pad(x[:, :-back], (0, 0, back, 0)) * reaches * kernel[:, -1 - back]
        return out


class CausalSelfAttention(nn.Module):
    def __init__(self, hp, layer, attention_fn):
        super().__init__()
        self.num_heads, self.num_kv_heads = hp.num_heads, hp.num_kv_heads
        self.head_dim = hp.model_dim // hp.num_heads
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(hp.model_dim, hp.model_dim)
        self.c_k = CastedLinear(hp.model_dim, kv_dim)
        self.c_v = CastedLinear(hp.model_dim, kv_dim)
        self.proj = CastedLinear(hp.model_dim, hp.model_dim, zero_init=hp.zero_init_proj)
        # QK-norm keeps the logits' scale in check; the queries' scale is learned, per head (the baseline's gain)
        # or, with NORM_WEIGHTS, per head dim as neon213's q_norm weight (shared by the heads, like k_norm's).
        self.q_norm = RMSNorm(self.head_dim, hp.norm_weights, init=hp.qk_gain_init)
        self.k_norm = RMSNorm(self.head_dim, hp.norm_weights)
        self.q_gain = None if hp.norm_weights else nn.Parameter(torch.full((self.num_heads,), hp.qk_gain_init))
        self.rotary = Rotary(hp.rope_dims or self.head_dim, hp.rope_base, max(hp.train_seq_len, hp.eval_seq_len),
                             hp.rope_train_seq_len)
        self.attention_fn = attention_fn
        self.xsa = layer in hp.layer_set("xsa_layers")
        self.gate = AttentionGate(hp.attn_gate, hp.model_dim, hp.num_heads, hp.gate_window, hp.attn_gate_scale) \
            if hp.attn_gate != "none" else None
        # Value residual (credit: ResFormer): v0 = layer 0's V enters every later layer's V, as v + sigmoid(a) v0
        # with a = 0 (the ValCalib record's form) or as l0 v0 + l1 v with l = (0.5, 0.5) (PR #549's form).
        self.value_residual_form = hp.value_residual_form
        initial = torch.zeros(()) if hp.value_residual_form == "sigmoid" else torch.full((2,), 0.5)
        self.value_residual = nn.Parameter(initial) if hp.value_residual and layer > 0 else None
        self.value_embed_scale = nn.Parameter(torch.ones(())) if layer in hp.layer_set("ve_layers") else None
        # The neon family (credit: neon213): causal depthwise convs on Q, K, V after their projections, and the
        # Intent, a fourth projection whose sigmoid gates every channel of the attention output.
        self.c_i = CastedLinear(hp.model_dim, hp.model_dim) if hp.intent_gate else None
        convs = {"q": hp.model_dim, "k": kv_dim, "v": kv_dim, **({"i": hp.model_dim} if hp.intent_gate else {})}
        self.convs = nn.ModuleDict({name: CausalConv(width, hp.conv_k, hp) for name, width in convs.items()}) \
            if hp.conv_k else None

    def project(self, x, name, linear, docs=None, lora=None):
        y = linear(x) if lora is None else linear(x) + lora(x)  # a per-document LoRA adds B A x to W x
        return self.convs[name](y, docs) if self.convs is not None else y

    def mix_value_residual(self, v, v0):
        if self.value_residual_form == "sigmoid":
            return v + torch.sigmoid(self.value_residual).to(v.dtype) * v0
        weights = self.value_residual.to(v.dtype)
        return weights[0] * v0 + weights[1] * v

    def forward(self, x, v0=None, value_embed=None, context=None, docs=None, lora=None):
        """x: the normed block input; `context` (default x): the normed input the keys and values are computed
        from (Cache+Backout's read path); `docs`: packed documents that must not see each other (DOC_ISOLATION);
        `lora`: this virtual layer's per-document adapters (LayerLoRA) during TTT_METHOD=lora.
        Returns (output, this layer's V before the value residual)."""
        B, T, C = x.shape
        context = x if context is None else context
        q_lora, k_lora, v_lora = (None, None, None) if lora is None else (lora.q, lora.k, lora.v)
        q = self.project(x, "q", self.c_q, docs, q_lora).view(B, T, self.num_heads, self.head_dim)
        k = self.project(context, "k", self.c_k, docs, k_lora).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.project(context, "v", self.c_v, docs, v_lora).view(B, T, self.num_kv_heads, self.head_dim)
        if self.value_embed_scale is not None:
            v = v + (self.value_embed_scale.to(x.dtype) * value_embed).view_as(v)
        own_v = v
        if self.value_residual is not None and v0 is not None:
            v = self.mix_value_residual(v, v0)
        reach = docs.piece_len if docs is not None else 0
        q, k = self.rotary(self.q_norm(q), reach), self.rotary(self.k_norm(k), reach)
        if self.q_gain is not None:
            q = q * self.q_gain.to(q.dtype)[:, None]
        y = self.attention_fn(q, k, v) if docs is None else self.attention_fn(q, k, v, docs)
        if self.xsa:
            y = exclusive_self_attention(y, v)
        if self.gate is not None:
            y = y * self.gate(x)
        if self.c_i is not None:
            y = y * torch.sigmoid(self.project(x, "i", self.c_i, docs)).view_as(y)
        return self.proj(y.reshape(B, T, C)), own_v


class MLP(nn.Module):
    """proj(act(fc x)^2) with act = ReLU (the baseline) or LeakyReLU(slope) (credit: PR #493, the LeakyReLU record);
    or SwiGLU, proj(silu(fc conv(x)) * up(x)), whose gate branch may read a causal conv of its input (MLP_CONV_K,
    neon213's "Hydra" conv; the value branch sees x itself)."""

    def __init__(self, hp):
        super().__init__()
        hidden = int(round(hp.mlp_mult * hp.model_dim))
        self.fc = CastedLinear(hp.model_dim, hidden)
        self.proj = CastedLinear(hidden, hp.model_dim, zero_init=hp.zero_init_proj)
        self.swiglu = hp.mlp_activation == "swiglu"
        self.up = CastedLinear(hp.model_dim, hidden) if self.swiglu else None
        self.gate_conv = CausalConv(hp.model_dim, hp.mlp_conv_k, hp) if hp.mlp_conv_k else None
        self.slope = hp.mlp_leaky_slope if hp.mlp_activation == "leaky_relu2" else 0.0
        self.fused = None  # FUSED_MLP_ENABLED where Triton runs: build_model sets fused_leaky_relu2_mlp()

    def forward(self, x, docs=None):
        if self.swiglu:
            gate_input = self.gate_conv(x, docs) if self.gate_conv is not None else x
            return self.proj(F.silu(self.fc(gate_input)) * self.up(x))
        # FUSED_MLP_ENABLED in training; passes without gradients (scoring, and GPTQ calibration, whose hooks read
        # fc and proj) stay unfused
        if self.fused is not None and torch.is_grad_enabled():
            dtype = matmul_dtype(x)
            return self.fused(x.to(dtype), self.fc.weight_in(dtype), self.proj.weight_in(dtype), self.slope)
        h = self.fc(x)
        return self.proj((F.leaky_relu(h, self.slope) if self.slope else F.relu(h)).square())


def merge_lanes(lanes):
    attention_lane, mlp_lane = lanes
    return attention_lane if mlp_lane is None else 0.5 * (attention_lane + mlp_lane)


class Block(nn.Module):
    """One transformer layer. The residual stream travels as `lanes`: (x, None) in sequential blocks, (attention
    lane, MLP lane) from PARALLEL_START_LAYER on."""

    def __init__(self, hp, layer, attention_fn):
        super().__init__()
        self.attn = CausalSelfAttention(hp, layer, attention_fn)
        self.mlp = MLP(hp)
        self.attn_norm, self.mlp_norm = RMSNorm(hp.model_dim, hp.norm_weights), RMSNorm(hp.model_dim, hp.norm_weights)
        scales = hp.sublayer_scales
        self.attn_scale = nn.Parameter(torch.ones(hp.model_dim)) if scales else None
        self.mlp_scale = nn.Parameter(torch.ones(hp.model_dim)) if scales else None
        # resid_mix blends the running residual with the block-0 input x0 per channel; [1, 0] = plain residual.
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(hp.model_dim), torch.zeros(hp.model_dim)])) \
            if hp.resid_mix else None
        # LN scale (credit: the PartialRoPE/LN-scale record): damp deeper sublayer inputs by 1/sqrt(layer + 1).
        # `layer` is the physical index, so a looped repeat keeps its block's factor. A tensor, not a Python float:
        # COMPILE_SCOPE=block then builds one graph for every layer of the same structure (a float would be folded in,
        # one graph per layer); the product is the same fp32 one. Not saved: it follows from the settings.
        self.register_buffer("norm_scale", torch.tensor(1.0 / math.sqrt(layer + 1)) if hp.ln_scale else None,
                             persistent=False)
        self.parallel = hp.parallel_residuals and layer >= hp.parallel_start_layer
        self.lanes_exchange = hp.parallel_form == "routing"
        if self.parallel and self.lanes_exchange:
            # Two lanes with learned routing (credit: modded-nanogpt PR #230, the ParallelResiduals record): attention
            # reads the attention lane, the MLP the MLP lane, both from the old lanes; each output is written to both.
            self.lane_decay = nn.Parameter(torch.full((2,), 1.1))  # [attention lane, MLP lane]
            self.lane_routing = nn.Parameter(torch.ones(2, 2))  # [from attention, from MLP] x [to lane 0, to lane 1]
        # PARALLEL_FORM=merge (credit: PR #1289, as in PR #1392 and the SP4096 record): attention updates the attention
        # lane, the MLP the MLP lane, and they never exchange; GPT merges them at the end with a learned m.

    def split(self, lanes):
        """The stream as this block's lanes, before its U-Net skip joins the attention lane: the first block of the
        routing form splits it here, so its MLP lane starts without the skip, as in the 04-27 record's decoder. The
        merge form splits after the skip (in forward), as the SP4096 record does, so both its lanes start with it."""
        return (lanes[0], lanes[0]) if self.parallel and self.lanes_exchange and lanes[1] is None else lanes

    def sublayer_input(self, x, norm):
        return norm(x) if self.norm_scale is None else norm(x) * self.norm_scale

    @staticmethod
    def scaled(output, scale):
        return output if scale is None else scale.to(output.dtype) * output

    def attention(self, normed, v0, value_embed, context, docs, lora):
        """The attention sublayer's output before its scale; a per-document O LoRA reads the block's normed input,
        as in the 04-27 record."""
        out, v = self.attn(normed, v0, value_embed, context, docs, lora)
        return (out if lora is None or lora.o is None else out + lora.o(normed)), v

    def feed_forward(self, normed, docs, lora):
        """The MLP sublayer's output before its scale, plus a per-document dim -> dim LoRA beside it."""
        out = self.mlp(normed, docs)
        return out if lora is None or lora.mlp is None else out + lora.mlp(normed)

    def forward(self, lanes, x0, v0=None, value_embed=None, cached=None, docs=None, lora=None):
        """Returns (new lanes, this layer's V). `cached`: Cache+Backout's cached state, which the attention's keys
        and values then read instead of this block's input; `docs`: see PackedDocuments; `lora`: see LayerLoRA."""
        if not self.parallel:
            lanes = (merge_lanes(lanes), None)
        residual, mlp_lane = lanes
        x = residual
        if self.resid_mix is not None:
            mix = self.resid_mix.to(residual.dtype)
            x = mix[0] * residual + mix[1] * x0
        context = None if cached is None else self.sublayer_input(cached, self.attn_norm)
        attn_out, v = self.attention(self.sublayer_input(x, self.attn_norm), v0, value_embed, context, docs, lora)
        attn_out = self.scaled(attn_out, self.attn_scale)
        if not self.parallel:
            x = x + attn_out
            return (x + self.scaled(self.feed_forward(self.sublayer_input(x, self.mlp_norm), docs, lora),
                                    self.mlp_scale), None), v
        mlp_lane = residual if mlp_lane is None else mlp_lane  # the merge form's first block splits the stream
        mlp_out = self.scaled(self.feed_forward(self.sublayer_input(mlp_lane, self.mlp_norm), docs, lora),
                              self.mlp_scale)
        if not self.lanes_exchange:
            return (x + attn_out, mlp_lane + mlp_out), v
        # The attention lane carries itself: its mix with x0 only feeds attention (the 04-27 record's parallel block).
        decay, route = self.lane_decay.to(x.dtype), self.lane_routing.to(x.dtype)
        return (decay[0] * residual + route[0, 0] * attn_out + route[1, 0] * mlp_out,
                decay[1] * mlp_lane + route[0, 1] * attn_out + route[1, 1] * mlp_out), v


class BigramHash(nn.Module):
    """A learned embedding of the hashed (previous, current) token pair, added to the token embedding (credit: the
    SmearGate/BigramHash records; the XOR hash of INT6-20). Bucket BIGRAM_BUCKETS - 1 is reserved for "no previous
    token": the first position of a row and every BOS, so packed documents never see each other. The table starts
    at zero (the identity at init); the projection starts random, since a zero table behind a zero projection would
    never receive a gradient."""

    def __init__(self, buckets, dim, model_dim, bos_id):
        super().__init__()
        self.buckets, self.bos_id = buckets, bos_id
        self.table = TokenTable(buckets, dim)
        nn.init.zeros_(self.table.weight)
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, input_ids):
        current = input_ids.long()
        previous = F.pad(current[:, :-1], (1, 0))
        hashed = torch.bitwise_xor(36313 * current, 27191 * previous) % (self.buckets - 1)
        no_previous = current == self.bos_id
        no_previous[:, 0] = True
        return torch.where(no_previous, self.buckets - 1, hashed)

    def forward(self, input_ids):
        return self.scale * self.proj(self.table(self.bucket_ids(input_ids)))


class SmearGate(nn.Module):
    """x_t += lam * sigmoid(w . x_t[:window]) * x_{t-1} on the raw embedding, never across a BOS (credit:
    modded-nanogpt's smear, the SmearGate records; the BOS mask fixes the cross-document leak found in PR #1797).
    lam = 0 and w = 0 at init: exactly the identity."""

    def __init__(self, window, bos_id):
        super().__init__()
        self.window, self.bos_id = window, bos_id
        self.weight = nn.Parameter(torch.zeros(1, window))
        self.lam = nn.Parameter(torch.zeros(()))

    def forward(self, x, input_ids):
        gate = torch.sigmoid(F.linear(x[..., :self.window], self.weight.to(x.dtype)))
        previous = F.pad(x[:, :-1], (0, 0, 1, 0)) * (input_ids != self.bos_id).unsqueeze(-1).to(x.dtype)
        return x + self.lam.to(x.dtype) * gate * previous


class SmearBlend(nn.Module):
    """The seed-era SmearGate (credit: PR #65, as in the PR #549 family): out_t = (1 - s) * x_t + s * x_{t-1} per
    channel, s = sigmoid(g), g = 0 (an even blend at init), on the normed embedding. The previous token is zero at
    a row's first position and, unlike in those records, at every BOS, so that documents never see each other."""

    def __init__(self, dim, bos_id):
        super().__init__()
        self.bos_id = bos_id
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x, input_ids):
        share = torch.sigmoid(self.gate).to(x.dtype)
        previous = F.pad(x[:, :-1], (0, 0, 1, 0)) * (input_ids != self.bos_id).unsqueeze(-1).to(x.dtype)
        return torch.lerp(x, previous, share)


class ValueEmbedding(nn.Module):
    """One token table shared by the VE_LAYERS, projected to the KV width and added to their V (credit: the VE128
    records). The projection starts at zero, so it is the identity at init, or orthogonal (VE_PROJ_INIT=ortho: the
    PR #549 family, whose OrthoInit pass overwrote its zero init)."""

    def __init__(self, vocab_size, dim, kv_dim, proj_init="zero"):
        super().__init__()
        self.table = TokenTable(vocab_size, dim)
        nn.init.normal_(self.table.weight, std=0.01)
        self.proj = CastedLinear(dim, kv_dim, zero_init=proj_init == "zero")
        if proj_init == "ortho":
            nn.init.orthogonal_(self.proj.weight)
        self.scale = nn.Parameter(torch.tensor(0.1))

    def forward(self, input_ids):
        return self.scale * self.proj(self.table(input_ids))


def mile_weights(logits, gamma):
    """MiLe token weights (arXiv 2310.19531, in PR #703's form): (1 - exp(-H))^gamma of the detached predictive
    entropy H, normalized to mean 1, so confidently predicted tokens count less. gamma = 0 is plain cross-entropy."""
    with torch.no_grad():
        log_probs = F.log_softmax(logits.float(), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        weights = (1 - torch.exp(-entropy)).clamp_min(1e-6) ** gamma
        return weights / weights.mean()


class GPT(nn.Module):
    def __init__(self, hp, attention_fn=_sdpa, bos_id=1):
        super().__init__()
        self.logit_softcap, self.fused_ce = hp.logit_softcap, None  # build_model sets fused_ce where it can run
        self.bos_id, self.doc_isolation = bos_id, hp.doc_isolation
        self.block_mask = getattr(attention_fn, "takes_block_mask", False)  # FlexAttention's, built once per forward
        self.tok_emb = TokenTable(hp.vocab_size, hp.model_dim)
        self.bigram = BigramHash(hp.bigram_buckets, hp.bigram_dim, hp.model_dim, bos_id) if hp.bigram_buckets else None
        self.smear = None if not hp.smear_gate else \
            SmearGate(hp.gate_window, bos_id) if hp.smear_gate_form == "scalar" else SmearBlend(hp.model_dim, bos_id)
        kv_dim = hp.num_kv_heads * (hp.model_dim // hp.num_heads)
        self.value_embed = ValueEmbedding(hp.vocab_size, hp.ve_dim, kv_dim, hp.ve_proj_init) \
            if hp.layer_set("ve_layers") else None
        self.blocks = nn.ModuleList(Block(hp, layer, attention_fn) for layer in range(hp.num_layers))
        # Depth recurrence (credit: the MiniDepthRecurrence and 3LayerRecur records): layers LOOP_START..LOOP_END run
        # 1 + NUM_LOOPS times once `looping` is switched on during training, reusing their weights.
        self.num_loops, self.loop_start, self.loop_end = hp.num_loops, hp.loop_start, hp.loop_end
        # The switch is a Python bool (compile specializes on it) mirrored in a buffer, so that the weights file says
        # which layout they were trained with and loading it restores the switch.
        self.register_buffer("loop_active", torch.zeros((), dtype=torch.bool))
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "looping", bool(module.loop_active)))
        self.looping = hp.num_loops > 0 and hp.loop_enable_at == 0
        # U-Net skips (credit: the baseline; gates: PR #1089): the first half of the virtual stack feeds the second
        # half in reverse order. Sized for the longer (looped) stack from the start, so that switching the recurrence
        # on mid-run adds no parameter.
        most_skips = max(len(self.layer_order(looping)) // 2 for looping in (False, True))
        self.skip_weights = nn.Parameter(torch.ones(most_skips, hp.model_dim)) if hp.unet_skips else None
        gated = hp.unet_skips and hp.skip_gates
        self.skip_gates = nn.Parameter(torch.zeros(most_skips, hp.model_dim)) if gated else None
        self.embed_norm = RMSNorm(hp.model_dim, learnable=False) if hp.embed_norm else None  # neon213 has none
        self.final_norm = RMSNorm(hp.model_dim, hp.norm_weights)
        # PARALLEL_FORM=merge ends with m lane0 + (1 - m) lane1, m learned from 0.5 (PR #1289).
        self.lane_merge = nn.Parameter(torch.tensor(0.5)) \
            if hp.parallel_residuals and hp.parallel_form == "merge" else None
        # Cache+Backout (credit: modded-nanogpt PR #140, parameter-golf PR #339 and PR #703): subtract a learned
        # multiple of the residual after BACKOUT_LAYER virtual layers from the final state (BACKOUT_INIT = 0: the
        # identity at init; PR #703: 0.1); with BACKOUT_READ the later layers' keys and values read that cached state.
        self.backout_layer, self.backout_read = hp.backout_layer, hp.backout_read
        self.backout = nn.Parameter(torch.tensor(float(hp.backout_init))) if hp.backout_layer else None
        self.lm_head = None if hp.tie_embeddings else CastedLinear(hp.model_dim, hp.vocab_size, zero_init=True)
        if hp.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)
        if hp.ortho_init:  # OrthoInit (credit: the SmearGate/OrthoInit record) on every random matrix >= 64 x 64
            for module in self.modules():
                if isinstance(module, CastedLinear) and not module.zero_init and min(module.weight.shape) >= 64:
                    nn.init.orthogonal_(module.weight)
        if hp.embed_bf16:  # after the init, so that the tables hold the fp32 init rounded to bf16
            store_tables_in_bf16(self)

    @property
    def looping(self):
        return self._looping

    @looping.setter
    def looping(self, on):
        self._looping = bool(on)
        self.loop_active.fill_(self._looping)

    def layer_order(self, looping=None):
        """The virtual stack: physical layer indices in execution order."""
        order = list(range(len(self.blocks)))
        if not (self.looping if looping is None else looping) or self.num_loops == 0:
            return order
        loop = order[self.loop_start:self.loop_end + 1]
        return order[:self.loop_start] + loop * (1 + self.num_loops) + order[self.loop_end + 1:]

    def grow_kernels(self, taps):
        """Every causal conv grows to `taps` taps (each capped at its allocated size); the function is unchanged."""
        for module in self.modules():
            if isinstance(module, CausalConv):
                module.grow(taps)

    def kernel_sizes(self):
        return sorted({m.active_k for m in self.modules() if isinstance(m, CausalConv)})

    def embed(self, input_ids):
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids)
        if isinstance(self.smear, SmearGate):  # on the raw embedding; the seed-era blend acts after the norm
            x = self.smear(x, input_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.smear(x, input_ids) if isinstance(self.smear, SmearBlend) else x

    def merge(self, lanes):
        if self.lane_merge is None or lanes[1] is None:
            return merge_lanes(lanes)
        return torch.lerp(lanes[1], lanes[0], self.lane_merge.to(lanes[0].dtype))  # m lane0 + (1 - m) lane1

    def add_skip(self, x, skip, index):
        weighted = self.skip_weights[index].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + weighted
        return torch.lerp(weighted, x, torch.sigmoid(self.skip_gates[index]).to(x.dtype))

    def hidden_states(self, input_ids, cu_seqlens=None, adapters=None, block=Block.__call__, piece_len=0):
        """`piece_len`: the rows are packed rows (TRAIN_ROWS=packed: training's, and the phases' global SGD's), their
        documents cut into pieces of at most this many tokens (see document_starts); 0 for any other row, which a
        document spans up to the row's end."""
        x0 = self.embed(input_ids)
        value_embed = self.value_embed(input_ids) if self.value_embed is not None else None
        order = self.layer_order()
        cache_after = self.backout_layer if self.backout_layer >= 0 else len(order) + self.backout_layer
        num_encoder = len(order) // 2 if self.skip_weights is not None else 0  # 0: no layer gives or takes a skip
        lanes, skips, v0, cached = (x0, None), [], None, None
        docs = packed_documents(input_ids, self.bos_id, cu_seqlens, self.block_mask, piece_len) \
            if self.doc_isolation else None
        for position, layer in enumerate(order):
            lanes = self.blocks[layer].split(lanes)
            if position >= num_encoder and skips:  # skips go into the attention lane: none is dropped
                lanes = (self.add_skip(lanes[0], skips.pop(), position - num_encoder), lanes[1])
            read = cached if self.backout_read else None
            lora = None if adapters is None else adapters.layer(position)
            lanes, v = block(self.blocks[layer], lanes, x0, v0, value_embed, read, docs, lora)
            v0 = v if v0 is None else v0
            if position < num_encoder:
                skips.append(self.merge(lanes))
            if self.backout_layer and position + 1 == cache_after:
                cached = self.merge(lanes)
        x = self.merge(lanes)
        if cached is not None:
            x = x - self.backout.to(x.dtype) * cached
        return self.final_norm(x)

    def head(self, h):
        """The output projection (tied or not), in the compute dtype, before the softcap."""
        return F.linear(h, self.tok_emb.weight.to(h.dtype)) if self.lm_head is None else self.lm_head(h)

    def output_logits(self, h, adapters=None):
        """The head over the final hidden states, with the logit softcap; fp32."""
        raw = self.head(h)
        if adapters is not None:
            raw = raw + adapters.head(h)
        if not self.logit_softcap:
            return raw.float()
        return self.logit_softcap * torch.tanh(raw.float() / self.logit_softcap)

    def output(self, h, target_ids=None, reduction="mean", mile_gamma=None, adapters=None):
        """Logits (B, T, V) without targets; with targets, the fp32 cross-entropy ("mean" or per token, "none").
        `mile_gamma` (a tensor, training only) weights the mean loss with MiLe. A mean loss to train on goes through
        the fused softcapped cross-entropy where it is on (`fused_ce`: FUSED_CE_ENABLED with Triton): the same
        math, without the fp32 logits in memory."""
        if target_ids is not None and reduction == "mean" and self.fused_ce and mile_gamma is None and adapters is None:
            return self.fused_ce(self.head(h).flatten(0, 1), target_ids.flatten(), self.logit_softcap).mean()
        logits = self.output_logits(h, adapters)
        if target_ids is None:
            return logits
        losses = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten().long(), reduction="none")
        if reduction == "none":
            return losses.view_as(target_ids)
        if mile_gamma is not None:
            losses = losses * mile_weights(logits.flatten(0, 1), mile_gamma)
        return losses.mean()

    def logits(self, input_ids, cu_seqlens=None, adapters=None):
        """`adapters`: the per-document LoRA of TTT_METHOD=lora (DocumentAdapters), one batch row per document."""
        return self.output_logits(self.hidden_states(input_ids, cu_seqlens, adapters), adapters)

    def forward(self, input_ids, target_ids=None, reduction="mean", mile_gamma=None, cu_seqlens=None, adapters=None,
                regions=None, piece_len=0):
        """The hidden states, then the output (see `output`). `cu_seqlens`: see cu_seqlens_of; `adapters`: see
        logits; `regions`: the compiled block and output of COMPILE_SCOPE=block (ForwardRegions), else eager;
        `piece_len`: see hidden_states."""
        block, output = regions or EAGER_REGIONS
        return output(self, self.hidden_states(input_ids, cu_seqlens, adapters, block, piece_len), target_ids,
                      reduction, mile_gamma, adapters)


class ForwardRegions(NamedTuple):
    """What GPT.forward calls for a block (with the block as first argument) and for the output."""
    block: Callable
    output: Callable


EAGER_REGIONS = ForwardRegions(Block.__call__, GPT.output)


# --- fused kernels (Triton, optional; credit: the 04-23 and 04-27 records' fused softcapped cross-entropy) ---
# Each is a switch. Where it cannot run (no Triton, or a device Triton does not drive) the same math runs unfused and
# the log says so. The kernels are custom ops, so torch.compile treats them as opaque calls inside its graphs.


@functools.cache
def triton_language():
    """(triton, triton.language), or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def triton_interpreted():
    """Whether Triton's kernels run in its interpreter (TRITON_INTERPRET=1, which the CPU tests use)."""
    found = triton_language()
    return found is not None and getattr(getattr(found[0], "knobs", None), "runtime", None) is not None and \
        bool(found[0].knobs.runtime.interpret)


def triton_drives(device):
    """Whether Triton's kernels run on `device`: CUDA, or any device under Triton's interpreter."""
    return triton_language() is not None and (device.type == "cuda" or triton_interpreted())


# How the kernels are launched: block sizes and, for the tiled matmul, warps and pipeline stages. 128 x 128 x 64
# tiles, eight warps and three stages fit any GPU since Ampere (the tests compile them for an H100's sm_90). FP
# fusion (a * b + c as one FMA) stays on, as the records' kernels run on their Triton: Triton 3.10 turns it off by
# default, which would round differently.
SOFTCAPPED_CE_LAUNCH = dict(BLOCK=1024, enable_fp_fusion=True)
LEAKY_RELU2_LAUNCH = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                          enable_fp_fusion=True)


@functools.cache
def softcapped_ce_kernels():
    """The Triton kernels of the softcapped cross-entropy, one program per row: the forward's loss and log-sum-exp
    in one pass over the vocabulary (an online log-sum-exp, fp32 in registers), and the backward's gradient, which
    recomputes the softcap instead of reading stored fp32 logits. tanh(y) is written 2 sigmoid(2y) - 1."""
    triton, tl = triton_language()

    @triton.jit
    def softcapped_ce_forward_kernel(raw, targets, losses, lse_out, row_stride, columns, softcap, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = raw + row * row_stride
        running_max = tl.zeros((), tl.float32) - float("inf")
        running_sum = tl.zeros((), tl.float32)
        for start in range(0, columns, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < columns
            x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            z = tl.where(inside, softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0), -float("inf"))
            new_max = tl.maximum(running_max, tl.max(z, 0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        x_target = tl.load(base + tl.load(targets + row)).to(tl.float32)
        tl.store(losses + row, lse - softcap * (2.0 * tl.sigmoid(2.0 * x_target / softcap) - 1.0))
        tl.store(lse_out + row, lse)

    @triton.jit
    def softcapped_ce_backward_kernel(raw, targets, lse_in, grad_losses, grad, row_stride, columns, softcap,
                                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base, out = raw + row * row_stride, grad + row * row_stride
        target, lse, scale = tl.load(targets + row), tl.load(lse_in + row), tl.load(grad_losses + row)
        for start in range(0, columns, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < columns
            x = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            tanh = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0
            softmax = tl.exp(softcap * tanh - lse)
            dz = scale * (softmax - tl.where(cols == target, 1.0, 0.0))
            tl.store(out + cols, (dz * (1.0 - tanh * tanh)).to(grad.dtype.element_ty), mask=inside)

    return softcapped_ce_forward_kernel, softcapped_ce_backward_kernel


@functools.cache
def fused_softcapped_ce():
    """losses(raw_logits (N, V), targets (N,), softcap) -> (N,) fp32: the cross-entropy of softcap * tanh(raw /
    softcap), through the kernels above registered as custom ops with their autograd."""

    @torch.library.custom_op("train_gpt::softcapped_ce", mutates_args=())
    def softcapped_ce(raw: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
        raw, targets = raw.contiguous(), targets.contiguous()
        losses = torch.empty(raw.size(0), dtype=torch.float32, device=raw.device)
        lse = torch.empty_like(losses)
        forward_kernel, _ = softcapped_ce_kernels()  # looked up at each launch, as the MLP's launcher does
        forward_kernel[(raw.size(0),)](raw, targets, losses, lse, raw.stride(0), raw.size(1), softcap,
                                       **SOFTCAPPED_CE_LAUNCH)
        return losses, lse

    @softcapped_ce.register_fake
    def _(raw, targets, softcap):
        return raw.new_empty(raw.size(0), dtype=torch.float32), raw.new_empty(raw.size(0), dtype=torch.float32)

    @torch.library.custom_op("train_gpt::softcapped_ce_backward", mutates_args=())
    def softcapped_ce_backward(raw: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                               grad_losses: torch.Tensor, softcap: float) -> torch.Tensor:
        raw, grad = raw.contiguous(), torch.empty(raw.shape, dtype=raw.dtype, device=raw.device)
        _, backward_kernel = softcapped_ce_kernels()
        backward_kernel[(raw.size(0),)](raw, targets.contiguous(), lse, grad_losses.contiguous(), grad, raw.stride(0),
                                        raw.size(1), softcap, **SOFTCAPPED_CE_LAUNCH)
        return grad

    @softcapped_ce_backward.register_fake
    def _(raw, targets, lse, grad_losses, softcap):
        return torch.empty_like(raw)

    def setup_context(ctx, inputs, output):
        raw, targets, softcap = inputs
        ctx.save_for_backward(raw, targets, output[1])
        ctx.softcap = softcap

    def backward(ctx, grad_losses, _grad_lse):
        raw, targets, lse = ctx.saved_tensors
        return softcapped_ce_backward(raw, targets, lse, grad_losses, ctx.softcap), None, None

    softcapped_ce.register_autograd(backward, setup_context=setup_context)
    return lambda raw, targets, softcap: softcapped_ce(raw, targets.long(), float(softcap))[0]


@functools.cache
def leaky_relu2_projection_kernel():
    """One Triton kernel for both halves of the fused MLP: a tiled matmul a @ b (fp32 accumulation, rounded to the
    output dtype as a matmul's output is) whose epilogue either applies the activation, writing both pre = x W1^T
    and post = LeakyReLU(pre)^2 (FORWARD), or multiplies g W2 by the activation's derivative at the stored pre,
    2 pre for pre > 0 and 2 slope^2 pre below (the backward). Row blocks are visited in groups of GROUP_M, so that
    a group shares each column block of b in the L2 cache."""
    triton, tl = triton_language()

    @triton.jit
    def fused_leaky_relu2_projection(a, b, pre, out, m_size, n_size, k_size, a_row_stride, a_col_stride,
                                     b_row_stride, b_col_stride, slope, FORWARD: tl.constexpr, PRECISION: tl.constexpr,
                                     WIDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        program, blocks_m, blocks_n = tl.program_id(0), tl.cdiv(m_size, BLOCK_M), tl.cdiv(n_size, BLOCK_N)
        first_m = program // (GROUP_M * blocks_n) * GROUP_M
        group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
        rows = (first_m + program % group_rows) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = program % (GROUP_M * blocks_n) // group_rows * BLOCK_N + tl.arange(0, BLOCK_N)
        a_rows, b_cols = a + rows[:, None].to(tl.int64) * a_row_stride, b + cols[None, :] * b_col_stride
        accumulator = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for start in range(0, k_size, BLOCK_K):
            depth = start + tl.arange(0, BLOCK_K)
            a_tile = tl.load(a_rows + depth[None, :] * a_col_stride,
                             mask=(rows[:, None] < m_size) & (depth[None, :] < k_size), other=0.0)
            b_tile = tl.load(b_cols + depth[:, None] * b_row_stride,
                             mask=(depth[:, None] < k_size) & (cols[None, :] < n_size), other=0.0)
            if WIDEN:  # exact: the products of two bf16 values are fp32 values, as the tensor cores form them
                a_tile, b_tile = a_tile.to(tl.float32), b_tile.to(tl.float32)
            accumulator = tl.dot(a_tile, b_tile, accumulator, input_precision=PRECISION)
        inside = (rows[:, None] < m_size) & (cols[None, :] < n_size)
        at = rows[:, None].to(tl.int64) * n_size + cols[None, :]
        product = accumulator.to(out.dtype.element_ty).to(tl.float32)
        if FORWARD:
            leaky = tl.where(product > 0, product, slope * product).to(out.dtype.element_ty).to(tl.float32)
            tl.store(pre + at, product.to(pre.dtype.element_ty), mask=inside)
            tl.store(out + at, (leaky * leaky).to(out.dtype.element_ty), mask=inside)
        else:
            stored = tl.load(pre + at, mask=inside, other=0.0).to(tl.float32)
            derivative = tl.where(stored > 0, 2.0 * stored, 2.0 * slope * slope * stored)
            tl.store(out + at, (product * derivative).to(out.dtype.element_ty), mask=inside)

    return fused_leaky_relu2_projection


def leaky_relu2_projection(a, b, slope, pre=None):
    """a (M, K) @ b (K, N), b any strided view: (pre, LeakyReLU(pre)^2) without `pre`, else the product times the
    activation's derivative at `pre` (edges of a block are masked)."""
    triton, _ = triton_language()
    (m_size, k_size), n_size = a.shape, b.size(1)
    forward = pre is None
    out = torch.empty((m_size, n_size), dtype=a.dtype, device=a.device)
    pre = torch.empty_like(out) if forward else pre.contiguous()
    precision = "tf32" if a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    # The interpreter multiplies bf16 tiles' bit patterns (triton-lang/triton#11584): it gets fp32 tiles instead.
    widen = triton_interpreted() and a.dtype == torch.bfloat16
    launch = LEAKY_RELU2_LAUNCH
    blocks = triton.cdiv(m_size, launch["BLOCK_M"]) * triton.cdiv(n_size, launch["BLOCK_N"])
    leaky_relu2_projection_kernel()[(blocks,)](
        a, b, pre, out, m_size, n_size, k_size, a.stride(0), a.stride(1), b.stride(0), b.stride(1), slope,
        FORWARD=forward, PRECISION=precision, WIDEN=widen, **launch)
    return (pre, out) if forward else out


@functools.cache
def fused_leaky_relu2_mlp():
    """mlp(x (..., dim), up (hidden, dim), down (dim, hidden), slope) -> (..., dim): LeakyReLU(x up^T)^2 down^T
    (slope 0: ReLU^2) in the inputs' dtype, as a custom op with its autograd. The forward's kernel writes pre and
    post; the backward's writes dpre = (g down) * act'(pre) and leaves the three weight and input products to
    cuBLAS. Saved for the backward: x, pre and post (the unfused graph also keeps the activation's output)."""

    @torch.library.custom_op("train_gpt::leaky_relu2_mlp", mutates_args=())
    def mlp(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, slope: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre, post = leaky_relu2_projection(x, up.T, slope)
        return post @ down.T, pre, post

    @mlp.register_fake
    def _(x, up, down, slope):
        hidden = x.new_empty(x.size(0), up.size(0))
        return x.new_empty(x.size(0), down.size(0)), hidden, torch.empty_like(hidden)

    @torch.library.custom_op("train_gpt::leaky_relu2_mlp_grad_pre", mutates_args=())
    def grad_pre(grad_out: torch.Tensor, down: torch.Tensor, pre: torch.Tensor, slope: float) -> torch.Tensor:
        return leaky_relu2_projection(grad_out.contiguous(), down, slope, pre=pre)

    @grad_pre.register_fake
    def _(grad_out, down, pre, slope):
        return torch.empty_like(pre)

    def setup_context(ctx, inputs, output):
        x, up, down, slope = inputs
        ctx.save_for_backward(x, up, down, output[1], output[2])
        ctx.slope = slope

    def backward(ctx, grad_out, _grad_pre, _grad_post):
        x, up, down, pre, post = ctx.saved_tensors
        dpre = grad_pre(grad_out, down, pre, ctx.slope)
        needs_x, needs_up, needs_down = ctx.needs_input_grad[:3]  # TTT's adapters train around frozen weights
        return (dpre @ up if needs_x else None, dpre.T @ x if needs_up else None,
                grad_out.T @ post if needs_down else None, None)

    mlp.register_autograd(backward, setup_context=setup_context)

    def fused(x, up, down, slope):
        flat = x.reshape(-1, x.size(-1)).contiguous()
        return mlp(flat, up, down, float(slope))[0].view(*x.shape[:-1], down.size(0))

    return fused


def matmul_dtype(x):
    """The dtype F.linear computes `x` in: autocast's where it is on for x's device, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def count_parameters(model):
    """(total, embedding, non-embedding): embedding = every token table (tokens, BigramHash, VE) + an untied head.
    Conv taps not yet grown are held at zero, so they are not counted: a kernel of k active taps counts k."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    embedding = sum(p.numel() for p in tables) + (model.lm_head.weight.numel() if model.lm_head is not None else 0)
    ungrown = sum(m.weight.size(0) * (m.max_k - m.active_k) for m in model.modules() if isinstance(m, CausalConv))
    total = sum(p.numel() for p in model.parameters()) - ungrown
    return total, embedding, total - embedding


def describe_features(model, hp):
    """The `features:` log line: every technique that is on, with its setting."""
    head_dim = hp.model_dim // hp.num_heads
    slope = f"({hp.mlp_leaky_slope:g})" if hp.mlp_activation == "leaky_relu2" else ""
    parallel = [layer for layer, block in enumerate(model.blocks) if block.parallel]
    optional = [  # (description, on)
        ("ortho_init", hp.ortho_init),
        (f"xsa_layers:{hp.xsa_layers}", hp.layer_set("xsa_layers")),
        (f"attn_gate:{hp.attn_gate}", hp.attn_gate != "none"),
        (f"value_residual:{hp.value_residual_form}", hp.value_residual),
        (f"value_embed:{hp.ve_layers}x{hp.ve_dim}(proj_init:{hp.ve_proj_init})", hp.layer_set("ve_layers")),
        (f"bigram_hash:{hp.bigram_buckets}x{hp.bigram_dim}", hp.bigram_buckets),
        (f"smear_gate:{hp.smear_gate_form}(bos_masked)", hp.smear_gate),
        ("no_embed_norm", not hp.embed_norm),
        ("random_init_proj", not hp.zero_init_proj),
        ("norm_weights", hp.norm_weights),
        ("ln_scale", hp.ln_scale),
        ("sublayer_scales", hp.sublayer_scales),
        ("resid_mix", hp.resid_mix),
        ("unet_skips" + ("(gated)" if hp.skip_gates else ""), hp.unet_skips),
        (f"depth_recurrence:layers{hp.loop_start}-{hp.loop_end}x{1 + hp.num_loops}@{hp.loop_enable_at:g}"
         f"(virtual_layers:{len(model.layer_order(True))})", hp.num_loops),
        (f"parallel_lanes:{parallel[0]}-{parallel[-1]}({hp.parallel_form})" if parallel else "", parallel),
        (f"backout:after{hp.backout_layer}(init:{hp.backout_init:g}{',read' if hp.backout_read else ''})",
         hp.backout_layer),
        (f"mile:{hp.mile_gamma:g}", hp.mile_gamma),
        (f"conv_qkv{'i' if hp.intent_gate else ''}:{hp.conv_k}", hp.conv_k),
        ("intent_gate", hp.intent_gate),
        (f"mlp_gate_conv:{hp.mlp_conv_k}", hp.mlp_conv_k),
        (f"kernel_schedule:{hp.kernel_schedule}(init:{hp.conv_init})",
         hp.kernel_schedule or hp.conv_k or hp.mlp_conv_k),
        ("doc_isolation" + (f"(packed_rows,pieces:{packed_pieces(hp)})" if hp.piece_len else ""), hp.doc_isolation),
    ]
    return " ".join([f"mlp:{hp.mlp_activation}{slope}x{hp.mlp_mult:g}", f"gqa:{hp.num_heads}/{hp.num_kv_heads}",
                     f"rope_dims:{hp.rope_dims or head_dim}/{head_dim}", f"qk_gain_init:{hp.qk_gain_init:g}",
                     f"softcap:{hp.logit_softcap:g}" if hp.logit_softcap else "no_softcap",
                     "tied_embeddings" if hp.tie_embeddings else "untied_head"]
                    + [description for description, on in optional if on])


# ============================================================================================
# OPTIMIZER
# ============================================================================================

# Keller Jordan's quintic: fast to converge, not to exactly 1 (five steps land singular values in about [0.7, 1.2]).
QUINTIC_COEFFICIENTS = ((3.4445, -4.7750, 2.0315),)
# Polar Express (Amsel et al. 2025; PR #1344): one polynomial per step, same cost as the quintic, tighter result.
# Steps past the list repeat its last polynomial, the one made for singular values already near 1. In full
# precision, as the records use them: rounded to five decimals, five steps move the result by about 1e-4.
POLAR_EXPRESS_COEFFICIENTS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
ORTHOGONALIZERS = {"quintic": QUINTIC_COEFFICIENTS, "polar_express": POLAR_EXPRESS_COEFFICIENTS}
INT8_MOMENTUM_BLOCK = 256  # values per fp32 scale of the int8 Muon momentum (PR #703)
# torch 2.13 renamed the single-tensor collectives (the old names warn); requirements.txt allows torch >= 2.5.
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def orthogonalize(grads, steps, method="quintic", eps=1e-7, dtype=None):
    """Approximately orthogonalize a matrix or a batch of them (..., rows, cols): U S V^T -> U S' V^T, S' near 1.
    Computed in `dtype`: by default bf16 on GPU for speed and fp32 on the CPU, which has no fast bf16 matmul."""
    coefficients = ORTHOGONALIZERS[method]
    x = grads.to(dtype or (torch.bfloat16 if grads.is_cuda else torch.float32))
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for step in range(steps):
        a, b, c = coefficients[min(step, len(coefficients) - 1)]
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if transposed else x


def quantize_int8_blockwise(x):
    """Symmetric int8 with one fp32 scale per block of INT8_MOMENTUM_BLOCK values: (codes, scales)."""
    flat = F.pad(x.flatten().float(), (0, -x.numel() % INT8_MOMENTUM_BLOCK)).view(-1, INT8_MOMENTUM_BLOCK)
    scales = flat.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(flat / scales.clamp_min(1e-30)).to(torch.int8), scales


def dequantize_int8_blockwise(codes, scales, like):
    return (codes.float() * scales).flatten()[:like.numel()].view_as(like)


class ParameterBank:
    """Same-shaped matrices stored as one contiguous (n, rows, cols) tensor (credit: PR #399's parameter banks).

    Each matrix stays a Parameter of its module, now a view of the bank, so modules, names, hooks and state_dict
    keys are unchanged and the banked model computes exactly what the unbanked one did. The gradients are views of
    one buffer padded to a multiple of the world size (autograd accumulates into them in place), so one
    reduce-scatter hands each rank whole matrices and one all-gather brings every update back. With a `grad_dtype`
    other than the weights' (MUON_BF16_STATE), `sent` holds the gradients cast to it before the reduce-scatter.
    """

    def __init__(self, params, world_size, update_dtype=None, grad_dtype=None):
        self.params, self.size = params, len(params)
        self.weights = torch.stack([p.detach() for p in params])
        padded = -(-self.size // world_size) * world_size
        self.grads = torch.zeros((padded, *self.weights.shape[1:]), dtype=self.weights.dtype,
                                 device=self.weights.device)
        for index, p in enumerate(params):
            p.data = self.weights[index]
            p.grad = self.grads[index]
        cast = grad_dtype not in (None, self.grads.dtype)
        self.sent = torch.empty_like(self.grads, dtype=grad_dtype) if cast else self.grads
        if world_size == 1:
            self.grad_shard, self.updates = self.sent, None
        else:  # the all-gather moves the update's dtype: bf16 on GPU, as it is computed in bf16 there
            self.grad_shard = torch.empty_like(self.sent[:padded // world_size])
            update_dtype = update_dtype or (torch.bfloat16 if self.weights.is_cuda else self.weights.dtype)
            self.updates = torch.empty_like(self.grads, dtype=update_dtype)


class ParallelMuon:
    """Muon (credit: Keller Jordan) over parameter banks, without DDP (credit: PR #399's Parallel Muon).

    Per bank, largest first: an asynchronous reduce-scatter leaves rank r the averaged gradient of its shard of whole
    matrices. Momentum lives for the shard only (1/world of the memory, optionally int8), then Nesterov, MuonEq-R row
    normalization and a batched orthogonalization run on the shard, and an asynchronous all-gather returns the
    updates; bank i's all-gather overlaps bank i+1's work. Decoupled weight decay and the update then apply to the
    full, replicated bank. At one process the same code runs without the collectives.
    """

    def __init__(self, banks, hp, rank, world_size, update_dtype=None, compiled=False):
        self.banks = sorted(banks, key=lambda bank: -bank.weights.numel())
        self.update_dtype = update_dtype  # None: bf16 on GPU, fp32 on the CPU (see orthogonalize)
        # Compiled (as the records compile theirs), each pointwise step of an iteration rounds to bf16 once, in one
        # kernel, where eager rounds each product and sum: the records' numerics, in fewer passes. One graph a shape.
        self.orthogonalize = torch.compile(orthogonalize, dynamic=False, fullgraph=True) if compiled else orthogonalize
        self.param_groups = [dict(lr=hp.matrix_lr, base_lr=hp.matrix_lr, momentum=hp.muon_momentum,
                                  weight_decay=hp.muon_weight_decay)]
        self.backend_steps, self.orthogonalizer = hp.muon_backend_steps, hp.muon_orthogonalizer
        self.row_normalize, self.int8_momentum = hp.muon_row_normalize, hp.muon_momentum_int8
        self.rank, self.world_size = rank, world_size
        self.state, self.pending = {}, {}

    def launch_reduce_scatters(self):
        for index, bank in enumerate(self.banks):
            if bank.sent is not bank.grads:
                bank.sent.copy_(bank.grads)  # MUON_BF16_STATE: each rank's gradient rounded to bf16 first (#549)
            if self.world_size > 1:
                self.pending[index] = reduce_scatter_single(bank.grad_shard, bank.sent, dist.ReduceOp.SUM,
                                                            async_op=True)

    def averaged_grad_shard(self, index):
        """This rank's matrices of bank `index`, gradient averaged over ranks (waits for the reduce-scatter)."""
        bank = self.banks[index]
        work = self.pending.pop(index, None)
        if work is not None:
            work.wait()
            bank.grad_shard.div_(self.world_size)  # gloo has no AVG
        return bank.grad_shard

    def momentum_step(self, index, grad, momentum):
        """buf = momentum * buf + grad, in the shard's stored precision (int8, or the gradient's: fp32, or bf16 with
        MUON_BF16_STATE); returns buf in the gradient's precision (fp32 from int8)."""
        state = self.state.setdefault(index, {})
        if self.int8_momentum:
            buf = dequantize_int8_blockwise(*state["codes_scales"], grad) if state else torch.zeros_like(grad)
            buf.mul_(momentum).add_(grad)
            state["codes_scales"] = quantize_int8_blockwise(buf)
            return buf
        if "buffer" not in state:  # allocated once: a default argument would allocate and fill one every step
            state["buffer"] = torch.zeros_like(grad)
        return state["buffer"].mul_(momentum).add_(grad)

    def shard_update(self, index, momentum):
        grad = self.averaged_grad_shard(index)
        update = grad.add(self.momentum_step(index, grad, momentum), alpha=momentum)  # Nesterov
        if self.row_normalize:  # MuonEq-R (arXiv 2603.28254, PR #1217): equal row norms before orthogonalizing
            update = update / update.norm(dim=-1, keepdim=True).clamp_min(1e-7)
        update = self.orthogonalize(update, self.backend_steps, self.orthogonalizer, dtype=self.update_dtype)
        return update * max(1.0, update.size(-2) / update.size(-1)) ** 0.5  # same RMS for tall and wide matrices

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        gathers = []
        for index, bank in enumerate(self.banks):
            update = self.shard_update(index, momentum)
            if self.world_size == 1:
                gathers.append((bank, None, update))
            else:
                work = all_gather_single(bank.updates, update.to(bank.updates.dtype), async_op=True)
                gathers.append((bank, work, bank.updates))
        for bank, work, updates in gathers:
            if work is not None:
                work.wait()
            bank.weights.mul_(1 - lr * weight_decay).add_(updates[:bank.size].to(bank.weights.dtype), alpha=-lr)

    def momentum_bytes(self):
        """The momentum memory of this rank (its shards only)."""
        return sum(t.numel() * t.element_size() for state in self.state.values()
                   for value in state.values() for t in (value if isinstance(value, tuple) else (value,)))


def sum_of_squares(tensors):
    """The fp32 sum of the squares of every element of `tensors`, in one multi-tensor norm per dtype (as
    torch.nn.utils.clip_grad_norm_ takes it): a fixed number of kernels however many tensors there are, where a
    norm per tensor would launch three kernels each (the step's clip reads about 70 small gains and gates)."""
    by_dtype = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    norms = [norm for group in by_dtype.values() for norm in torch._foreach_norm(group, 2, dtype=torch.float32)]
    return torch.stack(norms).square().sum() if norms else torch.zeros(())


def short_dtype(tensor):
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(tensor.dtype, str(tensor.dtype)[6:])


class Optimizers:
    """Every optimizer of a training step and their communication (there is no DDP): Parallel Muon over the banked
    block matrices, AdamW over the replicated rest (token tables, an untied head, gains, gates, scales, skips)."""

    def __init__(self, model, hp, rank, world_size, update_dtype=None, compiled=False):
        """`update_dtype`: Muon's orthogonalization and all-gather precision; None = bf16 on GPU, fp32 on the CPU.
        `compiled`: the orthogonalization compiled (see ParallelMuon)."""
        head = [] if model.lm_head is None else [model.lm_head.weight]
        # EMBED_PROJ_OPTIMIZER=adamw: the token tables' projections go with the scalars (the PR #549 family).
        table_projections = [m.proj for m in (model.bigram, model.value_embed) if m is not None] \
            if hp.embed_proj_optimizer == "adamw" else []
        excluded = {id(model.lm_head)} | {id(m) for m in table_projections}
        matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear) and id(m) not in excluded]
        tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
        taken = {id(p) for p in matrices + tables + head}
        scalars = [p for p in model.parameters() if id(p) not in taken]
        by_shape = {}
        for p in matrices:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        grad_dtype = torch.bfloat16 if hp.muon_bf16_state else None
        self.muon = ParallelMuon([ParameterBank(params, world_size, update_dtype, grad_dtype)
                                  for params in by_shape.values()], hp, rank, world_size, update_dtype, compiled)
        self.banks = self.muon.banks  # largest first: the order of the collectives
        adam_groups = [dict(params=tables, lr=hp.tied_embed_lr if hp.tie_embeddings else hp.embed_lr,
                            weight_decay=hp.embed_weight_decay),
                       dict(params=scalars, lr=hp.scalar_lr, weight_decay=hp.scalar_weight_decay)]
        if head:
            adam_groups.append(dict(params=head, lr=hp.head_lr, weight_decay=0.0))
        for group in adam_groups:
            group["base_lr"] = group["lr"]
        # Fused on every device (the CPU has a fused AdamW since torch 2.4): its step count stays a tensor, so the
        # step never reads it back to the host, as the unfused path's .item() does.
        self.adam = torch.optim.AdamW(adam_groups, betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=True)
        self.replicated = tables + scalars + head
        self.grad_clip_norm, self.clip_local, self.world_size = hp.grad_clip_norm, hp.grad_clip_local, world_size
        # ADAMW_SIDE_STREAM (credit: the 04-27 record): AdamW steps on a side CUDA stream while Muon orthogonalizes.
        # The two read and write disjoint tensors, so the updates are the same in any order.
        on_cuda = self.replicated[0].is_cuda
        self.side_stream = torch.cuda.Stream(self.replicated[0].device) if hp.adamw_side_stream and on_cuda else None

    def describe(self):
        clip = f"{self.grad_clip_norm:g}({'local' if self.clip_local else 'global'})" if self.grad_clip_norm else "off"
        return (f"muon:{self.muon.orthogonalizer} banks:{len(self.banks)} matrices:{sum(b.size for b in self.banks)} "
                f"shapes:{','.join('x'.join(map(str, b.weights.shape)) for b in self.banks)} "
                f"row_normalize:{self.muon.row_normalize} grads:{short_dtype(self.banks[0].sent)} "
                f"momentum:{'int8' if self.muon.int8_momentum else short_dtype(self.banks[0].sent)} "
                f"tables:{short_dtype(self.adam.param_groups[0]['params'][0])} "
                f"clip:{clip} adamw_params:{sum(p.numel() for p in self.replicated)} "
                f"adamw_stream:{'side' if self.side_stream is not None else 'main'} "
                f"orthogonalize:{'compiled' if self.muon.orthogonalize is not orthogonalize else 'eager'}")

    def adam_state_bytes(self):
        return sum(t.numel() * t.element_size() for state in self.adam.state.values() for t in state.values()
                   if torch.is_tensor(t))

    @torch.no_grad()
    def all_reduce_replicated(self):
        """Average the replicated parameters' gradients in one packed all-reduce."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.replicated]
        flat = all_reduce(torch.cat([g.flatten() for g in grads]), dist.ReduceOp.SUM).div_(self.world_size)
        for p, g in zip(self.replicated, torch.split(flat, [g.numel() for g in grads])):
            p.grad = g.view_as(p).to(p.dtype)  # summed in fp32; a bf16 table's gradient returns to bf16

    def clip_to_norm(self, banked, banked_squares):
        """Scales the banked gradients and the replicated parameters' to a norm of at most GRAD_CLIP_NORM, given the
        banked ones' sum of squares."""
        replicated = [p.grad for p in self.replicated if p.grad is not None]
        norm = (banked_squares + sum_of_squares(replicated)).sqrt()
        factor = (self.grad_clip_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(banked + replicated, factor)

    @torch.no_grad()
    def clip_global_norm(self):
        """Clip by the norm of the averaged gradient (the banked records clip each rank's own: GRAD_CLIP_LOCAL)."""
        shards = [self.muon.averaged_grad_shard(index) for index in range(len(self.banks))]
        banked = sum_of_squares(shards)
        if self.world_size > 1:
            all_reduce(banked, dist.ReduceOp.SUM)  # the shards are disjoint; the padding is zero
        self.clip_to_norm(shards, banked)

    @torch.no_grad()
    def clip_local_norm(self):
        """GRAD_CLIP_LOCAL (the banked records' clip, before their reduce-scatters): this rank's gradient by its own
        norm, before any collective, so nothing waits for one. The bank gradients are clipped in fp32, before
        MUON_BF16_STATE's cast."""
        grads = [bank.grads for bank in self.banks]
        self.clip_to_norm(grads, sum_of_squares(grads))

    def step(self, lr_scale, momentum):
        for group in self.adam.param_groups + self.muon.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        self.muon.param_groups[0]["momentum"] = momentum
        if self.grad_clip_norm > 0 and self.clip_local:
            self.clip_local_norm()
        self.muon.launch_reduce_scatters()
        if self.world_size > 1:
            self.all_reduce_replicated()  # while the banks' reduce-scatters are in flight
        if self.grad_clip_norm > 0 and not self.clip_local:
            self.clip_global_norm()  # waits for every reduce-scatter before Muon's first orthogonalization
        if self.side_stream is None:
            self.adam.step()
            self.muon.step()
            return
        self.side_stream.wait_stream(torch.cuda.current_stream())  # the clipped gradients are ready
        with torch.cuda.stream(self.side_stream):
            self.adam.step()
        self.muon.step()
        torch.cuda.current_stream().wait_stream(self.side_stream)  # the next forward reads AdamW's parameters

    def zero_grad(self):
        self.adam.zero_grad(set_to_none=True)
        for bank in self.banks:
            bank.grads.zero_()  # in place: the parameters' gradients are views of it

    def reset_state(self):
        """Back to the state before the first step (used after the untimed warmup)."""
        self.adam.state.clear()
        self.muon.state.clear()


class WeightAverage:
    """The weights that are exported (WEIGHT_AVERAGING): the live ones, an EMA, an SWA, or an SWA of the EMA.

    EMA (credit: the XSA4-EMA record): ema = d * ema + (1 - d) * w after every step, with d warmed up as
    min(EMA_DECAY, (1 + t) / (10 + t)) so that a short run is not dominated by its initial weights (TensorFlow's
    num_updates rule; EMA_WARMUP=0 is the records' fixed d). SWA: the uniform mean of snapshots taken every
    SWA_EVERY steps once the LR scale is below SWA_START_LR_SCALE. Several records collected SWA and never applied
    it; here `apply` loads the chosen average into the model, and the log says which one.
    """

    def __init__(self, model, hp):
        self.mode, self.decay, self.warmup = hp.weight_averaging, hp.ema_decay, hp.ema_warmup
        self.swa_every, self.swa_start_lr_scale = hp.swa_every, hp.swa_start_lr_scale
        self.params = [p for p in model.parameters()]
        self.ema = [p.detach().float().clone() for p in self.params] if self.mode in ("ema", "ema_swa") else None
        swa = self.mode in ("swa", "ema_swa")
        self.swa_sum = [torch.zeros_like(p, dtype=torch.float32) for p in self.params] if swa else None
        self.ema_updates = self.swa_count = 0

    @torch.no_grad()
    def update(self, step, lr_scale):
        """After optimizer step `step` (1-based) taken at LR scale `lr_scale`."""
        live = [p.detach().float() for p in self.params]  # the fp32 params themselves: no copy
        if self.ema is not None:
            decay = min(self.decay, (1 + self.ema_updates) / (10 + self.ema_updates)) if self.warmup else self.decay
            torch._foreach_lerp_(self.ema, live, 1 - decay)
            self.ema_updates += 1
        if self.swa_sum is not None and lr_scale < self.swa_start_lr_scale and step % self.swa_every == 0:
            torch._foreach_add_(self.swa_sum, self.ema if self.ema is not None else live)
            self.swa_count += 1

    def averaged(self):
        """The chosen average as a list aligned with model.parameters(), or None for the live weights."""
        if self.swa_sum is not None and self.swa_count:
            return [total / self.swa_count for total in self.swa_sum]
        # an EMA, or None: no averaging, or an SWA that took no snapshot (then EMA_SWA falls back to the EMA)
        return self.ema

    def live_copy(self):
        """A copy of the live weights where the export is an average of them, else None."""
        averaging = self.ema is not None or (self.swa_sum is not None and self.swa_count > 0)
        return [p.detach().clone() for p in self.params] if averaging else None

    @torch.no_grad()
    def apply(self):
        """Load the average into the model's parameters; returns a line for the log."""
        average = self.averaged()
        if average is not None:
            for p, value in zip(self.params, average):
                p.copy_(value)
        swa = f"swa(every:{self.swa_every} below_lr_scale:{self.swa_start_lr_scale} snapshots:{self.swa_count})"
        ema = f"ema(decay:{self.decay} updates:{self.ema_updates})"
        applied = {"none": "live_weights", "ema": ema,
                   "swa": swa if self.swa_count else "live_weights (no swa snapshot)",
                   "ema_swa": f"{swa} of {ema}" if self.swa_count else f"{ema} (no swa snapshot)"}[self.mode]
        return f"weight_averaging: exported {applied}"


def training_budget_ms(hp):
    """The wall-clock budget of the training steps: MAX_WALLCLOCK_SECONDS less the GPTQ calibration reserve, so that
    calibration on training data also happens inside the cap; 0 = no cap."""
    if hp.max_wallclock_seconds == 0:
        return 0.0
    return 1000.0 * (hp.max_wallclock_seconds - (hp.gptq_reserve_seconds if hp.gptq else 0.0))


def training_progress(hp, step, elapsed_ms):
    """The share of training done: of the training budget under a wall-clock cap, else of ITERATIONS."""
    if hp.max_wallclock_seconds > 0:
        return elapsed_ms / training_budget_ms(hp)
    return step / hp.iterations


def stage_lr_multiplier(hp, step, elapsed_ms):
    """KERNEL_STAGE_RESTARTS (neon213's regime): the LR decays linearly from 1 to 0 within each KERNEL_SCHEDULE
    stage, a sawtooth whose every tooth ends where the kernels grow."""
    progress = training_progress(hp, step, elapsed_ms)
    starts = [when if when < 1 else when / hp.iterations for when, _ in hp.kernel_stages] + [1.0]
    for start, end in zip(starts, starts[1:]):
        if progress < end:
            return max((end - progress) / (end - start), 0.0)
    return 0.0


def lr_multiplier(hp, step, elapsed_ms):
    """1, then a linear decay to 0, floored at MIN_LR_SCALE: over the last WARMDOWN_FRAC of training (the records'
    form), or over the last WARMDOWN_ITERS steps (the baseline's form: under a wall-clock cap those steps are
    converted to time with the mean step time so far, exactly as the baseline does). KERNEL_STAGE_RESTARTS replaces
    both with its per-stage decay."""
    if hp.kernel_stage_restarts:
        return stage_lr_multiplier(hp, step, elapsed_ms)
    if hp.warmdown_iters > 0:
        if hp.max_wallclock_seconds == 0:
            start = max(hp.iterations - hp.warmdown_iters, 0)
            scale = max((hp.iterations - step) / hp.warmdown_iters, 0.0) if start <= step < hp.iterations else 1.0
        else:
            warmdown_ms = hp.warmdown_iters * elapsed_ms / max(step, 1)
            remaining_ms = max(training_budget_ms(hp) - elapsed_ms, 0.0)
            scale = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
        return max(scale, hp.min_lr_scale)
    if hp.warmdown_frac == 0:
        return 1.0
    remaining = 1.0 - training_progress(hp, step, elapsed_ms)
    return max(min(remaining / hp.warmdown_frac, 1.0), hp.min_lr_scale)


def muon_momentum(hp, step):
    frac = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * hp.muon_momentum_warmup_start + frac * hp.muon_momentum


def kernel_taps_due(hp, step, elapsed_ms):
    """The conv kernel size KERNEL_SCHEDULE asks for at this point of training (None without a schedule)."""
    due = None
    for when, taps in hp.kernel_stages:
        reached = step >= when if when >= 1 else training_progress(hp, step, elapsed_ms) >= when
        due = taps if reached else due
    return due


def packed_pieces(hp):
    """The packed rows' longest piece for the logs: TRAIN_SEQ_LEN's, or each stage's as length@share."""
    return "/".join(f"{length}@{share:g}" for share, length in hp.train_seq_stages) or str(hp.piece_len)


def schedule_share(hp, step, elapsed_ms):
    """The share of training TRAIN_SEQ_SCHEDULE reads: the LR schedule's, or with TRAIN_SEQ_SCHEDULE_MODE=step, of
    ITERATIONS whatever the cap."""
    return step / hp.iterations if hp.train_seq_schedule_mode == "step" else training_progress(hp, step, elapsed_ms)


def piece_len_due(hp, step, elapsed_ms):
    """The longest piece of the packed rows at this point of training: TRAIN_SEQ_SCHEDULE's first stage whose share
    is at or above the share done (PR #2014's choice), or the one length without a schedule."""
    if not hp.train_seq_stages:
        return hp.piece_len
    done = schedule_share(hp, step, elapsed_ms)
    return next((length for share, length in hp.train_seq_stages if done <= share), hp.train_seq_stages[-1][1])


def lr_rewarm(hp, step, changed_at):
    """SEQ_CHANGE_WARMUP_STEPS: the optimizers' LR factor at `step` after the stage change at step `changed_at`
    (None: no change yet, or the change at step 0, which PR #2014 does not ramp)."""
    if changed_at is None or hp.seq_change_warmup_steps == 0:
        return 1.0
    return min((step - changed_at + 1) / hp.seq_change_warmup_steps, 1.0)


def training_shapes(hp, initial_looping):
    """(longest piece, looping) of every training graph the run can meet, for the warmup to build untimed: each
    TRAIN_SEQ_SCHEDULE stage in each layout it can run in. A stage spans the shares (start, end]: when the recurrence
    switches on at a share counted as the schedule counts, a stage runs unlooped only if it starts before that share,
    and looped only if it reaches it (PR #2014's COMPILE_SHAPE_WARMUP_LOOP_MODES=auto); else in both layouts."""
    layouts = [initial_looping] + ([True] if hp.num_loops > 0 and not initial_looping else [])
    one_clock = len(layouts) == 2 and hp.loop_enable_at < 1 and (
        hp.train_seq_schedule_mode == "wallclock" or hp.max_wallclock_seconds == 0)
    shapes, start = [], 0.0
    for end, length in hp.train_seq_stages or [(1.0, hp.piece_len)]:
        for looping in layouts:
            meets = not one_clock or (end >= hp.loop_enable_at if looping else start < hp.loop_enable_at)
            if meets and (length, looping) not in shapes:
                shapes.append((length, looping))
        start = end
    return shapes


def looping_due(hp, step, elapsed_ms):
    """Whether depth recurrence runs at this step. LOOP_ENABLE_AT >= 1 is a step; below 1 it is a fraction of the
    wall-clock cap when one is set, else of ITERATIONS (a delayed start beat always-on in the records)."""
    if hp.num_loops == 0:
        return False
    if hp.loop_enable_at >= 1:
        return step >= hp.loop_enable_at
    return training_progress(hp, step, elapsed_ms) >= hp.loop_enable_at


# ============================================================================================
# QUANTIZATION / EXPORT
# ============================================================================================
# Every projection matrix and token table is quantized per row, symmetric, at QUANT_BITS (EMBED_QUANT_BITS for the
# tables), with an fp16 scale per row; gains, gates and other small tensors pass through (fp16, or fp32 vectors).
# The row scale comes from the clip: SDClip (k times the row's std; credit: the SP8192 SDClip record, per-group k
# from the current record), a GPTQ-lite percentile search, or the row max. The rounding is full-Hessian GPTQ
# (Frantar et al., arXiv 2210.17323; credit: the Full-GPTQ records) when Hessians are given, else round to nearest.
# The file is magic + compressor id + flags + the payload's decompressed size (uint64, little-endian) + SHA-256 +
# the compressed payload. The digest covers everything else in the file, header included, and the size bounds the
# decompression, so a corrupt or hostile file is refused before it reaches torch.load or allocates memory.

ARTIFACT_MAGIC = b"PGQ3"
ARTIFACT_HEADER_BYTES = 4 + 1 + 1 + 8 + 32
ARTIFACT_MAX_PAYLOAD_BYTES = 1 << 28  # a cap on the decompressed size whatever the header says (16 times the limit)
ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal bytes: code + compressed model
FP16_BITS = 16  # QUANT_BITS / EMBED_QUANT_BITS value that stores the tensors as fp16 instead of quantizing them
PERCENTILE_CLIPS = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # GPTQ-lite candidates (1.0 = the row max)
BASELINE_CLIP_QUANTILE = 0.9999984  # the baseline's per-row int8 clip (QUANT_CLIP=quantile)
K_SCALE_RANGE = (0.25, 8.0)  # the size target's search range for the multiplier of every SDClip k
SIZE_SEARCH_STEPS = 5  # bisection steps of that search (the factor ends within 8^(1/32), about 7%)


def _zstd():
    import zstandard
    return zstandard


def _brotli():
    import brotli
    return brotli


def _zlib_decompress(data, limit):
    return zlib.decompressobj().decompress(data, limit)


def _zstd_decompress(data, limit):
    return _zstd().ZstdDecompressor().stream_reader(io.BytesIO(data)).read(limit)


def _brotli_decompress(data, limit):
    """Small input pieces and a capped output buffer, so that no call expands far past `limit`."""
    decompressor, out, size = _brotli().Decompressor(), [], 0
    for start in range(0, len(data), 256):
        out.append(decompressor.process(data[start:start + 256], output_buffer_limit=limit - size))
        size += len(out[-1])
        while size < limit and not decompressor.can_accept_more_data():
            out.append(decompressor.process(b"", output_buffer_limit=limit - size))
            size += len(out[-1])
        if size >= limit:
            break
    return b"".join(out)[:limit]


def compressor_available(name):
    """Whether the package (or, for lrzip, the program) a compressor needs is installed."""
    if name == "lrzip":
        return shutil.which("lrzip") is not None
    try:
        {"zstd": _zstd, "brotli": _brotli, "zlib": lambda: zlib, "lzma": lambda: lzma}[name]()
        return True
    except ImportError:
        return False


PIP_NAMES = {"zstd": "zstandard", "brotli": "brotli"}  # the packages of the compressors the standard library lacks


def _lzma_decompress(data, limit):
    return lzma.LZMADecompressor().decompress(data, max_length=limit)


# name: (id byte, compress, decompress(data, limit) -> at most `limit` bytes).
# A missing package is an error, never a silent fallback.
COMPRESSORS = {
    "zlib": (1, lambda b: zlib.compress(b, 9), _zlib_decompress),
    "zstd": (2, lambda b: _zstd().ZstdCompressor(level=22).compress(b), _zstd_decompress),
    "brotli": (3, lambda b: _brotli().compress(b, quality=11), _brotli_decompress),
    "lzma": (4, lambda b: lzma.compress(b, preset=6), _lzma_decompress),  # PR #549's (the standard library's xz)
}
PERGROUP_ID = 5  # the compressor id of COMPRESSOR=pergroup, whose payload is a table of streams (below)


def _lrzip_compress(data):
    done = subprocess.run(["lrzip", "-q", "-z", "-L", "9"], input=data, capture_output=True)
    if done.returncode:
        raise RunError(f"lrzip failed (exit {done.returncode}): {done.stderr.decode(errors='replace')[-300:]}")
    return done.stdout


def _lrzip_decompress(data, limit):
    """lrzip's header records the size it decompresses to (bytes 6..13): a stream that claims `limit` or more is not
    run, and no more than `limit` bytes are read from the program, which is stopped there."""
    if data[:4] != b"LRZI" or int.from_bytes(data[6:14], "little") >= limit:
        raise ValueError("an lrzip stream has a bad header or claims more bytes than the artifact records")
    with tempfile.NamedTemporaryFile(suffix=".lrz") as stream:
        stream.write(data)
        stream.flush()
        with subprocess.Popen(["lrzip", "-q", "-d", "-o", "-", stream.name], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as program:
            out = program.stdout.read(limit)
            if len(out) >= limit:
                program.kill()
            failed = program.wait() and len(out) < limit
    if failed:
        raise ValueError("lrzip could not decompress a stream of the artifact")
    return out


# The per-group streams' codecs: name: (id byte, compress, decompress(data, limit)). Stronger settings than the
# whole-file compressors', since each stream is compressed once per export: lzma's extreme preset 9 and brotli's
# largest window.
STREAM_CODECS = {
    "lrzip": (1, _lrzip_compress, _lrzip_decompress),  # ZPAQ at level 9, as the 04-27 record runs it
    "lzma": (2, lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), _lzma_decompress),
    "brotli": (3, lambda b: _brotli().compress(b, quality=11, lgwin=24), _brotli_decompress),
    "zstd": (4, COMPRESSORS["zstd"][1], _zstd_decompress),
}


def pergroup_codecs(name):
    """The stream codecs PERGROUP_CODEC=`name` tries on each stream (the smallest output is kept)."""
    return ("lzma", "brotli", "zstd") if name == "smallest" else (name,)


def quantized_tensor_groups(model, hp=None):
    """{state-dict name: group} of the tensors that are quantized: every CastedLinear weight but an untied head
    ("mlp" or "attn") and every token table ("embed"); with `hp`, none of at most
    QUANT_PASSTHROUGH_NUMEL elements and none whose bits are 16 (those are stored as fp16)."""
    groups = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            groups[f"{name}.weight"] = "embed"
        elif isinstance(module, CastedLinear) and module is not model.lm_head:
            groups[f"{name}.weight"] = "mlp" if ".mlp." in f".{name}." else "attn"
        kept_float = hp is not None and f"{name}.weight" in groups and (
            module.weight.numel() <= hp.quant_passthrough_numel
            or group_bits_and_k(hp, groups[f"{name}.weight"])[0] == FP16_BITS)
        if kept_float:
            del groups[f"{name}.weight"]
    return groups


def group_bits_and_k(hp, group):
    bits = hp.embed_quant_bits if group == "embed" else hp.quant_bits
    return bits, dict(embed=hp.clip_k_embed, mlp=hp.clip_k_mlp, attn=hp.clip_k_attn)[group]


def largest_level(bits):
    return 2 ** (bits - 1) - 1  # symmetric: [-qmax, qmax], so that 0 is exact


def round_to_nearest(w, scale, qmax):
    return torch.round(w / scale[:, None]).clamp(-qmax, qmax)


def clip_factor(k, k_scale):
    """k times the size target's scale, computed the same way (an fp32 product) by export and by QAT."""
    return torch.as_tensor(k_scale, dtype=torch.float32) * k


def row_scales(w, bits, method, k, floor=0.0):
    """fp32 per-row scales for values in [-qmax, qmax], rounded through fp16 (what is stored), but for the quantile
    rule, which rounds with the fp32 scale as the baseline does; `k` (a number, or the fp32 tensor of clip_factor)
    is read by SDClip only; `floor` is the least clip of a row (QUANT_CLIP_FLOOR; the quantile rule's is 1)."""
    qmax = largest_level(bits)
    if method == "sdclip":
        # the rows' sample std (n - 1), as every SDClip record computes it (torch's default)
        clip = torch.as_tensor(k, dtype=torch.float32, device=w.device) * w.std(dim=1)
    elif method == "quantile":  # the baseline's int8 rule, its floor included; it rounds with the fp32 scale
        return (quantile_clip(w) / qmax).clamp_min(max(floor, 1.0) / qmax)
    elif method == "rowmax":
        clip = w.abs().amax(dim=1)
    else:  # GPTQ-lite: one quantile for the whole matrix, the one whose stored grid has the lowest weight MSE
        return min(percentile_scales(w, bits, floor),
                   key=lambda scale: (w - round_to_nearest(w, scale, qmax) * scale[:, None]).square().sum().item())
    return stored_scale(clip, qmax, floor)


def stored_scale(clip, qmax, floor):
    return (clip / qmax).clamp_min(floor / qmax if floor else 2 ** -20).half().float()


def percentile_scales(w, bits, floor):
    """GPTQ-lite's candidates, as stored: the scales of each quantile in PERCENTILE_CLIPS of every row's |w|."""
    qmax = largest_level(bits)
    return [stored_scale(torch.quantile(w.abs(), quantile, dim=1) if quantile < 1 else w.abs().amax(dim=1), qmax, floor)
            for quantile in PERCENTILE_CLIPS]


def quantile_clip(w):
    return torch.quantile(w.abs(), BASELINE_CLIP_QUANTILE, dim=1)


def clipped_for_rounding(w, method):
    """What is rounded: `w`, or for the quantile rule each row clamped to its clip first, as the baseline and the
    PR #549 family do (where the floor raises the scale, values past the clip round to the clip, not past it)."""
    if method != "quantile":
        return w
    clip = quantile_clip(w)[:, None]
    return torch.maximum(torch.minimum(w, clip), -clip)


def quantization_line(hp, k_scale, gptq, protected, seconds):
    """The log's `quantization:` line. A clip, the size target's k scale and the packing are named only where some
    tensor is quantized: an all-fp16 export has none of them."""
    matrices, tables = hp.quant_bits < FP16_BITS, hp.embed_quant_bits < FP16_BITS
    fields = [f"bits:{hp.quant_bits}", f"embed_bits:{hp.embed_quant_bits}"]
    fields += [f"clip:{hp.quant_clip}"] * matrices + [f"embed_clip:{clip_method(hp, 'embed')}"] * tables
    if matrices or tables:
        fields += [f"clip_floor:{hp.quant_clip_floor:g}", f"k_scale:{k_scale:.3f}", f"packing:{hp.quant_packing}"]
    fields += [f"gptq:{gptq}", f"lqer_rank:{hp.lqer_rank}"]
    if protected:
        columns = ",".join(f"{name}@{column}" for name, columns in protected.items() for column in columns)
        fields.append(f"awq_lite:int{hp.awq_lite_bits}:{columns}")
    return "quantization: " + " ".join(fields + [f"time:{seconds:.1f}s"])


def clip_method(hp, group):
    return hp.embed_quant_clip if group == "embed" and hp.embed_quant_clip != "same" else hp.quant_clip


def fake_quantize(w, bits, method, k, floor=0.0, k_scale=1.0):
    """The round trip of `w` on the export's grid: the row scales quantize_state_dict computes for the same clip
    method, k, floor and size-target scale, rounded to nearest (GPTQ keeps the grid and changes only the
    rounding)."""
    qmax = largest_level(bits)
    scale = row_scales(w.detach(), bits, method, clip_factor(k, k_scale), floor)
    return round_to_nearest(clipped_for_rounding(w, method), scale, qmax) * scale[:, None]


def gptq(w, hessian, scale, qmax, block_size=128, damp=0.01, wide=None):
    """Integer values for `w` (rows x cols) that minimize the output error on inputs with second moment `hessian`
    (cols x cols): columns in order of decreasing Hessian diagonal (act-order), each rounded with its row scale and
    its error spread over the columns not yet rounded through the inverse Hessian's Cholesky factor, a block of
    columns at a time. `wide`: AWQ-lite's (column mask, row scale, qmax) for its protected columns. Dead columns
    (never active) are zeroed. Raises torch.linalg.LinAlgError when H is not positive definite even after damping."""
    w, hessian = w.clone(), hessian.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    hessian.diagonal().add_(damp * hessian.diagonal().mean())
    order = torch.argsort(hessian.diagonal(), descending=True)
    w, hessian = w[:, order], hessian[order][:, order]
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    q, in_wide = torch.zeros_like(w), ([False] * w.size(1) if wide is None else wide[0][order].tolist())
    for first in range(0, w.size(1), block_size):
        last = min(first + block_size, w.size(1))
        errors = torch.zeros(w.size(0), last - first, device=w.device)
        for j in range(first, last):
            column_scale, column_qmax = wide[1:] if in_wide[j] else (scale, qmax)
            q[:, j] = round_to_nearest(w[:, j:j + 1], column_scale, column_qmax)[:, 0]
            error = (w[:, j] - q[:, j] * column_scale) / inverse[j, j]
            w[:, j:last] -= error[:, None] * inverse[j, j:last][None]
            errors[:, j - first] = error
        w[:, last:] -= errors @ inverse[first:last, last:]
    return q[:, torch.argsort(order)]


def gptq_best_of(w, hessian, scales, qmax, hp, wide=None):
    """GPTQ's integers for each candidate row scale, and the pair whose result has the lowest weight MSE (with one
    candidate, plain GPTQ; GPTQ_CLIP_SEARCH=gptq, after the SP4096 record, tries every GPTQ-lite quantile)."""
    best = None
    for scale in scales:
        q = gptq(w, hessian, scale, qmax, hp.gptq_block_size, hp.gptq_damp, wide)
        error = (w - matrix_of(q, scale, wide)).square().sum().item() if len(scales) > 1 else 0.0
        if best is None or error < best[0]:
            best = (error, q, scale)
    return best[1], best[2]


def pack_values(q, bits, packing):
    """Integers in [-qmax, qmax] as int8 bytes, or densely bit-packed (offset to unsigned) into uint8."""
    if packing == "byte":
        return q.to(torch.int8).cpu()
    unsigned = (q.flatten().to(torch.int16) + largest_level(bits) + 1).to(torch.uint8).cpu().numpy()
    bit_planes = np.unpackbits(unsigned[:, None], axis=1)[:, 8 - bits:]
    return torch.from_numpy(np.packbits(bit_planes.reshape(-1)))


def unpack_values(data, bits, packing, shape):
    if packing == "byte":
        return data.float().view(shape)
    count = math.prod(shape)
    bit_planes = np.unpackbits(data.numpy())[:count * bits].reshape(count, bits)
    unsigned = np.packbits(np.pad(bit_planes, ((0, 0), (8 - bits, 0))), axis=1)[:, 0]
    return torch.from_numpy(unsigned.astype(np.float32) - largest_level(bits) - 1).view(shape)


def quantize_state_dict(state_dict, groups, hp, hessians=None, k_scale=1.0, log=None, protected=None):
    """The quantized form of a state dict. `groups` ({name: embed|mlp|attn}) says which tensors are quantized;
    `hessians` ({name: H}) switches GPTQ on for those names; `k_scale` multiplies every SDClip k (the size target);
    `protected` ({name: [first column]}): AWQ-lite's groups (see awq_lite_groups)."""
    quantized, residuals, protected = {}, {}, protected or {}
    for name, tensor in state_dict.items():
        w = tensor.detach().float()
        if hp.gated_attn_quant_gate and name.endswith(".attn.gate.weight"):
            quantized[name] = quantized_gate(w)
            continue
        if name not in groups:
            kept_fp32 = w.ndim < 2 and hp.vectors_fp32
            quantized[name] = dict(kind="fp32", data=w.cpu()) if kept_fp32 else dict(kind="fp16", data=w.half().cpu())
            continue
        (bits, k), method = group_bits_and_k(hp, groups[name]), clip_method(hp, groups[name])
        qmax = largest_level(bits)
        scale = row_scales(w, bits, method, clip_factor(k, k_scale), hp.quant_clip_floor)
        rounded, q = clipped_for_rounding(w, method), None
        wide = awq_lite_columns(w, protected.get(name), hp, method, clip_factor(k, k_scale))
        if hessians is not None and name in hessians and (hp.gptq_embed or groups[name] != "embed"):
            searched = method == "percentile" and hp.gptq_clip_search == "gptq"
            candidates = percentile_scales(w, bits, hp.quant_clip_floor) if searched else [scale]
            try:
                q, scale = gptq_best_of(rounded, hessians[name].to(w.device), candidates, qmax, hp, wide)
            except torch.linalg.LinAlgError:
                (log or print)(f"gptq: Cholesky failed for {name}; rounding it to nearest instead")
        if q is None:
            q = round_to_nearest(rounded, scale, qmax)
            if wide is not None:
                q[:, wide[0]] = round_to_nearest(rounded[:, wide[0]], wide[1], wide[2])
        if hp.lqer_rank > 0:  # the error LQER corrects; kept only when asked for (a copy of every matrix)
            residuals[name] = w - matrix_of(q, scale, wide)
        quantized[name] = dict(kind="int", bits=bits, packing=hp.quant_packing, shape=list(w.shape),
                               data=pack_values(q, bits, hp.quant_packing), scale=scale.half().cpu())
        if wide is not None:
            quantized[name]["awq"] = dict(starts=torch.tensor(protected[name], dtype=torch.int32),
                                          size=hp.awq_lite_group_size, scale=wide[1].half().cpu())
    if hp.lqer_rank > 0:
        add_low_rank_corrections(quantized, residuals, hp)
    return quantized


def matrix_of(q, scale, wide=None):
    """The weights integers `q` stand for: each row's scale, AWQ-lite's own in its protected columns."""
    w = q * scale[:, None]
    if wide is not None:
        w[:, wide[0]] = q[:, wide[0]] * wide[1][:, None]
    return w


# --- AWQ-lite (credit: PR #1953 and PR #2014): a few input-column groups keep more bits. A group's salience is the
# sum over its columns of the input's RMS (from GPTQ's Hessian diagonal) times the column's mean |weight|, as AWQ
# (Lin et al. 2023) weighs channels; the top groups over all matrices are rounded at AWQ_LITE_BITS inside GPTQ, with
# a row scale of their own, so GPTQ spreads the other columns' errors around them. ---


def awq_lite_groups(state_dict, groups, hessians, passes, hp):
    """{name: [first column of each protected group]}: the AWQ_LITE_GROUP_TOP_K most salient groups of
    AWQ_LITE_GROUP_SIZE columns among the matrices GPTQ rounds at fewer than AWQ_LITE_BITS. `passes` ({name: calls
    per forward}) turns the Hessians' sums into per-call second moments, so that looped layers compare fairly."""
    if not hp.awq_lite_enabled or hessians is None:
        return {}
    size, candidates = hp.awq_lite_group_size, []
    for name, group in groups.items():
        gptq_rounds = name in hessians and (hp.gptq_embed or group != "embed")
        if not gptq_rounds or group_bits_and_k(hp, group)[0] >= hp.awq_lite_bits:
            continue
        w = state_dict[name].detach().float()
        rms = (hessians[name].diagonal().float().cpu() / passes.get(name, 1)).clamp_min(0).sqrt()
        salience = rms * w.abs().mean(dim=0).cpu()
        for first in range(0, w.size(1) - size + 1, size):
            candidates.append((salience[first:first + size].sum().item(), name, first))
    chosen = {}
    for _, name, first in sorted(candidates, key=lambda item: -item[0])[:hp.awq_lite_group_top_k]:
        chosen.setdefault(name, []).append(first)
    return chosen


def calls_per_forward(net, names):
    """{name: how often a forward calls the weight}: a block's, once per pass of the (looped) stack; others once."""
    passes = Counter(net.layer_order())
    return {name: passes[int(name.split(".")[1])] if name.startswith("blocks.") else 1 for name in names}


def awq_lite_columns(w, starts, hp, method, k):
    """(column mask, row scale, qmax) of a matrix's protected columns, or None: the row scale is the matrix's
    clip rule at AWQ_LITE_BITS."""
    if not starts:
        return None
    mask, bits = group_columns(w.size(1), starts, hp.awq_lite_group_size, w.device), hp.awq_lite_bits
    return mask, row_scales(w, bits, method, k, hp.quant_clip_floor), largest_level(bits)


def group_columns(columns, starts, size, device=None):
    """A (columns,) bool mask of the groups of `size` columns that begin at `starts`."""
    mask = torch.zeros(columns, dtype=torch.bool, device=device)
    for first in starts:
        mask[first:first + size] = True
    return mask


def quantized_gate(w):
    """GATED_ATTN_QUANT_GATE (credit: PR #1736, the 04-27 record): int8 per row, scale = row max / 127 in fp16."""
    scale = (w.abs().amax(dim=1).clamp_min(1e-10) / 127).half()
    q = torch.clamp(torch.round(w / scale.float()[:, None]), -127, 127)
    return dict(kind="int", bits=8, packing="byte", shape=list(w.shape), data=q.to(torch.int8).cpu(), scale=scale.cpu())


def add_low_rank_corrections(quantized, residuals, hp):
    """LQER (credit: PR #1530 and the current record): the LQER_TOP_K matrices with the largest quantization error
    get a rank-LQER_RANK correction A B of that error, from its truncated SVD, packed by pack_low_rank."""
    worst = sorted(residuals, key=lambda name: residuals[name].norm().item(), reverse=True)[:hp.lqer_top_k]
    for name in worst:
        u, s, vh = torch.linalg.svd(residuals[name], full_matrices=False)
        quantized[name]["lqer"] = pack_low_rank(u[:, :hp.lqer_rank] * s[:hp.lqer_rank], vh[:hp.lqer_rank], hp)


def pack_low_rank(a, b, hp):
    """LQER's factors as the artifact stores them: the 04-27 record's asymmetric packing (LQER_ASYM_ENABLED, where
    the group size divides B: A as int2 in [-2, 1] with one scale, max |A| / 1.5; B as int4 in [-8, 7] with a scale
    per group of LQER_ASYM_GROUP values, max / 7.5), else symmetric per row at LQER_FACTOR_BITS, or fp16 at 16.
    The integers are int8 tensors: the compressor takes their low entropy."""
    if hp.lqer_asym_enabled and b.numel() % hp.lqer_asym_group == 0:
        a_scale = (a.abs().amax().clamp_min(1e-10) / 1.5).half()
        groups = b.reshape(-1, hp.lqer_asym_group)
        b_scale = (groups.abs().amax(dim=1).clamp_min(1e-10) / 7.5).half()
        b_q = torch.clamp(torch.round(groups / b_scale.float()[:, None]), -8, 7).view_as(b)
        return dict(a=torch.clamp(torch.round(a / a_scale.float()), -2, 1).to(torch.int8).cpu(), a_scale=a_scale.cpu(),
                    b=b_q.to(torch.int8).cpu(), b_scale=b_scale.cpu(), b_group=hp.lqer_asym_group)
    if hp.lqer_factor_bits == FP16_BITS:
        return dict(a=a.half().cpu(), b=b.half().cpu())
    level, packed = largest_level(hp.lqer_factor_bits), {}
    for key, factor in (("a", a), ("b", b)):
        scale = (factor.abs().amax(dim=1).clamp_min(1e-10) / level).half()
        packed[key] = torch.clamp(torch.round(factor / scale.float()[:, None]), -level, level).to(torch.int8).cpu()
        packed[key + "_scale"] = scale.cpu()
    return packed


def low_rank_factors(lqer):
    """(A, B) in fp32 from pack_low_rank's form."""
    a, b = lqer["a"].float(), lqer["b"].float()
    if "b_group" in lqer:
        groups = b.reshape(-1, lqer["b_group"]) * lqer["b_scale"].float()[:, None]
        return a * lqer["a_scale"].float(), groups.view_as(b)
    if "a_scale" in lqer:
        return a * lqer["a_scale"].float()[:, None], b * lqer["b_scale"].float()[:, None]
    return a, b


def awq_columns_of(entry, columns):
    """An artifact entry's AWQ-lite columns as matrix_of takes them, or None."""
    if "awq" not in entry:
        return None
    awq = entry["awq"]
    return group_columns(columns, awq["starts"].tolist(), awq["size"]), awq["scale"].float(), None


def dequantize_state_dict(quantized):
    state_dict = {}
    for name, entry in quantized.items():
        if entry["kind"] == "int":
            w = unpack_values(entry["data"], entry["bits"], entry["packing"], entry["shape"])
            w = matrix_of(w, entry["scale"].float(), awq_columns_of(entry, w.size(1)))
            if "lqer" in entry:
                a, b = low_rank_factors(entry["lqer"])
                w = w + a @ b
            state_dict[name] = w
        else:
            state_dict[name] = entry["data"].float()
    return state_dict


def quantize_to_fit(state_dict, groups, hp, hessians, code_bytes, log=print, qat_k_scale=None, protected=None):
    """(quantized, artifact bytes, k scale). With SIZE_TARGET_BYTES and SDClip, every clip k is scaled by the
    smallest factor in K_SCALE_RANGE whose artifact fits with the code: a finer grid is more accurate, a coarser one
    has a lower entropy and compresses smaller. A bisection in log space; each step quantizes and compresses again.
    `qat_k_scale`: the scale QAT trained against, kept whenever its artifact fits, so that QAT's grid is exported."""
    def attempt(k_scale):
        quantized = quantize_state_dict(state_dict, groups, hp, hessians, k_scale, log, protected)
        blob = serialize_artifact(quantized, hp.compressor, hp.byte_shuffle, hp.pergroup_codec)
        return quantized, blob, k_scale, code_bytes + len(blob) <= hp.size_target_bytes

    searched = bool(hp.size_target_bytes) and hp.quant_clip == "sdclip" and bool(groups)
    if qat_k_scale is not None:
        result = attempt(qat_k_scale)
        if result[3] or not searched:
            return result[:3]
        log(f"WARNING: qat: on the grid QAT trained against (clip k x{qat_k_scale:.3f}) the artifact is "
            f"{code_bytes + len(result[1])} > SIZE_TARGET_BYTES={hp.size_target_bytes} bytes; the export searches a "
            f"coarser grid, which QAT did not train against")
    first = attempt(1.0)
    if not searched:
        return first[:3]
    low, high = K_SCALE_RANGE
    if first[3]:
        best, high = first, 1.0
        finest = attempt(low)
        if finest[3]:
            return finest[:3]
    else:
        best, low = attempt(high), 1.0
        if not best[3]:
            log(f"size_target: even clip k x{high:g} gives {code_bytes + len(best[1])} > {hp.size_target_bytes} bytes; "
                f"lower QUANT_BITS or the model size")
            return best[:3]
    for _ in range(SIZE_SEARCH_STEPS):
        middle = math.sqrt(low * high)
        result = attempt(middle)
        best, low, high = (result, low, middle) if result[3] else (best, middle, high)
    log(f"size_target: clip k x{best[2]:.3f} is the finest grid that fits: "
        f"{code_bytes + len(best[1])} <= {hp.size_target_bytes} bytes")
    return best[:3]


def byte_shuffle(blob, inverse=False):
    """Bytes at even offsets, then bytes at odd offsets (separates the two bytes of fp16 values; credit: PR #1089)."""
    data = np.frombuffer(blob, dtype=np.uint8)
    if not inverse:
        return np.concatenate([data[0::2], data[1::2]]).tobytes()
    out = np.empty_like(data)
    half = (len(data) + 1) // 2
    out[0::2], out[1::2] = data[:half], data[half:]
    return out.tobytes()


def serialize_artifact(quantized, compressor, shuffle, pergroup_codec="lrzip"):
    if compressor == "pergroup":
        compressed, size = compress_streams(pergroup_streams(quantized), pergroup_codec)
        header = ARTIFACT_MAGIC + bytes([PERGROUP_ID, 0]) + size.to_bytes(8, "little")
    else:
        payload = torch_bytes(quantized)
        compressor_id, compress, _ = COMPRESSORS[compressor]
        header = ARTIFACT_MAGIC + bytes([compressor_id, int(shuffle)]) + len(payload).to_bytes(8, "little")
        compressed = compress(byte_shuffle(payload) if shuffle else payload)
    return header + hashlib.sha256(header + compressed).digest() + compressed


def torch_bytes(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def compressed_sizes_for_log(quantized, hp):
    """{compressor: bytes} of zstd and brotli other than the configured one, for comparison in the log; a package
    that is not installed is left out (only the configured compressor is required)."""
    return {name: len(serialize_artifact(quantized, name, hp.byte_shuffle)) for name in ("zstd", "brotli")
            if name != hp.compressor and compressor_available(name)}


def export_name(hp):
    """The export in the challenge's naming: int6_brotli, int8_zlib (the baseline's), fp16_brotli."""
    bits = "fp16" if hp.quant_bits == FP16_BITS else f"int{hp.quant_bits}"
    return f"{bits}_{hp.compressor}"


def exported_as(quantized, blob, groups):
    """export_name of an artifact read back (EVAL_ONLY_QUANTIZED_PATH), from what it holds rather than this run's
    settings: its MLP matrices' bits (QUANT_BITS; fp16 where they are not quantized, as in a miniature whose matrices
    are all within QUANT_PASSTHROUGH_NUMEL) and its header's compressor. `groups`: quantized_tensor_groups of the
    model it loads into."""
    bits = {entry["bits"] for name, entry in quantized.items() if groups.get(name) == "mlp" and entry["kind"] == "int"}
    by_id = {cid: name for name, (cid, _, _) in COMPRESSORS.items()} | {PERGROUP_ID: "pergroup"}
    return f"{f'int{max(bits)}' if bits else 'fp16'}_{by_id[blob[4]]}"


def write_atomically(path, data, what):
    """Writes `data` (bytes, or a function that writes to the open file) under a temporary name beside `path`, then
    renames it: a failed write (full disk, no permission) never leaves a partial file under the final name, and the
    error names the path and what was being written. Returns the size written."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise RunError(f"could not write {what} to {path}: {write_failure(error, path)}") from error
    return path.stat().st_size


def write_failure(error, path):
    """Why a write failed, in words: a full disk is named as such (torch.save only reports a stream position)."""
    free = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(Path(path).parent if Path(path).parent.exists() else ".").free
    if getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < 1 << 20):
        return f"the disk is full ({free if free is not None else 0:,} bytes free)"
    return getattr(error, "strerror", None) or str(error)


def write_artifact(path, blob):
    return write_atomically(path, blob, "the model artifact")


def read_artifact(path, blob=None):
    """The quantized state of the artifact at `path` (or of its bytes `blob`), verified against its checksum and
    decompressed to no more than the size its header records."""
    blob = Path(path).read_bytes() if blob is None else blob
    if len(blob) < ARTIFACT_HEADER_BYTES or blob[:4] != ARTIFACT_MAGIC:
        raise ValueError(f"{path}: not a model artifact of this format (bad magic or truncated header)")
    header, digest, compressed = blob[:14], blob[14:ARTIFACT_HEADER_BYTES], blob[ARTIFACT_HEADER_BYTES:]
    if hashlib.sha256(header + compressed).digest() != digest:
        raise ValueError(f"{path}: checksum mismatch; the artifact is truncated or corrupted")
    by_id = {cid: decompress for _, (cid, _, decompress) in COMPRESSORS.items()}
    size = int.from_bytes(header[6:14], "little")
    if (header[4] not in by_id and header[4] != PERGROUP_ID or header[5] > int(header[4] != PERGROUP_ID)
            or size > ARTIFACT_MAX_PAYLOAD_BYTES):
        raise ValueError(f"{path}: bad header (compressor id {header[4]}, flags {header[5]}, payload size {size})")
    if header[4] == PERGROUP_ID:
        return read_pergroup(compressed, size, path)
    payload = by_id[header[4]](compressed, size + 1)  # one byte more than recorded tells a larger payload
    if len(payload) != size:
        got = "more" if len(payload) > size else len(payload)
        raise ValueError(f"{path}: the payload decompresses to {got} bytes, "
                         f"not the {size} its header records")
    return load_plain_state(byte_shuffle(payload, inverse=True) if header[5] else payload, path)


def load_plain_state(payload, path):
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as error:  # never retried without weights_only: the file could run code
        raise ValueError(f"{path}: the payload is not a plain tensor state ({type(error).__name__}); refused") from None


# --- per-group compression (COMPRESSOR=pergroup; credit: PR #1586, via the 04-27 record) ---
# The integer tensors are grouped by kind (a block's attn.c_q.weight of every layer is one group, a table is its
# own) and each matrix is written column by column, so that neighbouring bytes are one input's weights in rows
# that are alike: the rows of the kinds in PERGROUP_SORTED are first put in a nearest-neighbour order, the
# permutation stored. Each group is a stream compressed on its own, and so is the rest of the state (a torch file
# without those tensors' values, first). The payload is a table, a stream count (uint32) and each stream's codec id
# (byte), decompressed and compressed sizes (uint64), then the streams. The decompressed sizes add up to the size
# the header records, and a stream is decompressed to no more than its own.

PERGROUP_SORTED = ("tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight")  # the kinds the record reorders
STREAM_TABLE_ENTRY = 1 + 8 + 8


def nearest_neighbour_order(q):
    """The rows of `q` in the record's greedy order: row 0, then each time the unused row nearest to the last one in
    L1 distance (in exact integers), the lowest index on a tie."""
    rows = q.to(torch.int16)
    remaining, order = torch.arange(1, rows.size(0)), [0]
    while remaining.numel():
        distances = (rows[remaining] - rows[order[-1]]).abs().sum(dim=1, dtype=torch.int32)
        pick = int(torch.argmin(distances))  # the first minimum
        order.append(int(remaining[pick]))
        remaining = torch.cat([remaining[:pick], remaining[pick + 1:]])
    return torch.tensor(order)


def pergroup_streams(quantized):
    """[the rest as a torch file, then each group's bytes]: the rest holds every entry without the grouped values
    (their row order added where reordered) and the groups' member names."""
    members, rest = {}, {}
    for name, entry in quantized.items():
        if entry["kind"] != "int":
            rest[name] = entry
            continue
        if entry["packing"] != "byte" or len(entry["shape"]) != 2:
            raise ValueError(f"COMPRESSOR=pergroup takes int8 matrices; {name} is {entry['packing']}-packed "
                             f"{entry['shape']}")
        kind, q = re.sub(r"^blocks\.\d+\.", "", name), entry["data"]
        rest[name] = {key: value for key, value in entry.items() if key != "data"}
        if kind in PERGROUP_SORTED:
            order = nearest_neighbour_order(q)
            q, rest[name]["order"] = q[order], order.to(torch.int16 if len(order) <= 1 << 15 else torch.int32)
        members.setdefault(kind, []).append((name, q.t().contiguous().numpy().tobytes()))
    groups = [[name for name, _ in group] for group in members.values()]
    return [torch_bytes(dict(state=rest, groups=groups))] + [b"".join(data for _, data in group)
                                                              for group in members.values()]


def compress_streams(streams, codec):
    """(payload, decompressed size): each stream compressed with the smallest of PERGROUP_CODEC's codecs, the
    streams and codecs in parallel threads (the codecs release the interpreter's lock)."""
    def smallest(data):
        return min(((STREAM_CODECS[name][0], STREAM_CODECS[name][1](data)) for name in pergroup_codecs(codec)),
                   key=lambda packed: len(packed[1]))
    with ThreadPoolExecutor() as pool:
        packed = list(pool.map(smallest, streams))
    table = len(streams).to_bytes(4, "little") + b"".join(
        bytes([codec_id]) + len(raw).to_bytes(8, "little") + len(data).to_bytes(8, "little")
        for raw, (codec_id, data) in zip(streams, packed))
    return table + b"".join(data for _, data in packed), sum(map(len, streams))


def decompress_streams(payload, size, path):
    """The streams of a per-group payload, each checked against the size its table records."""
    count = int.from_bytes(payload[:4], "little")
    table_end = 4 + STREAM_TABLE_ENTRY * count
    entries = [(payload[at], int.from_bytes(payload[at + 1:at + 9], "little"),
                int.from_bytes(payload[at + 9:at + 17], "little"))
               for at in range(4, table_end, STREAM_TABLE_ENTRY)] if len(payload) >= table_end else []
    by_id = {codec_id: decompress for codec_id, _, decompress in STREAM_CODECS.values()}
    if (not entries or sum(raw for _, raw, _ in entries) != size or table_end + sum(n for *_, n in entries)
            != len(payload) or any(codec_id not in by_id for codec_id, *_ in entries)):
        raise ValueError(f"{path}: the per-group stream table is inconsistent with the payload")
    ends = itertools.accumulate((n for *_, n in entries), initial=table_end)
    pieces = [(by_id[codec_id], payload[start:start + n], raw) for (codec_id, raw, n), start in zip(entries, ends)]
    with ThreadPoolExecutor() as pool:
        streams = list(pool.map(lambda piece: piece[0](piece[1], piece[2] + 1), pieces))
    if [len(stream) for stream in streams] != [raw for *_, raw in pieces]:
        raise ValueError(f"{path}: a per-group stream does not decompress to the size its table records")
    return streams


def read_pergroup(payload, size, path):
    """The quantized state of a per-group payload: the rest, with each grouped matrix's values put back."""
    streams = decompress_streams(payload, size, path)
    rest = load_plain_state(streams[0], path)
    try:
        state, groups = rest["state"], rest["groups"]
        if len(groups) != len(streams) - 1:
            raise ValueError(f"{len(groups)} groups for {len(streams) - 1} streams")
        for names, data in zip(groups, streams[1:]):
            restore_group(state, names, data)
        missing = [name for name, entry in state.items() if "data" not in entry]
        if missing:
            raise ValueError(f"no values for {', '.join(missing[:3])}")
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: the per-group payload is malformed ({type(error).__name__}: {error})") from None
    return state


def restore_group(state, names, data):
    """Puts each matrix of a group back in `state` from the group's bytes, in its row order."""
    offset = 0
    for name in names:
        entry = state[name]
        rows, cols = entry["shape"]
        if not 0 < rows * cols <= len(data) - offset:
            raise ValueError(f"the group of {name} is shorter than its matrices")
        values = torch.frombuffer(bytearray(data[offset:offset + rows * cols]), dtype=torch.int8).view(cols, rows).t()
        offset += rows * cols
        if "order" in entry:
            order = entry.pop("order").long()
            if not torch.equal(order.sort().values, torch.arange(rows)):
                raise ValueError(f"the row order of {name} is not a permutation")
            values = torch.empty_like(values).index_copy_(0, order, values)
        entry["data"] = values.contiguous()
    if offset != len(data):
        raise ValueError("a group holds more bytes than its matrices")


# --- code bytes: what the artifact counts as code (credit: the 04-05 record's self-extracting train_gpt.py) ---
# The readable source is for people. What is counted and shipped is the same program: the source without comments
# and docstrings, on the same lines (so that a traceback's line numbers point into the readable file), compressed with
# the smaller of brotli and LZMA, base85-encoded and wrapped in three lines that decompress and exec it.

READABLE_CODE_NAME = "train_gpt_human.py"  # the readable source beside a packed train_gpt.py (the records' name)
PACKED_CODE_PREFIX = b"# train_gpt.py, packed from "
CODE_PACKERS = {  # name: (compress, decompress); the packed file imports the module of the same name
    "brotli": (COMPRESSORS["brotli"][1], lambda data: _brotli().decompress(data)),
    "lzma": (lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
}


def strip_source(source):
    """`source` (str) without comments and docstrings, every line where it was: a docstring becomes blank lines (or
    `pass` where it is the whole body), a comment is cut off its line. Raises SyntaxError if it does not parse."""
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            first, last = body[0].lineno - 1, body[0].end_lineno
            indent = lines[first][:len(lines[first]) - len(lines[first].lstrip())]
            lines[first:last] = [indent + "pass" if len(body) == 1 else ""] + [""] * (last - first - 1)
    text = "\n".join(lines) + "\n"
    lines = text.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            lines[row - 1] = lines[row - 1][:column]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def pack_source(source, readable_name=READABLE_CODE_NAME):
    """(packed file, compressor, {compressor: packed size}) of `source` (bytes): a runnable file that executes the
    stripped source under the name `<readable_name> (packed)`, with `__name__` and `__file__` those of the packed
    file."""
    try:
        stripped = strip_source(source.decode("utf-8")).encode("utf-8")
    except SyntaxError as error:
        raise ValueError(f"the source does not parse (line {error.lineno}: {error.msg}), so it cannot be "
                         f"packed") from None
    files = {}
    for name, (compress, _) in CODE_PACKERS.items():
        payload = base64.b85encode(compress(stripped)).decode("ascii")
        # The source is also put in linecache under its name, as a file's would be: tracebacks show its lines, and
        # inspect.getsource finds the functions that Triton compiles from their source.
        files[name] = (f"{PACKED_CODE_PREFIX.decode()}{readable_name} ({name}); run it as the readable file.\n"
                       f"import base64, linecache, {name}\n"
                       f"_s = {name}.decompress(base64.b85decode('{payload}')).decode(); "
                       f"_n = {readable_name + ' (packed)'!r}\n"
                       f"linecache.cache[_n] = (len(_s), None, _s.splitlines(True), _n)\n"
                       f"exec(compile(_s, _n, 'exec'))\n").encode("ascii")
    best = min(files, key=lambda name: len(files[name]))
    return files[best], best, {name: len(blob) for name, blob in files.items()}


def unpack_source(packed):
    """The stripped source a packed file executes (bytes)."""
    match = re.match(re.escape(PACKED_CODE_PREFIX) + rb"\S+ \((\w+)\);.*?b85decode\('([^']*)'\)", packed, re.S)
    if match is None or match.group(1).decode() not in CODE_PACKERS:
        raise ValueError("not a packed train_gpt.py")
    return CODE_PACKERS[match.group(1).decode()][1](base64.b85decode(match.group(2)))


@dataclasses.dataclass(frozen=True)
class Code:
    """This program's bytes, read once per process: `source` is what the log and the records folder keep as the
    readable source, `counted` what the artifact counts and ships as train_gpt.py, `how` how it was counted."""
    source: bytes
    counted: bytes
    how: str

    @classmethod
    def read(cls, path, pack):
        own = Path(path).read_bytes()
        if own.startswith(PACKED_CODE_PREFIX):  # the packed file itself is running: it is what is counted
            return cls(unpack_source(own), own, "packed_file")
        if not pack:
            return cls(own, own, "raw (PACK_CODE=0)")
        packed, compressor, sizes = pack_source(own)
        return cls(own, packed, f"packed:{compressor} " + " ".join(f"{name}:{size}" for name, size in sizes.items()))

    @property
    def readable(self):
        """Whether `source` is the readable file (not the stripped source of a packed one)."""
        return self.how != "packed_file"


@torch.no_grad()
def collect_hessians(model, batches, autocast, piece_len=0):
    """{name: X^T X} of the input X of every CastedLinear (a looped layer adds every pass) and, for a tied
    embedding, of the final hidden state, which is the input of the logit matmul (credit: the SP8192 GPTQ-embedding
    record). Runs the eager model, whose hooks see every call; `piece_len`: the training loader's, for its rows."""
    hessians, hooks = {}, []

    def accumulate(name, x):
        x = x.detach().flatten(0, -2).float()
        with torch.autocast(x.device.type, enabled=False):  # the hooks run inside the forward's autocast: stay fp32
            hessians[name] = hessians[name].addmm_(x.T, x) if name in hessians else x.T @ x

    for name, module in model.named_modules():
        if isinstance(module, CastedLinear):
            hook = lambda m, args, out, name=name: accumulate(f"{name}.weight", args[0])
            hooks.append(module.register_forward_hook(hook))
    try:
        for inputs in batches:
            with autocast():
                hidden = model.hidden_states(inputs, piece_len=piece_len)
            if model.lm_head is None:
                accumulate("tok_emb.weight", hidden)
    finally:
        for hook in hooks:
            hook.remove()
    return hessians


def set_qat(model, hp, on, k_scale=1.0):
    """STE quantization-aware training: the quantized CastedLinears compute with their weights fake-quantized on the
    export's grid (clip method, k, and the size target's scale `k_scale`) while on. The switch and the scale are
    tensors the forward reads, so a compiled graph follows them (a Python flag would be folded in, the records'
    late-QAT bug)."""
    groups = quantized_tensor_groups(model, hp)
    for name, module in model.named_modules():
        if isinstance(module, CastedLinear) and f"{name}.weight" in groups:
            bits, k = group_bits_and_k(hp, groups[f"{name}.weight"])
            module.qat_grid = (bits, hp.quant_clip, k, hp.quant_clip_floor)
            module.qat_on.fill_(float(on))
            module.qat_k_scale.fill_(k_scale)


def qat_k_scale(run, net):
    """The size target's k scale QAT trains against: the one its search picks for the weights of the step QAT
    starts at (rank 0 searches, every rank gets the answer). The export keeps it whenever the artifact fits."""
    hp = run.hp
    if not (hp.size_target_bytes and hp.quant_clip == "sdclip"):
        return 1.0
    k_scale = None
    if run.rank == 0:
        start = time.perf_counter()
        _, _, k_scale = quantize_to_fit(net.state_dict(), quantized_tensor_groups(net, hp), hp, None,
                                        len(run.code.counted), run.log)
        run.log(f"qat: grid clip k x{k_scale:.3f} searched in {time.perf_counter() - start:.1f}s (on the training "
                f"clock)")
    return run.cluster.broadcast(k_scale)


# ============================================================================================
# EVALUATION
# ============================================================================================


def participation_ratio(x):
    """PR = (sum of eigenvalues)^2 / (sum of squared eigenvalues) of the covariance of x (N, D), columns centred:
    D for isotropic activations, at most r for activations in an r-dimensional subspace (credit: neon213's probes)."""
    x = x.double() - x.double().mean(dim=0)
    eigenvalues = torch.linalg.svdvals(x).square()
    return (eigenvalues.sum().square() / eigenvalues.square().sum()).item()


@torch.no_grad()
def activation_prs(model, tokens, autocast):
    """{kind: [PR per layer]} on one batch: Q, K, V (and Intent) after their projections and convs, averaged over
    heads (D = head dim), and every block's output (D = width). Forward hooks on the eager model, one forward."""
    captured, hooks = {}, []

    def capture(kind, layer, heads):
        def hook(module, inputs, output):
            if isinstance(output, tuple):  # a Block: (lanes, v); the residual stream is the lanes' merge
                output = merge_lanes(output[0])
            flat = output.float().reshape(-1, output.size(-1))
            prs = [participation_ratio(part) for part in flat.chunk(heads, dim=1)]
            captured.setdefault(kind, {})[layer] = sum(prs) / len(prs)
        return hook

    for layer, block in enumerate(model.blocks):
        attn = block.attn
        sources = {"q": attn.c_q, "k": attn.c_k, "v": attn.c_v, "i": attn.c_i}
        for kind, linear in sources.items():
            if linear is not None:
                module = attn.convs[kind] if attn.convs is not None else linear
                heads = attn.num_heads if kind in ("q", "i") else attn.num_kv_heads
                hooks.append(module.register_forward_hook(capture(kind, layer, heads)))
        hooks.append(block.register_forward_hook(capture("residual", layer, 1)))
    try:
        with autocast():
            model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return {kind: [by_layer[layer] for layer in sorted(by_layer)] for kind, by_layer in captured.items()}


@torch.no_grad()
def sample_tokens(model, prompt_ids, new_tokens, temperature, top_k, context_len, generator):
    """Autoregressive sampling, re-reading the last `context_len` tokens at every step; temperature 0 is greedy."""
    ids = list(prompt_ids)
    device = next(model.parameters()).device
    for _ in range(new_tokens):
        logits = model.logits(torch.tensor([ids[-context_len:]], device=device))[0, -1].float()
        if temperature == 0:
            ids.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if 0 < top_k < logits.numel():
            logits[logits < torch.topk(logits, top_k).values[-1]] = -math.inf
        ids.append(int(torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator)))
    return ids[len(prompt_ids):]


# Every validation target is scored exactly once, by one window. Position p of the stream predicts token p + 1. A
# window is (start, score_from, end): the model reads positions [start, end) and its losses at [score_from, end) are
# counted. The scored ranges partition [0, N - 1), never straddle a TTT chunk boundary, and (with EVAL_DOC_ISOLATED)
# never read across a BOS. Sliding windows (credit: the SlidingWindowEval record) give every scored token at least
# EVAL_SEQ_LEN - EVAL_STRIDE tokens of context where the document has them; the last window of a stream is shifted
# back to full length instead of being short, which also avoids the records' double-counted tail.


def plan_windows(num_targets, seq_len, stride, doc_starts=(), cuts=()):
    """Windows whose scored ranges partition [0, num_targets): the first window of a document scores up to seq_len
    positions, later ones at most `stride`; `cuts` (sorted) are positions where a scored range must end."""
    doc_starts = sorted(set(doc_starts) | {0})
    segments = zip(doc_starts, doc_starts[1:] + [num_targets])
    cuts = np.asarray(sorted(cuts), dtype=np.int64)
    windows = []
    for doc_start, doc_end in segments:
        inner_cuts = cuts[(cuts > doc_start) & (cuts < doc_end)].tolist()
        for piece_start, piece_end in zip([doc_start] + inner_cuts, inner_cuts + [doc_end]):
            score_from = piece_start
            while score_from < piece_end:
                end = min(score_from + (seq_len if score_from == doc_start else stride), piece_end)
                windows.append((max(end - seq_len, doc_start), score_from, end))
                score_from = end
    return windows


def rank_share(items, rank, world_size):
    """A contiguous, balanced share of `items` for this rank."""
    return items[len(items) * rank // world_size: len(items) * (rank + 1) // world_size]


def eval_rows_per_batch(batch_tokens, seq_len, world_size):
    return max(1, batch_tokens // (seq_len * world_size))


def window_rows(tokens, windows, seq_len, rows):
    """Host tensors of `windows` [(start, score_from, end), or None for a row left empty], padded to `rows` rows: the
    tokens [start, end] of each (rows, seq_len + 1) int64, zero after them, and its scored mask (rows, seq_len), True
    on [score_from, end). One gather whatever the number of rows."""
    empty = (0, 0, -1)
    spans = [window or empty for window in windows] + [empty] * (rows - len(windows))
    start, score_from, end = torch.tensor(spans, dtype=torch.int64).view(rows, 3, 1).unbind(1)
    columns = torch.arange(seq_len + 1)
    index = (start + columns).clamp_(max=tokens.numel() - 1)
    token_rows = torch.where(columns <= end - start, tokens[index].long(), 0)
    scored = (columns[:-1] >= score_from - start) & (columns[:-1] < end - start)
    return token_rows, scored


def window_batches(tokens, windows, seq_len, rows_per_batch, device):
    """(inputs, targets, scored mask) batches of a fixed shape: short windows and spare rows are masked, so a
    compiled model never recompiles, and a causal model is unaffected by the right padding."""
    for first in range(0, len(windows), rows_per_batch):
        rows, scored = window_rows(tokens, windows[first:first + rows_per_batch], seq_len, rows_per_batch)
        rows, scored = to_device(rows, device), to_device(scored, device)
        yield rows[:, :-1], rows[:, 1:], scored


@torch.no_grad()
def score_windows(model, tokens, windows, target_bytes, seq_len, rows_per_batch, device, autocast):
    """float64 sums (loss in nats, targets, UTF-8 bytes) over the scored positions of `windows`."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for inputs, targets, scored in window_batches(tokens, windows, seq_len, rows_per_batch, device):
        with autocast():
            losses = model(inputs, targets, reduction="none")
        # a where, not losses[scored]: a boolean index reads its size back from the device every batch
        sums[:2] += torch.stack([torch.where(scored, losses.double(), 0).sum(), scored.sum().double()])
    sums[2] += target_bytes.of(windows)
    return sums


def loss_and_bpb(sums):
    """(val_loss, val_bpb, targets scored) from float64 sums (loss, targets, bytes)."""
    loss, tokens, nbytes = sums.tolist()
    return loss / tokens, loss / math.log(2) / nbytes, int(tokens)


def doc_starts_of(tokens, bos_id):
    return np.flatnonzero(np.asarray(tokens) == bos_id).tolist()


def evaluate(model, val_tokens, target_bytes, seq_len, stride, batch_tokens, rank, world_size, device, autocast,
             doc_starts=()):
    """(val_loss in nats per token, val_bpb, targets scored) over every validation target; stride = seq_len is the
    plain, non-overlapping evaluation. val_bpb = (sum of CE / ln 2) / (sum of UTF-8 bytes of the targets)."""
    windows = plan_windows(val_tokens.numel() - 1, seq_len, stride, doc_starts)
    rows = eval_rows_per_batch(batch_tokens, seq_len, world_size)
    sums = score_windows(model, val_tokens, rank_share(windows, rank, world_size), target_bytes, seq_len, rows, device,
                         autocast)
    return loss_and_bpb(all_reduce(sums, dist.ReduceOp.SUM))


@torch.no_grad()
def check_normalization(model, tokens, seq_len, autocast, device):
    """(max |logsumexp| of the log-probabilities, max |scored loss + log p(target)|) on the first window: the scored
    distribution is a normalized one, and the scoring path charges exactly -log p(target)."""
    window = tokens[:seq_len + 1].long().to(device)[None]
    with autocast():
        log_probs = F.log_softmax(model(window[:, :-1]).float(), dim=-1)
        losses = model(window[:, :-1], window[:, 1:], reduction="none").float()
    charged = (losses + log_probs.gather(-1, window[:, 1:, None]).squeeze(-1)).abs().max().item()
    return torch.logsumexp(log_probs, dim=-1).abs().max().item(), charged


# --- score-first test-time training (credit: PR #461 and the LegalTTT records; rules: parameter-golf issue #1017) ---


class ScoredTargets:
    """The guard of score-first TTT. Scoring commits a growing prefix of target positions, and training tokens can
    only be read through `training_tokens`, which refuses any target that has not been scored yet."""

    def __init__(self, tokens):
        self._tokens, self.scored_upto = tokens, 0

    def commit(self, upto):
        if upto < self.scored_upto:
            raise RuntimeError("scoring must move forward through the validation stream")
        self.scored_upto = upto

    def training_tokens(self, first, end):
        """Tokens first..end, i.e. the inputs and targets of positions [first, end)."""
        if end > self.scored_upto:
            raise RuntimeError(f"TTT asked to train on targets up to position {end}, but only {self.scored_upto} are "
                               f"scored: adapting on unscored validation tokens is illegal")
        return self._tokens[first:end + 1]


def ttt_optimizer_of(hp):
    """sgd or adamw: TTT_OPTIMIZER, else the method's own (the LegalTTT records' SGD, the 04-27 record's AdamW)."""
    return {"": "adamw" if hp.ttt_method == "lora" else "sgd", "adam": "adamw"}.get(hp.ttt_optimizer, hp.ttt_optimizer)


def check_ttt_settings(model, hp):
    """TTT_PARAMS against the model's names, at start-up: a pattern that matches nothing is an error before
    training, not after training, export and evaluation."""
    if hp.ttt_params != "all":
        names = [name for name, _ in model.named_parameters()]
        missing = [pattern for pattern in hp.ttt_params.split(",") if not any(pattern in name for name in names)]
        if missing:
            raise ConfigError(f"TTT_PARAMS={hp.ttt_params!r}: {missing} match no parameter name "
                              f"(names look like {names[0]}, {names[-1]})")


def ttt_parameters(model, hp):
    """The parameters chunk TTT adapts: all, or those whose name contains one of the TTT_PARAMS patterns. Everything
    else is frozen."""
    check_ttt_settings(model, hp)
    patterns = None if hp.ttt_params == "all" else hp.ttt_params.split(",")
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(patterns is None or any(pattern in name for pattern in patterns))
        params += [p] if p.requires_grad else []
    return params


class AdaptSteps(NamedTuple):
    """How one adaptation walks its scored tokens: passes, sequences per step (summed over ranks), gradient clip, and
    the rows a step's sequences make (summed over ranks): one each, or with `spans`, that many (see adapt_on_chunk)."""
    epochs: int
    batch_seqs: int
    grad_clip: float
    spans: int = 0

    @property
    def rows(self):
        return self.spans or self.batch_seqs

    def row_len(self, seq_len):
        return -(-self.batch_seqs // self.rows) * seq_len


def adapt_steps(epochs, batch_seqs, grad_clip, chunk_tokens, seq_len, packed=False):
    """AdaptSteps over chunks of at most chunk_tokens targets. A step holds no more sequences than a chunk has: the
    rows a larger batch would add could only be padding, which the records' ranks, each taking its share of the
    chunk's sequences, never compute. Packed, a step's sequences make STREAM_CHUNKS rows at any world size, as the
    04-27 record's global SGD packs each of its 8 ranks' share into one row."""
    batch_seqs = min(batch_seqs, -(-chunk_tokens // seq_len))
    return AdaptSteps(epochs, batch_seqs, grad_clip, min(STREAM_CHUNKS, batch_seqs) if packed else 0)


def chunk_ttt_steps(hp, seq_len):
    """Chunk TTT's adaptation of each scored chunk."""
    return adapt_steps(hp.ttt_epochs, hp.ttt_batch_seqs, hp.ttt_grad_clip, hp.ttt_chunk_tokens, seq_len)


def global_sgd_steps(hp, seq_len):
    """The phases' global SGD; with TRAIN_ROWS=packed its rows are packed as training's."""
    return adapt_steps(hp.global_ttt_epochs, hp.global_ttt_batch_seqs, hp.global_ttt_grad_clip,
                       hp.global_ttt_chunk_tokens, seq_len, hp.train_rows == "packed")


@torch.enable_grad()  # whatever the caller's grad mode, as for LoRA TTT: chunk TTT and the phases' global SGD train
def adapt_on_chunk(model, ledger, first, end, params, optimizer, steps, seq_len, rank, world_size, device, autocast):
    """steps.epochs passes over the (already scored) targets [first, end) in sequences of seq_len. Each step's loss
    is the mean over the global batch of steps.batch_seqs sequences whatever the world size; gradients are summed.
    With steps.spans, the step's sequences are cut into that many contiguous spans (rank_share), each one row whose
    documents are cut into pieces of at most seq_len from their own starts."""
    tokens = ledger.training_tokens(first, end)
    sequences = [(start, start, min(start + seq_len, end)) for start in range(first, end, seq_len)]
    local_rows, row_len = -(-steps.rows // world_size), steps.row_len(seq_len)
    for _ in range(steps.epochs):
        for batch_start in range(0, len(sequences), steps.batch_seqs):
            batch = sequences[batch_start:batch_start + steps.batch_seqs]
            count = sum(end_ - start for start, _, end_ in batch)
            spans = [rank_share(batch, index, steps.rows) for index in range(steps.rows)]
            rows = [(span[0][0], span[0][1], span[-1][2]) for span in spans if span]
            mine = [(s - first, f - first, e - first) for s, f, e in rank_share(rows, rank, world_size)]
            inputs, targets, mask = next(window_batches(tokens, mine or [(0, 0, 0)], row_len, local_rows, device))
            with autocast():
                losses = model(inputs, targets, reduction="none", piece_len=seq_len if steps.spans else 0)
            (losses.float() * mask).sum().div(count).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if world_size > 1:
                flat = all_reduce(torch.cat([g.flatten() for g in grads]), dist.ReduceOp.SUM)
                grads = list(torch.split(flat, [g.numel() for g in grads]))
            for p, g in zip(params, grads):
                p.grad = g.view_as(p)
            if steps.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, steps.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def cosine_lr(peak, index, count):
    """peak * (1 + cos(pi * index / (count - 1))) / 2: the LegalTTT records' decay over chunks."""
    return peak * 0.5 * (1 + math.cos(math.pi * index / max(count - 1, 1)))


def global_ttt_lr_at(hp, index, count):
    """The global SGD's LR at chunk `index` of `count`: a linear rise from GLOBAL_TTT_WARMUP_START_LR over
    GLOBAL_TTT_WARMUP_CHUNKS chunks, then the cosine decay over the chunks after them (the 04-27 record's)."""
    warmup = max(0, min(hp.global_ttt_warmup_chunks, count - 1))
    if index < warmup:
        rise = (hp.global_ttt_lr - hp.global_ttt_warmup_start_lr) * index / max(warmup - 1, 1)
        return hp.global_ttt_warmup_start_lr + rise
    return cosine_lr(hp.global_ttt_lr, index - warmup, count - warmup)


def phase_boundaries(doc_starts, num_targets, prefix_docs, num_phases):
    """(documents, target position) where the phases of phased TTT end: phase i ends after the first
    prefix_docs * (i + 1) // num_phases documents of the stream (a document's targets run from its BOS to the next
    BOS, which it predicts). A phase that would end at the end of the stream has nothing left to help and is dropped."""
    starts = sorted(set(doc_starts) | {0})
    counts = sorted({prefix_docs * (i + 1) // num_phases for i in range(num_phases)} - {0})
    return [(count, starts[count]) for count in counts if count < len(starts) and starts[count] < num_targets]


def phase_ends(doc_starts, num_targets, prefix_docs, num_phases):
    return [end for _, end in phase_boundaries(doc_starts, num_targets, prefix_docs, num_phases)]


def global_chunks(end, chunk_tokens):
    """The chunks [first, stop) in which a phase's global SGD walks the scored targets [0, end)."""
    return [(first, min(first + chunk_tokens, end)) for first in range(0, end, chunk_tokens)]


def global_sgd_trained(end, chunk_tokens):
    """How many of the scored targets [0, end) a phase's global SGD trains on: all but its last chunk's."""
    return global_chunks(end, chunk_tokens)[-1][0] if end > 0 else 0


def global_sgd(model, ledger, end, params, hp, steps, seq_len, rank, world_size, device, autocast):
    """The global SGD of a phase (PR #1626): the scored targets [0, end), cumulatively, in GLOBAL_TTT_CHUNK_TOKENS
    chunks under a fresh SGD optimizer with the LR of global_ttt_lr_at; as in the records, the last chunk is not
    trained on."""
    optimizer = torch.optim.SGD(params, lr=hp.global_ttt_lr, momentum=hp.global_ttt_momentum)
    chunks = global_chunks(end, hp.global_ttt_chunk_tokens)
    for index, (first, stop) in enumerate(chunks[:-1]):
        for group in optimizer.param_groups:
            group["lr"] = global_ttt_lr_at(hp, index, len(chunks))
        adapt_on_chunk(model, ledger, first, stop, params, optimizer, steps, seq_len, rank, world_size, device,
                       autocast)


def scoring_work(num_windows, rows_per_batch, world_size, seq_len):
    """Positions one rank forwards to score `num_windows` windows: whole batches of rows_per_batch padded rows."""
    return -(-num_windows // (rows_per_batch * world_size)) * rows_per_batch * seq_len


def adapt_work(first, end, steps, seq_len, world_size):
    """Positions one rank forwards and backwards to adapt on targets [first, end): whole batches of padded rows."""
    batches = -(-(-(-(end - first) // seq_len)) // steps.batch_seqs)
    return steps.epochs * batches * -(-steps.rows // world_size) * steps.row_len(seq_len)


class TTTClock:
    """Whether the next adaptation still fits the eval budget with the scoring of everything after it. Costs are the
    slowest rates seen so far, per position computed (padding included, so a short segment does not look slow):
    scored positions, and adapted positions (three scored positions' worth until an adaptation has been measured)."""

    def __init__(self, budget_left, device):
        self.budget_left, self.device = budget_left, device
        self.score_rate, self.train_rate = 0.0, None

    def scored(self, seconds, positions):
        self.score_rate = max(self.score_rate, seconds / max(positions, 1))

    def adapted(self, seconds, positions):
        self.train_rate = max(self.train_rate or 0.0, seconds / max(positions, 1))

    def fits(self, positions, positions_left):
        if self.budget_left is None:
            return True
        score_rate = self.score_rate or (self.train_rate or 0.0) / 3  # a forward is about a third of a training step
        train_rate = self.train_rate if self.train_rate is not None else 3 * score_rate
        needed = train_rate * positions + score_rate * positions_left
        over = torch.tensor(float(needed > self.budget_left()), device=self.device)
        return all_reduce(over, dist.ReduceOp.MAX).item() == 0  # every rank takes the same decision


class Progress:
    """A progress line of a long evaluation (`ttt_progress: ...`), at most every `every` seconds and at the end, so
    that minutes of TTT are not silent: how far it is, the time spent, and the time left at the rate so far. Rank
    0's log only; nothing is synchronized for it."""

    def __init__(self, log, unit, total, every=30.0):
        self.log, self.unit, self.total, self.every = log, unit, total, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done, share_done, detail=lambda: ""):
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        self.last, elapsed = now, now - self.start
        left = elapsed * (1 - share_done) / share_done if share_done > 0 else float("nan")
        self.log(f"ttt_progress: {self.unit}:{done}/{self.total} {detail()}elapsed:{elapsed:.0f}s eta:{left:.0f}s")


def chunk_ttt_optimizer(params, hp):
    """One optimizer for the whole pass, its state carried from chunk to chunk: SGD with momentum (the LegalTTT
    records'), or AdamW with TTT_MOMENTUM as its beta1."""
    if ttt_optimizer_of(hp) == "sgd":
        return torch.optim.SGD(params, lr=hp.ttt_lr, momentum=hp.ttt_momentum)
    return torch.optim.AdamW(params, lr=hp.ttt_lr, betas=(hp.ttt_momentum, 0.999), weight_decay=0.0)


def score_first_ttt(model, val_tokens, target_bytes, hp, rank, world_size, device, autocast, doc_starts=(), log=print,
                    budget_left=None, phases=()):
    """Legal test-time training. The stream is cut into segments at every TTT_CHUNK_TOKENS targets and at the
    `phases` ends (phase_ends); each segment is first scored (no gradient) and committed on every rank, and only
    then adapted on: a segment ending a phase by global SGD over every target scored so far, any other by
    TTT_EPOCHS passes over itself. The last segment is never trained on. Returns ((val_loss, val_bpb, targets
    scored), per-segment float64 sums, segments adapted on). `budget_left()` gives the seconds of eval budget left:
    adapting stops, scoring never does, when the next adaptation and the scoring after it would not fit."""
    num_targets, seq_len = val_tokens.numel() - 1, hp.eval_seq_len or hp.train_seq_len
    chunk, phases = hp.ttt_chunk_tokens, list(phases)
    cuts = sorted(set(range(chunk, num_targets, chunk)) | set(phases))
    segments = list(zip([0] + cuts, cuts + [num_targets]))
    windows_of = [[] for _ in segments]
    for window in plan_windows(num_targets, seq_len, hp.eval_stride or seq_len, doc_starts, cuts):
        windows_of[bisect.bisect_right(cuts, window[1])].append(window)
    rows = eval_rows_per_batch(hp.val_batch_size, seq_len, world_size)
    scoring = [scoring_work(len(w), rows, world_size, seq_len) for w in windows_of]
    positions_after = np.cumsum(scoring[::-1])[::-1].tolist()[1:] + [0]
    params = ttt_parameters(model, hp)
    optimizer = chunk_ttt_optimizer(params, hp)
    chunk_steps, global_steps = chunk_ttt_steps(hp, seq_len), global_sgd_steps(hp, seq_len)
    ledger, clock = ScoredTargets(val_tokens), TTTClock(budget_left, device)
    per_segment, adapting, adapted = [], True, 0
    num_chunks, progress = -(-num_targets // chunk), Progress(log, "segment", len(segments))
    for index, (first, end) in enumerate(segments):
        start = time.perf_counter()
        mine = rank_share(windows_of[index], rank, world_size)
        sums = score_windows(model, val_tokens, mine, target_bytes, seq_len, rows, device, autocast)
        per_segment.append(all_reduce(sums, dist.ReduceOp.SUM))  # every rank has scored its share of this segment
        ledger.commit(end)
        synchronize_device(device)  # the scoring's kernels, queued without waiting, are done: the clock is true
        clock.scored(time.perf_counter() - start, scoring[index])
        progress(index + 1, end / num_targets, lambda: f"scored_bpb:{loss_and_bpb(sum(per_segment))[1]:.4f} ")
        if index == len(segments) - 1:
            break
        phase = end in phases
        work = (sum(adapt_work(f, stop, global_steps, seq_len, world_size)
                    for f, stop in global_chunks(end, hp.global_ttt_chunk_tokens)[:-1]) if phase else
                adapt_work(first, end, chunk_steps, seq_len, world_size))
        if not adapting or work == 0:
            continue
        if not clock.fits(work, positions_after[index]):
            adapting = False
            log(f"ttt: eval budget reached at segment {index + 1}/{len(segments)}; scoring continues without adapting")
            continue
        start = time.perf_counter()
        if phase:
            global_sgd(model, ledger, end, params, hp, global_steps, seq_len, rank, world_size, device, autocast)
        else:
            for group in optimizer.param_groups:  # cosine over chunks, as in the LegalTTT records
                group["lr"] = cosine_lr(hp.ttt_lr, first // chunk, num_chunks)
            adapt_on_chunk(model, ledger, first, end, params, optimizer, chunk_steps, seq_len, rank, world_size,
                           device, autocast)
        synchronize_device(device)
        clock.adapted(time.perf_counter() - start, work)
        if phase:
            log(f"ttt_phase: {phases.index(end) + 1}/{len(phases)} scored_targets:{end} "
                f"trained_targets:{global_sgd_trained(end, hp.global_ttt_chunk_tokens)} "
                f"time:{time.perf_counter() - start:.1f}s")
        adapted += 1
    return loss_and_bpb(torch.stack(per_segment).sum(0)), per_segment, adapted


# --- per-document LoRA TTT (credit: the LoRA TTT record of 2026-03-17 and PR #1530's batched document adapters;
# PR #1767 the alpha scale and the warm A; PR #1610/#1626 the phases; composed as in the 04-27 record) ---
# Every validation document gets adapters of its own, reset before it starts, so what one document teaches reaches
# another only through a phase's global SGD. A document is cut into TTT_CHUNK_SIZE-target chunks (fewer targets in
# batches of short documents with TTT_SHORT_SCORE_FIRST_ENABLED=1). Each chunk is scored by one forward over at most
# TTT_EVAL_SEQ_LEN tokens of its own document, and only then, unless it is the document's last, trained on with
# TTT_GRAD_STEPS optimizer steps. Documents go TTT_BATCH_SIZE at a time, one per batch row, longest batches first.


class BatchedLoRA(nn.Module):
    """One rank-r update per batch row (one document each): row b adds (alpha / r) B_b A_b x. B starts at zero, so
    every document starts from the base model; A is drawn from U(+-1/sqrt(in))."""

    def __init__(self, rows, in_features, out_features, rank, alpha, generator):
        super().__init__()
        self.bound, self.scale = in_features ** -0.5, alpha / rank
        draw = torch.empty(rows, rank, in_features).uniform_(-self.bound, self.bound, generator=generator)
        self.a = nn.Parameter(draw)
        self.b = nn.Parameter(torch.zeros(rows, out_features, rank))

    @torch.no_grad()
    def reset(self, warm_a, generators):
        """B to zero; unless `warm_a`, row i's A is drawn again from generators[i] (one per document), on the host,
        and the rows go to the device in one copy."""
        self.b.zero_()
        if not warm_a:
            draws = torch.stack([torch.empty(self.a.shape[1:]).uniform_(-self.bound, self.bound, generator=generator)
                                 for generator in generators])
            self.a[:len(generators)].copy_(to_device(draws, self.a.device))

    def forward(self, x):  # x: (documents, T, in); a batch of fewer documents uses the first rows
        a, b = self.a[:x.size(0)].to(x.dtype), self.b[:x.size(0)].to(x.dtype)
        return (x @ a.transpose(1, 2)) @ b.transpose(1, 2) * self.scale


class LayerLoRA(NamedTuple):
    """One virtual layer's per-document adapters; None where TTT_Q_LORA, TTT_K_LORA, TTT_V_LORA, TTT_O_LORA or
    TTT_MLP_LORA is off."""
    q: Optional[nn.Module]
    k: Optional[nn.Module]
    v: Optional[nn.Module]
    o: Optional[nn.Module]
    mlp: Optional[nn.Module]


class DocumentAdapters(nn.Module):
    """The adapters of `rows` documents: on Q, K, V, the attention output and beside the MLP where switched on, in
    every virtual layer, so that a looped block gets a set per pass; and on the output head. Made on the CPU from
    `generator`, then moved."""

    def __init__(self, model, rows, hp, generator):
        super().__init__()
        dim, slots = model.tok_emb.embedding_dim, len(model.layer_order())
        kv_dim = model.blocks[0].attn.c_k.out_features
        lora = lambda width: BatchedLoRA(rows, dim, width, hp.ttt_lora_rank, hp.ttt_lora_alpha, generator)
        per_layer = lambda on, width: nn.ModuleList(lora(width) for _ in range(slots)) if on else None
        self.q, self.k = per_layer(hp.ttt_q_lora, dim), per_layer(hp.ttt_k_lora, kv_dim)
        self.v = per_layer(hp.ttt_v_lora, kv_dim)
        self.o, self.mlp = per_layer(hp.ttt_o_lora, dim), per_layer(hp.ttt_mlp_lora, dim)
        self.head = lora(model.tok_emb.num_embeddings)

    def layer(self, position):
        pick = lambda loras: None if loras is None else loras[position]
        return LayerLoRA(pick(self.q), pick(self.k), pick(self.v), pick(self.o), pick(self.mlp))

    def reset(self, warm_a, generators):
        for module in self.modules():
            if isinstance(module, BatchedLoRA):
                module.reset(warm_a, generators)

    def redraw(self, generator):
        """Every row's A drawn again from `generator` (a new phase), in place: a compiled forward keeps its graph."""
        for module in self.modules():
            if isinstance(module, BatchedLoRA):
                module.reset(False, [generator] * module.a.size(0))


class Document(NamedTuple):
    """A validation document: its targets are the positions start .. start + targets - 1 of the stream (its last
    target is the next document's BOS). Tokens before the first BOS form a document too."""
    index: int
    start: int
    targets: int


def documents_of(doc_starts, num_targets):
    starts = sorted({start for start in doc_starts if start < num_targets} | {0})
    ends = starts[1:] + [num_targets]
    return [Document(index, start, end - start) for index, (start, end) in enumerate(zip(starts, ends))]


def document_queue(documents, batch_size):
    """The 04-27 record's order: documents sorted by length (ties in stream order), cut into batches of
    TTT_BATCH_SIZE, the batches taken longest first. [(batch index in the ascending cut, documents)]."""
    by_length = sorted(documents, key=lambda document: document.targets)
    batches = [by_length[first:first + batch_size] for first in range(0, len(by_length), batch_size)]
    return sorted(enumerate(batches), key=lambda item: -item[1][-1].targets)


def document_phases(queue, prefix_docs, num_phases):
    """{queue position: the documents of the phase that runs once that batch is scored}. Phase i ends when the
    scored queue reaches min(PHASED_TTT_PREFIX_DOCS, documents) * (i + 1) / PHASED_TTT_NUM_PHASES documents, at most
    one phase per batch; it trains on that many scored documents, taken as the 04-27 record takes them (by batch
    index in the ascending cut, then position), so each phase's set grows on the last. A phase after the last batch
    is dropped: it would help nothing."""
    counts = np.cumsum([len(batch) for _, batch in queue]).tolist()
    prefix = min(prefix_docs, counts[-1] if counts else 0)
    plan, position = {}, -1
    for phase in range(num_phases):
        boundary = prefix * (phase + 1) // num_phases
        if boundary == 0:
            continue
        position = max(position + 1, bisect.bisect_left(counts, boundary))
        if position >= len(queue) - 1:
            break
        scored = sorted((index, row, document) for index, batch in queue[:position + 1]
                        for row, document in enumerate(batch))
        plan[position] = [document for _, _, document in scored[:boundary]]
    return plan


def queue_rounds(queue_length, phase_positions, world_size):
    """Rounds of at most WORLD_SIZE queue positions, one per rank, that never run past a phase: a batch is scored by
    the same base model at any world size."""
    rounds, first = [], 0
    for stop in sorted(set(phase_positions) | {queue_length - 1}):
        for start in range(first, stop + 1, world_size):
            rounds.append(list(range(start, min(start + world_size, stop + 1))))
        first = stop + 1
    return rounds


class ScoredDocuments:
    """The guard of per-document TTT: how many of each document's targets are scored. An adapter trains only on
    scored targets of its own document, and a phase's global SGD only on fully scored documents."""

    def __init__(self, tokens, documents):
        self._tokens, self.scored = tokens, [0] * len(documents)

    def commit(self, document, upto):
        if upto < self.scored[document.index]:
            raise RuntimeError("scoring must move forward through each document")
        self.scored[document.index] = upto

    def training_tokens(self, document, first, end):
        """The tokens of the document's targets [first, end): inputs and targets."""
        if end > self.scored[document.index]:
            raise RuntimeError(f"TTT asked to train on targets up to {end} of document {document.index}, but only "
                               f"{self.scored[document.index]} are scored: adapting on unscored tokens is illegal")
        return self._tokens[document.start + first:document.start + end + 1]

    def document_tokens(self, document):
        return self.training_tokens(document, 0, document.targets)


def chunk_window(document, chunk, chunk_size, context):
    """(window start, first scored, end) in the document's targets: the chunk's targets, after as much of the
    same document as fits in `context` positions."""
    first, end = chunk * chunk_size, min((chunk + 1) * chunk_size, document.targets)
    return max(0, end - context), first, end


def batch_positions(batch, chunk_size, context, rows):
    """Positions forwarded to score a batch: every chunk runs all rows, as long as its longest window."""
    chunks = -(-max(document.targets for document in batch) // chunk_size)
    return sum(rows * min((chunk + 1) * chunk_size, context) for chunk in range(chunks))


def score_first_chunk_size(batch, hp):
    """The chunk size of a batch of documents: TTT_CHUNK_SIZE, or with TTT_SHORT_SCORE_FIRST_ENABLED=1 that of the
    first short-document step whose length holds the batch's longest document (in tokens, its targets + 1)."""
    longest = max(document.targets for document in batch) + 1
    return next((chunk for limit, chunk in hp.short_score_first_steps if longest <= limit), hp.ttt_chunk_size)


@torch.enable_grad()  # whatever the caller's grad mode: the chunks' forwards record gradients and their steps train
def adapt_documents(forward, adapters, ledger, batch, val_tokens, hp, device, autocast, adapt):
    """Scores `batch`'s documents chunk by chunk (see score_first_chunk_size); after each chunk is scored (and
    committed) and `adapt`, the documents with more chunks to come take TTT_GRAD_STEPS steps on it. Returns
    (documents, 2) float64 sums (loss in nats, targets)."""
    chunk_size, context = score_first_chunk_size(batch, hp), ttt_context(hp)
    optimizer = ttt_lora_optimizer(adapters.parameters(), hp)
    counts = [-(-document.targets // chunk_size) for document in batch]
    sums = torch.zeros(len(batch), 2, dtype=torch.float64, device=device)
    for chunk in range(max(counts)):
        width = min((chunk + 1) * chunk_size, context)
        windows = [chunk_window(document, chunk, chunk_size, context) if chunk < count else None
                   for document, count in zip(batch, counts)]
        in_stream = [window and tuple(document.start + at for at in window)  # the windows' positions in val_tokens
                     for document, window in zip(batch, windows)]
        rows, scored = window_rows(val_tokens, in_stream, width, len(batch))
        training = [row for row, count in enumerate(counts) if adapt and chunk < count - 1]
        # each training row's mean over its chunk: 1 / (the chunk's targets) on them
        means = torch.tensor([1.0 / (windows[row][2] - windows[row][1]) if row in training else 0.0
                              for row in range(len(batch))])
        weights = to_device(scored * means[:, None], device)
        rows, scored = to_device(rows, device), to_device(scored, device)
        inputs, targets = rows[:, :-1], rows[:, 1:]
        # Gradients on even where no row trains (the last chunk, a round past the budget), as the record runs it:
        # the compiled forward is then one graph, where no_grad would build a second one in the warmup.
        with autocast():
            losses = forward(inputs, targets, reduction="none", adapters=adapters).float()
        sums += torch.stack([(losses.detach().double() * scored).sum(1), scored.sum(1).double()], 1)
        for document, window in zip(batch, windows):
            if window is not None:
                ledger.commit(document, window[2])
        if training:
            for row in training:  # raises unless every target of each chunk trained on is scored
                ledger.training_tokens(batch[row], *windows[row][1:])
            train_on_chunk(forward, adapters, optimizer, (inputs, targets, losses), weights, hp, autocast)
    return sums


def train_on_chunk(forward, adapters, optimizer, scored, weights, hp, autocast):
    """TTT_GRAD_STEPS steps on the scored chunk: the sum over documents of each one's mean loss over the chunk
    (documents never share a gradient), as `weights` weigh it. `scored`: the scoring forward's (inputs, targets,
    losses), which the first step reuses."""
    inputs, targets, losses = scored
    for step in range(hp.ttt_grad_steps):
        if step > 0:  # a fresh forward through the adapters the last step moved
            with autocast():
                losses = forward(inputs, targets, reduction="none", adapters=adapters)
        optimizer.zero_grad(set_to_none=True)
        (losses.float() * weights).sum().backward()
        optimizer.step()


def ttt_context(hp):
    return hp.ttt_eval_seq_len or hp.eval_seq_len or hp.train_seq_len


def ttt_lora_optimizer(params, hp):
    """A fresh optimizer per batch of documents: no state crosses from one document to the next. AdamW is fused, as
    the 04-27 record's: one kernel a step for every adapter, and its step count stays on the device, never read."""
    lr = hp.ttt_adapter_lr
    if ttt_optimizer_of(hp) == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=hp.ttt_beta1, weight_decay=hp.ttt_weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(hp.ttt_beta1, hp.ttt_beta2), eps=1e-10,
                             weight_decay=hp.ttt_weight_decay, fused=True)


def lora_generator(hp, *keys):
    """A CPU generator for adapters' A, seeded by SEED and what they are for (a phase, or a document), so that a
    document's adapters start alike at any world size and in any batch."""
    digest = hashlib.sha256(repr((hp.seed, "ttt_lora") + keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class LoraTTTModels(NamedTuple):
    """One model's weights, three ways: `base` owns the parameters; `lora_forward` (eager, or compiled with dynamic
    shapes) takes the adapters; `train_forward` (as training runs it) takes the phases' global SGD."""
    base: nn.Module
    lora_forward: Callable
    train_forward: Callable


class LoraTTTReport(NamedTuple):
    result: tuple  # (val_loss, val_bpb, targets scored)
    per_document: torch.Tensor  # (documents, 3) float64 sums: loss in nats, targets, bytes
    adapted_rounds: int
    rounds: int
    phases: int


def per_document_lora_ttt(models, val_tokens, target_bytes, hp, rank, world_size, device, autocast, doc_starts=(),
                          log=print, budget_left=None):
    """TTT_METHOD=lora over the whole validation stream. Rank r takes the r-th batch of each round. Adaptation
    stops, scoring never does, when the next round's adaptation and the scoring of every round after it would not
    fit `budget_left()`."""
    num_targets, context = val_tokens.numel() - 1, ttt_context(hp)
    documents = documents_of(doc_starts, num_targets)
    queue = document_queue(documents, hp.ttt_batch_size)
    phases = (document_phases(queue, hp.phased_ttt_prefix_docs, hp.phased_ttt_num_phases)
              if hp.phased_ttt_enabled else {})
    rounds = queue_rounds(len(queue), phases, world_size)
    if hp.phased_ttt_enabled:  # the record's line, with the boundaries kept (in documents)
        prefix = min(hp.phased_ttt_prefix_docs, len(documents))
        log(f"ttt_phased: total_docs:{len(documents)} prefix_docs:{prefix} suffix_docs:{len(documents) - prefix} "
            f"num_phases:{len(phases)} boundaries:{[len(phase) for phase in phases.values()]}")
    work = [batch_positions(batch, score_first_chunk_size(batch, hp), context, hp.ttt_batch_size) for _, batch in queue]
    round_work = [max(work[position] for position in positions) for positions in rounds]
    work_after = np.cumsum(round_work[::-1])[::-1].tolist()[1:] + [0]
    ledger, clock = ScoredDocuments(val_tokens, documents), TTTClock(budget_left, device)
    per_document = torch.zeros(len(documents), 3, dtype=torch.float64, device=device)
    base_params = list(models.base.parameters())
    phase, adapting, adapted = 0, True, 0
    progress, total_work = Progress(log, "round", len(rounds)), sum(round_work)
    adapters = DocumentAdapters(models.base, hp.ttt_batch_size, hp, lora_generator(hp, phase)).to(device)
    for index, positions in enumerate(rounds):
        adapting = adapting and clock.fits(round_work[index], work_after[index])
        if not adapting and adapted == index:
            log(f"ttt_lora: eval budget reached at round {index + 1}/{len(rounds)}; scoring continues without adapting")
        start = time.perf_counter()
        for param in base_params:
            param.requires_grad_(False)
        if rank < len(positions):
            batch_index, batch = queue[positions[rank]]
            # A batch of fewer documents (the queue's first: its longest) gets adapters of its own, drawn as the
            # phase's were, and leaves the warm A of the full batches as it was, as in the 04-27 record.
            batch_adapters = adapters if len(batch) == hp.ttt_batch_size else \
                DocumentAdapters(models.base, hp.ttt_batch_size, hp, lora_generator(hp, phase)).to(device)
            batch_adapters.reset(hp.ttt_warm_start_a, [lora_generator(hp, document.index) for document in batch])
            sums = adapt_documents(models.lora_forward, batch_adapters, ledger, batch, val_tokens, hp, device,
                                   autocast, adapting)
            per_document[[document.index for document in batch], :2] = sums
        synchronize_device(device)
        (clock.adapted if adapting else clock.scored)(time.perf_counter() - start, round_work[index])
        adapted += adapting
        for position in positions:  # every rank's share of the round is scored: the next phase may read it
            for document in queue[position][1]:
                ledger.commit(document, document.targets)
        progress(index + 1, 1 - work_after[index] / max(total_work, 1), lambda: "adapting " if adapting else "scoring ")
        if adapting and positions[-1] in phases:
            adapting = run_document_phase(models, ledger, phases[positions[-1]], base_params, hp, rank, world_size,
                                          device, autocast, clock, work_after[index], log, (phase + 1, len(phases)))
            phase += adapting
            adapters.redraw(lora_generator(hp, phase))
    for param in base_params:
        param.requires_grad_(True)
    per_document = all_reduce(per_document, dist.ReduceOp.SUM)
    for document in documents:  # the chunks of a document partition its targets: its bytes are its range's
        span = (document.start, document.start, document.start + document.targets)
        per_document[document.index, 2] = target_bytes.of([span])
    return LoraTTTReport(loss_and_bpb(per_document.sum(0)), per_document, adapted, len(rounds), phase)


def run_document_phase(models, ledger, documents, params, hp, rank, world_size, device, autocast, clock, work_after,
                       log, phase_count):
    """A phase's global SGD (PR #1626, as the 04-27 record runs it): the phase's documents, each fully scored,
    joined in its order and walked by global_sgd. Returns False, having done nothing, if it would not fit the
    budget: the adaptation stops there."""
    stream = torch.cat([ledger.document_tokens(document) for document in documents])
    scored = stream.numel() - 1
    phase_ledger = ScoredTargets(stream)
    phase_ledger.commit(scored)
    seq_len = hp.eval_seq_len or hp.train_seq_len
    steps = global_sgd_steps(hp, seq_len)
    work = sum(adapt_work(first, stop, steps, seq_len, world_size)
               for first, stop in global_chunks(scored, hp.global_ttt_chunk_tokens)[:-1])
    if not clock.fits(work, work_after):
        log(f"ttt_lora: eval budget reached before phase {phase_count[0]}/{phase_count[1]}; scoring continues "
            f"without adapting")
        return False
    start = time.perf_counter()
    for param in params:
        param.requires_grad_(True)
    global_sgd(models.train_forward, phase_ledger, scored, params, hp, steps, seq_len, rank, world_size, device,
               autocast)
    synchronize_device(device)
    clock.adapted(time.perf_counter() - start, work)
    log(f"ttt_phase: {phase_count[0]}/{phase_count[1]} documents:{len(documents)} scored_targets:{scored} "
        f"trained_targets:{global_sgd_trained(scored, hp.global_ttt_chunk_tokens)} "
        f"time:{time.perf_counter() - start:.1f}s")
    return True


def synchronize_device(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ============================================================================================
# MAIN
# ============================================================================================


def all_reduce(tensor, op):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


class Logger:
    """Rank 0 prints and appends to logs/<RUN_ID>.txt, flushing every line so that a crash keeps the log. The file is
    created exclusively: a second run of the same RUN_ID never writes into the first one's log (OVERWRITE_RUN=1 to
    replace it on purpose)."""

    def __init__(self, path, enabled, overwrite=False):
        self.path, self.enabled = path, enabled
        if enabled:
            folder = os.path.dirname(path) or "."
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise ConfigError(f"{folder} is a file, not a folder: a run writes its log and files under {folder}/; "
                                  f"move the file away, or run from another folder")
            try:
                os.makedirs(folder, exist_ok=True)
                self.file = open(path, "w" if overwrite else "x", encoding="utf-8")
            except FileExistsError:
                raise ConfigError(f"RUN_ID: {path} already exists (another run of this name); choose another RUN_ID, "
                                  f"or set OVERWRITE_RUN=1 to replace it") from None
            except OSError as error:
                raise ConfigError(f"cannot create the log {path}: {error.strerror}; make its folder writable or run "
                                  f"from another folder") from None

    def __call__(self, message="", console=True):
        if self.enabled:
            if console:
                print(message, flush=True)
            try:
                self.file.write(message + "\n")
                self.file.flush()
            except OSError as error:
                raise RunError(f"could not append to the log {self.path}: {error.strerror}") from error


class RunError(RuntimeError):
    """A failure that is not a bad setting (bad data, a failed write, a diverged loss); the message says what and
    where."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run (at `step` of training, or in the phase that was running)."""

    def __init__(self, signum, step=None):
        super().__init__(f"signal:{signal.Signals(signum).name}")
        self.signum, self.step = signum, step


class StopSignals:
    """SIGINT and SIGTERM (what schedulers send and torchrun forwards), for the runs inside its `with`. While
    `deferred` (the training loop) the handler only records the signal, and the loop stops every rank at the same
    step with the weights saved; at any other time it raises Interrupted at once. On leaving, the handlers that were
    there before are back, so a program that runs `main()` keeps its own."""

    def __enter__(self):
        self.received, self.deferred = None, False
        self.previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *error):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.received = signum
        if not self.deferred:
            raise Interrupted(signum)


def cpu_threads(omp_num_threads, local_world_size):
    """CPU threads per process: OMP_NUM_THREADS when the user (or torchrun, which sets 1 for several processes) gave
    it, else the cores shared out over this node's processes. Returns the log's note."""
    given = omp_num_threads.strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ConfigError(f"OMP_NUM_THREADS={given!r} must be a positive integer")
        torch.set_num_threads(int(given))
        return f"threads:{given}(OMP_NUM_THREADS)"
    threads = max(1, (os.cpu_count() or 1) // local_world_size)
    torch.set_num_threads(threads)
    return f"threads:{threads}(cpu_count/local_world_size)"


class ClockAgreement:
    """The ranks' common training clock: the slowest rank's elapsed time, whether any rank was signalled, and the step
    they belong to (MAX over ranks), so that the LR, the recurrence switch, growth, QAT and the stop are one decision
    everywhere. It travels on a CPU (gloo) group and so never waits on a device; on a step that logs nothing it is
    posted and read one step later, so the host does not wait on the slowest rank either (decisions then use the
    previous step's agreed time, whose step number comes with it)."""

    def __init__(self, group, world_size):
        self.group, self.world_size, self.pending, self.last = group, world_size, None, (0.0, 0.0, 0)

    def restart(self):
        """A new training clock (each seed's run)."""
        self.collect()
        self.last = (0.0, 0.0, 0)

    def agree(self, elapsed_ms, signalled, step, now):
        if self.world_size == 1:
            return elapsed_ms, signalled, step
        values = torch.tensor([elapsed_ms, signalled, step], dtype=torch.float64)
        previous = self.collect()
        if now:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
            return self.unpack(values)
        self.pending = (values, dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return previous

    def collect(self):
        """The exchange in flight, waited for (ranks posted it a step ago), or the last one agreed."""
        if self.pending is not None:
            values, work = self.pending
            work.wait()
            self.pending, self.last = None, self.unpack(values)
        return self.last

    def unpack(self, values):
        elapsed_ms, signalled, step = values.tolist()  # a CPU tensor: no device sync
        self.last = (elapsed_ms, signalled, int(step))
        return self.last


class Cluster:
    """This process's place in the run: rank, world size and device. Started once, shared by every seed."""

    def __init__(self, hp):
        self.threads_note = ""
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device_type = hp.device if hp.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("DEVICE='cuda' but no CUDA device is visible")
        self.device = torch.device("cuda", self.local_rank) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        else:
            self.threads_note = cpu_threads(os.environ.get("OMP_NUM_THREADS", ""),
                                            int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        if self.distributed:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=10),
                                    **(dict(device_id=self.device) if device_type == "cuda" else {}))
            probe = all_reduce(torch.ones(1, device=self.device), dist.ReduceOp.SUM)
            if int(probe.item()) != self.world_size:
                raise RuntimeError(f"distributed sanity all-reduce gave {probe.item()}, expected {self.world_size}")
        # The clock's group: the default one where it is gloo already (the CPU), a gloo side group beside NCCL.
        clock_group = dist.new_group(backend="gloo") if self.distributed and device_type == "cuda" else None
        self.clock = ClockAgreement(clock_group, self.world_size)

    def broadcast(self, value):
        """Rank 0's `value`, on every rank."""
        box = [value]
        if self.distributed:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def stop(self):
        if self.distributed:  # every rank done first: a gloo rank torn down while a peer still exchanges can abort
            dist.barrier()
            dist.destroy_process_group()


class Run:
    """What the phases of one seed's run share: its settings and how it executes (batch split, compile, attention,
    precision), the cluster, the log, the clocks and results, and what a failure saves. Every attribute is made
    here. A setting the machine cannot meet is refused here too, before the log or anything else is written."""

    def __init__(self, hp, sources, cluster, code, signals):
        self.hp, self.sources, self.code, self.signals, self.cluster = hp, sources, code, signals, cluster
        self.distributed, self.rank, self.world_size = cluster.distributed, cluster.rank, cluster.world_size
        self.device, device_type = cluster.device, cluster.device.type
        self.device_name = torch.cuda.get_device_name(self.device) if device_type == "cuda" else "cpu"
        # an evaluation-only run trains nothing: no batch to split, and none refused (TRAIN_BATCH_TOKENS is its default)
        self.seqs_per_step, self.grad_accum_steps = (0, 1) if hp.eval_only_quantized_path else batch_split(
            hp, self.world_size)
        self.use_compile = hp.compile == "1" or (hp.compile == "auto" and device_type == "cuda")
        if sources["compile_scope"].startswith("env") and not self.use_compile:  # COMPILE=0 is refused by `needs`
            raise ConfigError(f"COMPILE_SCOPE={hp.compile_scope!r} has no effect: COMPILE=auto compiles on CUDA only, "
                              f"and this run is on the {device_type}; set COMPILE=1 to compile here, or unset "
                              f"COMPILE_SCOPE")
        bf16 = autocast_name(hp.autocast, device_type) == "bf16"
        self.attention_name, self.attention_fn = select_attention(hp.attn_backend, device_type, half_precision=bf16,
                                                                  documents=hp.doc_isolation, compiled=self.use_compile)
        check_doc_isolation(hp, self.attention_name, self.attention_fn, device_type)
        self.autocast = autocast_context(hp.autocast, device_type)
        self.eval_seq_len = hp.eval_seq_len or hp.train_seq_len
        self.run_id, self.log = hp.run_id, print  # the log file is opened by `setup`
        self.log_path = os.path.join("logs", f"{hp.run_id}.txt")
        self.code_sha256 = hashlib.sha256(code.counted).hexdigest()[:16]
        self.config_hash = None  # set by `setup`: it hashes the data too
        self.timings, self.results = {}, {}
        self.scored_targets = {}  # final evaluation name: validation targets it scored
        self.eval_start = None  # the evaluation clock's start (`evaluate_artifact`)
        self.graphs_before, self.graphs_after_warmup = 0, 0  # compiled graphs when the model was built, after warmup
        self.qat_k_scale = None  # the size target's k scale QAT trained against, once it started
        self.raw_weights_path = os.path.join("logs", f"{hp.run_id}_raw.pt")
        self.phase, self.training_began, self.raw_saved, self.steps_done = "setup", False, False, 0
        self.net, self.average = None, None  # what a failure saves: the network (build_model), its average (train)


def batch_split(hp, world_size):
    """(sequences per step, micro-steps per step): GRAD_ACCUM_STEPS, else 8 // WORLD_SIZE (one micro-step per rank
    on 8 GPUs, the records' split) where that divides, else 1. Refused unless the sequences split evenly."""
    seqs_per_step = hp.train_batch_tokens // hp.train_seq_len
    accum = hp.grad_accum_steps or (8 // world_size if 8 % world_size == 0 else 1)
    if seqs_per_step % (world_size * accum):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} is {seqs_per_step} sequences of "
                          f"TRAIN_SEQ_LEN={hp.train_seq_len}, which does not split over WORLD_SIZE={world_size} x "
                          f"GRAD_ACCUM_STEPS={accum}; change TRAIN_BATCH_TOKENS or GRAD_ACCUM_STEPS")
    return seqs_per_step, accum


def setup(run):
    """The log, then the data (`load_data`), which it returns. Fails early, with a message naming the fix."""
    hp = run.hp
    run.log = Logger(run.log_path, run.rank == 0, hp.overwrite_run)
    run.log(run.code.source.decode("utf-8"), console=False)
    run.log("=" * 100, console=False)

    if hp.finish_from and run.cluster.broadcast(run.rank == 0 and not os.path.isfile(hp.finish_from)):
        raise ConfigError(f"FINISH_FROM={hp.finish_from!r} is not a file (it takes logs/<RUN_ID>_raw.pt)")
    only = hp.eval_only_quantized_path
    if only and run.cluster.broadcast(run.rank == 0 and not os.path.isfile(only)):
        raise ConfigError(f"EVAL_ONLY_QUANTIZED_PATH={only!r} is not a file (a run writes "
                          f"logs/<RUN_ID>_model.<format>.ptz)")
    data = load_data(run)
    run.config_hash = hp.config_hash(data.digest)
    check_record_dir(run)
    if run.rank == 0:
        log_environment(run, data)
    append_index(run, "launched")
    return data


class Data(NamedTuple):
    """What `load_data` hands on: the tokenizer, the training stream, and the validation split with the bytes each
    target counts for val_bpb, all checked."""
    tokenizer: spm.SentencePieceProcessor
    train_files: list  # none for EVAL_ONLY_QUANTIZED_PATH, which reads no training data
    train_loader: Optional[TrainLoader]
    val_files: list
    val_tokens: torch.Tensor
    target_bytes: TargetBytes  # the bytes each validation target counts: the LUTs', or CaseOps' sidecar
    doc_starts: tuple  # the validation documents' first positions, with EVAL_DOC_ISOLATED; else ()
    digest: dict  # the SHA-256 of the validation shards and of the tokenizer: the data in the config hash
    bytecheck: str  # what the byte check verified, for the log's bpb_bytecheck line


def load_data(run):
    """The tokenizer and the shards, checked before anything trains: every token id within the vocabulary, and the
    bytes val_bpb counts against the text (the tokenizer's LUTs, or CaseOps' byte sidecar, document by document).
    An evaluation-only run (EVAL_ONLY_QUANTIZED_PATH) needs no training shards and reads none."""
    hp = run.hp
    tokenizer = load_tokenizer(hp.tokenizer_path, hp.vocab_size, hp.data_path)
    val_files = shard_files(hp.data_path, "val")
    val_tokens = load_validation_tokens(val_files)
    check_token_ids(val_files, [load_shard(f) for f in val_files], hp.vocab_size)
    train_files, loader = [], None
    if not hp.eval_only_quantized_path:
        train_files = shard_files(hp.data_path, "train")
        bos_id = tokenizer.bos_id() if uses_varlen(hp, run.attention_name) else None
        loader = TrainLoader(train_files, hp.train_seq_len, run.seqs_per_step, hp.data_seed, run.rank,
                             run.world_size, run.grad_accum_steps, bos_id, hp.piece_len)
        reduce_max = lambda maxima: all_reduce(torch.from_numpy(maxima).to(run.device), dist.ReduceOp.MAX).cpu().numpy()
        check_token_ids(train_files, loader.shards, hp.vocab_size, run.rank, run.world_size, reduce_max)
    if hp.caseops_enabled:  # the bytes of the original text, from the sidecar, checked document by document
        caseops_byte_luts(tokenizer, hp.vocab_size)  # the tokenizer holds the operators
        sidecar = load_byte_sidecar(val_files)
        reduce_min = lambda index: int(all_reduce(torch.tensor(index, device=run.device), dist.ReduceOp.MIN).item())
        check = check_caseops(tokenizer, val_tokens.numpy(), sidecar, run.rank, run.world_size, reduce_min)
        bytecheck = (f"docs:{check.documents} bytes:{check.sidecar_bytes} tokenizer_roundtrip:ok "
                     f"bytes_from:caseops_sidecar caseops_roundtrip:ok sidecar_vs_tokens:pieces:"
                     f"{check.tokens_differing} bytes:{check.bytes_differing:+d}")
        target_bytes = TargetBytes(sidecar[1:])
    else:
        signs = caseops_signs(val_files, tokenizer)
        if signs:
            raise ConfigError(f"DATA_PATH and TOKENIZER_PATH are CaseOps data ({' and '.join(signs)}), but "
                              f"CASEOPS_ENABLED is off: val_bpb would count the bytes of the transformed text; set "
                              f"CASEOPS_ENABLED=1")
        luts = build_byte_luts(tokenizer, hp.vocab_size)
        documents, checked_bytes = check_tokenizer_and_bytes(tokenizer, val_tokens.numpy(), luts)
        bytecheck = f"docs:{documents} bytes:{checked_bytes} tokenizer_roundtrip:ok bytes_from:luts"
        target_bytes = TargetBytes(target_byte_counts(val_tokens.numpy(), luts))
    doc_starts = doc_starts_of(val_tokens, tokenizer.bos_id()) if hp.eval_doc_isolated else ()
    digest = dict(val_sha256=_sha256_files(val_files), tokenizer_sha256=_sha256_files([hp.tokenizer_path]))
    return Data(tokenizer, train_files, loader, val_files, val_tokens, target_bytes, doc_starts, digest, bytecheck)


def autocast_name(setting, device_type):
    return "bf16" if setting == "bf16" or (setting == "auto" and device_type == "cuda") else "off(fp32)"


def autocast_context(setting, device_type):
    """A callable that opens the run's precision context: bf16 autocast (matmuls and attention in bf16, master weights,
    norms, softcap and cross-entropy in fp32) or nothing (fp32)."""
    if autocast_name(setting, device_type) == "bf16":
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _command_output(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _sha256_files(paths):
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def package_versions():
    """What ran: Python, torch, CUDA and the packages whose version changes results or speed."""
    versions = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                    sentencepiece=spm.__version__, cuda=torch.version.cuda or "none")
    for module in ("zstandard", "brotli", "flash_attn", "flash_attn_interface"):
        try:
            versions[module] = getattr(__import__(module), "__version__", "installed")
        except ImportError:
            pass
    return versions


def log_environment(run, data):
    hp, log = run.hp, run.log
    log("environment: " + " ".join(f"{k}:{v}" for k, v in package_versions().items()))
    if run.device.type == "cuda":
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        devices = [platform.processor() or platform.machine()]
    log(f"host:{socket.gethostname()} git_sha:{_command_output(['git', 'rev-parse', 'HEAD']) or 'none'} "
        f"devices:{'|'.join(devices)} cpu_count:{os.cpu_count()}")
    if run.device.type == "cuda":
        log(_command_output(["nvidia-smi"]), console=False)
    log("config: " + " ".join(f"{f.name.upper()}={getattr(hp, f.name)!r}({run.sources[f.name]})"
                              for f in dataclasses.fields(hp)))
    scope = f"(scope:{hp.compile_scope})" if run.use_compile else ""
    log(f"world_size:{run.world_size} grad_accum_steps:{run.grad_accum_steps} device:{run.device} "
        f"attention:{run.attention_name} compile:{run.use_compile}{scope} "
        f"autocast:{autocast_name(hp.autocast, run.device.type)} "
        f"{run.cluster.threads_note}")
    train_tokens = sum(len(s) for s in data.train_loader.shards) if data.train_loader else 0
    log(f"data: train_shards:{len(data.train_files)} train_tokens:{train_tokens} val_shards:{len(data.val_files)} "
        f"val_sha256:{data.digest['val_sha256']} tokenizer_sha256:{data.digest['tokenizer_sha256']}")
    log(f"fingerprint: config_hash:{run.config_hash} code_sha256:{run.code_sha256} seed:{hp.seed}")
    log(f"code: bytes_counted:{len(run.code.counted)} bytes_source:{len(run.code.source)} {run.code.how}")
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={hp.tokenizer_path}")
    log(f"val_tokens:{data.val_tokens.numel()} val_bytes:{data.target_bytes.total}")
    log(f"bpb_bytecheck:ok {data.bytecheck}")
    planned = hp.iterations * hp.train_batch_tokens
    if planned > train_tokens and not (hp.finish_from or hp.eval_only_quantized_path):  # else nothing trains
        log(f"warning: {hp.iterations} steps x {hp.train_batch_tokens} tokens = {planned} exceeds the {train_tokens} "
            f"training tokens on disk, so data repeats (download more shards)")


class VarlenDocuments(nn.Module):
    """The model (compiled or eager) on FlashAttention's varlen path: a call without cu_seqlens (the evaluations,
    TTT, the warmup's synthetic batch) has them found here, once per batch, eagerly: a fullgraph graph cannot
    compute a tensor whose length depends on the data, and eager attention would find them once per layer. Training
    batches bring theirs from the loader. A module, so that TTT finds the parameters (their names gain a prefix;
    TTT_PARAMS matches substrings)."""

    def __init__(self, model, bos_id):
        super().__init__()
        self.model, self.bos_id = model, bos_id

    def forward(self, input_ids, target_ids=None, reduction="mean", mile_gamma=None, cu_seqlens=None, piece_len=0):
        if cu_seqlens is None:
            cu_seqlens = cu_seqlens_of(document_starts(input_ids, self.bos_id, piece_len))
        return self.model(input_ids, target_ids, reduction, mile_gamma, cu_seqlens, piece_len=piece_len)


class RegionallyCompiled(nn.Module):
    """COMPILE_SCOPE=block: the model's forward with its two heavy regions compiled, each as a fullgraph function
    compiled once: the block, whose graph every layer of the same structure reuses (so a looped pass costs no compile,
    and eleven layers cost a few graphs), and the output head with its loss (the fp32 logits never leave the graph).
    The embedding and the glue between blocks run eager. As PyTorch's regional compilation recipe does; the math is
    the model's. A module, so that TTT finds the parameters."""

    def __init__(self, model, backend="inductor"):
        super().__init__()
        self.model = model
        compiled = functools.partial(torch.compile, dynamic=False, fullgraph=True, backend=backend)
        self.regions = ForwardRegions(compiled(Block.forward), compiled(GPT.output))

    def forward(self, input_ids, target_ids=None, reduction="mean", mile_gamma=None, cu_seqlens=None, piece_len=0):
        return self.model(input_ids, target_ids, reduction, mile_gamma, cu_seqlens, regions=self.regions,
                          piece_len=piece_len)


# Dynamo's limit of graphs per compiled function. Its default, 8, would send later graphs to eager: a run's graphs
# share one cache per function (the whole model's forward, or the block's), one per layout, grad mode and shape:
# training's, evaluation's, TTT's training passes and the per-document TTT forward's, and per block structure.
COMPILE_GRAPH_LIMIT = 64


def train_model_of(model, use_compile, varlen, scope="model", backend="inductor"):
    """What training, evaluation and TTT call: the model compiled (COMPILE_SCOPE: by regions, or as one fullgraph
    graph per layout; static shapes but cu_seqlens' length) or eager, behind VarlenDocuments when `varlen`. The tests
    compile with backend="aot_eager"."""
    if use_compile:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_GRAPH_LIMIT)
    if not use_compile:
        compiled = model
    elif scope == "block":
        compiled = RegionallyCompiled(model, backend)
    else:
        compiled = torch.compile(model, dynamic=False, fullgraph=True, backend=backend)
    return VarlenDocuments(compiled, model.bos_id) if varlen else compiled


class Model(NamedTuple):
    """What `build_model` hands on: the network, its optimizers, the forward that training and scoring call
    (compiled per COMPILE and COMPILE_SCOPE, else the network itself), the memory estimate of a training step (none
    where nothing trains), and, once the warmup has compiled it, the forward per-document TTT calls."""
    net: GPT
    optimizers: Optimizers
    forward: nn.Module
    memory: Optional["MemoryEstimate"]
    ttt_forward: Optional[nn.Module] = None


def build_model(run, data):
    """The network (seeded by SEED), its optimizers and its training forward; the model's features, size and memory
    estimate go into the log. The network is also the run's: what a failure saves."""
    hp = run.hp
    torch.manual_seed(hp.seed)
    net = run.net = GPT(hp, run.attention_fn, bos_id=data.tokenizer.bos_id()).to(run.device)
    # Banks the matrices: after .to(device). The bf16 precision path computes Muon's update in bf16 on any device.
    update_dtype = torch.bfloat16 if autocast_name(hp.autocast, run.device.type) == "bf16" else torch.float32
    # Muon's orthogonalization compiles with the model on a GPU; on the CPU it runs eagerly, where its compile would
    # cost more than it saves.
    optimizers = Optimizers(net, hp, run.rank, run.world_size, update_dtype,
                            compiled=run.use_compile and run.device.type == "cuda")
    fused = triton_drives(run.device)  # else the same math unfused, and the log says why
    why_not = f"does not drive {run.device.type}" if triton_language() else "is not installed"
    triton_state = "on (Triton)" if fused else f"the same math unfused (Triton {why_not})"
    if hp.fused_ce_enabled:
        net.fused_ce = fused_softcapped_ce() if fused else None
        run.log(f"fused_ce: {triton_state}")
    if hp.fused_mlp_enabled:
        for block in net.blocks:
            block.mlp.fused = fused_leaky_relu2_mlp() if fused else None
        run.log(f"fused_mlp: {triton_state}")
    forward = train_model_of(net, run.use_compile, uses_varlen(hp, run.attention_name), hp.compile_scope)
    run.graphs_before, run.graphs_after_warmup = compiled_graphs(), 0
    if hp.qat_start_lr_scale > 0:
        set_qat(net, hp, on=False)
    total, embedding, non_embedding = count_parameters(net)
    check_ttt_settings(net, hp)  # name patterns are checked now, not after training
    run.log(f"features: {describe_features(net, hp)}")
    run.log(f"model_params:{total} embedding_params:{embedding} non_embedding_params:{non_embedding}")
    run.log(f"optimizer: {optimizers.describe()}")
    memory = None if hp.eval_only_quantized_path else logged_memory_estimate(run, net, optimizers)  # of a step
    return Model(net, optimizers, forward, memory)


def logged_memory_estimate(run, net, optimizers):
    """The memory estimate of a training step, logged, with a warning where it nears the device's memory."""
    memory = estimate_memory(run, net, optimizers)
    capacity = torch.cuda.get_device_properties(run.device).total_memory if run.device.type == "cuda" else 0
    run.log(memory.describe() + (f" of device:{capacity / 2**20:.0f}MiB" if capacity else ""))
    if capacity and memory.total > 0.95 * capacity:
        advice = out_of_memory_advice(run).split(": ", 1)[1]
        run.log(f"warning: the estimate exceeds 95% of the device's memory; {advice}")
    return memory


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Peak device memory of a training step per GPU, in bytes, by what holds it."""
    weights: int  # master weights: fp32 (the tables bf16 with EMBED_BF16)
    grads: int  # gradients in their parameters' dtype (the banks' padded buffers, and bf16 copies, included)
    optimizer: int  # this rank's Muon momentum shard and the replicated AdamW moments
    averages: int  # the EMA / SWA copies
    activations: int  # what autograd saves for backward at one micro-batch
    micro_batch_seqs: int
    collectives: int = 0  # Parallel Muon's reduce-scatter shard and all-gather buffers (more than one rank)

    @property
    def total(self):
        return self.weights + self.grads + self.optimizer + self.averages + self.activations + self.collectives

    def describe(self):
        mib = lambda n: f"{n / 2**20:.0f}MiB"
        return (f"memory_estimate: per_gpu:{mib(self.total)} weights:{mib(self.weights)} grads:{mib(self.grads)} "
                f"optimizer:{mib(self.optimizer)} averages:{mib(self.averages)} collectives:{mib(self.collectives)} "
                f"activations:{mib(self.activations)}(micro_batch:{self.micro_batch_seqs}seqs)")


def saved_activation_bytes(model, seqs, seq_len, vocab_size, autocast, device):
    """Bytes autograd saves for the backward of `seqs` sequences of `seq_len` tokens (each storage counted once),
    measured on an eager forward with saved-tensor hooks."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor
    tokens = torch.randint(vocab_size, (seqs, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast():
        loss = model(tokens[:, :-1], tokens[:, 1:])
    del loss
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(nbytes for pointer, nbytes in storages.items() if pointer not in parameters)


def estimate_memory(run, model, optimizers):
    """The device memory of a training step per GPU, made before anything is compiled: the exact sizes of the
    weights, gradients, optimizer state, averages and collective buffers this configuration allocates, plus the
    activations of one micro-batch, extrapolated from forwards of one and two sequences (a fixed part, such as the
    bf16 copies of the weights, and a part per sequence). Transient buffers (the backward's, Newton-Schulz's) are not
    in it: on CUDA the warmup measures the real peak beside it (log_measured_memory)."""
    hp = run.hp
    nbytes = lambda tensor: 0 if tensor is None else tensor.numel() * tensor.element_size()
    stored = lambda tensors: sum(map(nbytes, tensors))  # in their dtypes: bf16 tables with EMBED_BF16
    float_bytes = lambda tensors: sum(t.numel() * 4 for t in tensors)
    params = list(model.parameters())
    # the banks' fp32 gradients, and their bf16 copies with MUON_BF16_STATE
    bank_grads = sum(stored([bank.grads] + [bank.sent] * (bank.sent is not bank.grads)) for bank in optimizers.banks)
    muon = sum(bank.grads.numel() // run.world_size * (1 + 4 / INT8_MOMENTUM_BLOCK if hp.muon_momentum_int8
                                                       else bank.sent.element_size()) for bank in optimizers.banks)
    adam = 2 * stored(optimizers.replicated)
    copies = (hp.weight_averaging in ("ema", "ema_swa")) + (hp.weight_averaging in ("swa", "ema_swa"))
    micro_batch = run.seqs_per_step // (run.world_size * run.grad_accum_steps)
    one, two = (saved_activation_bytes(model, seqs, hp.train_seq_len, hp.vocab_size, run.autocast, run.device)
                for seqs in (1, 2))
    collectives = sum(nbytes(bank.updates) + (nbytes(bank.grad_shard) if run.world_size > 1 else 0)
                      for bank in optimizers.banks)
    return MemoryEstimate(weights=stored(params), grads=bank_grads + stored(optimizers.replicated),
                          optimizer=int(muon) + adam, averages=copies * float_bytes(params),
                          activations=one + (two - one) * (micro_batch - 1), micro_batch_seqs=micro_batch,
                          collectives=collectives)


def log_measured_memory(device, estimate, log, advice):
    """On CUDA, after the warmup's training steps (real compiled micro-steps and optimizer steps, the bound that
    counts): `memory_measured:` the peak allocated and reserved beside the estimate, which is made before anything
    is compiled and misses transient buffers; a warning with `advice` when the reserved peak passes 95% of the
    device."""
    if device.type != "cuda":
        return
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    capacity = torch.cuda.get_device_properties(device).total_memory
    mib = lambda n: f"{n / 2**20:.0f}MiB"
    log(f"memory_measured: peak_allocated:{mib(allocated)} peak_reserved:{mib(reserved)} "
        f"estimate:{mib(estimate.total)} allocated/estimate:{allocated / max(estimate.total, 1):.2f} "
        f"of device:{mib(capacity)} (warmup training steps)")
    if reserved > 0.95 * capacity:
        log(f"warning: the warmup's steps reserved over 95% of the device's memory; {advice.split(': ', 1)[1]}")


def out_of_memory_advice(run):
    """What to change when a training step runs out of device memory: a smaller micro-batch."""
    accum = run.grad_accum_steps
    larger = [a for a in (2 * accum, 4 * accum) if run.seqs_per_step % (run.world_size * a) == 0]
    fix = (f"set GRAD_ACCUM_STEPS={larger[0]} (the micro-batch halves, the global batch stays)" if larger else
           f"lower TRAIN_BATCH_TOKENS={run.hp.train_batch_tokens} (no larger GRAD_ACCUM_STEPS divides it)")
    return (f"out of device memory in a training step at a micro-batch of "
            f"{run.seqs_per_step // (run.world_size * accum)} sequences of {run.hp.train_seq_len} tokens "
            f"(GRAD_ACCUM_STEPS={accum}): {fix}")


def train_step(run, model, loader, step, lr_scale, piece_len=None, rewarm=1.0):
    """One optimizer step over the global batch; returns this rank's mean loss (a tensor, not yet averaged).
    `piece_len`: the packed rows' longest piece (the loader's unless given); `rewarm`: a factor on the optimizers'
    LR only (SEQ_CHANGE_WARMUP_STEPS)."""
    try:
        return accumulate_and_step(run, model, loader, step, lr_scale, piece_len, rewarm)
    except torch.OutOfMemoryError as error:
        raise RunError(out_of_memory_advice(run)) from error


def accumulate_and_step(run, model, loader, step, lr_scale, piece_len, rewarm):
    total_loss = torch.zeros((), device=run.device)
    # MiLe's exponent decays with the LR, so the warmdown ends on plain cross-entropy; a tensor, so compile never
    # specializes on its value.
    # torch.full is a fill kernel: unlike torch.tensor, it copies nothing from the host, so the step never blocks on it.
    mile_gamma = torch.full((), run.hp.mile_gamma * lr_scale, device=run.device) if run.hp.mile_gamma > 0 else None
    piece_len = loader.piece_len if piece_len is None else piece_len
    for micro_step in range(run.grad_accum_steps):
        batch = loader.batch(step, micro_step, run.device, piece_len)
        with run.autocast():
            loss = model.forward(batch.inputs, batch.targets, mile_gamma=mile_gamma, cu_seqlens=batch.cu_seqlens,
                                 piece_len=piece_len)
        (loss / run.grad_accum_steps).backward()
        total_loss += loss.detach()
    model.optimizers.step(lr_scale * rewarm, muon_momentum(run.hp, step))
    model.optimizers.zero_grad()
    return total_loss / run.grad_accum_steps


def synchronize(run):
    if run.device.type == "cuda":
        torch.cuda.synchronize()


def warmup(run, data, model):
    """Compile and warm up on training batches, untimed, then restore the initial weights and optimizer state. With
    depth recurrence the second half runs looped, so both training graphs exist before the clock starts. The
    evaluation graph is warmed up on synthetic tokens: validation tokens are never touched here. Returns the model
    with the per-document TTT forward it compiled, if any."""
    hp, net = run.hp, model.net
    if hp.warmup_steps == 0:
        return model
    start = time.perf_counter()
    initial_model = copy.deepcopy(net.state_dict())
    initial_looping = net.looping
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    # The steps shared in order among the training shapes (the first half unlooped, the second looped, per piece
    # length of TRAIN_SEQ_SCHEDULE); every shape gets a step, even from WARMUP_STEPS=1.
    shapes = training_shapes(hp, initial_looping)
    steps = max(hp.warmup_steps, len(shapes))
    for step in range(steps):
        piece_len, net.looping = shapes[step * len(shapes) // steps]
        step_start = time.perf_counter()
        train_step(run, model, data.train_loader, step, 1.0, piece_len)
        synchronize(run)  # the first step of a shape includes its compile time, shown here
        run.log(f"warmup_step:{step + 1}/{steps} looping:{net.looping} " + (f"pieces:{piece_len} " if piece_len else "")
                + f"time:{time.perf_counter() - step_start:.2f}s")
    net.looping = initial_looping
    log_measured_memory(run.device, model.memory, run.log, out_of_memory_advice(run))
    # The layouts evaluations will see: the final evaluations', looped if the recurrence switches on before the last
    # step; and with VAL_LOSS_EVERY, the initial one too (the step-0 validation, and any before the switch).
    final_looping = initial_looping or looping_due(hp, hp.iterations, training_budget_ms(hp))
    layouts = {final_looping} | ({initial_looping} if hp.val_loss_every > 0 else set())
    model = model._replace(ttt_forward=warm_evaluation_graphs(run, model, layouts, final_looping))
    net.load_state_dict(initial_model)
    model.optimizers.reset_state()
    synchronize(run)
    run.timings["untimed_warmup_s"] = time.perf_counter() - start
    run.log(f"warmup:done steps:{steps} time:{run.timings['untimed_warmup_s']:.1f}s "
            f"restored:initial_weights_and_optimizer_state")
    log_compiled_graphs(run, "warmup")
    return model


def warm_evaluation_graphs(run, model, layouts, final_looping):
    """Every graph the evaluations will call, built here on synthetic tokens (validation tokens are never touched),
    so that no graph is compiled after the warmup: scoring in each of `layouts` at each window length; in the final
    layout, TTT's training passes (chunk TTT's and the phases' global SGD, with the parameters they train); and the
    per-document TTT forward, which it returns (None without LoRA TTT). The weights are only read; their gradients
    are cleared."""
    hp, net = run.hp, model.net
    if not run.use_compile:
        return None
    initial_looping = net.looping
    for looping, seq_len in itertools.product(sorted(layouts), sorted({hp.train_seq_len, run.eval_seq_len})):
        net.looping = looping
        rows = eval_rows_per_batch(hp.val_batch_size, seq_len, run.world_size)
        with torch.no_grad():
            seconds = timed_synthetic_pass(run, model.forward, rows, seq_len)
        run.log(f"warmup_eval: seq_len:{seq_len} rows:{rows} looping:{looping} time:{seconds:.2f}s")
    net.looping = final_looping
    for rows, row_len, piece_len, params in ttt_training_passes(run, model):
        trainable = {id(param) for param in params}
        for param in net.parameters():
            param.requires_grad_(id(param) in trainable)
        seconds = timed_synthetic_pass(run, model.forward, rows, row_len, backward=True, piece_len=piece_len)
        for param in net.parameters():
            param.requires_grad_(True)
        model.optimizers.zero_grad()
        run.log(f"warmup_ttt_training: seq_len:{row_len} rows:{rows} " + (f"pieces:{piece_len} " if piece_len else "")
                + f"params:{len(params)} time:{seconds:.2f}s")
    ttt_forward = lora_forward_of(run, net) if hp.ttt_enabled and hp.ttt_method == "lora" else None
    net.looping = initial_looping
    return ttt_forward


def warm_up_evaluation(run, model):
    """EVAL_ONLY_QUANTIZED_PATH and FINISH_FROM, which train nothing: the evaluation graphs of the loaded weights'
    layout, built before the evaluation clock starts. Returns the model with its per-document TTT forward."""
    start = time.perf_counter()
    with compile_failures_named(run, before="the evaluation"):
        ttt_forward = warm_evaluation_graphs(run, model, {model.net.looping}, model.net.looping)
    run.timings["untimed_warmup_s"] = time.perf_counter() - start
    log_compiled_graphs(run, "warmup")
    return model._replace(ttt_forward=ttt_forward)


def ttt_training_passes(run, model):
    """(rows per rank, row length, piece length, trained parameters) of each training pass TTT makes through the
    compiled model (the shapes of adapt_on_chunk)."""
    hp, passes, seq_len = run.hp, [], run.eval_seq_len
    shape_of = lambda steps: (-(-steps.rows // run.world_size), steps.row_len(seq_len), seq_len if steps.spans else 0)
    if hp.ttt_enabled and hp.ttt_method == "chunk":
        passes.append((*shape_of(chunk_ttt_steps(hp, seq_len)), ttt_parameters(model.forward, hp)))
    if hp.ttt_enabled and hp.phased_ttt_enabled:  # the global SGD: chunk TTT's parameters, or all with LoRA TTT
        params = ttt_parameters(model.forward, hp) if hp.ttt_method == "chunk" else list(model.net.parameters())
        passes.append((*shape_of(global_sgd_steps(hp, seq_len)), params))
    return list({tuple(shape): (*shape, params) for *shape, params in passes}.values())


def timed_synthetic_pass(run, forward, rows, seq_len, backward=False, piece_len=0):
    """Seconds of one pass of the compiled model over `rows` random sequences (the per-token losses, summed for the
    backward as TTT sums them), waited for; `piece_len`: see GPT.hidden_states."""
    start = time.perf_counter()
    tokens = torch.randint(run.hp.vocab_size, (rows, seq_len + 1), device=run.device)  # synthetic tokens
    with run.autocast():
        losses = forward(tokens[:, :-1], tokens[:, 1:], reduction="none", piece_len=piece_len)
    if backward:
        losses.float().sum().backward()
    synchronize(run)
    return time.perf_counter() - start


CALIBRATION_MARGIN = (1.25, 1.0)  # the reserve: the measured calibration time x 1.25, plus 1 s for the all-reduce


def calibration_reserve(hp, seconds_per_batch):
    """(reserve, measured need) in seconds: GPTQ_CALIBRATION_BATCHES at the measured seconds per global batch, with
    the margin; never less than GPTQ_RESERVE_SECONDS."""
    scale, slack = CALIBRATION_MARGIN
    needed = hp.gptq_calibration_batches * seconds_per_batch * scale + slack
    return max(hp.gptq_reserve_seconds, needed), needed


def hessians_of_batch(run, net, loader, step):
    """GPTQ's Hessians of this rank's micro-batches of the training batch of `step` (not yet summed over ranks)."""
    batches = (loader.batch(step, micro, run.device).inputs for micro in range(run.grad_accum_steps))
    return collect_hessians(net, batches, run.autocast, loader.piece_len)


def reserve_calibration_time(run, data, net):
    """Before the clock, with GPTQ on training batches under a cap: times GPTQ's calibration on one training batch as
    `calibrate` reads it (the second pass, after any first-call cost; the weights are only read) and returns the
    settings with the reserve that ends training early enough for calibration to read its training batches inside
    MAX_WALLCLOCK_SECONDS. The ranks agree on the slowest."""
    hp = run.hp
    if not (hp.gptq and hp.gptq_calibration == "train" and hp.max_wallclock_seconds):
        return hp
    initial_looping = net.looping  # timed in the layout calibration will see
    net.looping = initial_looping or looping_due(hp, hp.iterations, training_budget_ms(hp))
    hessians_of_batch(run, net, data.train_loader, 0)
    synchronize(run)
    start = time.perf_counter()
    hessians_of_batch(run, net, data.train_loader, 1)
    synchronize(run)
    seconds = all_reduce(torch.tensor(time.perf_counter() - start, device=run.device), dist.ReduceOp.MAX).item()
    net.looping = initial_looping
    run.timings["calibration_batch_s"] = seconds
    reserve, needed = calibration_reserve(hp, seconds)
    run.log(f"gptq_reserve: {seconds:.3f}s per batch x {hp.gptq_calibration_batches} x {CALIBRATION_MARGIN[0]} + "
            f"{CALIBRATION_MARGIN[1]:.0f}s = {needed:.1f}s; GPTQ_RESERVE_SECONDS={hp.gptq_reserve_seconds:g}; "
            f"reserved:{reserve:.1f}s")
    if reserve >= hp.max_wallclock_seconds:
        raise ConfigError(f"GPTQ calibration needs {reserve:.1f}s of MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds:g}"
                          f", leaving no time to train: lower GPTQ_CALIBRATION_BATCHES or raise the cap")
    return dataclasses.replace(hp, gptq_reserve_seconds=reserve)


@contextlib.contextmanager
def compile_failures_named(run, before="training"):
    """A graph torch.compile cannot build in the warmup (a graph break under fullgraph, a FlashAttention build that
    does not register its kernels for torch.compile, an inductor failure) stops the run before training (or, for a
    run that trains nothing, before the evaluation), naming the settings that avoid it, not in a compiler traceback."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as error:
        avoid = "COMPILE=0 (eager)"
        if run.attention_name != "sdpa":
            avoid += f", or ATTN_BACKEND=sdpa if the trace stops in {run.attention_name}"
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"torch.compile failed in the warmup, before {before} ({type(error).__name__}: "
                          f"{first_line}); "
                          f"set {avoid}; TORCH_LOGS=graph_breaks shows where") from error


def compiled_graphs():
    """Graphs torch.compile has captured in this process (one per layout, shape or mode it met)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def log_compiled_graphs(run, phase):
    """`compile: after:<phase> graphs:N` since the model was built. The warmup compiles every graph of the run
    (warmup and warm_evaluation_graphs); a count that grows after it means a compile on the clock."""
    if run.use_compile:
        graphs = compiled_graphs() - run.graphs_before
        run.log(f"compile: after:{phase} graphs:{graphs}")
        if phase == "warmup":
            run.graphs_after_warmup = graphs
        elif graphs > run.graphs_after_warmup:
            run.log(f"warning: {graphs - run.graphs_after_warmup} graph(s) compiled after the warmup, by the end of "
                    f"{phase}, on the clock; TORCH_LOGS=recompiles shows why")


def benchmark(run, data, model):
    """BENCHMARK_STEPS=N: after the untimed warmup, N timed steps on training data in each training layout (without
    and with depth recurrence), and with TRAIN_SEQ_SCHEDULE at each stage's piece length; logs ms/step, tokens/s per
    GPU, MFU and peak memory. Nothing is exported or scored."""
    hp = run.hp
    lengths = list(dict.fromkeys(length for _, length in hp.train_seq_stages)) or [data.train_loader.piece_len]
    for piece_len, looping in itertools.product(lengths, [False, True] if hp.num_loops else [False]):
        model.net.looping = looping
        # untimed: the first step of a shape may still compile
        train_step(run, model, data.train_loader, 0, 1.0, piece_len)
        synchronize(run)
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        start = time.perf_counter()
        for step in range(1, hp.benchmark_steps + 1):
            train_step(run, model, data.train_loader, step, 1.0, piece_len)
        synchronize(run)
        step_ms = 1000 * (time.perf_counter() - start) / hp.benchmark_steps
        tokens_per_s = hp.train_batch_tokens / step_ms * 1000
        flops_per_s = tokens_per_s * training_flops_per_token(model.net, piece_len or hp.train_seq_len)
        memory = (f"peak_memory_allocated:{torch.cuda.max_memory_allocated(run.device) // 2**20}MiB"
                  if run.device.type == "cuda" else "")
        fields = (f"benchmark: looping:{looping} steps:{hp.benchmark_steps} ms_per_step:{step_ms:.2f}",
                  f"tokens_per_s_per_gpu:{tokens_per_s / run.world_size:.0f}",
                  mfu_field(run, flops_per_s).strip(), memory,
                  f"pieces:{piece_len}" if hp.train_seq_stages else "")
        run.log(" ".join(filter(None, fields)))


def run_validation(run, data, model):
    """The plain evaluation (non-overlapping TRAIN_SEQ_LEN windows) used during training and for the round-trip gap."""
    hp = run.hp
    return evaluate(model.forward, data.val_tokens, data.target_bytes, hp.train_seq_len, hp.train_seq_len,
                    hp.val_batch_size, run.rank, run.world_size, run.device, run.autocast)


# Dense bf16 peak per device (no sparsity), for the MFU estimate; matched against the CUDA device name.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def training_flops_per_token(model, seq_len, looping=None):
    """Forward + backward FLOPs per token: 6 x the matrix weights a token passes through (a looped layer once per
    pass; the output head and the bigram's and value embeddings' projections once) plus attention, 6 x seq_len x
    width per layer pass (PaLM's 12 L T d, halved because causal attention skips the upper triangle). `looping`:
    the layout (the model's current one unless given)."""
    passes = Counter(model.layer_order(looping))
    weights = lambda module: sum(m.weight.numel() for m in module.modules() if isinstance(m, CastedLinear))
    block_weights = sum(count * weights(model.blocks[layer]) for layer, count in passes.items())
    tied_head = model.tok_emb.weight.numel() if model.lm_head is None else 0
    outside_blocks = weights(model) - weights(model.blocks) + tied_head
    width = model.tok_emb.weight.size(1)
    return 6 * (block_weights + outside_blocks) + 6 * sum(passes.values()) * seq_len * width


def mfu_field(run, flops_per_s):
    """`mfu:X% ` against the devices' dense bf16 peak, or nothing where the peak is unknown (the CPU)."""
    peak = PEAK_BF16_FLOPS.get(next((key for key in PEAK_BF16_FLOPS if key in run.device_name), None))
    return f"mfu:{100 * flops_per_s / (peak * run.world_size):.1f}% " if peak else ""


def throughput(run, net, clock, step_avg_ms):
    """tokens/s and MFU over the steps so far, each step's FLOPs at the layout and piece length it ran (the steps
    before the recurrence and a schedule's short stages cost less), and the training time left with its ETA."""
    hp = run.hp
    tokens_per_s = hp.train_batch_tokens / step_avg_ms * 1000
    flops = hp.train_batch_tokens * sum(steps * training_flops_per_token(net, reach, looping)
                                        for (looping, reach), steps in clock.shapes.items())
    mfu = mfu_field(run, flops / (clock.elapsed_ms / 1000))  # elapsed > 0, as step_avg_ms above
    remaining_ms = (hp.iterations - clock.step) * step_avg_ms
    if hp.max_wallclock_seconds > 0:
        remaining_ms = min(remaining_ms, max(training_budget_ms(hp) - clock.elapsed_ms, 0.0))
    eta = time.strftime("%H:%M:%S", time.localtime(time.time() + remaining_ms / 1000))
    return f"tok_s:{tokens_per_s:.0f} {mfu}remaining:{remaining_ms / 1000:.0f}s eta:{eta}"


@dataclasses.dataclass
class TrainingClock:
    """The timed loop's state. `train_ms` is training time up to the last off-clock pause, `since` when the clock
    resumed; `elapsed_ms` is the time the ranks agreed on at the last step (MAX), `stop_after` the step the predictive
    stop chose; `nonfinite` a flag on the device: any non-finite loss since the last check; `piece_len` the packed
    rows' longest piece and `changed_at` the step of its last change after step 0 (TRAIN_SEQ_SCHEDULE); `shapes`
    the steps taken in each (layout, attention's reach), which the MFU counts."""
    step: int = 0
    train_ms: float = 0.0
    elapsed_ms: float = 0.0
    since: float = 0.0
    stop_after: Optional[int] = None
    lr_scale: float = 1.0
    qat_on: bool = False
    grown_taps: int = 0
    nonfinite: Optional[torch.Tensor] = None
    piece_len: int = 0
    changed_at: Optional[int] = None
    shapes: Counter = dataclasses.field(default_factory=Counter)

    def pause(self, run):
        synchronize(run)
        self.train_ms += 1000.0 * (time.perf_counter() - self.since)

    def resume(self, run):
        synchronize(run)
        self.since = time.perf_counter()


def train(run, data, model):
    """The timed loop. The clock runs only during training steps; validation pauses it. Ranks agree on the elapsed
    time (MAX), so the LR, the recurrence switch and the stop are the same decision everywhere. The stop is
    predictive: training ends before a step would cross MAX_WALLCLOCK_SECONDS. A SIGINT/SIGTERM stops every rank at
    the same step (the flag travels with the elapsed time) with the raw weights saved; a non-finite loss stops the
    run at the next check (a log step, or every NONFINITE_CHECK_EVERY steps), read off a flag kept on the device."""
    hp = run.hp
    run.average = WeightAverage(model.net, hp)  # the run's: a failure applies it before saving
    clock = TrainingClock(grown_taps=max(model.net.kernel_sizes(), default=0),  # read once: the masks are on the device
                          nonfinite=torch.zeros((), dtype=torch.bool, device=run.device),
                          piece_len=0 if hp.train_seq_stages else hp.piece_len)  # a schedule logs its first stage
    # PR_EVERY's fixed batch: 4 training sequences (the diagnostics read what the model sees, never validation)
    pr_tokens = data.train_loader.batch(0, 0)[0][:4].to(run.device) if hp.pr_every else None
    synchronize(run)
    run.cluster.clock.restart()
    run.training_began, run.signals.deferred = True, True
    clock.since = time.perf_counter()
    while True:
        last_step = clock.step in (hp.iterations, clock.stop_after)
        validate = last_step or (hp.val_loss_every > 0 and clock.step % hp.val_loss_every == 0)
        diagnose = hp.pr_every > 0 and clock.step % hp.pr_every == 0
        if validate or diagnose:
            off_the_clock(run, data, model, clock, last_step, validate, pr_tokens if diagnose else None)
        if last_step:
            break
        scheduled_events(run, model, clock)
        timed_step(run, data, model, clock)
    run.cluster.clock.collect()  # the last step's exchange, still in flight
    log_compiled_graphs(run, "training")
    log_end_of_training(run, model, clock)


def off_the_clock(run, data, model, clock, last_step, validate, pr_tokens):
    """What pauses the clock: the participation-ratio diagnostics, the end of training (the check for a non-finite
    loss, the averaged weights applied, the raw weights saved, QAT off), and validation."""
    hp, log = run.hp, run.log
    clock.pause(run)
    if pr_tokens is not None and run.rank == 0:
        prs = activation_prs(model.net, pr_tokens, run.autocast)
        log(f"pr: step:{clock.step} " + " ".join(f"{kind}:" + "/".join(f"{v:.1f}" for v in values)
                                                 for kind, values in prs.items()))
    live = None
    if last_step:
        check_finite(run, clock.nonfinite, clock.step, clock.lr_scale)
        if clock.qat_on:
            set_qat(model.net, hp, on=False)  # evaluation and export see the plain weights
        live = run.average.live_copy() if validate else None
        log(run.average.apply())  # what is evaluated and exported from here on
        save_raw_weights(run)  # before anything else can fail
        run.signals.deferred = False
    if validate:
        start = time.perf_counter()
        val_loss, val_bpb, _ = run_validation(run, data, model)
        seconds = time.perf_counter() - start
        # The last step line scores the live weights, as in the challenge's scripts.
        live_loss, live_bpb = (val_loss, val_bpb) if live is None else score_live_weights(run, data, model, live)
        run.results.update(live_val_loss=live_loss, live_val_bpb=live_bpb)
        log(f"step:{clock.step}/{hp.iterations} val_loss:{live_loss:.4f} val_bpb:{live_bpb:.4f} "
            f"train_time:{clock.train_ms:.0f}ms step_avg:{clock.train_ms / max(clock.step, 1):.2f}ms")
        if live is not None:  # the current records' name for the score of what is exported
            log(f"pre-quantization post-{hp.weight_averaging.replace('_', '-')} val_loss:{val_loss:.8f} "
                f"val_bpb:{val_bpb:.8f} eval_time:{1000 * seconds:.0f}ms")
        run.results.update(pre_quant_val_loss=val_loss, pre_quant_val_bpb=val_bpb)
    clock.resume(run)


def score_live_weights(run, data, model, live):
    """(val_loss, val_bpb) of the live weights `live`, loaded in place of the average, which is put back after."""
    with torch.no_grad():
        for p, value in zip(run.average.params, live):
            p.copy_(value)
    try:
        val_loss, val_bpb, _ = run_validation(run, data, model)
    finally:
        run.average.apply()
    return val_loss, val_bpb


def scheduled_events(run, model, clock):
    """What the schedule switches on before a step: kernel growth, the packed rows' piece length, the recurrence,
    the LR scale, and late QAT."""
    hp, log, net, step, elapsed_ms = run.hp, run.log, model.net, clock.step, clock.elapsed_ms
    taps = kernel_taps_due(hp, step, elapsed_ms)
    if taps is not None and taps > clock.grown_taps:
        net.grow_kernels(taps)
        clock.grown_taps = taps
        if hp.kernel_stage_restarts:  # neon213 rebuilt both optimizers at every stage
            model.optimizers.reset_state()
        log(f"kernel_growth: taps:{taps} at step:{step} train_time:{elapsed_ms:.0f}ms sizes:{net.kernel_sizes()} "
            f"model_params:{count_parameters(net)[0]}"
            + (" optimizers:restarted" if hp.kernel_stage_restarts else ""))
    piece_len = piece_len_due(hp, step, elapsed_ms)
    if piece_len != clock.piece_len:  # PR #2014's log lines
        clock.piece_len = piece_len
        log(f"growth_stage:seq_len:{piece_len} progress:{schedule_share(hp, step, elapsed_ms):.3f} step:{step}")
        if hp.seq_change_warmup_steps and step > 0:
            clock.changed_at = step
            log(f"growth_stage_rewarmup:start step:{step} steps:{hp.seq_change_warmup_steps} seq_len:{piece_len}")
    if not net.looping and looping_due(hp, step, elapsed_ms):
        net.looping = True
        log(f"recurrence: activated at step:{step} train_time:{elapsed_ms:.0f}ms "
            f"layers:{','.join(map(str, net.layer_order()))}")
    clock.lr_scale = lr_multiplier(hp, step, elapsed_ms)
    if not clock.qat_on and clock.lr_scale < hp.qat_start_lr_scale:
        run.qat_k_scale = qat_k_scale(run, net)
        set_qat(net, hp, on=True, k_scale=run.qat_k_scale)
        clock.qat_on = True
        log(f"qat: enabled at step:{step} lr_scale:{clock.lr_scale:.4f} grid:{hp.quant_clip} "
            f"k_scale:{run.qat_k_scale:.3f}")


def timed_step(run, data, model, clock):
    """One optimizer step on the clock, the weight average's update, the ranks' agreement on the elapsed time (and
    on a stop signal), the step line, and the predictive stop."""
    hp, log = run.hp, run.log
    local_loss = train_step(run, model, data.train_loader, clock.step, clock.lr_scale, clock.piece_len,
                            lr_rewarm(hp, clock.step, clock.changed_at))
    clock.shapes[model.net.looping, clock.piece_len or hp.train_seq_len] += 1  # for the MFU
    clock.nonfinite |= ~torch.isfinite(local_loss)
    step = clock.step = run.steps_done = clock.step + 1
    run.average.update(step, clock.lr_scale)
    logged = hp.train_log_every > 0 and (step <= 10 or step % hp.train_log_every == 0 or step == hp.iterations)
    if logged:
        synchronize(run)  # a step line's clock is exact; on other steps the host runs ahead, never waiting
    elapsed_ms, signalled, clock_step = run.cluster.clock.agree(
        clock.train_ms + 1000.0 * (time.perf_counter() - clock.since), float(run.signals.received is not None), step,
        now=logged)
    clock.elapsed_ms, step_avg = elapsed_ms, elapsed_ms / max(clock_step, 1)
    if logged or step % NONFINITE_CHECK_EVERY == 0:
        check_finite(run, clock.nonfinite, step, clock.lr_scale)
    if logged:
        # The mean over the global batch: every rank's micro-batches have the same size.
        train_loss = all_reduce(local_loss, dist.ReduceOp.SUM).item() / run.world_size
        # The challenge's step line exactly (parsers anchor on "step_avg:...ms" at its end); ours follow it.
        log(f"step:{step}/{hp.iterations} train_loss:{train_loss:.4f} train_time:{elapsed_ms:.0f}ms "
            f"step_avg:{step_avg:.2f}ms")
        log(f"throughput: step:{step} {throughput(run, model.net, clock, step_avg)}")
    if signalled:  # every rank stops at this step; conclude_failure applies the average and saves the weights
        run.results.update(train_time_ms=elapsed_ms)
        raise Interrupted(run.signals.received or signal.SIGTERM, step)  # a rank that was not signalled stops too
    # Predictive: stop before the next step would end past the cap (counted from the step the clock agreed on).
    cap_ms = training_budget_ms(hp)
    if cap_ms > 0 and clock.stop_after is None and elapsed_ms + (step - clock_step + 1) * step_avg > cap_ms:
        clock.stop_after = step
        log(f"stopping_early: wallclock_cap train_time:{elapsed_ms:.0f}ms step:{step}/{hp.iterations}")


def log_end_of_training(run, model, clock):
    run.results.update(steps=clock.step, train_time_ms=clock.train_ms, step_avg_ms=clock.train_ms / max(clock.step, 1))
    run.log(f"optimizer_state: muon_momentum_bytes_per_rank:{model.optimizers.muon.momentum_bytes()} "
            f"adamw_state_bytes:{model.optimizers.adam_state_bytes()}")
    if run.device.type == "cuda":
        run.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")


NONFINITE_CHECK_EVERY = 100  # steps between the checks for a non-finite loss when no step line is logged


def check_finite(run, nonfinite, step, lr_scale):
    """A NaN or inf loss on any rank since the last check ends the run: it must never become an artifact or a score."""
    if all_reduce(nonfinite.float(), dist.ReduceOp.MAX).item() > 0:
        hp = run.hp
        lrs = " ".join(f"{name}:{getattr(hp, name) * lr_scale:.3g}" for name in
                       ("matrix_lr", "scalar_lr", "tied_embed_lr" if hp.tie_embeddings else "embed_lr"))
        raise RunError(f"train_loss is not finite by step {step} (lr_scale:{lr_scale:.4f} {lr_scale and lrs} "
                       f"grad_clip_norm:{hp.grad_clip_norm}); the run stops with no artifact and no score: lower the "
                       f"learning rates or set GRAD_CLIP_NORM")


def save_raw_weights(run):
    """The fp32 weights that would be exported (the average, once applied), saved as soon as training ends or fails:
    a crash or signal later loses nothing, and FINISH_FROM=<this file> finishes the run from them."""
    if run.rank == 0:
        state = dict(model=run.net.state_dict(), step=run.steps_done, train_time_ms=run.results.get("train_time_ms"),
                     run_id=run.run_id, config_hash=run.config_hash)
        try:
            write_atomically(run.raw_weights_path, lambda f: torch.save(state, f), "the raw weights")
        except RunError as error:  # logs/ cannot take them (a full disk): the temporary folder may
            fallback = os.path.join(tempfile.gettempdir(), os.path.basename(run.raw_weights_path))
            try:
                write_atomically(fallback, lambda f: torch.save(state, f), "the raw weights")
            except RunError as second:
                raise RunError(f"{error}; and {second}: the weights are lost") from None
            run.log(f"warning: {error}; saved them to {fallback} instead")
            run.raw_weights_path = fallback
        run.log(f"saved_raw_weights:{run.raw_weights_path} step:{run.steps_done}")
    run.raw_saved = True


def load_raw_weights(path):
    """(state dict, metadata) of a raw weights file (a plain state dict is accepted too, with no metadata). Only
    plain tensors are read: a file holding anything else is refused unread, never retried without weights_only."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(f"FINISH_FROM={str(path)!r} holds objects other than tensors; it was refused unread, since "
                          f"loading it could run code. Give the logs/<RUN_ID>_raw.pt file a run wrote") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ConfigError(f"FINISH_FROM={str(path)!r} is damaged or truncated, not a whole torch file "
                          f"({type(error).__name__}); give the logs/<RUN_ID>_raw.pt file a run wrote") from None
    if isinstance(saved, dict) and "model" in saved and isinstance(saved["model"], dict):
        return saved["model"], {k: v for k, v in saved.items() if k != "model"}
    return saved, {}


def finish_from_raw_weights(run, data, model):
    """FINISH_FROM: the weights an interrupted or crashed run saved, instead of training. They must come from the
    same configuration, so that calibration, export and evaluation are those the run would have done. Rank 0 reads
    the file (it wrote it) and sends it to the others, so nodes need no shared disk."""
    hp = run.hp
    state, meta = run.cluster.broadcast(load_raw_weights(hp.finish_from) if run.rank == 0 else None)  # rank 0's disk
    if meta.get("config_hash") != run.config_hash:
        raise ConfigError(f"FINISH_FROM={hp.finish_from!r} was saved by a run of config hash "
                          f"{meta.get('config_hash')}, "
                          f"this run has {run.config_hash}: rerun with the settings of the run that saved it")
    try:
        model.net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(f"FINISH_FROM={hp.finish_from!r} does not fit this model: {error}") from None
    run.steps_done = meta["step"]
    run.raw_weights_path = hp.finish_from  # where the weights are, should this run be cut short too
    run.log(f"finish_from:{hp.finish_from} step:{meta['step']} run_id:{meta['run_id']} (training skipped)")
    val_loss, val_bpb, _ = run_validation(run, data, model)
    average = "" if hp.weight_averaging == "none" else f" post-{hp.weight_averaging.replace('_', '-')}"
    run.log(f"pre-quantization{average} val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} "
            f"(finish_from, step:{meta['step']})")
    train_ms = meta.get("train_time_ms") or 0.0
    run.results.update(pre_quant_val_loss=val_loss, pre_quant_val_bpb=val_bpb, steps=meta["step"],
                       train_time_ms=train_ms, step_avg_ms=train_ms / max(meta["step"], 1))
    run.raw_saved = True


# Which settings shape a tensor, by a part of its name (the first that matches): what to check when an artifact does
# not fit the model that EVAL_ONLY_QUANTIZED_PATH loads it into.
SHAPING_SETTINGS = (
    ("tok_emb", "VOCAB_SIZE, MODEL_DIM"), ("lm_head", "TIE_EMBEDDINGS, VOCAB_SIZE"),
    ("bigram", "BIGRAM_BUCKETS, BIGRAM_DIM"), ("value_embed.", "VE_LAYERS, VE_DIM, VE_PROJ_INIT"),
    ("value_embed_scale", "VE_LAYERS"), ("smear", "SMEAR_GATE, SMEAR_GATE_FORM, GATE_WINDOW"),
    ("attn.c_k", "NUM_KV_HEADS, MODEL_DIM"), ("attn.c_v", "NUM_KV_HEADS, MODEL_DIM"),
    ("attn.gate", "ATTN_GATE, GATE_WINDOW, NUM_HEADS"), ("attn.c_i", "INTENT_GATE"), ("convs", "CONV_K, INTENT_GATE"),
    ("value_residual", "VALUE_RESIDUAL, VALUE_RESIDUAL_FORM"), ("q_gain", "NORM_WEIGHTS, NUM_HEADS"),
    ("norm", "NORM_WEIGHTS"), ("attn_scale", "SUBLAYER_SCALES"), ("mlp_scale", "SUBLAYER_SCALES"),
    ("resid_mix", "RESID_MIX"), ("lane", "PARALLEL_RESIDUALS, PARALLEL_FORM, PARALLEL_START_LAYER, NUM_LAYERS"),
    ("mlp", "MLP_MULT, MLP_ACTIVATION, MLP_CONV_K"),
    ("skip", "UNET_SKIPS, SKIP_GATES, NUM_LAYERS, NUM_LOOPS, LOOP_START, LOOP_END"),
    ("backout", "BACKOUT_LAYER"), ("blocks.", "NUM_LAYERS, MODEL_DIM, NUM_HEADS"), ("", "MODEL_DIM"),
)


def shaping_settings(name):
    return next(settings for part, settings in SHAPING_SETTINGS if part in name)


def check_artifact_fits(model, state, path):
    """A tensor the model lacks or has in another shape, or one it has that the artifact lacks, is refused with the
    settings that shape it: the model is this run's settings, the artifact the training run's."""
    mine = model.state_dict()
    where = f"EVAL_ONLY_QUANTIZED_PATH={path!r}: "
    blocks = lambda names: len({name.split(".")[1] for name in names if name.startswith("blocks.")})
    if blocks(state) != blocks(mine):  # else the first tensor that differs would name the settings of its kind
        raise ConfigError(f"{where}the artifact has {blocks(state)} blocks, this model {blocks(mine)}; set NUM_LAYERS "
                          f"as the run that wrote it did")
    for name, tensor in state.items():
        if name not in mine:
            raise ConfigError(f"{where}the artifact has {name}, which this model has not; set "
                              f"{shaping_settings(name)} as the run that wrote it did")
        if tuple(tensor.shape) != tuple(mine[name].shape):
            raise ConfigError(f"{where}the artifact's {name} is {tuple(tensor.shape)}, this model's "
                              f"{tuple(mine[name].shape)}; set {shaping_settings(name)} as the run that wrote it did")
    for name in mine:
        if name not in state:
            raise ConfigError(f"{where}this model has {name}, which the artifact has not; set "
                              f"{shaping_settings(name)} as the run that wrote it did")


def load_artifact_to_evaluate(run, net):
    """EVAL_ONLY_QUANTIZED_PATH: the artifact is checked against this run's model, and the evaluation phases score it
    with this run's evaluation and TTT settings. Rank 0 reads it and sends it to the others."""
    path = run.hp.eval_only_quantized_path
    blob = run.cluster.broadcast(Path(path).read_bytes() if run.rank == 0 else None)
    try:
        quantized = read_artifact(path, blob)
    except ValueError as error:
        raise ConfigError(f"EVAL_ONLY_QUANTIZED_PATH={path!r}: {error}") from None
    check_artifact_fits(net, dequantize_state_dict(quantized), path)
    export = exported_as(quantized, blob, quantized_tensor_groups(net))
    artifact = Artifact(path, hashlib.sha256(blob).hexdigest(), export)
    code_bytes = len(run.code.counted)
    run.results.update(bytes_code=code_bytes, bytes_model=len(blob), bytes_total=code_bytes + len(blob))
    run.log(f"eval_only: artifact:{path} sha256:{artifact.sha256} bytes_model:{len(blob)} "
            f"bytes_total:{code_bytes + len(blob)} export:{export} (nothing trained, calibrated or exported)"
            + (" ttt_eval_only:1" if run.hp.ttt_eval_only else ""))
    return artifact


SELF_CALIBRATION_BATCH = 8  # sequences sampled together for GPTQ_CALIBRATION=self (the AR self-calibration record's)


@torch.no_grad()
def self_generated_batches(model, hp, bos_id, rank, world_size, device, autocast):
    """GPTQ_CALIBRATION=self (credit: PR #1019's AR self-generated calibration, as in PR #1392): the model samples
    GPTQ_SELF_SEQS sequences of GPTQ_SELF_SEQ_LEN tokens from BOS at GPTQ_SELF_TEMPERATURE, re-reading the whole
    prefix at every step. Batches of SELF_CALIBRATION_BATCH are shared out to the ranks, and batch b is sampled with
    generator seed (SEED, b), so the sequences do not depend on the world size. No training or validation token is
    read. Yields this rank's batches (B, T)."""
    sizes = [min(SELF_CALIBRATION_BATCH, hp.gptq_self_seqs - first)
             for first in range(0, hp.gptq_self_seqs, SELF_CALIBRATION_BATCH)]
    for index in rank_share(list(range(len(sizes))), rank, world_size):
        generator = torch.Generator(device=device).manual_seed(hp.seed * 1_000_003 + index)
        ids = torch.full((sizes[index], 1), bos_id, dtype=torch.long, device=device)
        while ids.size(1) < hp.gptq_self_seq_len:
            with autocast():
                logits = model.logits(ids)[:, -1].float()
            if hp.gptq_self_temperature == 0:
                following = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits / hp.gptq_self_temperature, dim=-1)
                following = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, following], dim=1)
        yield ids


def calibration_batches(run, data, net):
    """(this rank's calibration inputs, a description for the log): GPTQ_CALIBRATION_BATCHES fresh global training
    batches (the steps after the last one trained, split over ranks as in training), or self-generated sequences."""
    hp = run.hp
    if hp.gptq_calibration == "self":
        batches = self_generated_batches(net, hp, data.tokenizer.bos_id(), run.rank, run.world_size,
                                         run.device, run.autocast)
        return batches, (f"self_generated seqs:{hp.gptq_self_seqs} seq_len:{hp.gptq_self_seq_len} "
                         f"temperature:{hp.gptq_self_temperature:g} tokens:{hp.gptq_self_seqs * hp.gptq_self_seq_len}")
    first_step = run.results["steps"]
    batches = (data.train_loader.batch(first_step + step, micro, run.device).inputs
               for step in range(hp.gptq_calibration_batches) for micro in range(run.grad_accum_steps))
    tokens = hp.gptq_calibration_batches * hp.train_batch_tokens
    return batches, f"batches:{hp.gptq_calibration_batches} tokens:{tokens}"


def calibrate(run, data, net):
    """GPTQ's Hessians from the calibration inputs (see calibration_batches), summed over ranks: the same tokens at
    every world size. It runs in the reserve taken off the training budget, and is timed as training."""
    hp = run.hp
    if not hp.gptq:
        return None
    synchronize(run)
    start = time.perf_counter()
    if hp.gptq_calibration == "train" and hp.max_wallclock_seconds:
        hessians, described = hessians_within_the_cap(run, net, data.train_loader, start)
    else:
        batches, described = calibration_batches(run, data, net)
        piece_len = data.train_loader.piece_len if hp.gptq_calibration == "train" else 0  # self-made rows: none
        hessians = collect_hessians(net, batches, run.autocast, piece_len)
        run.timings["training_data_read_until_s"] = run.results["train_time_ms"] / 1000 + time.perf_counter() - start
    for hessian in (hessians or {}).values():
        all_reduce(hessian, dist.ReduceOp.SUM)
    synchronize(run)
    seconds = time.perf_counter() - start
    run.timings["calibration_s"] = seconds
    train_and_calibration = run.results["train_time_ms"] / 1000 + seconds
    run.log(f"gptq_calibration: {described} matrices:{len(hessians or {})} "
            f"time:{seconds:.1f}s train+calibration:{train_and_calibration:.1f}s"
            + (f" of max_wallclock:{hp.max_wallclock_seconds:.0f}s" if hp.max_wallclock_seconds else ""))
    if hessians is None:
        run.log("WARNING: no calibration batch fit in MAX_WALLCLOCK_SECONDS: the weights are quantized without GPTQ; "
                "raise GPTQ_RESERVE_SECONDS or lower GPTQ_CALIBRATION_BATCHES")
    return hessians


def hessians_within_the_cap(run, net, loader, start):
    """GPTQ_CALIBRATION=train under MAX_WALLCLOCK_SECONDS: the calibration batches one at a time, each begun only if
    it would end inside the cap at the slowest batch time seen (the warmup's measurement before the first), so no
    training token is read after the cap, whatever the reserve. The ranks take each decision together. Returns
    (this rank's Hessians or None, a description for the log)."""
    hp, trained = run.hp, run.results["train_time_ms"] / 1000
    per_batch, hessians, used = run.timings.get("calibration_batch_s", 0.0), {}, 0
    for step in range(hp.gptq_calibration_batches):
        over = trained + time.perf_counter() - start + per_batch > hp.max_wallclock_seconds
        if all_reduce(torch.tensor(float(over), device=run.device), dist.ReduceOp.MAX).item():
            break
        batch_start = time.perf_counter()
        for name, hessian in hessians_of_batch(run, net, loader, run.results["steps"] + step).items():
            hessians[name] = hessians[name].add_(hessian) if name in hessians else hessian
        synchronize(run)
        per_batch, used = max(per_batch, time.perf_counter() - batch_start), used + 1
    run.timings["training_data_read_until_s"] = trained + time.perf_counter() - start
    return hessians or None, f"batches:{used}/{hp.gptq_calibration_batches} tokens:{used * hp.train_batch_tokens}"


class Artifact(NamedTuple):
    """What `export` hands to evaluation: the file, the SHA-256 of the bytes written (evaluation scores those bytes,
    nothing else; known on rank 0), its export name (int6_brotli: the round trip's line is named after it), and,
    once `evaluate_artifact` has read it back, the bytes."""
    path: str
    sha256: Optional[str]
    export: str
    blob: Optional[bytes] = None


def export(run, net, hessians):
    """Quantize, compress and write the artifact; account its bytes (this file + the model file) against the limit.
    With SIZE_TARGET_BYTES the clip grid is the finest that fits (quantize_to_fit). `hessians` are GPTQ's (None:
    round to nearest). Returns the Artifact; its SHA-256 is known on rank 0, which wrote it."""
    hp, log = run.hp, run.log
    start = time.perf_counter()
    path, sha256 = os.path.join("logs", f"{run.run_id}_model.{export_name(hp).split('_')[0]}.ptz"), None
    bad = [name for name, tensor in net.state_dict().items() if not torch.isfinite(tensor).all()]
    if bad:  # every rank holds the same weights, so every rank stops here
        raise RunError(f"the trained weights are not finite ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                       f"no artifact is written")
    if run.rank == 0:
        code_bytes, state, groups = len(run.code.counted), net.state_dict(), quantized_tensor_groups(net, hp)
        protected = awq_lite_groups(state, groups, hessians, calls_per_forward(net, groups), hp)
        quantized, blob, k_scale = quantize_to_fit(state, groups, hp, hessians, code_bytes, log, run.qat_k_scale,
                                                   protected)
        total = code_bytes + len(blob)
        run.timings["quantize_s"] = time.perf_counter() - start
        model_bytes = write_artifact(path, blob)
        sha256 = hashlib.sha256(blob).hexdigest()  # evaluation scores these bytes, nothing else
        others = compressed_sizes_for_log(quantized, hp)
        log(quantization_line(hp, k_scale, hessians is not None, protected, run.timings["quantize_s"]))
        log(f"compressed_model_bytes: {hp.compressor}:{model_bytes} (shipped) "
            + " ".join(f"{name}:{size}" for name, size in others.items()) + f" byte_shuffle:{hp.byte_shuffle}")
        log(f"artifact: bytes_code:{code_bytes} bytes_model:{model_bytes} bytes_total:{total} "
            f"limit:{ARTIFACT_LIMIT_BYTES} headroom:{ARTIFACT_LIMIT_BYTES - total}")
        log_challenge_sizes(run, net, quantized, blob, code_bytes)
        if total > ARTIFACT_LIMIT_BYTES:
            log("!" * 100 + f"\nWARNING: ARTIFACT OVER THE LIMIT by {total - ARTIFACT_LIMIT_BYTES} bytes: "
                f"{total} > {ARTIFACT_LIMIT_BYTES}. This run cannot be a submission.\n" + "!" * 100)
        run.results.update(bytes_code=code_bytes, bytes_model=model_bytes, bytes_total=total)
    if run.distributed:
        dist.barrier()
    run.timings["export_s"] = time.perf_counter() - start
    log(f"export_time:{run.timings['export_s']:.1f}s")
    return Artifact(path, sha256, export_name(hp))


def tensor_bytes(tree):
    """Bytes of every tensor in a nested dict/tuple/list (the challenge's payload count)."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return sum(tensor_bytes(value) for value in values)


def log_challenge_sizes(run, net, quantized, blob, code_bytes):
    """The baseline's size lines, spelled as its parsers read them, with the export named as in the newer records
    (int8+zlib for the baseline's, int6+brotli for the default): the fp32 file, the code, and the artifact."""
    state = net.state_dict()
    raw = io.BytesIO()
    torch.save(state, raw)
    label = export_name(run.hp).replace("_", "+")
    payload = tensor_bytes(quantized)
    decompressed = int.from_bytes(blob[6:14], "little")  # the header's payload size: the quantized torch file
    run.log(f"Serialized model: {raw.tell()} bytes")
    run.log(f"Code size: {code_bytes} bytes")
    run.log(f"Total submission size: {raw.tell() + code_bytes} bytes")
    run.log(f"Serialized model {label}: {len(blob)} bytes (payload:{payload} raw_torch:{decompressed} "
            f"payload_ratio:{tensor_bytes(state) / max(payload, 1):.2f}x)")
    run.log(f"Total submission size {label}: {len(blob) + code_bytes} bytes")


def log_final(run, data, name, result, seconds, extra=""):
    """One evaluation's lines: rounded, then `_exact` to 8 decimals. The last `_exact` line of a log is its score, so
    an evaluation that scored other than every validation target is refused before it writes one."""
    val_loss, val_bpb, scored = result
    expected = data.val_tokens.numel() - 1
    if scored != expected:
        raise RunError(f"{name} scored {scored} validation targets, not {expected}; its score is not logged")
    run.scored_targets[name] = scored
    run.log(f"{name} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} {extra}eval_time:{1000 * seconds:.0f}ms")
    run.log(f"{name}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    run.results.update({f"{name}_val_loss": val_loss, f"{name}_val_bpb": val_bpb, "val_loss": val_loss,
                        "val_bpb": val_bpb})


def evaluate_artifact(run, data, model, artifact):
    """Score exactly what ships: read the file back, dequantize, load strictly (every tensor is replaced). The eval
    clock starts here and covers everything that follows, compilation included. Returns the artifact with the bytes
    read back."""
    synchronize(run)
    run.eval_start = start = time.perf_counter()
    # Rank 0 wrote the file; it sends the bytes it reads back to the others, so nodes need no shared disk. They must
    # be the bytes this run wrote: another process writing to the same path is caught here.
    blob, problem = None, None
    if run.rank == 0:
        blob = Path(artifact.path).read_bytes()
        if hashlib.sha256(blob).hexdigest() != artifact.sha256:
            blob, problem = None, (f"{artifact.path} is not the artifact this run wrote (its SHA-256 changed "
                                   f"after the write: another process wrote to it); nothing was scored")
    blob, problem = run.cluster.broadcast((blob, problem))
    if problem:
        raise RunError(problem)
    model.net.load_state_dict(dequantize_state_dict(read_artifact(artifact.path, blob)), strict=True)
    run.log(f"artifact_read_time:{1000 * (time.perf_counter() - start):.0f}ms")  # decompression, on the eval clock
    artifact = artifact._replace(blob=blob)
    if run.hp.ttt_eval_only:
        return artifact
    result = run_validation(run, data, model)
    synchronize(run)
    gap = result[1] - run.results.get("pre_quant_val_bpb", math.nan)  # none when EVAL_ONLY_QUANTIZED_PATH
    log_final(run, data, f"final_{artifact.export}_roundtrip", result, time.perf_counter() - start,
              f"quant_gap_bpb:{gap:+.4f} " if math.isfinite(gap) else "")
    if math.isfinite(gap):
        run.results["quant_gap_bpb"] = gap
    return artifact


def evaluate_sliding(run, data, model):
    hp = run.hp
    if hp.eval_stride == 0 or hp.ttt_eval_only:
        return
    start = time.perf_counter()
    result = evaluate(model.forward, data.val_tokens, data.target_bytes, run.eval_seq_len, hp.eval_stride,
                      hp.val_batch_size, run.rank, run.world_size, run.device, run.autocast, data.doc_starts)
    synchronize(run)
    log_final(run, data, "final_sliding_window", result, time.perf_counter() - start,
              f"seq_len:{run.eval_seq_len} stride:{hp.eval_stride} ")


def evaluate_ttt(run, data, model):
    hp = run.hp
    if not hp.ttt_enabled:
        return None
    run.log(f"ttt: method:{hp.ttt_method} ({'per-document LoRA' if hp.ttt_method == 'lora' else 'chunk SGD'}) "
            f"optimizer:{ttt_optimizer_of(hp)}")
    return (evaluate_lora_ttt if hp.ttt_method == "lora" else evaluate_chunk_ttt)(run, data, model)


def evaluate_lora_ttt(run, data, model):
    hp = run.hp
    start = time.perf_counter()
    budget_left = lambda: hp.eval_budget_seconds - (time.perf_counter() - run.eval_start)
    ttt_forward = model.ttt_forward if model.ttt_forward is not None else lora_forward_of(run, model.net)  # no warmup
    report = per_document_lora_ttt(LoraTTTModels(model.net, ttt_forward, model.forward), data.val_tokens,
                                   data.target_bytes, hp, run.rank, run.world_size, run.device, run.autocast,
                                   doc_starts_of(data.val_tokens, data.tokenizer.bos_id()), run.log, budget_left)
    synchronize(run)
    log_final(run, data, "final_ttt", report.result, time.perf_counter() - start,
              f"documents:{report.per_document.size(0)} rounds:{report.rounds} adapted_rounds:{report.adapted_rounds} "
              f"phases:{report.phases} ")
    return dict(chunks=report.rounds, adapted=report.adapted_rounds, phases=report.phases)


def lora_forward_of(run, net, backend="inductor"):
    """The forward per-document TTT calls: the model compiled with dynamic shapes (the batch and the context length
    change from chunk to chunk), its graph built here on synthetic tokens at the shortest and longest context (one
    graph: it always runs with gradients on), as the record warms its TTT graph; or the eager model, with COMPILE=0
    or when torch.compile cannot build it (the same math, logged). The tests compile with backend="aot_eager"."""
    if not run.use_compile:
        return net
    hp, start = run.hp, time.perf_counter()
    # Its graphs share the model forward's cache with training's and evaluation's (COMPILE_GRAPH_LIMIT).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_GRAPH_LIMIT)
    # Only the batch and the lengths vary: the model's float constants (scales, slopes, the softcap) stay constants,
    # which dynamic=True would trace as symbols; that halves the build on the CPU (aot_eager: 46 s -> 28 s).
    torch._dynamo.config.specialize_float = True
    compiled = torch.compile(net, dynamic=True, backend=backend)
    adapters = DocumentAdapters(net, hp.ttt_batch_size, hp, torch.Generator().manual_seed(0)).to(run.device)
    for param in net.parameters():
        param.requires_grad_(False)  # as while the adapters train
    try:
        chunk_sizes = {hp.ttt_chunk_size} | {chunk for _, chunk in hp.short_score_first_steps}
        for width in sorted({min(chunk, ttt_context(hp)) for chunk in chunk_sizes} | {ttt_context(hp)}):
            tokens = torch.randint(hp.vocab_size, (hp.ttt_batch_size, width + 1), device=run.device)  # synthetic
            with run.autocast():
                compiled(tokens[:, :-1], tokens[:, 1:], reduction="none", adapters=adapters).float().mean().backward()
    except torch._dynamo.exc.TorchDynamoException as error:
        run.log(f"warning: torch.compile cannot build the per-document TTT forward ({type(error).__name__}); it runs "
                f"eager, the same math")
        return net
    finally:
        for param in net.parameters():
            param.requires_grad_(True)
    run.log(f"ttt_lora: compiled (dynamic shapes) time:{time.perf_counter() - start:.1f}s")
    return compiled


def evaluate_chunk_ttt(run, data, model):
    hp = run.hp
    start = time.perf_counter()
    budget_left = lambda: hp.eval_budget_seconds - (time.perf_counter() - run.eval_start)
    phases = []
    if hp.phased_ttt_enabled:  # the record's fields (boundaries in documents), then the phase ends in targets
        doc_starts = doc_starts_of(data.val_tokens, data.tokenizer.bos_id())
        kept = phase_boundaries(doc_starts, data.val_tokens.numel() - 1, hp.phased_ttt_prefix_docs,
                                hp.phased_ttt_num_phases)
        phases, total_docs = [end for _, end in kept], len(set(doc_starts) | {0})
        run.log(f"ttt_phased: total_docs:{total_docs} prefix_docs:{hp.phased_ttt_prefix_docs} "
                f"suffix_docs:{max(total_docs - hp.phased_ttt_prefix_docs, 0)} num_phases:{len(phases)} "
                f"boundaries:{[documents for documents, _ in kept]} ends:{phases}")
    result, per_segment, adapted = score_first_ttt(
        model.forward, data.val_tokens, data.target_bytes, hp, run.rank, run.world_size, run.device, run.autocast,
        data.doc_starts, run.log, budget_left, phases)
    synchronize(run)
    log_final(run, data, "final_ttt", result, time.perf_counter() - start,
              f"chunks:{len(per_segment)} adapted:{adapted} stride:{hp.eval_stride or run.eval_seq_len} ")
    return dict(chunks=len(per_segment), adapted=adapted, phases=len(phases))


def scored_windows(hp, eval_seq_len):
    """The windows of the last pass that scored in windows (LoRA TTT has a line of its own): EVAL_WINDOWS' (chunk
    TTT scores in the sliding pass's windows, and at stride 0 in EVAL_SEQ_LEN windows), else the round trip's plain
    TRAIN_SEQ_LEN windows, which never isolate documents; TTT_EVAL_ONLY with LoRA TTT runs neither."""
    if switched_on(vars(hp), EVAL_WINDOWS):
        return (f"eval_mode:{'sliding' if hp.eval_stride else 'plain'} seq_len:{eval_seq_len} "
                f"stride:{hp.eval_stride or eval_seq_len} doc_isolated:{hp.eval_doc_isolated}")
    if hp.ttt_eval_only:
        return "eval_mode:ttt_only"
    return f"eval_mode:plain seq_len:{hp.train_seq_len} stride:{hp.train_seq_len} doc_isolated:False"


def log_compliance(run, data, model, ttt_report):
    """The rules of evaluation, checked and stated in the log (parameter-golf issue #1017: causal, normalized,
    score before update, single pass)."""
    hp, log = run.hp, run.log
    expected = data.val_tokens.numel() - 1  # what each final evaluation scored, checked by log_final
    # The eager model: a one-row diagnostic must not compile two more graphs inside the evaluation budget.
    logsumexp, charged = check_normalization(model.net, data.val_tokens, run.eval_seq_len, run.autocast, run.device)
    log(f"compliance: {scored_windows(hp, run.eval_seq_len)} "
        f"targets_scored:{' '.join(f'{n}={c}' for n, c in run.scored_targets.items())} expected:{expected} "
        f"single_pass:yes")
    report = ttt_report  # what TTT adapted, as evaluate_ttt returned it
    if hp.ttt_enabled and hp.ttt_method == "lora":
        log(f"compliance: ttt:score_first method:lora per_document_adapters:reset_each_document "
            f"chunk_size:{hp.ttt_chunk_size} "
            + "".join(f"short_docs_upto_{limit}:{chunk} " for limit, chunk in hp.short_score_first_steps)
            + f"rounds:{report['chunks']} adapted_rounds:{report['adapted']} last_chunk_trained:no "
            f"rank:{hp.ttt_lora_rank} optimizer:{ttt_optimizer_of(hp)} lr:{hp.ttt_adapter_lr:g}"
            + (f" phases:{report['phases']} global_sgd:scored_documents_only" if hp.phased_ttt_enabled else ""))
    elif hp.ttt_enabled:
        log(f"compliance: ttt:score_first method:chunk chunks:{report['chunks']} chunk_tokens:{hp.ttt_chunk_tokens} "
            f"adapted_chunks:{report['adapted']} last_chunk_trained:no "
            f"epochs:{hp.ttt_epochs} params:{hp.ttt_params} optimizer:{ttt_optimizer_of(hp)} lr:{hp.ttt_lr}"
            + (f" phases:{report['phases']} global_sgd:scored_targets_only" if hp.phased_ttt_enabled else ""))
    warmup_data = "synthetic" if hp.eval_only_quantized_path or hp.finish_from else "training_tokens+synthetic"
    log(f"compliance: warmup_data:{warmup_data} validation_seen_before_scoring:never")  # nothing trained: no steps
    if "training_data_read_until_s" in run.timings and hp.gptq_calibration == "train" and hp.max_wallclock_seconds:
        read_until = run.timings["training_data_read_until_s"]  # the last calibration batch read
        log(f"compliance: training_data_read_until:{read_until:.1f}s max_wallclock:{hp.max_wallclock_seconds:g}s "
            f"within_cap:{'yes' if read_until <= hp.max_wallclock_seconds else 'NO'}")
    log(f"compliance: normalization max_abs_logsumexp:{logsumexp:.2e} max_abs_loss_plus_logp:{charged:.2e}")


def log_summary(run, artifact):
    """The closing block: the separate clocks, the artifact, every val_bpb; then the same as one JSON line."""
    synchronize(run)
    run.timings["eval_s"] = time.perf_counter() - run.eval_start
    log_compiled_graphs(run, "evaluation")
    r, t = run.results, run.timings
    r.setdefault("train_time_ms", 0.0), r.setdefault("steps", 0), r.setdefault("step_avg_ms", 0.0)  # EVAL_ONLY_...
    t.setdefault("export_s", 0.0)
    run.log(f"timing: untimed_warmup:{t.get('untimed_warmup_s', 0):.1f}s train:{r['train_time_ms'] / 1000:.1f}s "
            f"gptq_calibration:{t.get('calibration_s', 0):.1f}s export:{t['export_s']:.1f}s "
            f"(quantize:{t.get('quantize_s', 0):.1f}s) eval:{t['eval_s']:.1f}s "
            f"(budget {run.hp.eval_budget_seconds:.0f}s)")
    bpb = lambda key: f"{r[key]:.4f}" if key in r else "-"
    header = "=" * 40 + f" summary: {run.run_id} " + "=" * 40
    run.log("\n".join([
        header,
        f"train     {r['train_time_ms'] / 1000:8.1f} s  {r['steps']} steps at {r['step_avg_ms']:.2f} ms "
        f"(+{t.get('calibration_s', 0):.1f} s GPTQ calibration; {t.get('untimed_warmup_s', 0):.1f} s untimed warmup)",
        f"export    {t['export_s']:8.1f} s  artifact {r.get('bytes_total', 0):,} bytes, "
        f"headroom {ARTIFACT_LIMIT_BYTES - r.get('bytes_total', 0):,}",
        f"eval      {t['eval_s']:8.1f} s  of a {run.hp.eval_budget_seconds:.0f} s budget",
        f"val_bpb   pre-quant {bpb('pre_quant_val_bpb')} "
        f"| round-trip {bpb(f'final_{artifact.export}_roundtrip_val_bpb')} "
        f"| sliding {bpb('final_sliding_window_val_bpb')} | ttt {bpb('final_ttt_val_bpb')}",
        "=" * len(header)]))
    summary = dict(run_id=run.run_id, seed=run.hp.seed, world_size=run.world_size, config_hash=run.config_hash,
                   code_sha256=run.code_sha256, eval_time_s=t["eval_s"], calibration_time_s=t.get("calibration_s", 0),
                   versions=package_versions(),
                   ttt_score_first=run.hp.ttt_enabled,
                   max_wallclock_seconds=None if run.hp.eval_only_quantized_path else run.hp.max_wallclock_seconds,
                   eval_budget_seconds=run.hp.eval_budget_seconds,
                   record={field: getattr(run.hp, f"record_{field}")
                           for field in ("name", "author", "github_id", "blurb")}, **r)
    run.log("summary_json: " + json.dumps(summary, sort_keys=True))


def generate_sample(run, data, artifact):
    """GEN_PROMPT: text sampled from the model read back from the artifact (not the TTT-adapted one), in the log.
    After the summary, so it is on no clock."""
    hp = run.hp
    if not hp.gen_prompt or run.rank != 0:
        return
    model = GPT(hp, run.attention_fn, bos_id=data.tokenizer.bos_id()).to(run.device).eval()
    model.load_state_dict(dequantize_state_dict(read_artifact(artifact.path, artifact.blob)), strict=True)
    # documents start with BOS, as in the shards
    prompt_ids = [data.tokenizer.bos_id()] + data.tokenizer.encode(hp.gen_prompt)
    generator = torch.Generator().manual_seed(hp.seed)
    with run.autocast():
        new_ids = sample_tokens(model, prompt_ids, hp.gen_tokens, hp.gen_temperature, hp.gen_top_k,
                                run.eval_seq_len, generator)
    run.log(f"sample: prompt:{hp.gen_prompt!r} tokens:{hp.gen_tokens} temperature:{hp.gen_temperature} "
            f"top_k:{hp.gen_top_k} seed:{hp.seed}")
    run.log(f"sample_text: {(hp.gen_prompt + data.tokenizer.decode(new_ids))!r}")


def check_record_dir(run):
    """A records folder holds one configuration and one code: refuse, before training, to add a seed whose config
    hash or code differs from the logs already there (rank 0 looks; every rank gets its verdict)."""
    problem = [None]
    folder = Path(run.hp.record_dir) if run.hp.record_dir else None
    if run.rank == 0 and folder is not None:
        try:  # a folder that cannot take the records must fail now, not after training
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write_probe{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            problem[0] = f"RECORD_DIR={run.hp.record_dir!r} is not writable: {error.strerror}"
    if run.rank == 0 and folder is not None and not problem[0]:
        for path in sorted(folder.glob("train_seed*.log")):
            fingerprint = re.search(r"^fingerprint: config_hash:(\S+) code_sha256:(\S+)",
                                    path.read_text(encoding="utf-8"), re.M)
            if fingerprint is None or fingerprint.groups() != (run.config_hash, run.code_sha256):
                problem[0] = (f"RECORD_DIR={run.hp.record_dir!r} already holds {path.name} from another "
                              f"configuration or "
                              f"code (theirs: {fingerprint.groups() if fingerprint else 'no fingerprint'}; this run: "
                              f"{(run.config_hash, run.code_sha256)}); seeds of different runs must not be pooled: "
                              f"use a new RECORD_DIR")
                break
    if run.distributed:
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise ConfigError(problem[0])


def append_index(run, event, **fields):
    """The append-only run index (RECORD_DIR/index.jsonl, else logs/index.jsonl): every seed is written when it is
    launched and again when it finishes, so a crashed or dropped seed stays visible (no cherry-picking)."""
    if run.rank != 0:
        return
    folder = Path(run.hp.record_dir or "logs")
    folder.mkdir(parents=True, exist_ok=True)
    entry = dict(event=event, time=time.strftime("%Y-%m-%dT%H:%M:%S"), run_id=run.run_id, seed=run.hp.seed,
                 config_hash=run.config_hash, code_sha256=run.code_sha256, **fields)
    try:
        with open(folder / "index.jsonl", "a", encoding="utf-8") as index:
            index.write(json.dumps(entry, sort_keys=True) + "\n")
    except OSError as error:
        raise RunError(f"could not append the '{event}' entry to {folder / 'index.jsonl'}: {error.strerror}") from error


def record(run):
    """The end of a seed: the run index; with RECORD_DIR, what only the run knows goes into the records folder: the
    code it counted and its log. `python3 records/make.py RECORD_DIR` derives the rest (submission.json, README)."""
    append_index(run, "finished", val_loss=run.results["val_loss"], val_bpb=run.results["val_bpb"], log=run.log_path)
    if not run.hp.record_dir or run.rank != 0:
        return
    folder = Path(run.hp.record_dir)
    write_atomically(folder / "train_gpt.py", run.code.counted, "the code of the record")
    if run.code.readable and run.code.counted != run.code.source:
        write_atomically(folder / READABLE_CODE_NAME, run.code.source, "the readable source of the record")
    run.log(f"record_dir:{folder} seed:{run.hp.seed} next: python3 records/make.py {folder}")
    write_atomically(folder / f"train_seed{run.hp.seed}.log", Path(run.log_path).read_bytes(), "the seed's log")  # last


def in_phase(run, phase, *inputs):
    """Runs one phase under its name, so that a failure says where it happened (and what did not finish)."""
    run.phase = phase.__name__
    return phase(run, *inputs)


def evaluate_and_conclude(run, data, model, artifact):
    """The evaluation clock's phases (from reading the artifact back to the summary), then the sample."""
    artifact = in_phase(run, evaluate_artifact, data, model, artifact)
    in_phase(run, evaluate_sliding, data, model)
    ttt_report = in_phase(run, evaluate_ttt, data, model)
    in_phase(run, log_compliance, data, model, ttt_report)
    in_phase(run, log_summary, artifact)
    in_phase(run, generate_sample, data, artifact)


def train_and_evaluate(run):
    """One seed: the data, the model, then training (or the weights to finish, or the artifact to evaluate),
    calibration and export, the evaluations, and the records."""
    data = setup(run)
    model = build_model(run, data)
    if run.hp.eval_only_quantized_path:
        run.phase = "eval_only"
        artifact = load_artifact_to_evaluate(run, model.net)
        model = warm_up_evaluation(run, model)
        return evaluate_and_conclude(run, data, model, artifact)
    if run.hp.finish_from:
        run.phase = "finish_from"
        finish_from_raw_weights(run, data, model)
        model = warm_up_evaluation(run, model)
    else:
        run.phase = "warmup"
        with compile_failures_named(run):
            model = warmup(run, data, model)
        run.hp = reserve_calibration_time(run, data, model.net)
        if run.hp.benchmark_steps:
            return benchmark(run, data, model)
        in_phase(run, train, data, model)
    hessians = in_phase(run, calibrate, data, model.net)
    artifact = in_phase(run, export, model.net, hessians)
    evaluate_and_conclude(run, data, model, artifact)
    in_phase(run, record)


# The phases after training, in order: what a run cut short after training names as not finished.
AFTER_TRAINING = ("calibrate", "export", "evaluate_artifact", "evaluate_sliding", "evaluate_ttt", "log_compliance",
                  "log_summary", "generate_sample", "record")


def conclude_failure(run, error):
    """A seed that fails: the raw weights are saved first if training had begun, the error goes into the log (and
    the run index), and the log says what did not finish and how to finish it."""
    def best_effort(line):
        with contextlib.suppress(Exception):
            run.log(line)
    if run.training_began and not run.raw_saved:
        try:
            if run.average is not None:
                best_effort(run.average.apply())
            save_raw_weights(run)
        except Exception as save_error:
            best_effort(f"raw_weights: NOT saved: {save_error}")
    where = f"step:{error.step}" if isinstance(error, Interrupted) and error.step is not None else f"phase:{run.phase}"
    if isinstance(error, Interrupted):
        best_effort(f"interrupted: {error} {where}")
    elif isinstance(error, (ConfigError, RunError)):
        best_effort(f"error: {type(error).__name__}: {error} {where}")
    else:
        best_effort(f"error: {where}\n" + traceback.format_exc())
    if run.raw_saved:
        pending = AFTER_TRAINING[AFTER_TRAINING.index(run.phase):] if run.phase in AFTER_TRAINING else AFTER_TRAINING
        best_effort(f"not_finished: {','.join(pending)}; raw weights at {run.raw_weights_path}; to finish: rerun the "
                    f"same command with FINISH_FROM={run.raw_weights_path} (and a new RUN_ID)")
    if run.config_hash is not None:  # a seed refused before `setup` hashed its data never enters the index
        with contextlib.suppress(Exception):
            append_index(run, "failed", phase=run.phase, error=str(error)[:500])


def run_ids(hp, cluster):
    """The RUN_ID of every seed. The default is a timestamp plus a random suffix (two runs started in the same second
    differ), made on rank 0 so that every rank of one run uses it. A name whose log exists is refused before anything
    is written, unless OVERWRITE_RUN=1."""
    base = hp.run_id or cluster.broadcast(f"{time.strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}")
    seeds = hp.seed_list()
    ids = {seed: base if len(seeds) == 1 else f"{base}_seed{seed}" for seed in seeds}
    taken = [f"logs/{name}.txt" for name in ids.values() if os.path.exists(os.path.join("logs", f"{name}.txt"))]
    taken = cluster.broadcast(taken if cluster.rank == 0 else None)
    if taken and not hp.overwrite_run:
        raise ConfigError(f"RUN_ID={base!r}: {', '.join(taken)} already exists (a run of that name was made); choose "
                          f"another RUN_ID, or set OVERWRITE_RUN=1 to replace it")
    return ids


def with_record_folder(hp, sources):
    """RECORD_NAME without RECORD_DIR: the challenge's folder, records/track_10min_16mb/<date>_<name>/ (the date of
    the launch, so that every seed of one command lands in one folder)."""
    if not hp.record_name or hp.record_dir:
        return hp, sources
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", hp.record_name).strip("_") or "record"
    folder = os.path.join("records", "track_10min_16mb", f"{time.strftime('%Y-%m-%d')}_{slug}")
    return dataclasses.replace(hp, record_dir=folder), dict(sources, record_dir="implied:RECORD_NAME")


def usage():
    """The `--help` text: how a run is configured, every setting by group with its default, and the presets."""
    groups = []
    for field in dataclasses.fields(Hyperparameters):
        if field.metadata.get("group") or not groups:
            groups.append((field.metadata.get("group", ""), []))
        default = int(field.default) if isinstance(field.default, bool) else field.default
        groups[-1][1].append(f"{field.name.upper()}={default}")
    lines = ["Every setting is an environment variable, read once at start; a bad or inert one is refused before",
             "anything trains. The full table, with every meaning: docs/configuration.md.",
             "  torchrun --standalone --nproc_per_node=8 train_gpt.py   # 8 GPUs",
             "  PRESET=smoke python3 train_gpt.py                        # one process, e.g. a CPU miniature",
             "Presets (PRESET=a,b applies a, then b; a variable you set wins): " + ", ".join(filter(None, PRESETS)),
             "Settings by group, with their defaults:"]
    for title, names in groups:
        lines += [f"{title}:"] + textwrap.wrap("  ".join(names), 116, initial_indent="  ", subsequent_indent="  ",
                                               break_on_hyphens=False)
    return "\n".join(lines)


def main():
    hp, sources = with_record_folder(*Hyperparameters.from_env())
    # once: every seed logs and ships the code that is running, even if the file changes
    code = Code.read(__file__, hp.pack_code)
    cluster = Cluster(hp)
    with StopSignals() as signals:
        for seed, run_id in run_ids(hp, cluster).items():
            seed_sources = sources if len(hp.seed_list()) == 1 else dict(sources, seed="SEEDS")
            run = Run(dataclasses.replace(hp, seed=seed, run_id=run_id), seed_sources, cluster, code, signals)
            try:
                train_and_evaluate(run)
            except BaseException as error:
                conclude_failure(run, error)
                raise
            torch._dynamo.reset()  # the next seed's model is new: compiled afresh, not against the cache limit
    cluster.stop()


# ============================================================================================
# OTHER SCRIPTS' SETTINGS
# ============================================================================================
# Read by `Hyperparameters.from_env`: a variable of the baseline or the records is applied as ours, translated, or
# refused with what to use instead; never ignored.

# Names that the challenge's baseline or the public records read. Where one of ours has the same meaning it is an
# alias (applied, and logged as such); every other one is refused with the setting to use instead, if any.
SETTING_ALIASES = {
    "MUON_WD": "muon_weight_decay", "EMBED_WD": "embed_weight_decay", "ADAM_WD": "scalar_weight_decay",
    "MIN_LR": "min_lr_scale", "ENABLE_LOOPING_AT": "loop_enable_at", "VAL_BATCH_TOKENS": "val_batch_size",
    "MATRIX_BITS": "quant_bits", "EMBED_BITS": "embed_quant_bits", "MLP_CLIP_SIGMAS": "clip_k_mlp",
    "ATTN_CLIP_SIGMAS": "clip_k_attn", "EMBED_CLIP_SIGMAS": "clip_k_embed", "SMEAR_GATE_ENABLED": "smear_gate",
    "SKIP_GATES_ENABLED": "skip_gates", "SPARSE_ATTN_GATE_SCALE": "attn_gate_scale",
    "BIGRAM_VOCAB_SIZE": "bigram_buckets",  # the PR #549 family's: the same hash, the last bucket kept for "none"
}
FOREIGN_SETTING_HINTS = {
    "DATASETS_DIR": "DATA_PATH",
    "MATRIX_CLIP_SIGMAS": "CLIP_K_ATTN and CLIP_K_MLP",
    "GATED_ATTN_ENABLED": "ATTN_GATE=head", "ATTN_OUT_GATE_ENABLED": "ATTN_GATE=output",
    "GATED_ATTENTION": "ATTN_GATE=biased (PR #549's form)", "QAT_ENABLED": "QAT_START_LR_SCALE",
    "BIGRAM_HASH_BUCKETS": "BIGRAM_BUCKETS", "BIGRAM_HASH_DIM": "BIGRAM_DIM", "NEGATIVE_SLOPE": "MLP_LEAKY_SLOPE",
    "COMPILE_MODEL": "COMPILE",
    "USE_COMPILE": "COMPILE", "USE_GPTQ": "GPTQ", "GPTQ_CALIB_BATCHES": "GPTQ_CALIBRATION_BATCHES",
    "STRIDE": "EVAL_STRIDE", "SLIDING_WINDOW_ENABLED": "EVAL_STRIDE (0 = off)", "RESUME_FROM": "FINISH_FROM",
    "EVAL_ONLY_PATH": "FINISH_FROM", "TARGET_MB": "SIZE_TARGET_BYTES", "USE_ZSTD": "COMPRESSOR=zstd",
    "ZSTD_LEVEL": "COMPRESSOR", "WEIGHT_DECAY": "MUON_WEIGHT_DECAY / EMBED_WEIGHT_DECAY / SCALAR_WEIGHT_DECAY",
    "ADAM_WEIGHT_DECAY": "SCALAR_WEIGHT_DECAY", "EVAL_BATCH_SIZE": "VAL_BATCH_SIZE",
    "VAL_MAX_TOKENS": "DATA_PATH (a smaller val split)",
    "LOAD_ARTIFACT_PATH": "EVAL_ONLY_QUANTIZED_PATH", "QUANTIZE_ONLY": "FINISH_FROM",
    "FORCE_STOP_STEP": "ITERATIONS (with MAX_WALLCLOCK_SECONDS=0)",
    "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS": "VECTORS_FP32", "GPTQ_ENABLED": "GPTQ",
    "POLAR_EXPRESS": "MUON_ORTHOGONALIZER", "PARALLEL_RESIDUAL": "PARALLEL_RESIDUALS",
    "PARALLEL_RESIDUAL_START": "PARALLEL_RESIDUALS and PARALLEL_START_LAYER", "RECUR_LAYERS": "LOOP_START and LOOP_END",
    "RECUR_START_STEP": "LOOP_ENABLE_AT", "GPTQ_AR_SELFGEN": "GPTQ_CALIBRATION=self",
    "GPTQ_TEMPERATURE": "GPTQ_SELF_TEMPERATURE", "MATRIX_LR_EARLY": "MATRIX_LR", "MATRIX_LR_LATE": "MATRIX_LR",
    # the 03-24 ternary record's, read through a helper of its own (`_e("NAME", default)`)
    "COMPILE_MODE": "COMPILE and COMPILE_SCOPE (torch.compile's default mode)", "WARMDOWN_FRACTION": "WARMDOWN_FRAC",
    "ACTIVATION": "MLP_ACTIVATION", "BIGRAM_HASH": "BIGRAM_BUCKETS", "SMEAR": "SMEAR_GATE",
    "SEQ_LEN_START": "TRAIN_SEQ_SCHEDULE", "SEQ_SCHEDULE_FRACTION": "TRAIN_SEQ_SCHEDULE",
    "SLIDING_EVAL": "EVAL_STRIDE (0 = off)", "SLIDING_EVAL_STRIDE": "EVAL_STRIDE",
    "SLIDING_BATCH_SIZE": "VAL_BATCH_SIZE (in tokens)", "SOFTCAP_TYPE": "LOGIT_SOFTCAP (tanh)",
    "TRAINING_DEPTH_RECURRENCE": "NUM_LOOPS, LOOP_START and LOOP_END",
    "EVAL_DEPTH_RECURRENCE": "NUM_LOOPS, LOOP_START and LOOP_END",
}
# The rest of the settings of the baseline and the records' scripts (2026-03 to 2026-04) that have no counterpart here.
FOREIGN_SETTINGS = set(SETTING_ALIASES) | set(FOREIGN_SETTING_HINTS) | set("""
    VAL_DOC_FRACTION TTT_EVAL_BATCHES ROPE_YARN PARALLEL_FINAL_LANE ARTIFACT_DIR MUON_BETA2
    MTP_NUM_HEADS MTP_LOSS_WEIGHT
    GATED_ATTN_INIT_STD FP_STORAGE ATTN_OUT_GATE_SRC TTT_DEBUG_BYPASS
    SWA_START_FRAC SPARSE_ATTN_GATE_INIT_STD SCALE_STORAGE PREQUANT_ONLY
    EVAL_BATCH_SEQS TTT_OUTPUT_DIR TRIGRAM MLP_HIDDEN
    FP16_KEEP_NAME_PATTERNS EMBEDDING_DIM DTG_ENABLED TARGET_AVG_CHUNK_LEN
    SW_EVAL_BATCH RATIO_LOSS_WEIGHT QAT OUTER_LAYERS MODEL_SAVE_PATH LORA_RANK LAWA_K LAWA_FREQ LAWA_ENABLED
    HNET_LR_DIFF WRAP_INIT_SCALE WD_TAPER_START_FRAC WD_TAPER_FINAL_MULT VAL_MAX_BATCHES VAL_FILES USE_WRAP
    USE_SMEARGATE USE_INT6 TTT_ONLY_EVAL TTT_ONLY TTT_HEARTBEAT_SECONDS TTT_DOC_LIMIT TRAIN_FILES SWA_DECAY
    SMEAR_GATE_WIDTH SKIP_TOKENS SKIP_POST_TRAIN_EVAL SIGREG_WEIGHT QUANT_CONFIG QUANT_CLIP_RANGE QAT_THRESHOLD
    QAT_INT6 QAT_FRACTION QAT_BITS QAT_AFTER_STEP PRUNE_RATIO NUM_VIRTUAL_LAYERS NUM_UNIQUE_BLOCKS NUM_LIGHT_BLOCKS
    MUON_COOLDOWN_START MUON_COOLDOWN_END MLP_RANK LR_START LR_SCHEDULE LORA_LR LEGENDRE_GROUPS
    LEGENDRE_DEGREE_FFN LEGENDRE_DEGREE_ATTN LATENT_KV_DIM JEPA_WEIGHT JEPA_PURE_FRAC INT6_STEP
    INT6_LAYER_START INT6_LAYER_END INT6_LAYERS INT4_STEP INT4_LAYERS INDEPENDENT_LR GPTQ_RESERVE_MS
    GPTQ_CALIB_SAMPLES GLOBAL_TTT_DOC_LIMIT GDN_N_HEADS GDN_LAYERS GDN_HEAD_DIM_RATIO GDN_EXPAND_V GDN_CONV_SIZE
    GATE_WIDTH GATE_MLP_OUT GATE_ATTN_SRC GATE_ATTN_OUT FP16_PASSTHROUGH_PATTERNS FP16_EMBED_EXPORT
    EVAL_NTK_ALPHA EMBED_INNER_DIM EFFECTIVE_DEPTH DEPTH_LORA_RANK COEFF_LR_SCALE
    COEFF_LR_BASE CHECKPOINT_EVERY CHECKPOINT_DIR CE_WEIGHT CE_PURE_FRAC BLOCK_TYPE BLOCK_LARS_TRUST
    BLOCK_LARS_MIN_SCALE ATTN_VARIANT MODE
    MIDRUN_CAP_SCHEDULE MIDRUN_CAP_LOG_UPDATES
    LQER_SCOPE LQER_GAIN_SELECT TTT_SHORT_LORA_ENABLED TTT_SHORT_LORA_RANK TTT_SHORT_LORA_LR TTT_SHORT_WEIGHT_DECAY
    TTT_SHORT_BETA2 TTT_TRAIN_MIN_DOC_LEN TTT_TRAIN_MAX_DOC_LEN TTT_WARM_START_MEAN_ENABLED TTT_WARM_START_MEAN_DOC_LEN
    TTT_WARM_START_MEAN_MOMENTUM CONTROL_TENSOR_NAME_PATTERNS
    BANK_SPLIT CANON_AC_LAYERS DISABLE_LAYER0_ATTN GPTQ_BATCH_SIZE INT8_FULL_RANGE_PATTERNS MIXED_QUANT N_INT6_LAYERS
    PARALLEL_START_LAYER_IS_PHYSICAL POST_GPTQ_EVAL_ONLY REPEAT_UNTIE_MLP REPEAT_UNTIE_MLP_LAYERS SLOT_ENABLED SLOT_LR
    SLOT_STEPS CLIP_MULT_EARLY CLIP_MULT_LATE CLIP_MULT_LOOP CLIP_MULT_MID HESSIAN_CLIP_LAMBDA LOOP_LAYER_BITS
    LOOP_LAYER_CLIP_SIGMAS LOOP_PHASE2_AT TTT_ENTROPY_HIGH TTT_ENTROPY_LOW TTT_NS_STEPS UNTIE_LOOP_MLPS
    ADAM_LR ATTN_PROJ_TYPE BATCH_SCHEDULE_FRACTION BATCH_TOKENS_START BITNET_GROUP_SIZE CHURN_LOG_EVERY CORR_WEIGHT_LR
    DIFF_ATTN EMBED_DIM LOGIT_HEAD_TYPE MATRIX_OPTIMIZER MLP_GROUPS MTP_HEADS REFINER REFINER_KERNEL ROPE_TYPE
    TEMP_SCALING TVERSKY_FEATURE_POOLS TVERSKY_MEMBERSHIP TVERSKY_NUM_FEATURES UNTIE_AT_FRACTION YARN_MAX_LEN
""".split())


def _translate_xsa_last_n(raw, environ):
    count = _parse_env("XSA_LAST_N", raw, int)
    if count < 0:
        raise ConfigError(f"XSA_LAST_N={raw!r}: must be zero or positive")
    return {"xsa_layers": ",".join(str(-back) for back in range(count, 0, -1))}


def _translate_ve_enabled(raw, environ):
    """Here the value embedding is on exactly where VE_LAYERS names layers."""
    if _parse_env("VE_ENABLED", raw, bool):
        if not environ.get("VE_LAYERS", "").strip():
            raise ConfigError("VE_ENABLED=1: set VE_LAYERS too (the value embedding is on where it names layers; the "
                              "03-23 record's default is 9,10)")
        return {}
    return {"ve_layers": ""}


def _translate_lqer_enabled(raw, environ):
    """The records' LQER switch: on at their LQER_RANK (4 unless given), off as LQER_RANK=0."""
    given = environ.get("LQER_RANK", "").strip()
    if not _parse_env("LQER_ENABLED", raw, bool):
        if given and _parse_env("LQER_RANK", given, int) != 0:
            raise ConfigError(f"LQER_ENABLED={raw!r} and LQER_RANK={given!r}: LQER_ENABLED=0 is LQER_RANK=0; set one")
        return {"lqer_rank": 0}
    return {} if given else {"lqer_rank": 4}


def _translate_ttt_freeze_blocks(raw, environ):
    if _parse_env("TTT_FREEZE_BLOCKS", raw, int) != 0:
        raise ConfigError(f"TTT_FREEZE_BLOCKS={raw!r}: set TTT_PARAMS to the name patterns of what adapts instead "
                          f"(e.g. blocks.2,blocks.3,...; TTT_FREEZE_BLOCKS=0 is TTT_PARAMS=all)")
    return {"ttt_params": "all"}


def _translate_sparse_attn_gate(raw, environ):
    """The 04-27 record's sparse head gate switch; its other gates have switches of their own, all off by default."""
    return {"attn_gate": "sparse" if _parse_env("SPARSE_ATTN_GATE_ENABLED", raw, bool) else "none"}


TTT_MASKS = {"": "", "all": "", "baseline_all": "", "no_q": "q", "no_v": "v", "no_qv": "qv"}  # what each turns off


def _translate_ttt_mask(raw, environ):
    """The late-April records' TTT_MASK: the default of TTT_Q_LORA and TTT_V_LORA. One given beside it that
    disagrees is refused (the records let it win)."""
    mask = raw.strip().lower()
    if mask not in TTT_MASKS:
        raise ConfigError(f"TTT_MASK={raw!r}: choose all, no_q, no_v or no_qv")
    implied = {}
    for which in "qv":
        name, wanted = f"TTT_{which.upper()}_LORA", which not in TTT_MASKS[mask]
        given = environ.get(name, "").strip()
        if not given:
            implied[name.lower()] = str(int(wanted))
        elif _parse_env(name, given, bool) != wanted:
            raise ConfigError(f"TTT_MASK={raw!r} turns {name} {'on' if wanted else 'off'}, and {name}={given!r} says "
                              f"otherwise; set one")
    return implied


def _ema_and_swa_as_in_the_03_23_record(environ):
    """EMA_ENABLED=1 with SWA_ENABLED=1 (or unset): the PR #549 family keeps an EMA and SWA snapshots and exports
    the EMA; its SWA is never applied."""
    flag = lambda name, default: _parse_env(name, environ.get(name, default), bool)
    return flag("EMA_ENABLED", "0") and flag("SWA_ENABLED", "1")


def _translate_averaging_switch(name):
    """EMA_ENABLED and SWA_ENABLED: the records give them different meanings but for the PR #549 family's pair."""
    def translate(raw, environ):
        if not _ema_and_swa_as_in_the_03_23_record(environ):
            raise ConfigError(f"{name}={raw!r}: the records give EMA_ENABLED and SWA_ENABLED different meanings, but "
                              f"for EMA_ENABLED=1 with SWA_ENABLED=1 or unset (the EMA is exported, the SWA never "
                              f"applied); set WEIGHT_AVERAGING=none, ema, swa or ema_swa")
        return {"weight_averaging": "ema"}
    return translate


def _translate_swa_every(raw, environ):
    """Ours (snapshots every N steps), except beside the PR #549 family's EMA_ENABLED=1, whose SWA is never applied."""
    return {"weight_averaging": "ema"} if _ema_and_swa_as_in_the_03_23_record(environ) else {"swa_every": raw}


def _translate_late_qat(name):
    def translate(raw, environ):  # parsed for its type only: every value means the same here
        _parse_env(name, raw, bool if name == "LATE_QAT" else float)
        return {"qat_start_lr_scale": "0"}
    return translate


def _what_runs_here(name, typ, accepted, here):
    """A record setting whose `accepted` values ask for what this script always does (`here` says what); any
    other value is refused."""
    def translate(raw, environ):
        if _parse_env(name, raw, typ) not in accepted:
            raise ConfigError(f"{name}={raw!r}: {here}; unset {name}")
        return {}
    return translate


# PR #2014's: its shape warmup is what the warmup here always does, and it scores the validation tail as here. Its
# ASYM_LOGIT_RESCALE is the plain softcap in effect: its two scales start at LOGIT_SOFTCAP and nothing trains them
# (the training forward, which its global SGD also runs, keeps the single softcap; no optimizer holds them; its TTT
# trains only the adapters), so either value runs its function.
PR2014_AS_HERE = {name: _what_runs_here(name, typ, accepted, here) for name, typ, accepted, here in (
    ("COMPILE_SHAPE_WARMUP", bool, (True,), "the warmup here always builds every training shape untimed, each "
     "TRAIN_SEQ_SCHEDULE stage in each layout it can meet (COMPILE_SHAPE_WARMUP=1)"),
    ("COMPILE_SHAPE_WARMUP_ITERS", int, (1,), "the warmup here shares WARMUP_STEPS among the training shapes, at "
     "least one each; set WARMUP_STEPS"),
    ("COMPILE_SHAPE_WARMUP_LOOP_MODES", str, ("auto",), "the warmup here builds each stage in the layouts it can "
     "meet (auto)"),
    ("EVAL_INCLUDE_TAIL", bool, (True,), "every validation target is scored here, the tail included "
     "(EVAL_INCLUDE_TAIL=1)"),
    ("ASYM_LOGIT_RESCALE", bool, (True, False), ""),
)}


# Record settings whose meaning, in the records' published commands, is one of ours with another value: applied as
# that, and logged as "(translated)" in the config line. Late QAT never ran in the records that have it (a class
# flag that torch.compile constant-folds: the PartialRoPE record's README, credit @152334H; frozen under their torch
# 2.9.1, benchmarks/late_qat_probe.py), so their LATE_QAT* are QAT off; QAT_START_LR_SCALE is the late QAT that runs.
RECORD_TRANSLATIONS = {
    "XSA_LAST_N": _translate_xsa_last_n, "VE_ENABLED": _translate_ve_enabled,
    "TTT_FREEZE_BLOCKS": _translate_ttt_freeze_blocks, "EMA_ENABLED": _translate_averaging_switch("EMA_ENABLED"),
    "SWA_ENABLED": _translate_averaging_switch("SWA_ENABLED"), "SWA_EVERY": _translate_swa_every,
    "LATE_QAT": _translate_late_qat("LATE_QAT"), "LATE_QAT_THRESHOLD": _translate_late_qat("LATE_QAT_THRESHOLD"),
    "SPARSE_ATTN_GATE_ENABLED": _translate_sparse_attn_gate, "LQER_ENABLED": _translate_lqer_enabled,
    "TTT_MASK": _translate_ttt_mask, **PR2014_AS_HERE,
}

# Variables of other programs that are never read as settings, even when a name is close to one of ours.
FOREIGN_PREFIXES = ("CUDA", "NCCL", "TORCH", "PYTORCH", "OMP_", "MKL", "KMP_", "MASTER_", "GROUP_", "ROLE_", "LOCAL_",
                    "PYTHON", "LC_", "XDG_", "HF_", "TRITON", "GLOO", "NVIDIA", "PYTEST", "CI")


def settings_in_environ(environ, types):
    """{field: (env name, raw value, source)} of the settings in `environ`; raises ConfigError on a refused name."""
    found = {}

    def setting(field, env_name, raw, source):
        if field in found and (found[field][1] != raw or field == env_name.lower()):
            raise ConfigError(f"{env_name}={environ[env_name]!r} and {found[field][0]}={environ[found[field][0]]!r} "
                              f"set the same setting ({field.upper()}); set one")
        found[field] = (env_name, raw, source)

    for env_name, raw in environ.items():
        if env_name in RECORD_TRANSLATIONS:
            for field, value in RECORD_TRANSLATIONS[env_name](raw, environ).items():
                own = field == env_name.lower()
                setting(field, env_name, value, "env" if own else f"env:{env_name}={raw}(translated)")
            continue
        field = env_name.lower() if env_name.lower() in types else SETTING_ALIASES.get(env_name)
        if field is not None:
            setting(field, env_name, raw, "env" if env_name == field.upper() else f"env:{env_name}(alias)")
            continue
        if env_name in FOREIGN_SETTINGS:
            hint = FOREIGN_SETTING_HINTS.get(env_name)
            raise ConfigError(f"{env_name}={raw!r} is a setting of the challenge records that this script does not "
                              f"have; " + (f"use {hint} instead" if hint else "unset it (see the README's table)"))
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", env_name) and not env_name.startswith(FOREIGN_PREFIXES):
            close = difflib.get_close_matches(env_name, [name.upper() for name in types], n=1, cutoff=0.85)
            if close:
                raise ConfigError(f"{env_name}={raw!r} is not a setting; did you mean {close[0]}?")
    return found


if __name__ == "__main__":
    if sys.argv[1:] in (["-h"], ["--help"]):
        try:
            print(usage(), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has what it wanted and closed the pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    if sys.argv[1:]:
        sys.exit(f"config error: train_gpt.py takes no arguments ({' '.join(sys.argv[1:])}): every setting is an "
                 f"environment variable; python3 train_gpt.py --help lists them")
    try:
        main()
    except DataError as error:
        sys.exit(f"data error: {error}")
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    except RunError as error:
        sys.exit(f"error: {error}")
    except Interrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        sys.exit(128 + error.signum)
