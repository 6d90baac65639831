"""PRESET=record's model beside the 04-27 record's own, on the CPU: the record's train_gpt.py is imported as a module
(FlashAttention 3 replaced by SDPA, its fused Triton kernels off), both models are built at a small size from their
own settings, the record's weights are drawn at random and copied into ours, and then they are compared:

  1. the loss over one row of packed documents, without and with the loop (the record's side gets the cu_seqlens its
     own _build_cu_seqlens makes; ours finds the documents itself), and what a forward and backward costs: the
     FLOPs of the matmuls and attention, and the ATen operators run eagerly;
  2. the per-document TTT forward, the same LoRA adapters on both sides, one document a row;
  3. a few training steps with each side's own optimizers in the record's precision of state (bf16 bank gradients,
     momentum and Newton-Schulz, compiled on both sides), without clipping and with its clip at 0.3;
  4. the whole evaluation of the record, per-document LoRA TTT with phased global SGD, over a small validation
     stream: its eval_val_ttt_phased against our per_document_lora_ttt, in fp32, every adapter's A drawn alike
     on both sides (each side draws its own at random otherwise); then with its global SGD's packed rows against
     ours under TRAIN_ROWS=packed; and what each evaluation costs, counted as in 1;
  5. the export at width 512 (where every matrix is large enough to be quantized): the record's gptq_mixed_quantize
     and dequantize_mixed against our quantize_state_dict and dequantize_state_dict, from the same weights and the
     same Hessians: what each tensor becomes;
  6. the training rows (with --shard, a shard of BOS-led documents such as the record's CaseOps validation shard):
     the record's DocumentPackingLoader against our TrainLoader with TRAIN_ROWS=packed, micro-batch by micro-batch
     until the record's loader reaches the shard's end (where it skips the tail, and ours reads on).

    R=<parameter-golf>/records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611
    python3 benchmarks/record_side_by_side.py --record-script $R/train_gpt.py

Prints one line per comparison (docs/evidence.md, "PRESET=record's model beside the 04-27 record's own model").
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import re
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402

SIZES = dict(VOCAB_SIZE="1024", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="512",
             EVAL_SEQ_LEN="512")
# The record's command, as far as the model and its optimizers read it (its other names are data and evaluation).
RECORD_COMMAND = dict(SPARSE_ATTN_GATE_ENABLED="1", SPARSE_ATTN_GATE_SCALE="0.5", GATE_WINDOW="12",
                      SMEAR_GATE_ENABLED="1", GATED_ATTN_QUANT_GATE="1", BETA2="0.99", MATRIX_LR="0.026",
                      MIN_LR="0.1", MUON_BACKEND_STEPS="5", WARMDOWN_FRAC="0.85", FUSED_CE_ENABLED="0",
                      CASEOPS_ENABLED="0", TTT_CHUNK_SIZE="48", PHASED_TTT_ENABLED="1", GLOBAL_TTT_MOMENTUM="0.9",
                      TTT_BETA2="0.99", TTT_WEIGHT_DECAY="0.5", EMBED_BITS="7", MLP_CLIP_SIGMAS="11.5",
                      ATTN_CLIP_SIGMAS="13.0", EMBED_CLIP_SIGMAS="14.0", LQER_ENABLED="1", LQER_ASYM_ENABLED="1",
                      LQER_RANK="4", LQER_FACTOR_BITS="4", LQER_ASYM_GROUP="64", LQER_TOP_K="3")
# The evaluation's sizes, the same on both sides: 4 documents a batch, 128-token windows, rank 8; two phases over
# the first 8 documents; the global SGD in chunks of one sequence of EVAL_SEQ_LEN, so that both sides cut the same
# rows (the record packs a batch into one row, ours cuts rows of EVAL_SEQ_LEN; see docs/seeds.md).
TTT_SIZES = dict(TTT_BATCH_SIZE="4", TTT_EVAL_SEQ_LEN="128", TTT_LORA_RANK="8", PHASED_TTT_PREFIX_DOCS="8",
                 PHASED_TTT_NUM_PHASES="2", GLOBAL_TTT_CHUNK_TOKENS="1024", GLOBAL_TTT_BATCH_SEQS="1",
                 EVAL_SEQ_LEN="1024")
# With TRAIN_ROWS=packed, the record's own batches: chunks of 8 sequences of 128, each chunk one step of one row,
# documents cut into pieces of 128 from their own starts. In one process the record packs the whole step into one
# row; ours packs a step into STREAM_CHUNKS rows, the record's 8 ranks', whatever the world size, so the comparison
# sets STREAM_CHUNKS to 1, the record's rank count here.
PACKED_TTT_SIZES = dict(TTT_SIZES, GLOBAL_TTT_BATCH_SEQS="32", EVAL_SEQ_LEN="128")
BOS = 1
DOCUMENT_STARTS = [0, 37, 100, 290, 300, 451]  # in one row of 512 tokens


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record-script", required=True, help="the 04-27 record's train_gpt.py")
    parser.add_argument("--steps", type=int, default=5, help="training steps per comparison")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the same comparisons on a GPU")
    parser.add_argument("--shard", help="a shard of BOS-led documents for the training rows' comparison")
    return parser.parse_args(argv)


def sdpa(q, k, v, mask=None):
    """FlashAttention's layout (B, T, H, D) through SDPA, causal or under `mask`, any dtype."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    grouped = k.size(1) != q.size(1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=grouped)
    return y.transpose(1, 2)


def varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, window_size=None):
    """flash_attn_varlen_func's documents (one packed row) as a block-diagonal causal mask. Making the mask is the
    stand-in's work, not the record's: a Cost leaves it out."""
    with _disable_current_modes():
        positions = torch.arange(q.size(0), device=q.device)
        document = torch.zeros_like(positions)
        for start in cu_seqlens_q[1:].tolist():
            document += positions >= start
        mask = (document[:, None] == document[None, :]) & (positions[None, :] <= positions[:, None])
    return sdpa(q[None], k[None], v[None], mask)[0]


def load_record(path):
    """The record's script as a module, its settings read from the environment at import, as it reads them."""
    os.environ.update(SIZES, **RECORD_COMMAND)
    sys.modules["flash_attn_interface"] = types.SimpleNamespace(
        flash_attn_func=lambda q, k, v, causal=True: sdpa(q, k, v), flash_attn_varlen_func=varlen_sdpa)
    spec = importlib.util.spec_from_file_location("record_train_gpt", path)
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    record.BOS_ID = BOS  # its loader sets it from the data
    return record


def record_model(record, seed, device, **sizes):
    """The record's GPT from its own Hyperparameters (`sizes`: attributes set on them), its fused MLP off, with random
    weights: every scale and lane weight about 1, the rest normal, so that no part of it is the identity."""
    h = record.Hyperparameters()
    for name, value in sizes.items():
        setattr(h, name, value)
    model = record.GPT(h).float().to(device)
    for block in model.blocks:
        block.mlp.use_fused = False
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator).to(device) * (0.05 if p.dim() >= 2 else 0.3)
            p.copy_(noise + (1.0 if "scale" in name or "lambdas" in name else 0.0))
    return model


def our_state(record_state, layers):
    """The record's state dict in our names: its banks split into matrices, its gates and lane weights per block."""
    state = {"tok_emb.weight": record_state["tok_emb.weight"], "skip_weights": record_state["skip_weights"],
             "skip_gates": record_state["skip_gates"], "smear.weight": record_state["smear_gate.weight"],
             "smear.lam": record_state["smear_lambda"]}
    banks = {"attn.c_q": ("qo_bank", 0), "attn.proj": ("qo_bank", layers), "attn.c_k": ("kv_bank", 0),
             "attn.c_v": ("kv_bank", layers), "mlp.fc": ("mlp_up_bank", 0), "mlp.proj": ("mlp_down_bank", 0)}
    for i in range(layers):
        block = f"blocks.{i}."
        for ours, (bank, offset) in banks.items():
            state[f"{block}{ours}.weight"] = record_state[bank][offset + i]
        for name in ("attn.q_gain", "attn_scale", "mlp_scale", "resid_mix"):
            state[block + name] = record_state[block + name]
        state[block + "attn.gate.weight"] = record_state[block + "attn.attn_gate_w"]
        state[block + "lane_decay"] = record_state["parallel_resid_lambdas"][i]
        state[block + "lane_routing"] = record_state["parallel_post_lambdas"][i]
    return state


