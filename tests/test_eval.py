"""Sliding-window evaluation and score-first test-time training: coverage, equivalences and legality."""

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

import train_gpt as T
from conftest import small_hp

CPU = torch.device("cpu")
AUTOCAST_OFF = lambda: torch.autocast("cpu", enabled=False)
HP = small_hp(num_layers=2, val_batch_size=256, eval_stride=8, ttt_chunk_tokens=96, ttt_epochs=2, ttt_lr=0.05,
                       ttt_batch_seqs=4)
LUTS = T.TargetBytes(np.ones(10_000))  # 1 byte per target, for any stream of up to 10,000 tokens


def small_model(seed=0, hp=HP):
    torch.manual_seed(seed)
    model = T.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_window_plans_partition_the_targets_with_enough_context():
    rng = random.Random(0)
    for _ in range(300):
        num_targets, seq_len = rng.randint(1, 400), rng.randint(1, 64)
        stride = rng.randint(1, seq_len)
        docs = sorted(rng.sample(range(num_targets), rng.randint(0, min(5, num_targets))))
        cuts = sorted(rng.sample(range(1, num_targets + 1), rng.randint(0, min(4, num_targets))))
        windows = T.plan_windows(num_targets, seq_len, stride, docs, cuts)
        scored = [p for _, first, end in windows for p in range(first, end)]
        assert scored == list(range(num_targets))  # every target exactly once, in order
        doc_starts = sorted(set(docs) | {0})
        for start, first, end in windows:
            doc_start = max(d for d in doc_starts if d <= first)
            assert doc_start <= start <= first < end <= num_targets and end - start <= seq_len
            assert not any(start < d <= first for d in doc_starts)  # never reads across a document start
            assert not any(first < c < end for c in cuts)  # never straddles a TTT chunk boundary
            assert first - start >= min(seq_len - stride, first - doc_start)  # context where the document has it


def naive_plain_eval(model, tokens, seq_len):
    """Non-overlapping windows, each run on its own, unpadded; the tail window is the last seq_len positions."""
    num_targets, loss = tokens.numel() - 1, 0.0
    for first in range(0, num_targets, seq_len):
        end = min(first + seq_len, num_targets)
        start = max(end - seq_len, 0)
        chunk = tokens[start:end + 1].long()[None]
        losses = model(chunk[:, :-1], chunk[:, 1:], reduction="none")[0]
        loss += losses[first - start:].double().sum().item()
    return loss / num_targets


@pytest.mark.parametrize("num_tokens", [33, 200, 257])
def test_stride_equal_to_the_window_is_the_plain_evaluation(num_tokens):
    model = small_model()
    tokens = torch.from_numpy(np.random.default_rng(num_tokens).integers(0, 64, num_tokens).astype(np.int32))
    with torch.no_grad():
        loss, _, scored = T.evaluate(model, tokens, LUTS, 32, 32, 256, 0, 1, CPU, AUTOCAST_OFF)
        assert loss == pytest.approx(naive_plain_eval(model, tokens, 32), rel=1e-6)
        assert scored == num_tokens - 1


def test_sliding_gives_context_to_every_scored_token():
    """On text that repeats with period 24, a model can only be right when it sees the previous period."""
    tokens = torch.from_numpy(np.tile(np.random.default_rng(1).integers(0, 64, 24), 20).astype(np.int32))
    windows = T.plan_windows(tokens.numel() - 1, 32, 8)
    assert all(first - start >= 24 for start, first, _ in windows[1:])


def run_ttt(tokens, hp=HP, seed=0, **overrides):
    model = small_model(seed)
    hp = dataclasses.replace(hp, **overrides)
    return T.score_first_ttt(model, tokens, LUTS, hp, 0, 1, CPU, AUTOCAST_OFF)


def stream(seed, length=600):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 64, length).astype(np.int32))


def test_a_chunk_score_never_depends_on_later_chunks():
    tokens = stream(0)
    _, reference, _ = run_ttt(tokens)
    altered = tokens.clone()
    altered[3 * HP.ttt_chunk_tokens + 1:] = stream(99)[: altered.numel() - 3 * HP.ttt_chunk_tokens - 1]
    _, per_chunk, _ = run_ttt(altered)
    for index in range(3):  # chunks 0..2 hold targets before the altered tokens
        assert torch.equal(per_chunk[index], reference[index])
    assert not torch.equal(per_chunk[3], reference[3])


