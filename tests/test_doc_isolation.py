"""DOC_ISOLATION: packed documents never see each other, in attention (SDPA's block-diagonal mask, FlashAttention's
variable-length entry point) and in the neon convolutions; SmearGate and BigramHash never cross a BOS anyway."""

import dataclasses
import re
import sys

import numpy as np
import pytest
import torch

import train_gpt as T
from prepare_docs import write_shard
from conftest import REPO, run_script, set_run_env, small_hp, tiny_env
import flash_standins

BOS = 1
STACK = small_hp(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=97, bigram_buckets=31,
                 bigram_dim=16, ve_layers="2,3", ve_dim=16, value_residual=True, backout_layer=3, doc_isolation=True)
NEON = small_hp("neon213", num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=97, loop_start=0,
                loop_end=-1, num_loops=0, parallel_start_layer=-1, conv_k=5, mlp_conv_k=3, kernel_schedule="",
                doc_isolation=True)
LENGTHS = (9, 13, 10)  # three documents packed into one 32-token row


def documents(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([BOS]), torch.randint(2, 97, (n - 1,), generator=generator)]) for n in LENGTHS]


def attention(backend, monkeypatch):
    if backend in ("sdpa", "flex"):  # FlexAttention: forward only on the CPU (it has no backward there)
        return {"sdpa": T._sdpa, "flex": T._flex}[backend], torch.float32
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


def logits(model, tokens, dtype, piece_len=0):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return model.output_logits(model.hidden_states(tokens[None], piece_len=piece_len)).float()[0]


@pytest.mark.parametrize("backend", ["sdpa", "flex", "fa3", "fa2"])
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


def test_flash_attention_without_varlen_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn_interface", flash_standins.fa3_module())
    name, fn = T.select_attention("fa3", "cuda")
    with pytest.raises(T.ConfigError, match="flash_attn_varlen_func.*ATTN_BACKEND=sdpa"):
        T.check_doc_isolation(STACK, name, fn)
    T.check_doc_isolation(dataclasses.replace(STACK, doc_isolation=False), name, fn)  # plain causal attention
    monkeypatch.setitem(sys.modules, "flash_attn_interface",
                        flash_standins.with_varlen(flash_standins.fa3_module(), fa3=True))
    name, fn = T.select_attention("fa3", "cuda")
    T.check_doc_isolation(STACK, name, fn)
    T.check_doc_isolation(STACK, "sdpa", T._sdpa)  # the mask


@pytest.mark.parametrize("backend", ["fa3", "fa2"])
def test_the_varlen_kernels_match_the_sdpa_mask_forward_and_backward(monkeypatch, backend):
    """The stand-in varlen kernel's own backward (a custom op cannot use autograd) against autograd through SDPA's
    block-diagonal mask, with grouped-query K/V: 4 query heads over 2."""
    attention_fn, _ = attention(backend, monkeypatch)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 97, (2, 40), generator=generator)
    ids[0, [7, 20, 21]] = ids[1, [13]] = BOS
    docs = T.packed_documents(ids, BOS)
    inputs = [torch.randn(2, 40, heads, 16, generator=generator) for heads in (4, 2, 2)]
    results = []
    for fn, dtype in ((attention_fn, torch.bfloat16), (T._sdpa, torch.float32)):
        q, k, v = (t.to(dtype).requires_grad_() for t in inputs)
        out = fn(q, k, v, docs)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out.float() * weights).sum().backward()
        results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results):
        assert (got - want).abs().max() <= 0.02 * want.abs().max() + 1e-3, name


def test_cu_seqlens_list_every_document_start_then_pad_to_a_bucket_of_64():
    ids = torch.tensor([[5, 6, BOS, 7, BOS, BOS, 8], [BOS, 9, 9, 9, BOS, 3, 3]])
    cu = T.cu_seqlens_of(T.document_starts(ids, BOS))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 4, 5, 7, 11] + [14] * 58
    for starts, entries in ((63, 64), (64, 128), (127, 128)):  # the starts, then B * T, fill whole buckets
        many = torch.full((1, 400), 9)
        many[0, torch.arange(starts) * 3] = BOS
        cu = T.cu_seqlens_of(T.document_starts(many, BOS))
        assert cu.numel() == entries and cu[:starts].tolist() == list(range(0, 3 * starts, 3))
        assert (cu[starts:] == 400).all()