def our_model(record_net, clip, **settings):
    """PRESET=record's model at the same sizes, holding the record model's weights; its settings with `clip`."""
    hp, _ = T.Hyperparameters.from_env({"PRESET": "record", **SIZES, "CASEOPS_ENABLED": "0",
                                        "GRAD_CLIP_NORM": str(clip), **settings})
    model = T.GPT(hp, attention_fn=T._sdpa, bos_id=BOS).float().to(next(record_net.parameters()).device)
    own = model.state_dict()
    with torch.no_grad():
        for name, value in our_state(record_net.state_dict(), len(record_net.blocks)).items():
            if name in own:  # the record allocates lane weights for every layer; ours has them where they are read
                own[name].copy_(value.reshape(own[name].shape))
    return model, hp


def packed_row(record, seed, device):
    ids = torch.randint(2, 1024, (1, 513), generator=torch.Generator().manual_seed(seed))
    ids[0, DOCUMENT_STARTS] = BOS
    ids = ids.to(device)
    cu_seqlens, max_len = record._build_cu_seqlens(DOCUMENT_STARTS, 512, device, 512, 64)
    return ids[:, :-1], ids[:, 1:], cu_seqlens, max_len


def grouped(query_shape, kv_shape):
    """K or V's shape as the query heads read it (grouped-query attention: each K/V head serves several)."""
    return (*query_shape[:2], *kv_shape[2:])


# torch's FLOP counter knows the CUDA attention kernels only; both sides run the CPU's flash kernel (dense: every
# position pair, masked or not), counted here by the same formulas.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, grouped(q, k), grouped(q, v)),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, grouped(q, k),
                                                                                        grouped(q, v)),
}


class Cost(NamedTuple):
    flops: int  # matmuls and attention, forward and backward
    operators: int  # ATen operators run, views excluded (eagerly: on a GPU, each one a kernel launch)


class OperatorCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.operators = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators += not func.is_view
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def measured(costs, side):
    """Puts the Cost of the work in the block into costs[side]. (Not its time: the counting itself takes most.)"""
    flops, operators = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS), OperatorCount()
    with flops, operators:
        yield
    costs[side] = Cost(flops.get_total_flops(), operators.operators)


def cost_line(name, costs):
    record, ours = costs["record"], costs["ours"]
    extra = ours.flops - record.flops
    return (f"{name} GFLOP record {record.flops / 1e9:.3f} ours {ours.flops / 1e9:.3f} "
            f"({f'ours {extra:+,} FLOPs, {extra / record.flops:+.0e}' if extra else 'equal'}); "
            f"operators record {record.operators} ours {ours.operators} ({ours.operators / record.operators - 1:+.1%})")


def compare_forward(record, args):
    theirs = record_model(record, seed=0, device=args.device)
    ours, _ = our_model(theirs, clip=0.3)
    x, y, cu_seqlens, max_len = packed_row(record, seed=1, device=args.device)
    for looping in (False, True):
        theirs.looping_active = ours.looping = looping
        with torch.no_grad():
            record_loss = theirs(x, y, cu_seqlens=cu_seqlens, max_seqlen=max_len).item()
            our_loss = ours(x, y).item()
        print(f"forward looping:{looping} loss record {record_loss:.6f} ours {our_loss:.6f} "
              f"difference {our_loss - record_loss:+.1e}")
    costs = {}
    with measured(costs, "record"):
        theirs(x, y, cu_seqlens=cu_seqlens, max_seqlen=max_len).backward()
    with measured(costs, "ours"):
        ours(x, y).backward()
    print(cost_line("forward_and_backward_cost looping:True", costs))


