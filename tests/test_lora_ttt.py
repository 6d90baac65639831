"""Per-document LoRA TTT (TTT_METHOD=lora): the ledger, the record's queue and phases, and legality; and the
evaluation's host work (chunks, sliding batches and TTT steps never wait for the device)."""

import dataclasses
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt as T
from conftest import REPO, small_hp

sys.path.insert(0, str(REPO / "benchmarks"))
from optimizer_step import DispatchedOperators  # noqa: E402

CPU = torch.device("cpu")
AUTOCAST_OFF = lambda: torch.autocast("cpu", enabled=False)
# A looped middle layer and a parallel last layer: the virtual stack has 5 slots for 4 blocks.
HP = small_hp(val_batch_size=256, ttt_enabled=True, ttt_method="lora", ttt_lora_rank=4, ttt_lora_alpha=8.0,
              ttt_lora_lr=0.02, ttt_chunk_size=8, ttt_eval_seq_len=24, ttt_batch_size=3, ttt_weight_decay=0.0,
              ttt_warm_start_a=False)
LUTS = T.TargetBytes(np.arange(10_000) % 3 + 1)  # 1 to 3 bytes per target
BOS = 1


def model_of(seed=0, hp=HP):
    torch.manual_seed(seed)
    model = T.GPT(hp, bos_id=BOS)
    model.looping = True
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def documents_stream(lengths, seed=0):
    """BOS, then a document's tokens (never BOS), for each length in turn."""
    rng = np.random.default_rng(seed)
    pieces = [np.concatenate([[BOS], rng.integers(2, 64, length - 1)]) for length in lengths]
    return torch.from_numpy(np.concatenate(pieces).astype(np.int32))


LENGTHS = [30, 7, 45, 12, 3, 60, 20, 9]


def run(tokens, hp=HP, seed=0, rank=0, world_size=1, budget_left=None, log=lambda message: None):
    model = model_of(seed, hp)
    starts = T.doc_starts_of(tokens, BOS)
    return T.per_document_lora_ttt(T.LoraTTTModels(model, model, model), tokens, LUTS, hp, rank, world_size, CPU,
                                   AUTOCAST_OFF, starts, log=log, budget_left=budget_left)


def per_document(report):
    return report.per_document


def test_the_queue_is_the_records_longest_batches_first_and_phases_take_its_prefix():
    documents = T.documents_of([0, 30, 37, 82, 94, 97, 157, 177], 186)
    assert [d.targets for d in documents] == LENGTHS
    queue = T.document_queue(documents, 3)
    # ascending: 3 7 9 | 12 20 30 | 45 60; longest batch first, each batch ascending
    assert [(index, [d.targets for d in batch]) for index, batch in queue] == [
        (2, [45, 60]), (1, [12, 20, 30]), (0, [3, 7, 9])]
    plan = T.document_phases(queue, prefix_docs=4, num_phases=2)
    # 2 documents scored after the first batch: phase 1; 4 after the second: phase 2, whose set is taken by batch
    # index, then position (the record's sort), and cut at 4
    planned = {position: [d.targets for d in docs] for position, docs in plan.items()}
    assert planned == {0: [45, 60], 1: [12, 20, 30, 45]}
    assert T.document_phases(queue, prefix_docs=8, num_phases=1) == {}  # would end after the last batch
    assert T.queue_rounds(3, [0], 2) == [[0], [1, 2]] and T.queue_rounds(5, [], 2) == [[0, 1], [2, 3], [4]]


def test_every_target_is_scored_exactly_once_with_exact_bytes_and_the_progress_reaches_the_last_round():
    tokens, lines = documents_stream(LENGTHS), []
    report = run(tokens, log=lines.append)
    sums = per_document(report)
    assert sums[:, 1].tolist() == LENGTHS[:-1] + [LENGTHS[-1] - 1]  # the last document has no next BOS to predict
    assert report.result[2] == tokens.numel() - 1
    assert sums[:, 2].sum().item() == LUTS.prefix[tokens.numel() - 1]
    assert report.adapted_rounds == report.rounds == 3
    progress = [line for line in lines if line.startswith("ttt_progress: ")]
    assert progress[-1].startswith("ttt_progress: round:3/3 adapting ") and progress[-1].endswith(" eta:0s")