def test_the_first_chunk_scores_as_without_ttt_and_later_chunks_change():
    tokens = stream(1)
    _, adapted, chunks_adapted = run_ttt(tokens)
    _, frozen, none_adapted = run_ttt(tokens, ttt_epochs=0)
    assert chunks_adapted == len(adapted) - 1 and len(adapted) == math.ceil(599 / HP.ttt_chunk_tokens)
    assert torch.equal(adapted[0], frozen[0])
    assert not torch.equal(adapted[1], frozen[1])
    # The TTT plan scores the same targets as the sliding plan, and without adaptation the same sums.
    sliding = T.evaluate(small_model(0), tokens, LUTS, HP.train_seq_len, HP.eval_stride, 256, 0, 1, CPU, AUTOCAST_OFF)
    frozen_total = T.loss_and_bpb(torch.stack(frozen).sum(0))
    assert frozen_total[0] == pytest.approx(sliding[0], rel=1e-6)


@pytest.mark.parametrize("params", ["all", "blocks.1"])
def test_ttt_learns_a_repeated_chunk(params):
    chunk = stream(2, HP.ttt_chunk_tokens)
    tokens = torch.cat([chunk, stream(3, HP.ttt_chunk_tokens), chunk, stream(4, 5)])  # chunk 2 repeats chunk 0
    lr = 0.1 if params == "all" else 1.0  # a few adapted weights need a larger step to memorize 96 tokens
    _, adapted, _ = run_ttt(tokens, ttt_params=params, ttt_epochs=4, ttt_lr=lr)
    _, frozen, _ = run_ttt(tokens, ttt_epochs=0)
    repeat = lambda sums: (sums[2][0] / sums[2][1]).item()
    assert repeat(adapted) < repeat(frozen) - 0.2


def test_the_guard_refuses_unscored_targets():
    ledger = T.ScoredTargets(torch.arange(100))
    ledger.commit(40)
    assert ledger.training_tokens(0, 40).tolist() == list(range(41))
    with pytest.raises(RuntimeError, match="unscored"):
        ledger.training_tokens(30, 41)
    with pytest.raises(RuntimeError):
        ledger.commit(39)


def test_scoring_is_normalized_and_charges_minus_log_p():
    model = small_model()
    logsumexp, charged = T.check_normalization(model, stream(5, 40), 32, AUTOCAST_OFF, CPU)
    assert logsumexp < 1e-5 and charged < 1e-5


def test_eval_budget_stops_adapting_but_not_scoring():
    tokens = stream(6)
    (_, _, scored), per_chunk, adapted = T.score_first_ttt(small_model(), tokens, LUTS, HP, 0, 1, CPU, AUTOCAST_OFF,
                                                    log=lambda message: None, budget_left=lambda: 0.0)
    assert adapted == 0  # before any adaptation is measured, its cost is estimated from the scoring's
    assert int(torch.stack(per_chunk).sum(0)[1]) == scored == tokens.numel() - 1


# --- phased TTT (global SGD on every scored document at phase ends) ---

PHASED = dataclasses.replace(HP, ttt_enabled=True, ttt_method="chunk", phased_ttt_enabled=True, global_ttt_lr=0.05,
                             global_ttt_chunk_tokens=64, global_ttt_batch_seqs=4, global_ttt_epochs=2)


def test_phase_ends_follow_document_counts():
    starts = [0, 10, 25, 40, 70, 90]  # six documents
    assert T.phase_ends(starts, 120, 4, 2) == [25, 70]  # after documents 2 and 4
    assert T.phase_ends(starts, 120, 4, 3) == [10, 25, 70]  # 4 // 3, 8 // 3, 12 // 3 documents
    assert T.phase_ends(starts, 120, 6, 2) == [40]  # the last phase would end at the end of the stream
    assert T.phase_ends(starts, 120, 100, 1) == []
    assert T.phase_ends([0], 120, 2, 1) == []