def copied_adapters(record, theirs, ours, hp, rows, rank):
    """The record's BatchedTTTLoRA with random A and B, and our DocumentAdapters holding the same values, both made on
    the CPU and moved to the models' device."""
    record_lora = record.BatchedTTTLoRA(rows, theirs, rank, k_lora=True, mlp_lora=True, o_lora=True)
    our_lora = T.DocumentAdapters(ours, rows, dataclasses.replace(hp, ttt_lora_rank=rank), torch.Generator())
    pairs = [(record_lora.lm_head_lora, our_lora.head)]
    for record_name, our_name in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "o"), ("mlp", "mlp")):
        pairs += zip(getattr(record_lora, f"{record_name}_loras"), getattr(our_lora, our_name), strict=True)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for record_module, our_module in pairs:
            record_module.B.copy_(torch.randn(record_module.B.shape, generator=generator) * 0.05)
            our_module.a.copy_(record_module.A)
            our_module.b.copy_(record_module.B)
    device = next(ours.parameters()).device
    return record_lora.to(device), our_lora.to(device)


def compare_ttt_forward(record, args):
    theirs = record_model(record, seed=0, device=args.device)
    ours, hp = our_model(theirs, clip=0.3)
    ids = torch.randint(2, 1024, (2, 201), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = BOS
    ids = ids.to(args.device)
    for looping in (False, True):
        theirs.looping_active = ours.looping = looping
        record_lora, our_lora = copied_adapters(record, theirs, ours, hp, rows=2, rank=8)
        with torch.no_grad():
            record_losses = theirs.forward_ttt(ids[:, :-1], ids[:, 1:], record_lora)
            our_losses = ours(ids[:, :-1], ids[:, 1:], reduction="none", adapters=our_lora)
        print(f"ttt_forward looping:{looping} per-token losses: largest difference "
              f"{(our_losses - record_losses).abs().max().item():.1e} of {record_losses.numel()}")


class NoStream:
    """The record's optimizers make a CUDA side stream; its three steps touch disjoint tensors, so none is needed."""

    def __init__(self, *args):
        pass

    def wait_stream(self, *args):
        pass


def record_step(record, theirs, optimizers, x, y, cu_seqlens, max_len, step, hp):
    loss = theirs(x, y, cu_seqlens=cu_seqlens, max_seqlen=max_len)
    loss.backward()
    for group in optimizers.optimizer_muon.param_groups:
        group["momentum"] = T.muon_momentum(hp, step)  # its warmup formula, the same step count
    if hp.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in theirs.parameters() if p.requires_grad], hp.grad_clip_norm)
    for optimizer in optimizers:
        optimizer.step()
    optimizers.zero_grad_all()
    return loss.item()


def compare_steps(record, args, clip):
    """`args.steps` training steps at the full learning rate on both sides, from the same weights on one packed
    row; the largest weight difference after each, relative to the tensor's largest weight."""
    if args.device == "cpu":
        record.torch.cuda.Stream = NoStream
    theirs = record_model(record, seed=0, device=args.device)
    ours, hp = our_model(theirs, clip)
    record_optimizers = record.Optimizers(record.Hyperparameters(), theirs)
    our_optimizers = T.Optimizers(ours, hp, 0, 1, update_dtype=torch.bfloat16, compiled=True)
    x, y, cu_seqlens, max_len = packed_row(record, seed=1, device=args.device)
    theirs.looping_active = ours.looping = True
    differences = []
    for step in range(args.steps):
        record_loss = record_step(record, theirs, record_optimizers, x, y, cu_seqlens, max_len, step, hp)
        our_loss = ours(x, y)
        our_loss.backward()
        our_optimizers.step(1.0, T.muon_momentum(hp, step))
        our_optimizers.zero_grad()
        expected, own = our_state(theirs.state_dict(), len(theirs.blocks)), ours.state_dict()
        worst = max(((own[name] - value.reshape(own[name].shape)).abs().max() / value.abs().max()).item()
                    for name, value in expected.items() if name in own)
        differences.append(f"{record_loss:.6f}/{our_loss.item():.6f}:{worst:.0e}")
    print(f"steps clip:{clip} loss record/ours:largest relative weight difference, each step: "
          + " ".join(differences))


