"""DOC_ISOLATION: packed documents never see each other, in attention (SDPA's block-diagonal mask, FlashAttention's
variable-length entry point) and in the neon convolutions; SmearGate and BigramHash never cross a BOS anyway."""

import dataclasses
import sys

import pytest
import torch

import train_gpt as T
from conftest import REPO, run_script, small_hp, tiny_env
import flash_standins

BOS = 1
STACK = small_hp(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=97, bigram_buckets=31, bigram_dim=16,
                 ve_layers="2,3", ve_dim=16, value_residual=True, backout_layer=3, doc_isolation=True)
NEON = small_hp("neon213", num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=97, loop_start=0, loop_end=-1,
                num_loops=0, parallel_start_layer=-1, conv_k=5, mlp_conv_k=3, kernel_schedule="", doc_isolation=True)
LENGTHS = (9, 13, 10)  # three documents packed into one 32-token row


def documents(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([BOS]), torch.randint(2, 97, (n - 1,), generator=generator)]) for n in LENGTHS]


def attention(backend, monkeypatch):
    if backend == "sdpa":
        return T._sdpa, torch.float32
    fa3 = flash_standins.with_varlen(flash_standins.fa3_module(returns_lse=True), fa3=True)
    fa2 = flash_standins.with_varlen(flash_standins.fa2_module(), fa3=False)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    name, fn = T.select_attention(backend, "cuda")
    assert name == backend and fn.has_varlen
    return fn, torch.bfloat16  # the kernels take bf16 only


def model_of(hp, attention_fn):
    torch.manual_seed(0)
    model = T.GPT(hp, attention_fn, bos_id=BOS)
    model.looping = hp.num_loops > 0
    with torch.no_grad():  # zero-initialized projections would hide the attention: give them values
        for module in model.modules():
            if isinstance(module, T.CastedLinear) and module.zero_init:
                module.weight.normal_(0, 0.05)
    return model.eval()


def logits(model, tokens, dtype):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return model.logits(tokens[None]).float()[0]


@pytest.mark.parametrize("backend", ["sdpa", "fa3", "fa2"])
@pytest.mark.parametrize("hp", [STACK, NEON], ids=["stack", "neon213"])
def test_each_packed_document_scores_as_if_it_ran_alone(monkeypatch, backend, hp):
    attention_fn, dtype = attention(backend, monkeypatch)
    docs = documents()
    packed = logits(model_of(hp, attention_fn), torch.cat(docs), dtype)
    tolerance = 2e-4 if dtype == torch.float32 else 6e-2  # bf16: RoPE at other absolute positions rounds differently
    start, error = 0, 0.0
    for doc in docs:
        alone = logits(model_of(hp, attention_fn), doc, dtype)
        error = max(error, (packed[start:start + len(doc)] - alone).abs().max().item())
        start += len(doc)
    assert error < tolerance, (backend, error)
    # Without the setting the later documents read the earlier ones, by far more than that rounding.
    leaky = logits(model_of(dataclasses.replace(hp, doc_isolation=False), attention_fn), torch.cat(docs), dtype)
    later = slice(LENGTHS[0], sum(LENGTHS))
    assert (leaky[later] - packed[later]).abs().max().item() > 5 * error


def test_a_future_token_never_changes_earlier_logits_with_isolated_documents():
    model = model_of(NEON, T._sdpa)
    tokens = torch.cat(documents())
    base = logits(model, tokens, torch.float32)
    for position in (5, 12, 25):
        changed = tokens.clone()
        changed[position] = (changed[position] + 7) % 95 + 2
        assert torch.allclose(logits(model, changed, torch.float32)[:position], base[:position], atol=1e-5)


def test_packed_documents_mark_a_row_start_and_every_bos():
    ids = torch.tensor([[5, 6, BOS, 7, BOS, BOS, 8], [BOS, 9, 9, 9, BOS, 3, 3]])
    docs = T.packed_documents(ids, BOS)
    assert docs.offsets.tolist() == [[0, 1, 0, 1, 0, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    assert docs.ids.tolist() == [[1, 1, 2, 2, 3, 4, 4], [1, 1, 1, 1, 2, 2, 2]]


def test_flash_attention_without_varlen_or_under_compile_is_refused(monkeypatch):
    hp = dataclasses.replace(STACK)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", flash_standins.fa3_module())
    name, fn = T.select_attention("fa3", "cuda")
    with pytest.raises(T.ConfigError, match="flash_attn_varlen_func"):
        T.check_doc_isolation(hp, name, fn, use_compile=False)
    monkeypatch.setitem(sys.modules, "flash_attn_interface",
                        flash_standins.with_varlen(flash_standins.fa3_module(), fa3=True))
    name, fn = T.select_attention("fa3", "cuda")
    T.check_doc_isolation(hp, name, fn, use_compile=False)
    with pytest.raises(T.ConfigError, match="ATTN_BACKEND=sdpa"):
        T.check_doc_isolation(hp, name, fn, use_compile=True)
    T.check_doc_isolation(hp, "sdpa", T._sdpa, use_compile=True)  # the mask compiles


@pytest.mark.cuda_path
def test_the_block_diagonal_mask_compiles_as_one_graph():
    model = model_of(dataclasses.replace(NEON, num_layers=1), T._sdpa).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    tokens = torch.cat(documents())[None]
    loss = compiled(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.allclose(loss, model(tokens[:, :-1], tokens[:, 1:]), atol=1e-5)


@pytest.mark.cuda_path  # a whole run: CI's second step
def test_a_run_with_isolated_documents_trains_and_scores(sample, tmp_path):
    env = tiny_env(sample, DOC_ISOLATION=1, RUN_ID="docs", ITERATIONS=4)
    result = run_script([sys.executable, str(REPO / "train_gpt.py")], env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "docs.txt").read_text()
    assert " doc_isolation\n" in log and "final_int6_brotli_roundtrip_exact" in log