def test_a_phase_end_changes_no_score_before_it_and_the_phase_adapts_on_all_scored_targets(monkeypatch):
    """A phase end on a chunk cut: up to it the run is the chunk TTT run, bit for bit; after it, the global SGD has
    read every scored target [0, end) and nothing unscored, and later scores change."""
    tokens = stream(7)
    end = 2 * HP.ttt_chunk_tokens
    reads = []
    original = T.ScoredTargets.training_tokens

    def spy(self, first, stop):
        reads.append((first, stop, self.scored_upto))
        return original(self, first, stop)

    monkeypatch.setattr(T.ScoredTargets, "training_tokens", spy)
    _, plain, _ = T.score_first_ttt(small_model(), tokens, LUTS, PHASED, 0, 1, CPU, AUTOCAST_OFF)
    plain_reads, reads[:] = list(reads), []
    lines = []
    _, phased, adapted = T.score_first_ttt(small_model(), tokens, LUTS, PHASED, 0, 1, CPU, AUTOCAST_OFF,
                                           log=lines.append, phases=[end])
    assert len(phased) == len(plain) and adapted == len(plain) - 1
    for index in range(2):
        assert torch.equal(phased[index], plain[index])
    assert not torch.equal(phased[2], plain[2])
    assert all(stop <= scored for _, stop, scored in reads)  # the ledger's guard, seen from outside
    global_reads = [(first, stop) for first, stop, scored in reads if scored == end]
    chunk = PHASED.global_ttt_chunk_tokens
    chunks = [(first, min(first + chunk, end)) for first in range(0, end, chunk)]
    assert global_reads == chunks[:-1]  # the phase's global SGD walks [0, end) once per chunk, the last one aside
    trained = sum(stop - first for first, stop in global_reads)  # the log counts what it trained on, not all it read
    assert 0 < trained < end and f"ttt_phase: 1/1 scored_targets:{end} trained_targets:{trained} " in "\n".join(lines)
    assert [(first, stop) for first, stop, scored in plain_reads if scored == end] == [(HP.ttt_chunk_tokens, end)]


def test_chunk_ttt_and_a_phases_global_sgd_train_whatever_the_callers_grad_mode():
    tokens, end = stream(7), 2 * HP.ttt_chunk_tokens
    _, with_grad, adapted = T.score_first_ttt(small_model(), tokens, LUTS, PHASED, 0, 1, CPU, AUTOCAST_OFF,
                                              phases=[end])
    with torch.no_grad():
        _, without, _ = T.score_first_ttt(small_model(), tokens, LUTS, PHASED, 0, 1, CPU, AUTOCAST_OFF, phases=[end])
    assert adapted == len(with_grad) - 1 and all(torch.equal(a, b) for a, b in zip(with_grad, without))


def test_with_document_isolated_windows_a_later_phase_changes_nothing_scored_before_it():
    """Phase ends fall on document starts. With document-isolated windows a phase end plans no window
    differently, wherever it falls; and adding a later phase leaves every score before it as it was."""
    tokens = stream(8)
    docs = [0, 50, 130, 170, 288, 300, 420, 500]
    num_targets, chunk_cuts = tokens.numel() - 1, list(range(HP.ttt_chunk_tokens, 599, HP.ttt_chunk_tokens))
    for end in docs[1:]:
        assert (T.plan_windows(num_targets, 32, 8, docs, sorted(set(chunk_cuts) | {end})) ==
                T.plan_windows(num_targets, 32, 8, docs, chunk_cuts + [end] * (end in chunk_cuts)))
    hp = dataclasses.replace(PHASED, ttt_epochs=0)  # no chunk adaptation: only the phases adapt
    one, two = T.phase_ends(docs, num_targets, 2, 1), T.phase_ends(docs, num_targets, 4, 2)
    assert one == [130] and two == [130, 288]
    _, first, _ = T.score_first_ttt(small_model(), tokens, LUTS, hp, 0, 1, CPU, AUTOCAST_OFF, docs, phases=one)
    _, second, adapted = T.score_first_ttt(small_model(), tokens, LUTS, hp, 0, 1, CPU, AUTOCAST_OFF, docs, phases=two)
    assert adapted == 2 and len(first) == len(second)  # segments end at 96, 130, 192, 288, 384, ...
    assert all(torch.equal(a, b) for a, b in zip(first[:4], second[:4]))
    assert not torch.equal(first[4], second[4])


def test_phased_ttt_settings_need_ttt_and_are_refused_when_inert():
    with pytest.raises(T.ConfigError, match="PHASED_TTT_ENABLED"):
        T.Hyperparameters.from_env({"PHASED_TTT_ENABLED": "1"})
    with pytest.raises(T.ConfigError, match="GLOBAL_TTT_LR"):
        T.Hyperparameters.from_env({"TTT_ENABLED": "1", "TTT_METHOD": "chunk", "GLOBAL_TTT_LR": "0.01"})
    hp, _ = T.Hyperparameters.from_env({"TTT_ENABLED": "1", "TTT_METHOD": "lora", "PHASED_TTT_ENABLED": "1",
                                        "PHASED_TTT_NUM_PHASES": "3"})
    assert hp.phased_ttt_num_phases == 3