def validation_stream(seed, documents):
    """`documents` BOS-led documents of 30 to 400 tokens, each mostly drawn from 40 tokens of its own, so that
    adapting to a document pays; and byte tables for them (a space on 40% of the tokens, BOS a boundary)."""
    generator = torch.Generator().manual_seed(seed)
    pieces = []
    for _ in range(documents):
        length = int(torch.randint(30, 400, (1,), generator=generator))
        topic, common = torch.randint(2, 1024, (40,), generator=generator), torch.randint(2, 1024, (length,),
                                                                                          generator=generator)
        own = topic[torch.randint(0, 40, (length,), generator=generator)]
        pieces += [torch.tensor([BOS]), torch.where(torch.rand(length, generator=generator) < 0.7, own, common)]
    rng = np.random.default_rng(seed)
    base_bytes, space = rng.integers(1, 7, 1024), rng.random(1024) < 0.4
    boundary = np.zeros(1024, dtype=bool)
    boundary[[0, BOS]], base_bytes[[0, BOS]], space[[0, BOS]] = True, 0, False
    return torch.cat(pieces), (base_bytes, space, boundary)


def drawn_alike(shape, bound):
    """An adapter's A, the same on both sides: a fixed pattern within +-bound; row b of a batch is the same at any
    batch size."""
    index = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape)
    return (bound * torch.sin(0.618 * index + 0.3)).float()


@contextlib.contextmanager
def adapters_drawn_alike(record):
    """Every A that either side draws (a new adapter set, or a re-drawn one) becomes drawn_alike's pattern."""
    record_init, record_reset = record.BatchedLinearLoRA.__init__, record.BatchedLinearLoRA.reset
    our_init, our_reset = T.BatchedLoRA.__init__, T.BatchedLoRA.reset

    def record_init_alike(self, bsz, in_features, out_features, rank):
        record_init(self, bsz, in_features, out_features, rank)
        with torch.no_grad():
            self.A.copy_(drawn_alike(self.A.shape, self._bound))

    def record_reset_alike(self):
        record_reset(self)
        if not self._WARM_START_A:
            with torch.no_grad():
                self.A.copy_(drawn_alike(self.A.shape, self._bound))

    def our_init_alike(self, rows, in_features, out_features, rank, alpha, generator):
        our_init(self, rows, in_features, out_features, rank, alpha, generator)
        with torch.no_grad():
            self.a.copy_(drawn_alike(self.a.shape, self.bound))

    def our_reset_alike(self, warm_a, generators):
        our_reset(self, warm_a, generators)
        if not warm_a:
            with torch.no_grad():
                self.a[:len(generators)].copy_(drawn_alike(self.a.shape, self.bound)[:len(generators)].to(self.a))

    record.BatchedLinearLoRA.__init__, record.BatchedLinearLoRA.reset = record_init_alike, record_reset_alike
    T.BatchedLoRA.__init__, T.BatchedLoRA.reset = our_init_alike, our_reset_alike
    try:
        yield
    finally:
        record.BatchedLinearLoRA.__init__, record.BatchedLinearLoRA.reset = record_init, record_reset
        T.BatchedLoRA.__init__, T.BatchedLoRA.reset = our_init, our_reset


def record_ttt_settings(record, hp, sizes):
    """The record's Hyperparameters (its command's values) with the evaluation's `sizes`."""
    h = record.Hyperparameters()
    for name in sizes:
        setattr(h, name.lower(), type(getattr(h, name.lower()))(getattr(hp, name.lower())))
    return h