def test_training_batches_bring_the_cu_seqlens_the_model_would_find(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    tokens = np.random.default_rng(0).integers(2, 97, 20000)
    tokens[np.random.default_rng(1).choice(20000, 300, replace=False)] = BOS
    write_shard(path, tokens)
    for data_seed in (-1, 3):
        loader = T.TrainLoader([str(path)], 32, 16, data_seed, grad_accum_steps=2, varlen_bos_id=BOS)
        for step, micro in ((0, 0), (2, 1)):
            batch = loader.batch(step, micro)
            assert torch.equal(batch.cu_seqlens, T.cu_seqlens_of(T.document_starts(batch.inputs, BOS)))
            assert batch.cu_seqlens.numel() % 64 == 0 and batch.cu_seqlens.numel() > 8  # BOS inside the rows
        assert T.TrainLoader([str(path)], 32, 16, data_seed).batch(0, 0).cu_seqlens is None


def test_the_eager_varlen_model_finds_the_documents_once_per_batch(monkeypatch):
    attention_fn, _ = attention("fa3", monkeypatch)
    model = model_of(STACK, attention_fn)
    wrapped = T.train_model_of(model, use_compile=False, varlen=True)
    calls = []
    found = T.cu_seqlens_of
    monkeypatch.setattr(T, "cu_seqlens_of", lambda starts: calls.append(1) or found(starts))
    tokens = torch.stack([torch.cat(documents(seed)) for seed in range(2)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        alone, through = model(tokens[:, :-1], tokens[:, 1:]), wrapped(tokens[:, :-1], tokens[:, 1:])
    assert len(calls) == len(model.layer_order()) + 1  # alone once per attention call (looped layers too); wrapped once
    assert torch.equal(alone, through)


@pytest.mark.cuda_path  # FA3 only: FA2 goes through the same wrapper, and the eager tests cover its signature
@pytest.mark.parametrize("scope", ["model", "block"])
def test_flash_varlen_compiles_as_one_graph_for_any_number_of_documents(monkeypatch, scope, backend="fa3"):
    """The compiled model on FlashAttention's varlen path (a custom op, as the real builds register it): batches of
    9, 93 and 48 documents (two buckets of cu_seqlens) run in one fullgraph graph (COMPILE_SCOPE=model), or in the
    graphs the first batch built (block), with the cu_seqlens found outside it or brought along as the loader does,
    and the loss and gradients are the eager model's."""
    attention_fn, _ = attention(backend, monkeypatch)
    model = model_of(STACK, attention_fn).train()
    compiled = T.train_model_of(model, use_compile=True, varlen=True, scope=scope, backend="aot_eager")
    rows = lambda seed: torch.stack([torch.cat(documents(seed + row)) for row in range(3)])
    every_token, every_other = rows(3), rows(6)
    every_token[:] = BOS  # 31 one-token documents a row
    every_other[:, ::2] = BOS
    batches = [rows(0), every_token, every_other]
    graphs_before, graphs_after_first = T.compiled_graphs(), None
    for index, tokens in enumerate(batches):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        cu_seqlens = T.cu_seqlens_of(T.document_starts(inputs, BOS)) if index == 2 else None  # the loader's way
        flash_standins.VARLEN_CALLS.clear()
        results = []
        for run in (compiled, model):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = run(inputs, targets, cu_seqlens=cu_seqlens)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (compiled_loss, compiled_grads), (eager_loss, eager_grads) = results
        assert torch.allclose(compiled_loss, eager_loss, atol=1e-3), index
        assert len(compiled_grads) == len(eager_grads) and all(
            torch.allclose(a, b, atol=2e-3, rtol=2e-2) for a, b in zip(compiled_grads, eager_grads)), index
        entries = T.cu_seqlens_of(T.document_starts(inputs, BOS)).numel()
        assert set(flash_standins.VARLEN_CALLS) == {(entries - 1, True)}, index  # every layer, the padded bounds
        graphs_after_first = graphs_after_first or T.compiled_graphs()
    # One graph (model), or one per block structure plus the output (block), all built by the first batch
    assert T.compiled_graphs() == graphs_after_first and (scope == "block" or graphs_after_first - graphs_before == 1)


@pytest.mark.cuda_path
def test_the_block_diagonal_mask_compiles_as_one_graph():
    model = model_of(dataclasses.replace(NEON, num_layers=1), T._sdpa).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    tokens = torch.cat(documents())[None]
    loss = compiled(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.allclose(loss, model(tokens[:, :-1], tokens[:, 1:]), atol=1e-5)


def record_pieces(bos_positions, length, piece_len):
    """The piece starts of the 04-27 record's _build_cu_seqlens, restated: a segment from the row's start and from
    every BOS, each cut every piece_len tokens from its own start."""
    bounds = sorted({0, *bos_positions}) + [length]
    return [start for first, end in zip(bounds, bounds[1:]) for start in range(first, end, piece_len)]


def shard_of_documents(tmp_path, seed=0):
    """A training shard whose documents run from 1 to 120 tokens, so that many cross 32-token rows."""
    rng, pieces = np.random.default_rng(seed), []
    while sum(map(len, pieces)) < 20000:
        pieces.append(np.concatenate([[BOS], rng.integers(2, 97, int(rng.integers(0, 120)))]))
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.concatenate(pieces))
    return str(path)


def test_packed_rows_hold_the_micro_batchs_tokens_in_the_records_pieces(tmp_path):
    path = shard_of_documents(tmp_path)
    rows = T.TrainLoader([path], 32, 16, -1, grad_accum_steps=8, varlen_bos_id=BOS)
    packed = T.TrainLoader([path], 32, 16, -1, grad_accum_steps=8, varlen_bos_id=BOS, piece_len=32)
    cut_inside = 0
    for step, micro in ((0, 0), (0, 7), (5, 3)):
        seq, one = rows.batch(step, micro), packed.batch(step, micro)
        assert one.inputs.shape == (1, 64) and torch.equal(one.inputs, seq.inputs.reshape(1, -1))
        assert torch.equal(one.targets, seq.targets.reshape(1, -1))
        inputs = one.inputs[0]
        pieces = record_pieces(torch.nonzero(inputs == BOS).flatten().tolist(), inputs.numel(), 32)
        assert sorted(set(one.cu_seqlens.tolist()) - {inputs.numel()}) == pieces
        assert torch.equal(one.cu_seqlens, T.cu_seqlens_of(T.document_starts(one.inputs, BOS, 32)))
        cut_inside += sum(start % 32 != 0 and inputs[start] != BOS for start in pieces)
    assert cut_inside  # pieces cut from a document's start, not from the row's
    with pytest.raises(T.ConfigError, match="TRAIN_ROWS=packed makes each micro-batch one span"):
        T.TrainLoader([path], 32, 16, -1, grad_accum_steps=2, piece_len=32)  # 8 spans over 2 micro-batches


@pytest.mark.parametrize("backend", ["sdpa", "fa3"])
def test_a_packed_row_scores_each_piece_as_if_it_ran_alone(monkeypatch, backend):
    """Pieces of at most TRAIN_SEQ_LEN (8 here) from each document's start: the 13-token document is two pieces, and
    the row (32 tokens) is longer than the rotary tables (8). The SmearGate and BigramHash, which read the previous
    token across a cut that is not a BOS (as in the record), are off."""
    attention_fn, dtype = attention(backend, monkeypatch)
    hp = dataclasses.replace(STACK, train_rows="packed", train_seq_len=8, eval_seq_len=8, eval_stride=8,
                             smear_gate=False, bigram_buckets=0)
    docs, model = documents(), model_of(hp, attention_fn)
    packed = logits(model, torch.cat(docs), dtype, piece_len=hp.piece_len)
    pieces = [piece for doc in docs for piece in doc.split(8)]
    tolerance = 2e-4 if dtype == torch.float32 else 6e-2
    start, error = 0, 0.0
    for piece in pieces:
        error = max(error, (packed[start:start + len(piece)] - logits(model, piece, dtype)).abs().max().item())
        start += len(piece)
    assert error < tolerance, (backend, error)
    whole = logits(model, torch.cat(docs), dtype)  # rows that are not packed: the documents whole
    assert (whole - packed).abs().max().item() > 5 * error  # their second pieces read their first
    if backend == "fa3":  # the varlen wrapper cuts the same pieces for the cu_seqlens it finds
        row = torch.cat(docs)[None]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            wrapped = T.VarlenDocuments(model, BOS)(row[:, :-1], row[:, 1:], reduction="none", piece_len=8)
            direct = model(row[:, :-1], row[:, 1:], reduction="none", piece_len=8)  # cu_seqlens from its pieces
        torch.testing.assert_close(wrapped.float(), direct.float(), rtol=0, atol=0)


def test_packed_rows_are_refused_where_they_cannot_be_honoured():
    with pytest.raises(T.ConfigError, match="TRAIN_ROWS"):
        T.Hyperparameters.from_env({"TRAIN_ROWS": "packed"})  # without DOC_ISOLATION=1
    with pytest.raises(T.ConfigError, match="TRAIN_ROWS"):
        T.Hyperparameters.from_env({"DOC_ISOLATION": "1", "TRAIN_ROWS": "packed", "DATA_SEED": "3"})
    hp, _ = T.Hyperparameters.from_env({"DOC_ISOLATION": "1", "TRAIN_ROWS": "packed"})
    with pytest.raises(T.ConfigError, match="SDPA would build"):
        T.check_doc_isolation(hp, "sdpa", T._sdpa, "cuda")
    T.check_doc_isolation(hp, "sdpa", T._sdpa, "cpu")  # short rows on the CPU: the mask is small


def test_a_run_with_packed_rows_cuts_its_training_rows_into_pieces_and_nothing_else(sample, tmp_path, monkeypatch):
    """In-process, every forward's documents recorded: training's micro-batches and GPTQ's calibration (training
    rows) are one row of 512 tokens cut into pieces of TRAIN_SEQ_LEN=128; the validation rows of EVAL_SEQ_LEN=256,
    longer than a piece, are not cut, so a document spans its row as without TRAIN_ROWS=packed."""
    seen, original = [], T.packed_documents

    def recorded(input_ids, bos_id, cu_seqlens=None, block_mask=False, piece_len=0):
        seen.append((tuple(input_ids.shape), piece_len))
        return original(input_ids, bos_id, cu_seqlens, block_mask, piece_len)
    monkeypatch.setattr(T, "packed_documents", recorded)
    env = tiny_env(sample, DOC_ISOLATION=1, TRAIN_ROWS="packed", RUN_ID="packed", ITERATIONS=3, GRAD_ACCUM_STEPS=8,
                   TRAIN_BATCH_TOKENS=4096, TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=256, GPTQ_CALIBRATION_BATCHES=2)
    set_run_env(monkeypatch, env, tmp_path)
    T.main()
    log = (tmp_path / "logs" / "packed.txt").read_text()
    assert re.search(r"^features: .* doc_isolation\(packed_rows,pieces:128\)$", log, re.M)
    assert re.search(r"^step:3/3 train_loss:[\d.]+ ", log, re.M) and "final_int6_brotli_roundtrip_exact" in log
    assert re.search(r"^gptq_calibration: batches:2 ", log, re.M)
    assert seen.count(((1, 512), 128)) == (3 + 2) * 8  # 3 steps and 2 calibration batches of 8 micro-batches
    validation = [piece_len for shape, piece_len in seen if shape[1] == 256]
    assert validation and set(validation) == {0}
    assert {piece_len for shape, piece_len in seen if shape != (1, 512)} == {0}


@pytest.mark.cuda_path  # a whole run: CI's second step
def test_a_run_with_isolated_documents_trains_and_scores(sample, tmp_path):
    env = tiny_env(sample, DOC_ISOLATION=1, RUN_ID="docs", ITERATIONS=4, EVAL_STRIDE=128, EVAL_DOC_ISOLATED=1)
    result = run_script([sys.executable, str(REPO / "train_gpt.py")], env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "docs.txt").read_text()
    assert " doc_isolation\n" in log and "final_int6_brotli_roundtrip_exact" in log
    assert "final_sliding_window_exact" in log and " stride:128 doc_isolated:True " in log


def test_flexattention_over_packed_documents_equals_the_sdpa_mask_and_builds_its_block_mask_once():
    """Grouped-query K/V (4 query heads over 2), documents of every length, a row that is one document."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 97, (3, 200), generator=generator)
    ids[0, [7, 20, 21, 150]] = ids[1, [13]] = BOS
    q, k, v = (torch.randn(3, 200, heads, 16, generator=generator) for heads in (4, 2, 2))
    mask_only = T.packed_documents(ids, BOS)
    docs = T.packed_documents(ids, BOS, block_mask=True)
    assert mask_only.block_mask is None and docs.block_mask is not None
    with torch.no_grad():
        torch.testing.assert_close(T._flex(q, k, v, docs), T._sdpa(q, k, v, mask_only), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(T._flex(q, k, v), T._sdpa(q, k, v))  # causal rows: SDPA itself
    model = model_of(STACK, T._flex)
    assert model.block_mask and not model_of(STACK, T._sdpa).block_mask


@pytest.mark.parametrize("rows, length, block, bos_per_row, piece_len", [
    (3, 200, 16, 5, 0),  # a ragged last block
    (2, 256, 32, 3, 0),
    (1, 1000, 64, 0, 0),  # one document: every block before the diagonal full
    (2, 777, 16, 40, 50),  # short documents, pieces (TRAIN_ROWS=packed), documents inside a block
    (1, 50, 128, 1, 0),  # shorter than a block
])
def test_the_documents_block_mask_is_the_one_create_block_mask_finds_from_every_pair(rows, length, block, bos_per_row,
                                                                                       piece_len):
    """Built from block ends, it must equal PyTorch's own, which evaluates the mask at all (query, key) pairs: the
    same partial and full blocks in the same order, in both directions (the backward reads the transposed ones)."""
    from torch.nn.attention.flex_attention import create_block_mask
    generator = torch.Generator().manual_seed(length)
    input_ids = torch.randint(2, 97, (rows, length), generator=generator)
    for row in range(rows):
        input_ids[row, torch.randint(length, (bos_per_row,), generator=generator)] = BOS
    ids = T.packed_documents(input_ids, BOS, piece_len=piece_len).ids
    ours = T.document_block_mask(ids, block)
    expected = create_block_mask(lambda b, h, q, k: (q >= k) & (ids[b, q] == ids[b, k]), rows, None, length, length,
                                 device="cpu", BLOCK_SIZE=block)
    assert (ours.kv_num_blocks > 0).all() and (ours.full_kv_num_blocks.sum() > 0) == (length >= 2 * block)
    for name in ("seq_lengths", "BLOCK_SIZE", "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        mine, theirs = getattr(ours, name), getattr(expected, name)
        assert (mine == theirs).all() if isinstance(mine, torch.Tensor) else tuple(mine) == tuple(theirs), name
    q = torch.randn(rows, length, 2, 8, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(T._flex(q, q, q, T.PackedDocuments(ids, ids, block_mask=ours)),
                                   T._sdpa(q, q, q, T.PackedDocuments(ids, ids)), rtol=1e-5, atol=1e-5)


def test_the_selector_takes_flexattention_for_documents_on_a_compiled_gpu_without_flashattention(monkeypatch):
    inject = lambda fa3, fa2: (monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3),
                               monkeypatch.setitem(sys.modules, "flash_attn", fa2))
    inject(None, None)
    assert T.select_attention("auto", "cuda", documents=True, compiled=True)[0] == "flex"
    assert T.select_attention("auto", "cuda", documents=False, compiled=True)[0] == "sdpa"
    assert T.select_attention("auto", "cuda", documents=True, compiled=False)[0] == "sdpa"  # eager flex is slow
    assert T.select_attention("auto", "cpu", documents=True, compiled=True)[0] == "sdpa"
    assert T.select_attention("flex", "cuda") == ("flex", T._flex)
    with pytest.raises(T.ConfigError, match="no backward on the CPU"):
        T.select_attention("flex", "cpu")
    inject(flash_standins.with_varlen(flash_standins.fa3_module(), fa3=True), None)
    assert T.select_attention("auto", "cuda", documents=True, compiled=True)[0] == "fa3"
    assert not T.uses_varlen(STACK, "flex") and T.uses_varlen(STACK, "fa3")


@pytest.mark.cuda_path  # a compile: CI's second step
def test_flexattention_compiles_as_one_graph_for_any_length_and_document_count():
    hp = dataclasses.replace(NEON, num_layers=1, conv_k=0, mlp_conv_k=0)  # one layer: the attention is what counts
    model, reference = model_of(hp, T._flex), model_of(hp, T._sdpa)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    graphs_before = T.compiled_graphs()
    # Rows of several FlexAttention blocks, so the fused kernel skips some, masks some and takes some whole.
    for length, bos in ((530, [400]), (300, [5, 140, 141])):
        tokens = torch.randint(2, 97, (2, length), generator=torch.Generator().manual_seed(length))
        tokens[0, bos] = BOS
        with torch.no_grad():
            torch.testing.assert_close(compiled(tokens), reference(tokens), rtol=1e-4, atol=1e-4)
    assert T.compiled_graphs() - graphs_before == 1
