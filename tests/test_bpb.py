"""val_bpb: the byte LUTs against real decoding, and the evaluation's token and byte accounting."""

import json
import math

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as T


def _encode_docs(sp, texts):
    tokens = []
    for ids in sp.encode(texts):
        tokens += [sp.bos_id()] + ids
    return np.array(tokens)


def test_lut_bytes_equal_utf8_of_decode_on_real_fineweb(corpus):
    sp = spm.SentencePieceProcessor(model_file=str(corpus / "tokenizers" / "fineweb_1024_bpe.model"))
    texts = [json.loads(line)["text"] for line in open(corpus / "fineweb_docs_200.jsonl")]
    tokens = _encode_docs(sp, texts)
    luts = T.build_byte_luts(sp, 1024)
    docs, total = T.check_tokenizer_and_bytes(sp, tokens, luts, max_tokens=len(tokens))
    assert docs == 200  # the last document too: no BOS follows it, the split's end does
    expected = sum(len(sp.decode(ids).encode("utf-8")) for ids in sp.encode(texts))
    assert total == expected
    # The whole-stream count (the run's val_bytes) agrees with the per-document sum (a BOS target counts 0 bytes).
    assert T.count_target_bytes(tokens, luts) == expected
    # A split longer than the check's reach: the document it cuts off is left out, not checked in part.
    last = sp.encode(texts[-1])
    assert T.check_tokenizer_and_bytes(sp, tokens, luts, max_tokens=len(tokens) - len(last) // 2) == (
        199, expected - len(sp.decode(last).encode("utf-8")))


def test_lut_identity_on_the_embedded_sample(sample):
    data_dir, tokenizer = sample
    sp = T.load_tokenizer(str(tokenizer), 1024)
    tokens = T.load_validation_tokens(T.shard_files(str(data_dir), "val")).numpy()
    docs, total = T.check_tokenizer_and_bytes(sp, tokens, T.build_byte_luts(sp, 1024))
    assert docs > 100 and total > 50_000


def test_a_tokenizer_that_did_not_make_the_shards_is_refused(corpus, sample):
    sp_fineweb = spm.SentencePieceProcessor(model_file=str(corpus / "tokenizers" / "fineweb_1024_bpe.model"))
    _, sample_tokenizer = sample
    sp_sample = spm.SentencePieceProcessor(model_file=str(sample_tokenizer))
    texts = [json.loads(line)["text"] for line in open(corpus / "fineweb_docs_200.jsonl")][:20]
    tokens = _encode_docs(sp_fineweb, texts + ["x"])
    with pytest.raises(T.ConfigError, match="TOKENIZER_PATH does not match the shards"):
        T.check_tokenizer_and_bytes(sp_sample, tokens, T.build_byte_luts(sp_sample, 1024))


def test_a_lut_that_disagrees_with_decoding_is_refused(corpus):
    sp = spm.SentencePieceProcessor(model_file=str(corpus / "tokenizers" / "fineweb_1024_bpe.model"))
    texts = [json.loads(line)["text"] for line in open(corpus / "fineweb_docs_200.jsonl")][:5]
    base_bytes, has_space, is_boundary = T.build_byte_luts(sp, 1024)
    has_space = np.zeros_like(has_space)  # forget the leading-space byte of "▁" pieces
    with pytest.raises(T.ConfigError, match="byte accounting self-check failed"):
        T.check_tokenizer_and_bytes(sp, _encode_docs(sp, texts + ["x"]), (base_bytes, has_space, is_boundary))


def test_leading_space_is_not_counted_after_bos():
    class FakeSP:  # ids: 0 = BOS (control), 1 = "▁ab", 2 = "c", 3 = byte
        def vocab_size(self): return 4
        def is_control(self, i): return i == 0
        def is_unknown(self, i): return False
        def is_unused(self, i): return False
        def is_byte(self, i): return i == 3
        def id_to_piece(self, i): return {1: "\u2581ab", 2: "c"}[i]
    luts = T.build_byte_luts(FakeSP(), 6)  # ids 4, 5 are beyond the tokenizer: boundary, 0 bytes
    # BOS ▁ab c ▁ab byte BOS ▁ab -> 2 + 1 + 3 + 1 + 0 + 2
    assert T.count_target_bytes([0, 1, 2, 1, 3, 0, 1], luts) == 9
    assert T.count_target_bytes([0, 4, 5], luts) == 0


class ConstantModel(torch.nn.Module):
    """Uniform logits: every token costs exactly ln(V) nats."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, inputs, targets, reduction="none"):
        logits = torch.zeros(*inputs.shape, self.vocab)
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return losses.view_as(targets)


class TargetValueModel(torch.nn.Module):
    """Charges each position a function of its target id, so sums reveal which targets were scored."""

    def __init__(self, power):
        super().__init__()
        self.power = power

    def forward(self, inputs, targets, reduction="none"):
        return targets.double() ** self.power


AUTOCAST_OFF = lambda: torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("num_tokens, seq_len, batch_tokens",
                         [(2, 4, 4), (1001, 64, 256), (1024, 64, 128), (97, 10, 35)])
def test_evaluation_formula_and_exact_bytes(num_tokens, seq_len, batch_tokens):
    rng = np.random.default_rng(num_tokens)
    vocab = 50
    tokens = torch.from_numpy(rng.integers(0, vocab, num_tokens).astype(np.int32))
    luts = (rng.integers(1, 4, vocab), rng.random(vocab) < 0.5, rng.random(vocab) < 0.1)
    target_bytes = T.TargetBytes(T.target_byte_counts(tokens.numpy(), luts))
    loss, bpb, scored = T.evaluate(ConstantModel(vocab), tokens, target_bytes, seq_len, seq_len, batch_tokens, 0, 1,
                                   torch.device("cpu"), AUTOCAST_OFF)
    n_bytes = T.count_target_bytes(tokens.numpy(), luts)
    assert scored == num_tokens - 1 and target_bytes.total == n_bytes
    assert loss == pytest.approx(math.log(vocab), rel=1e-6)  # fp32 cross-entropy of uniform logits
    assert bpb == pytest.approx(loss / math.log(2) * (num_tokens - 1) / n_bytes, rel=1e-12)


@pytest.mark.parametrize("num_tokens, seq_len, batch_tokens, world_size",
                         [(2, 4, 4, 1), (1001, 64, 256, 3), (1025, 64, 128, 2), (97, 10, 35, 4)])
def test_every_target_is_scored_exactly_once_over_ranks(num_tokens, seq_len, batch_tokens, world_size):
    tokens = torch.arange(num_tokens, dtype=torch.int32)  # unique ids: the sums below identify the scored set
    target_bytes = T.TargetBytes(np.arange(1, num_tokens))  # target p covers p + 1 "bytes"
    windows = T.plan_windows(num_targets=num_tokens - 1, seq_len=seq_len, stride=seq_len)
    rows = T.eval_rows_per_batch(batch_tokens, seq_len, world_size)
    for power in (0, 1, 2):  # count, sum and sum of squares of the scored target ids
        sums = sum(T.score_windows(TargetValueModel(power), tokens, T.rank_share(windows, rank, world_size),
                                   target_bytes, seq_len, rows, torch.device("cpu"), AUTOCAST_OFF)
                   for rank in range(world_size))
        assert sums[0].item() == sum(j ** power for j in range(1, num_tokens))
        assert sums[2].item() == sum(range(1, num_tokens))  # the bytes of each scored target, once