def compare_ttt_evaluation(record, args, documents, packed=False):
    """The record's eval_val_ttt_phased and our per_document_lora_ttt, from the same weights over the same stream:
    val_loss and val_bpb, and how many phases ran; the model alone (no adaptation) for scale."""
    theirs = record_model(record, seed=0, device=args.device)
    sizes = PACKED_TTT_SIZES if packed else TTT_SIZES
    rows = dict(TRAIN_ROWS="packed", DOC_ISOLATION="1") if packed else {}
    ours, hp = our_model(theirs, clip=0.3, **sizes, **rows)
    theirs.looping_active = ours.looping = True
    tokens, luts = validation_stream(seed=3, documents=documents)
    device = torch.device(args.device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        contextlib.nullcontext
    validation = types.SimpleNamespace(
        val_tokens=tokens, caseops_enabled=False, val_bytes=None,
        base_bytes_lut=torch.tensor(luts[0], dtype=torch.int16, device=device),
        has_leading_space_lut=torch.tensor(luts[1], device=device),
        is_boundary_token_lut=torch.tensor(luts[2], device=device))
    record_lines = []
    record.log = lambda message, console=True: record_lines.append(message)
    target_bytes, starts = T.TargetBytes(T.target_byte_counts(tokens, luts)), T.doc_starts_of(tokens, BOS)
    models = T.LoraTTTModels(ours, ours, ours)
    with adapters_drawn_alike(record):
        alone = T.per_document_lora_ttt(models, tokens, target_bytes, hp, 0, 1, device, autocast, starts,
                                        log=lambda message: None, budget_left=lambda: -1.0).result
        settings = record_ttt_settings(record, hp, sizes)
        costs = {}
        with warnings.catch_warnings(), measured(costs, "record"):
            # Its autocast names CUDA: off on the CPU, where both sides run in fp32.
            warnings.filterwarnings("ignore", message="CUDA is not available")
            record_loss, record_bpb = record.eval_val_ttt_phased(settings, theirs, device, validation,
                                                                 theirs.forward_ttt)
        for path in Path("/tmp").glob(f"ttt_*_{settings.run_id}"):  # its ranks' shared counters
            path.unlink()
        with stream_chunks(1 if packed else T.STREAM_CHUNKS), measured(costs, "ours"):
            report = T.per_document_lora_ttt(models, tokens, target_bytes, hp, 0, 1, device, autocast, starts,
                                             log=lambda message: None)
    our_loss, our_bpb, _ = report.result
    record_phases = sum(line.startswith("ttpr:") for line in record_lines)
    print(f"ttt_evaluation{'(packed_global_sgd)' if packed else ''} documents:{documents} batches:{report.rounds} "
          f"phases record/ours:{record_phases}/"
          f"{report.phases} val_loss record {record_loss:.6f} ours {our_loss:.6f} difference "
          f"{our_loss - record_loss:+.1e}; val_bpb record {record_bpb:.6f} ours {our_bpb:.6f} difference "
          f"{our_bpb - record_bpb:+.1e}; the model alone {alone[0]:.6f} ({alone[0] - record_loss:+.3f})")
    print(cost_line(f"ttt_evaluation_cost{'(packed_global_sgd)' if packed else ''} documents:{documents}", costs))


@contextlib.contextmanager
def stream_chunks(count):
    saved, T.STREAM_CHUNKS = T.STREAM_CHUNKS, count
    try:
        yield
    finally:
        T.STREAM_CHUNKS = saved


def random_hessians(names_and_widths, seed):
    """{name: H = X^T X / n} of random inputs whose columns differ in scale over two decades, two columns dead."""
    generator, hessians = torch.Generator().manual_seed(seed), {}
    for name, width in names_and_widths:
        scales = torch.logspace(-1, 1, width)[torch.randperm(width, generator=generator)]
        x = torch.randn(2 * width, width, generator=generator) * scales
        x[:, torch.randperm(width, generator=generator)[:2]] = 0
        hessians[name] = x.T @ x / x.size(0)
    return hessians


def compare_export(record, args):
    """What each tensor becomes through each side's export, from the same weights and Hessians: quantized, then
    dequantized. The record's model at width 512 (8 heads, 4 KV heads), so that every matrix is above its fp16
    passthrough of 65,536 elements."""
    sizes = dict(model_dim=512, num_heads=8, num_kv_heads=4)
    theirs = record_model(record, seed=0, device="cpu", **sizes)
    ours, hp = our_model(theirs, clip=0.3, MODEL_DIM="512", NUM_HEADS="8", NUM_KV_HEADS="4")
    layers, h = len(theirs.blocks), record.Hyperparameters()
    flat = record._unbank_state_dict(theirs.state_dict(), layers)
    groups = T.quantized_tensor_groups(ours, hp)
    hessians = random_hessians([(name, flat[name].size(1)) for name in groups], seed=4)
    record.log = lambda message, console=True: None
    result, meta = record.gptq_mixed_quantize(flat, hessians, h)
    record_state = record._rebank_state_dict(record.dequantize_mixed(result, meta, flat), layers, 512,
                                             theirs.blocks[0].attn.num_kv_heads * 64, theirs.mlp_up_bank.size(1))
    quantized = T.quantize_state_dict(ours.state_dict(), groups, hp, hessians)
    ours_after, theirs_after = T.dequantize_state_dict(quantized), our_state(record_state, layers)
    codes = [(T.unpack_values(quantized[name]["data"], quantized[name]["bits"], quantized[name]["packing"],
                              quantized[name]["shape"]), result[name + ".q"].float()) for name in groups]
    scales_equal = all(torch.equal(quantized[name]["scale"], result[name + ".scale"]) for name in groups)
    same = [name for name in groups if torch.equal(ours_after[name], theirs_after[name])]
    others = [name for name in theirs_after if name in ours_after and name not in groups]
    relative = lambda name: ((ours_after[name] - theirs_after[name].reshape(ours_after[name].shape)).abs().max()
                             / theirs_after[name].abs().max()).item()
    lqer = lambda names: ",".join(sorted(re.sub(r"\.weight$", "", name) for name in names))
    print(f"export width:512 matrices the same after the round trip: {len(same)} of {len(groups)}; their integers "
          f"that differ: {sum(int((ours != theirs).sum()) for ours, theirs in codes)} of "
          f"{sum(ours.numel() for ours, _ in codes)}; scales equal: {scales_equal}; LQER on record "
          f"{lqer(n for n, kind in meta.items() if 'lqer' in kind)} ours "
          f"{lqer(n for n in groups if 'lqer' in quantized[n])}"
          f"; other tensors the same: {sum(relative(name) == 0 for name in others)} of {len(others)}, the largest "
          f"relative difference {max(map(relative, others)):.0e}")


@contextlib.contextmanager
def unpinned():
    """The record's loader pins its host tensors, which needs a GPU; on the CPU they stay pageable."""
    empty, pin = torch.empty, torch.Tensor.pin_memory
    torch.empty = lambda *args, pin_memory=False, **kwargs: empty(*args, **kwargs)
    torch.Tensor.pin_memory = lambda self, *args: self
    try:
        yield
    finally:
        torch.empty, torch.Tensor.pin_memory = empty, pin


def compare_training_rows(record, shard, tmp):
    """The record's DocumentPackingLoader and our TrainLoader (TRAIN_ROWS=packed), one process of 8 micro-steps
    of 98,304 tokens, as on one GPU: each micro-batch's inputs, targets and cu_seqlens."""
    paths = [Path(tmp) / f"fineweb_train_00000{index}.bin" for index in range(2)]  # two copies: a whole step
    for path in paths:
        path.write_bytes(Path(shard).read_bytes())
    h = record.Hyperparameters()
    h.train_files, h.train_seq_len, h.rank, h.world_size = str(Path(tmp) / "fineweb_train_*.bin"), 2048, 0, 1
    ours = T.TrainLoader(list(map(str, paths)), 2048, 786_432 // 2048, -1, 0, 1, 8, varlen_bos_id=BOS,
                         piece_len=2048)
    fits = (ours.shard_offsets[1] - 1) // (786_432 // 8 + 1)  # micro-batches before the record's loader skips
    with unpinned():
        theirs = record.DocumentPackingLoader(h, torch.device("cpu"))
        same = []
        for micro in range(min(fits, 8)):
            x, y, cu_seqlens, _ = theirs.next_batch(786_432, 8)
            batch = ours.batch(0, micro)
            same.append(torch.equal(x, batch.inputs) and torch.equal(y, batch.targets)
                        and torch.equal(cu_seqlens, batch.cu_seqlens))
    print(f"training_rows micro-batches of 98304 tokens compared: {len(same)}; inputs, targets and cu_seqlens equal "
          f"in {sum(same)}; pieces in the first: {int((batch.cu_seqlens < batch.inputs.numel()).sum())}")


def main(argv=None):
    args = parse_args(argv)
    record = load_record(args.record_script)
    compare_forward(record, args)
    compare_ttt_forward(record, args)
    for clip in (0.0, 0.3):
        compare_steps(record, args, clip)
    for documents in (16, 18):
        compare_ttt_evaluation(record, args, documents)
    compare_ttt_evaluation(record, args, 18, packed=True)
    compare_export(record, args)
    if args.shard:
        with tempfile.TemporaryDirectory() as tmp:
            compare_training_rows(record, args.shard, tmp)


if __name__ == "__main__":
    main()