def test_the_budget_clock_counts_the_padded_work_so_a_short_segment_is_not_slow():
    steps = T.AdaptSteps(epochs=3, batch_seqs=32, grad_clip=1.0)
    assert T.adapt_work(0, 10, steps, 256, 1) == 3 * 32 * 256  # one padded batch of 32 rows, 3 times
    assert T.adapt_work(0, 32 * 256, steps, 256, 1) == 3 * 32 * 256  # the same work, all of it real
    assert T.adapt_work(0, 32 * 256 + 1, steps, 256, 4) == 3 * 2 * 8 * 256  # two batches of 8 rows per rank
    assert T.scoring_work(1, 64, 1, 256) == T.scoring_work(64, 64, 1, 256) == 64 * 256
    assert T.scoring_work(65, 64, 2, 256) == 64 * 256  # each of 2 ranks runs one batch
    clock = T.TTTClock(lambda: 100.0, CPU)
    clock.scored(1.0, T.scoring_work(1, 64, 1, 256))  # a one-window segment costs a whole batch
    clock.scored(10.0, T.scoring_work(640, 64, 1, 256))
    assert clock.score_rate == pytest.approx(1.0 / (64 * 256))
    assert clock.fits(0, 99 * 64 * 256) and not clock.fits(0, 101 * 64 * 256)


def test_ttt_reports_its_progress_ending_with_the_score_so_far_equal_to_the_final_one():
    lines = []
    (_, bpb, _), per_chunk, _ = T.score_first_ttt(small_model(), stream(6), LUTS, HP, 0, 1, CPU, AUTOCAST_OFF,
                                                  log=lines.append)
    progress = [line for line in lines if line.startswith("ttt_progress: ")]
    assert progress[-1].startswith(f"ttt_progress: segment:{len(per_chunk)}/{len(per_chunk)} scored_bpb:{bpb:.4f} ")
    assert progress[-1].endswith(" eta:0s")


def test_progress_is_printed_at_most_every_interval_and_always_at_the_end(monkeypatch):
    clock, lines = iter([0.0, 1.0, 2.0, 40.0, 41.0, 42.0]), []
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    progress = T.Progress(lines.append, "round", 4, every=30.0)
    for done in range(1, 5):
        progress(done, done / 4)
    assert lines == ["ttt_progress: round:3/4 elapsed:40s eta:13s", "ttt_progress: round:4/4 elapsed:41s eta:0s"]


def adapted_delta(model, tokens, steps, seq_len, rank=0, world_size=1, shapes=None):
    """The parameter change of adapt_on_chunk over all of `tokens` with SGD at lr 1 (no momentum): minus the summed
    gradient over the count of the global batch, linear in each rank's gradient. `shapes` collects the rows' shapes."""
    start = [p.detach().clone() for p in model.parameters()]
    ledger = T.ScoredTargets(tokens)
    ledger.commit(tokens.numel() - 1)
    params = list(model.parameters())

    def forward(inputs, targets, reduction, piece_len):
        if shapes is not None:
            shapes.append((tuple(inputs.shape), piece_len))
        return model(inputs, targets, reduction=reduction, piece_len=piece_len)
    T.adapt_on_chunk(forward, ledger, 0, tokens.numel() - 1, params, torch.optim.SGD(params, lr=1.0), steps, seq_len,
                     rank, world_size, CPU, AUTOCAST_OFF)
    delta = [(p.detach() - s) for p, s in zip(model.parameters(), start)]
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    return delta


def documents_model():  # SmearGate and BigramHash off: they read across a piece's cut (see test_doc_isolation)
    return small_model(hp=small_hp(num_layers=2, doc_isolation=True, smear_gate=False, bigram_buckets=0))


def document_stream(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.concatenate([[1, *rng.integers(2, 64, n - 1)] for n in lengths]).astype(np.int64))