def test_a_documents_first_chunk_scores_as_without_adaptation_and_later_chunks_change():
    tokens = documents_stream(LENGTHS)
    adapted = run(tokens)
    frozen = run(tokens, budget_left=lambda: -1.0)  # no budget: nothing adapts
    assert frozen.adapted_rounds == 0
    targets = frozen.per_document[:, 1].tolist()
    one_chunk = [i for i, count in enumerate(targets) if count <= HP.ttt_chunk_size]
    longer = [i for i, count in enumerate(targets) if count > HP.ttt_chunk_size]
    assert one_chunk and longer
    assert torch.equal(adapted.per_document[one_chunk], frozen.per_document[one_chunk])
    assert all(adapted.per_document[i, 0] != frozen.per_document[i, 0] for i in longer)
    # A long document's first chunk too: it is scored before its adapters have trained on anything.
    assert torch.equal(chunk_sums(tokens, 5, 1), chunk_sums(tokens, 5, 1, budget_left=lambda: -1.0))
    assert not torch.equal(chunk_sums(tokens, 5, 2), chunk_sums(tokens, 5, 2, budget_left=lambda: -1.0))
    # Without adaptation the scores are the model's own, each window read alone.
    model = model_of()
    for document in T.documents_of(T.doc_starts_of(tokens, BOS), tokens.numel() - 1)[:3]:
        total = 0.0
        for chunk in range(-(-document.targets // HP.ttt_chunk_size)):
            start, first, end = T.chunk_window(document, chunk, HP.ttt_chunk_size, HP.ttt_eval_seq_len)
            row = tokens[document.start + start:document.start + end + 1].long()[None]
            with torch.no_grad():
                total += model(row[:, :-1], row[:, 1:], reduction="none")[0, first - start:].double().sum().item()
        assert frozen.per_document[document.index, 0].item() == pytest.approx(total, rel=1e-6)


def test_altering_a_later_chunk_or_a_later_document_changes_no_earlier_score():
    tokens = documents_stream(LENGTHS)
    reference = run(tokens).per_document
    document = T.documents_of(T.doc_starts_of(tokens, BOS), tokens.numel() - 1)[5]  # 60 targets: 8 chunks
    altered = tokens.clone()
    cut = document.start + 3 * HP.ttt_chunk_size + 1  # tokens from here are targets of chunk 3 onwards
    altered[cut:document.start + document.targets] = (altered[cut:document.start + document.targets] + 7) % 62 + 2
    changed = run(altered).per_document
    # the other documents are in other rows of the batch, or other batches: each has its own adapters
    others = [i for i in range(len(LENGTHS)) if i != 5]
    assert torch.equal(changed[others], reference[others])
    # within the document, the first three chunks are scored before anything from the altered tokens is trained on
    first_three = chunk_sums(altered, 5, 3)
    assert torch.equal(first_three, chunk_sums(tokens, 5, 3))
    assert not torch.equal(changed[5], reference[5])


def altered_documents(tokens, documents):
    altered = tokens.clone()
    for document in documents:  # every token after its BOS, up to the next document's BOS
        span = slice(document.start + 1, document.start + document.targets)
        altered[span] = (altered[span] + 7) % 62 + 2
    return altered


def test_a_short_batch_adapts_adapters_of_its_own_and_leaves_the_warm_ones_as_they_were():
    """With TTT_WARM_START_A=1, A carries what a rank's earlier batches taught it; the batch of fewer documents
    than TTT_BATCH_SIZE (the queue's first) gets adapters of its own, as in the 04-27 record, so it teaches the
    other batches nothing."""
    warm = dataclasses.replace(HP, ttt_warm_start_a=True)
    tokens = documents_stream([30, 17, 45, 12, 3, 60, 20, 9])  # the batches: 45 60 | 17 20 30 | 3 8 12 targets
    documents = T.documents_of(T.doc_starts_of(tokens, BOS), tokens.numel() - 1)
    (_, short), (_, full), (_, last) = T.document_queue(documents, warm.ttt_batch_size)
    assert len(short) < warm.ttt_batch_size == len(full) == len(last)
    reference = run(tokens, warm).per_document
    indices = lambda batch: [document.index for document in batch]
    changed = run(altered_documents(tokens, short), warm).per_document
    assert torch.equal(changed[indices(full + last)], reference[indices(full + last)])
    assert not torch.equal(changed[indices(short)], reference[indices(short)])
    # a full batch's A does reach the next full batch: the 12-target document's second chunk reads it
    changed = run(altered_documents(tokens, full), warm).per_document
    assert not torch.equal(changed[indices(last)], reference[indices(last)])


def chunk_sums(tokens, document_index, chunks, budget_left=None):
    """The loss of the first `chunks` chunks of one document, from a run that records every chunk's sums."""
    recorded = []
    original = T.adapt_documents

    def recording(forward, adapters, ledger, batch, *args):
        def spy(inputs, targets, reduction, adapters):
            losses = forward(inputs, targets, reduction=reduction, adapters=adapters)
            for row, document in enumerate(batch):
                if document.index == document_index:
                    recorded.append(losses[row].detach().clone())
            return losses
        return original(spy, adapters, ledger, batch, *args)

    T.adapt_documents = recording
    try:
        run(tokens, budget_left=budget_left)
    finally:
        T.adapt_documents = original
    return torch.stack([recorded[chunk][chunk * HP.ttt_chunk_size:(chunk + 1) * HP.ttt_chunk_size]
                        for chunk in range(chunks)])


def test_batched_adapters_equal_one_document_at_a_time():
    tokens = documents_stream(LENGTHS)
    batched = run(tokens)
    alone = run(tokens, dataclasses.replace(HP, ttt_batch_size=1))
    assert torch.allclose(batched.per_document, alone.per_document, rtol=1e-5, atol=1e-6)


def test_two_ranks_score_what_one_does():
    tokens = documents_stream(LENGTHS)
    one = run(tokens).per_document
    shares = [run(tokens, rank=rank, world_size=2).per_document for rank in range(2)]
    # without a process group each rank keeps only its own documents' sums (bytes are filled on every rank)
    both = shares[0][:, :2] + shares[1][:, :2]
    assert torch.allclose(both, one[:, :2], rtol=1e-6, atol=1e-8)
    assert all(((s[:, 1] > 0).sum() > 0) for s in shares)  # each rank scored a share


def test_the_ledger_refuses_unscored_targets_and_documents():
    tokens = documents_stream([10, 10])
    documents = T.documents_of(T.doc_starts_of(tokens, BOS), tokens.numel() - 1)
    ledger = T.ScoredDocuments(tokens, documents)
    ledger.commit(documents[0], 8)
    assert ledger.training_tokens(documents[0], 0, 8).tolist() == tokens[:9].tolist()
    with pytest.raises(RuntimeError, match="illegal"):
        ledger.training_tokens(documents[0], 0, 9)
    with pytest.raises(RuntimeError, match="illegal"):
        ledger.document_tokens(documents[0])
    with pytest.raises(RuntimeError):
        ledger.commit(documents[0], 7)


PHASED = dataclasses.replace(HP, phased_ttt_enabled=True, phased_ttt_prefix_docs=5, phased_ttt_num_phases=2,
                             global_ttt_lr=0.05, global_ttt_chunk_tokens=32, global_ttt_batch_seqs=2)


def test_a_phase_trains_only_on_scored_documents_and_changes_no_score_before_it(monkeypatch):
    tokens = documents_stream(LENGTHS)
    plain = run(tokens)
    read = []
    original = T.ScoredDocuments.document_tokens

    def spy(self, document):
        read.append((document.index, self.scored[document.index] == document.targets))
        return original(self, document)

    monkeypatch.setattr(T.ScoredDocuments, "document_tokens", spy)
    phased = run(tokens, PHASED)
    assert phased.phases == 2 and read and all(fully_scored for _, fully_scored in read)
    queue = T.document_queue(T.documents_of(T.doc_starts_of(tokens, BOS), tokens.numel() - 1), HP.ttt_batch_size)
    first_batch = [d.index for d in queue[0][1]]
    assert torch.equal(phased.per_document[first_batch], plain.per_document[first_batch])  # scored before phase 1
    later = [d.index for _, batch in queue[1:] for d in batch if d.targets > 1]
    assert not torch.equal(phased.per_document[later], plain.per_document[later])


def test_the_budget_stops_adapting_never_scoring():
    tokens = documents_stream(LENGTHS)
    seconds = iter([100.0] + [-1.0] * 100)  # the first round fits; nothing after it does
    report = run(tokens, PHASED, budget_left=lambda: next(seconds))
    assert report.adapted_rounds == 1 and report.phases == 0
    assert report.result[2] == tokens.numel() - 1


def test_adapters_start_as_the_identity_and_cover_every_virtual_layer():
    model = model_of()
    adapters = T.DocumentAdapters(model, 2, HP, torch.Generator().manual_seed(0))
    assert len(adapters.q) == len(model.layer_order()) == 5
    inputs = torch.randint(2, 64, (2, 16))
    assert torch.equal(model(inputs, adapters=adapters), model(inputs))
    off = T.DocumentAdapters(model, 2, dataclasses.replace(HP, ttt_k_lora=False, ttt_o_lora=False, ttt_mlp_lora=False),
                             torch.Generator().manual_seed(0))
    assert off.k is None and off.o is None and off.mlp is None
    with torch.no_grad():
        for module in adapters.modules():
            if isinstance(module, T.BatchedLoRA):
                module.b.normal_()
    out = model(inputs, adapters=adapters)
    assert not torch.equal(out, model(inputs))
    # row 1's adapters never touch row 0
    with torch.no_grad():
        for module in adapters.modules():
            if isinstance(module, T.BatchedLoRA):
                module.b[1].normal_()
    assert torch.equal(model(inputs, adapters=adapters)[0], out[0])


def fake_run(hp, model, lines):
    from types import SimpleNamespace
    return SimpleNamespace(hp=hp, use_compile=True, device=CPU, autocast=AUTOCAST_OFF, log=lines.append)


def test_a_forward_torch_compile_cannot_build_falls_back_to_eager_before_scoring(monkeypatch):
    def broken(*args, **kwargs):
        raise torch._dynamo.exc.Unsupported("an opaque extension")
    monkeypatch.setattr(T.torch, "compile", lambda model, **kwargs: broken)
    model, lines = model_of(), []
    assert T.lora_forward_of(fake_run(HP, model, lines), model) is model
    assert "runs eager, the same math" in lines[-1] and all(p.requires_grad for p in model.parameters())


@pytest.fixture
def fresh_dynamo():
    """Graphs compiled here must not count against the recompile limit of the tests that run after this one."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.cuda_path  # a dynamic-shape compile: CI's second step
def test_the_compiled_forward_scores_as_the_eager_one(fresh_dynamo):
    tokens = documents_stream(LENGTHS)
    eager = run(tokens).per_document
    model, lines = model_of(), []
    compiled = T.lora_forward_of(fake_run(HP, model, lines), model, backend="aot_eager")
    assert compiled is not model and lines[-1].startswith("ttt_lora: compiled")
    starts, graphs = T.doc_starts_of(tokens, BOS), T.compiled_graphs()
    report = T.per_document_lora_ttt(T.LoraTTTModels(model, compiled, model), tokens, LUTS, HP, 0, 1, CPU,
                                     AUTOCAST_OFF, starts, log=lambda message: None)
    assert torch.allclose(report.per_document, eager, rtol=1e-5, atol=1e-6)
    assert T.compiled_graphs() == graphs  # every batch and context length ran on the graphs built beforehand


class DeviceWaits(TorchDispatchMode):
    """Records what would make the host wait for a GPU: a value read back (`.item()`, `bool()`: a scalar read), the
    size of a boolean selection (`x[mask]`), and, through `to` (patched by the test), a copy to a device, which from
    pageable memory waits for every kernel queued before it."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        boolean_index = name == "aten.index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if name in ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select") or boolean_index:
            self.waits.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def device_waits(monkeypatch):
    """A DeviceWaits that also records every Tensor.to naming a device that train_gpt.py calls (torch's own, as in
    clip_grad_norm_, move results between devices that are already the same)."""
    waits = DeviceWaits()
    original = torch.Tensor.to

    def to(tensor, *args, **kwargs):
        names_device = any(isinstance(arg, (torch.device, str)) for arg in args) or "device" in kwargs
        if names_device and sys._getframe(1).f_code.co_filename == T.__file__:
            waits.waits.append("to(device)")
        return original(tensor, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return waits


def test_a_chunk_of_lora_ttt_and_a_batch_of_sliding_windows_never_wait_for_the_device(device_waits):
    """The per-chunk work of LoRA TTT, the sliding window's per-batch scoring and a step of chunk TTT (or of the
    phases' global SGD) queue their work and go on: their inputs travel by `to_device` (pinned, asynchronous on a
    GPU) and nothing is read back."""
    tokens = documents_stream(LENGTHS)
    model = model_of()
    documents = T.documents_of(T.doc_starts_of(tokens, BOS), tokens.numel() - 1)
    batch = [documents[0], documents[2], documents[5]]  # 30, 45 and 60 targets: 4 to 8 chunks, trained on
    adapters = T.DocumentAdapters(model, HP.ttt_batch_size, HP, T.lora_generator(HP, 0))
    ledger = T.ScoredDocuments(tokens, documents)
    windows = T.plan_windows(tokens.numel() - 1, 24, 8, T.doc_starts_of(tokens, BOS))
    scored = T.ScoredTargets(tokens)
    scored.commit(tokens.numel() - 1)
    params = T.ttt_parameters(model, HP)
    before = [p.detach().clone() for p in params]
    with device_waits:
        sums = T.adapt_documents(model, adapters, ledger, batch, tokens, HP, CPU, AUTOCAST_OFF, True)
        scores = T.score_windows(model, tokens, windows, LUTS, 24, 4, CPU, AUTOCAST_OFF)
        T.adapt_on_chunk(model, scored, 0, 100, params, torch.optim.SGD(params, lr=0.01, momentum=0.9),
                         T.AdaptSteps(epochs=1, batch_seqs=4, grad_clip=1.0), 24, 0, 1, CPU, AUTOCAST_OFF)
    assert sums[:, 1].tolist() == [30, 45, 60] and scores[1].item() == tokens.numel() - 1
    assert adapters.q[0].b.abs().sum() > 0 and not torch.equal(params[0], before[0])  # both adapted
    assert device_waits.waits == []


def test_a_chunk_runs_as_many_operators_for_three_documents_as_for_two():
    """Building a chunk's rows, masks and training weights takes the same operators however many documents it
    holds: nothing is done row by row (on a GPU each would be a launch)."""
    tokens = documents_stream([30] * 3)
    documents = T.documents_of(T.doc_starts_of(tokens, BOS), tokens.numel() - 1)
    counts = []
    for batch in (documents[:2], documents):
        model = model_of()
        adapters = T.DocumentAdapters(model, HP.ttt_batch_size, HP, T.lora_generator(HP, 0))
        with DispatchedOperators() as dispatched:
            T.adapt_documents(model, adapters, T.ScoredDocuments(tokens, documents), batch, tokens, HP, CPU,
                              AUTOCAST_OFF, True)
        counts.append(dispatched.counts)
    assert counts[0] == counts[1]


def test_the_eval_budgets_clock_reads_the_time_only_after_the_device_is_done(monkeypatch):
    """Evaluation queues its kernels without waiting, so the host's clock runs ahead of the device: every time
    TTT's budget clock takes (scoring, adapting, a phase) must follow a device synchronize, in LoRA TTT and in chunk
    TTT alike."""
    events = []
    monkeypatch.setattr(T, "synchronize_device", lambda device: events.append("synchronize"))
    for name in ("scored", "adapted"):
        original = getattr(T.TTTClock, name)
        monkeypatch.setattr(T.TTTClock, name, lambda self, *args, original=original, name=name:
                            events.append(name) or original(self, *args))
    tokens = documents_stream(LENGTHS)
    run(tokens, PHASED, budget_left=lambda: 100.0)
    chunk = dataclasses.replace(PHASED, ttt_method="chunk", ttt_chunk_tokens=48, ttt_epochs=1, ttt_batch_seqs=2)
    T.score_first_ttt(model_of(0, chunk), tokens, LUTS, chunk, 0, 1, CPU, AUTOCAST_OFF, T.doc_starts_of(tokens, BOS),
                      log=lambda message: None, budget_left=lambda: 100.0, phases=[96])
    clocks = [index for index, event in enumerate(events) if event != "synchronize"]
    assert {events[index] for index in clocks} == {"scored", "adapted"} and len(clocks) > 10
    assert all(events[index - 1] == "synchronize" for index in clocks)


def test_new_adapters_are_drawn_row_by_row_on_the_host_and_sent_in_one_copy():
    adapters = T.DocumentAdapters(model_of(), HP.ttt_batch_size, HP, T.lora_generator(HP, 0))
    counts = []
    for documents in (2, 3):
        with DispatchedOperators() as dispatched:
            adapters.reset(False, [T.lora_generator(HP, index) for index in range(documents)])
        counts.append(dispatched.counts)
    assert counts[0]["aten.copy_"] == counts[1]["aten.copy_"] > 0  # one copy a module, not one a row
    lora = adapters.q[0]  # the first module: the first draw of each document's generator
    draw = torch.empty(lora.a.shape[1:]).uniform_(-lora.bound, lora.bound, generator=T.lora_generator(HP, 2))
    assert torch.equal(lora.a[2], draw) and not torch.equal(lora.a[1], draw)


def test_each_adapter_switch_takes_its_adapters_away_and_only_q_and_v_act_where_they_alone_are_perturbed():
    model, inputs = model_of(), torch.randint(2, 64, (2, 16))
    for which in ("q", "k", "v", "o", "mlp"):
        off = T.DocumentAdapters(model, 2, dataclasses.replace(HP, **{f"ttt_{which}_lora": False}),
                                 torch.Generator().manual_seed(0))
        assert getattr(off, which) is None and getattr(off.layer(0), which) is None
    for which in ("q", "v"):  # the Q and V adapters reach the output: turning them off changes what TTT can learn
        adapters = T.DocumentAdapters(model, 2, HP, torch.Generator().manual_seed(0))
        with torch.no_grad():
            for module in getattr(adapters, which):
                module.b.normal_()
        assert not torch.equal(model(inputs, adapters=adapters), model(inputs))


def test_ttt_mask_no_qv_adapts_without_q_and_v_adapters_and_scores_differently():
    hp, sources = T.Hyperparameters.from_env({"PRESET": "record", "TTT_MASK": "no_qv"})
    assert (hp.ttt_q_lora, hp.ttt_k_lora, hp.ttt_v_lora) == (False, True, False)
    assert sources["ttt_v_lora"] == "env:TTT_MASK=no_qv(translated)"
    tokens = documents_stream(LENGTHS)
    masked = run(tokens, dataclasses.replace(HP, ttt_q_lora=False, ttt_v_lora=False))
    full = run(tokens)
    assert masked.adapted_rounds == full.adapted_rounds > 0
    assert torch.equal(masked.per_document[:, 1], full.per_document[:, 1])
    assert not torch.equal(masked.per_document[:, 0], full.per_document[:, 0])


def test_the_local_lr_multiplier_scales_the_adapters_learning_rate():
    tokens = documents_stream(LENGTHS)
    frozen = run(tokens, budget_left=lambda: -1.0).per_document
    assert torch.equal(run(tokens, dataclasses.replace(HP, ttt_local_lr_mult=0.0)).per_document, frozen)
    halved = run(tokens, dataclasses.replace(HP, ttt_local_lr_mult=0.5)).per_document
    assert torch.equal(halved, run(tokens, dataclasses.replace(HP, ttt_lora_lr=HP.ttt_lora_lr / 2)).per_document)
    assert not torch.equal(halved, run(tokens).per_document) and not torch.equal(halved, frozen)


def test_ttt_grad_steps_takes_that_many_steps_on_each_chunk_each_from_a_fresh_forward_with_gradients(monkeypatch):
    """TTT_GRAD_STEPS=2 (the record's loop): two optimizer steps on each chunk that trains, the second on the loss
    of a new forward through the adapters the first moved; every forward records gradients, whatever the caller's
    grad mode."""
    tokens, steps, make_optimizer = documents_stream(LENGTHS), [], T.ttt_lora_optimizer

    def counted_optimizer(params, hp):
        optimizer = make_optimizer(params, hp)
        optimizer.register_step_post_hook(lambda *_: steps.append(1))
        return optimizer

    def counted_run(hp):
        model, forwards = model_of(0, hp), []

        def forward(*args, **kwargs):
            forwards.append(torch.is_grad_enabled())
            return model(*args, **kwargs)

        with torch.no_grad():
            report = T.per_document_lora_ttt(T.LoraTTTModels(model, forward, model), tokens, LUTS, hp, 0, 1, CPU,
                                             AUTOCAST_OFF, T.doc_starts_of(tokens, BOS))
        return report, forwards

    monkeypatch.setattr(T, "ttt_lora_optimizer", counted_optimizer)
    once, scoring = counted_run(HP)
    trained_chunks, steps[:] = len(steps), []
    twice, forwards = counted_run(dataclasses.replace(HP, ttt_grad_steps=2))
    assert 0 < trained_chunks < len(scoring) and all(scoring)
    assert len(steps) == 2 * trained_chunks
    assert len(forwards) == len(scoring) + trained_chunks and all(forwards)
    assert torch.equal(twice.per_document[:, 1], once.per_document[:, 1])
    assert not torch.equal(twice.per_document[:, 0], once.per_document[:, 0])


def test_ttt_optimizer_gives_the_adapters_that_optimizer_with_their_settings():
    hp = dataclasses.replace(HP, ttt_lora_lr=0.02, ttt_local_lr_mult=0.5, ttt_beta1=0.8, ttt_beta2=0.95,
                             ttt_weight_decay=0.1)
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = T.ttt_lora_optimizer(params, dataclasses.replace(hp, ttt_optimizer="sgd"))
    assert type(sgd) is torch.optim.SGD
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.01, 0.8, 0.1)
    for name in ("", "adamw", "adam"):  # LoRA's default is AdamW; "adam" is its records' spelling
        adamw = T.ttt_lora_optimizer(params, dataclasses.replace(hp, ttt_optimizer=name))
        assert type(adamw) is torch.optim.AdamW and adamw.defaults["fused"]
        assert adamw.defaults["lr"] == 0.01 and adamw.defaults["betas"] == (0.8, 0.95)
        assert adamw.defaults["weight_decay"] == 0.1
    tokens = documents_stream(LENGTHS)
    assert not torch.equal(run(tokens, dataclasses.replace(HP, ttt_optimizer="sgd")).per_document,
                           run(tokens).per_document)


def test_a_batch_of_short_documents_takes_the_chunk_size_of_the_first_step_that_holds_its_longest():
    short = dataclasses.replace(HP, ttt_short_score_first_enabled=True, ttt_short_score_first_steps="20:4,8:2")
    assert short.short_score_first_steps == [(8, 2), (20, 4)]
    batch = lambda *targets: [T.Document(i, 0, count) for i, count in enumerate(targets)]
    # a document of n targets has n + 1 tokens, as the record counts its length
    assert [T.score_first_chunk_size(batch(3, targets), short) for targets in (7, 8, 19, 20)] == [2, 4, 4, 8]
    assert T.score_first_chunk_size(batch(3, 7), HP) == HP.ttt_chunk_size  # switched off
    pair = dataclasses.replace(HP, ttt_short_score_first_enabled=True, ttt_short_doc_len=10, ttt_short_chunk_size=3)
    assert pair.short_score_first_steps == [(10, 3)]
    assert dataclasses.replace(pair, ttt_short_chunk_size=0).short_score_first_steps == [(10, HP.ttt_chunk_size)]


def test_short_document_chunks_change_only_the_short_batch_and_still_score_every_target_once():
    tokens = documents_stream(LENGTHS)  # batches of 3 by length: (3, 7, 9), (12, 20, 30), (45, 60)
    reference = run(tokens).per_document
    short = run(tokens, dataclasses.replace(HP, ttt_short_score_first_enabled=True,
                                            ttt_short_score_first_steps="10:4")).per_document
    assert short[:, 1].tolist() == LENGTHS[:-1] + [LENGTHS[-1] - 1]
    in_short_batch = [1, 4, 7]  # the documents of 7, 3 and 9 targets
    others = [i for i in range(len(LENGTHS)) if i not in in_short_batch]
    assert torch.equal(short[others], reference[others])
    # 3 targets: one chunk either way; 7 targets: one chunk of 8 before, now adapted after its first 4
    assert torch.equal(short[4], reference[4]) and not torch.equal(short[1], reference[1])