def test_an_adaptation_step_pads_no_row_beyond_its_chunks_sequences_and_updates_as_the_padded_one_did():
    """A chunk of 96 targets in sequences of 16 has 6 sequences: with TTT_BATCH_SEQS=32 each rank used to run 32 rows
    (at 8 ranks, 4 where the chunk gives 1), 26 of them padding, as the records never did."""
    model, tokens = documents_model(), document_stream([30, 40, 27])
    padded_shapes, capped_shapes = [], []
    padded = adapted_delta(model, tokens, T.AdaptSteps(1, 32, 0.0), 16, shapes=padded_shapes)
    capped_steps = T.adapt_steps(1, 32, 0.0, chunk_tokens=96, seq_len=16)
    capped = adapted_delta(model, tokens, capped_steps, 16, shapes=capped_shapes)
    assert padded_shapes == [((32, 16), 0)] and capped_shapes == [((6, 16), 0)]
    for a, b in zip(padded, capped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert T.adapt_work(0, 96, capped_steps, 16, 8) == 16 and T.adapt_work(0, 96, T.AdaptSteps(1, 32, 0.0), 16, 8) == 64
    assert T.adapt_steps(1, 4, 0.0, chunk_tokens=96, seq_len=16).batch_seqs == 4  # fewer than the chunk's: as asked


def test_packed_global_sgd_trains_each_document_piece_as_a_row_of_its_own_at_any_world_size():
    """TRAIN_ROWS=packed (the 04-27 record's global SGD): a step's 6 sequences of 16 make STREAM_CHUNKS spans (rows
    of 1 sequence here, at most 8), and each row's documents are cut into pieces of 16 from their own starts. With SGD
    at lr 1, one step's change is minus the mean gradient, so it equals running each piece as its own row; and
    ranks 0 and 1 of 2, summed, equal one process."""
    model, tokens = documents_model(), document_stream([30, 40, 27])  # 96 targets: 6 sequences of 16
    hp = small_hp(num_layers=2, global_ttt_epochs=1, global_ttt_batch_seqs=32, global_ttt_grad_clip=0.0,
                  global_ttt_chunk_tokens=96, train_rows="packed", doc_isolation=True)
    steps, shapes = T.global_sgd_steps(hp, 16), []
    assert steps.rows == 6 and steps.row_len(16) == 16
    steps = steps._replace(spans=3)  # 3 spans of 2 sequences: rows of 32 whose documents cross a sequence's end
    packed = adapted_delta(model, tokens, steps, 16, shapes=shapes)
    assert shapes == [((3, 32), 16)]
    starts = T.document_starts(tokens[None, :-1].reshape(3, 32), 1, 16).reshape(-1)
    bounds = torch.nonzero(starts).flatten().tolist() + [96]
    pieces = list(zip(bounds, bounds[1:]))
    assert any(tokens[first] != 1 and first % 32 for first, _ in pieces)  # cut 16 tokens after a document's start
    model.zero_grad()
    losses = [model(tokens[None, a:b], tokens[None, a + 1:b + 1], reduction="none").sum() for a, b in pieces]
    (sum(losses) / 96).backward()
    for delta, p in zip(packed, model.parameters()):
        torch.testing.assert_close(delta, -p.grad, rtol=1e-4, atol=1e-6)
    unpacked = adapted_delta(model, tokens, steps._replace(spans=0), 16)
    assert max((a - b).abs().max().item() for a, b in zip(packed, unpacked)) > 1e-4  # sequences cut documents
    halves = [adapted_delta(model, tokens, steps, 16, rank, 2) for rank in (0, 1)]
    for delta, first, second in zip(packed, *halves):
        torch.testing.assert_close(first + second, delta, rtol=1e-4, atol=1e-6)


def test_an_evaluation_that_missed_a_target_writes_no_score_line():
    """The last _exact line of a log is its score: one that scored fewer targets than the split holds (a partial
    pass) is refused before its lines are written, so no parser can read it."""
    from types import SimpleNamespace
    lines = []
    run = SimpleNamespace(scored_targets={}, log=lines.append, results={})
    data = SimpleNamespace(val_tokens=torch.zeros(11, dtype=torch.int64))  # 10 targets
    T.log_final(run, data, "final_ttt", (2.0, 1.0, 10), 1.0)
    assert lines[-1] == "final_ttt_exact val_loss:2.00000000 val_bpb:1.00000000" and run.results["val_bpb"] == 1.0
    lines.clear()
    with pytest.raises(T.RunError, match="final_sliding_window scored 9 validation targets, not 10"):
        T.log_final(run, data, "final_sliding_window", (2.0, 0.5, 9), 1.0)
    assert lines == [] and "final_sliding_window" not in run.scored_targets and run.results["val_bpb"] == 1.0
