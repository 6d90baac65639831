"""Shards, the training loader, and the tokenizer checks."""

import numpy as np
import pytest
import torch

import train_gpt as T
from prepare_docs import write_shard


def test_shard_round_trip(tmp_path):
    tokens = np.array([1, 0, 65535, 42, 7], dtype=np.uint16)
    write_shard(tmp_path / "s.bin", tokens)
    assert T.read_shard_header(tmp_path / "s.bin") == 5
    loaded = T.load_shard(tmp_path / "s.bin")
    assert loaded.dtype == np.uint16 and np.array_equal(loaded, tokens)
    assert (tmp_path / "s.bin").stat().st_size == T.SHARD_HEADER_BYTES + 10


def _corrupt(tmp_path, mutate):
    path = tmp_path / "bad.bin"
    write_shard(path, np.arange(100))
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(data)))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:500], "shorter than the 1024-byte shard header"),
    (lambda d: b"\x00\x00\x00\x00" + d[4:], "bad magic"),
    (lambda d: d[:4] + (2).to_bytes(4, "little") + d[8:], "unsupported shard version 2"),
    (lambda d: d[:-2], "truncated or corrupted"),
    (lambda d: d + b"\x00\x00", "truncated or corrupted"),
])
def test_malformed_shards_fail_clearly(tmp_path, mutate, message):
    path = _corrupt(tmp_path, mutate)
    with pytest.raises(ValueError, match=message) as error:
        T.load_shard(path)
    assert str(path) in str(error.value)


def test_write_shard_rejects_ids_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "s.bin", np.array([70000]))


def test_missing_shards_name_data_path(tmp_path):
    with pytest.raises(T.ConfigError, match="DATA_PATH"):
        T.shard_files(str(tmp_path), "train")


def _make_shards(tmp_path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    files = []
    for index, size in enumerate(sizes):
        files.append(str(tmp_path / f"fineweb_train_{index:06d}.bin"))
        write_shard(files[-1], rng.integers(0, 1000, size))
    return files


def _global_rows(loader_factory, step, world_size, accum):
    """The rows of one optimizer step, gathered over ranks and micro-steps in (rank, micro) order."""
    rows = []
    for rank in range(world_size):
        loader = loader_factory(rank, world_size, accum)
        for micro in range(accum):
            x, y, _ = loader.batch(step, micro)
            rows.append(torch.cat([x, y[:, -1:]], dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("data_seed", [-1, 7])  # the challenge's stream order, and shuffled windows
def test_loader_is_world_size_invariant_and_ranks_are_disjoint(tmp_path, data_seed):
    files = _make_shards(tmp_path, [5000, 3333, 4100])
    factory = lambda rank, world, accum: T.TrainLoader(files, 32, 16, data_seed, rank=rank, world_size=world,
                                                       grad_accum_steps=accum)
    for step in (0, 3, 17):  # step 17 crosses an epoch boundary (386 windows / 16 per step)
        reference = _global_rows(factory, step, 1, 8)
        for world, accum in ((2, 4), (4, 2), (8, 1), (2, 1)):
            assert torch.equal(_global_rows(factory, step, world, accum), reference)
    # Within a step, ranks get different windows.
    a, b = factory(0, 2, 1).batch(0, 0)[0], factory(1, 2, 1).batch(0, 0)[0]
    assert not any(torch.equal(r, s) for r in a for s in b)


def test_loader_is_deterministic_and_the_seed_changes_the_order(tmp_path):
    files = _make_shards(tmp_path, [5000, 3333])
    make = lambda seed: T.TrainLoader(files, 32, 16, data_seed=seed)
    assert torch.equal(make(1).batch(5, 0)[0], make(1).batch(5, 0)[0])
    assert not torch.equal(make(1).batch(5, 0)[0], make(2).batch(5, 0)[0])


def test_loader_visits_every_window_once_per_epoch_with_shifted_targets(tmp_path):
    files = _make_shards(tmp_path, [1000, 700])
    loader = T.TrainLoader(files, 50, 4, data_seed=3)
    assert loader.num_windows == 19 + 13
    ids = np.concatenate([loader.global_window_ids(s) for s in range(8)])  # exactly one epoch
    assert sorted(ids.tolist()) == list(range(32))
    x, y, _ = loader.batch(0, 0)
    assert torch.equal(x[:, 1:], y[:, :-1])
    shard_tokens = np.concatenate([np.asarray(T.load_shard(f)) for f in files])
    first = int(loader.global_window_ids(0)[0])
    shard = 0 if first < 19 else 1
    start = (first - (0 if shard == 0 else 19)) * 50 + (0 if shard == 0 else 1000)
    assert x[0].tolist() == shard_tokens[start:start + 50].tolist()


def test_loader_refuses_a_batch_larger_than_the_data(tmp_path):
    files = _make_shards(tmp_path, [300])
    with pytest.raises(T.ConfigError, match="TRAIN_BATCH_TOKENS"):
        T.TrainLoader(files, 32, 16, data_seed=0)


def test_tokenizer_must_match_vocab_size(corpus):
    path = str(corpus / "tokenizers" / "fineweb_1024_bpe.model")
    assert T.load_tokenizer(path, 1024).vocab_size() == 1024
    with pytest.raises(T.ConfigError, match="VOCAB_SIZE=4096"):
        T.load_tokenizer(path, 4096)
    with pytest.raises(T.ConfigError, match="TOKENIZER_PATH"):
        T.load_tokenizer(str(corpus / "nope.model"), 1024)


def baseline_loader_rows(files, batch_tokens, seq_len, steps, world_size=8, grad_accum=1):
    """A re-statement of the challenge baseline's loader: the sorted shards as one cyclic stream; every call takes
    the next (local + 1) * world_size tokens and rank r reads its (local + 1)-token span as rows (inputs, last
    target)."""
    stream = np.concatenate([np.asarray(T.load_shard(f)) for f in files])
    local = batch_tokens // (world_size * grad_accum)
    position, per_step = 0, []
    for _ in range(steps):
        rows = []
        for _ in range(grad_accum):
            take = (local + 1) * world_size
            chunk = np.take(stream, np.arange(position, position + take), mode="wrap")
            position = (position + take) % len(stream)
            for rank in range(world_size):
                span = chunk[rank * (local + 1):(rank + 1) * (local + 1)]
                x, y = span[:-1].reshape(-1, seq_len), span[1:].reshape(-1, seq_len)
                rows.extend(np.concatenate([x, y[:, -1:]], axis=1).tolist())
        per_step.append(sorted(rows))
    return per_step


def test_the_default_order_gives_each_step_the_baselines_tokens(tmp_path):
    files = _make_shards(tmp_path, [5000, 3333, 4100])
    expected = baseline_loader_rows(files, 16 * 32, 32, steps=30)  # 30 steps wrap around the 12,433 tokens
    for world, accum in ((1, 8), (8, 1), (2, 4)):
        factory = lambda rank, w, a: T.TrainLoader(  # noqa: E731
            files, 32, 16, -1, rank=rank, world_size=w, grad_accum_steps=a)
        for step in range(30):
            assert sorted(_global_rows(factory, step, world, accum).tolist()) == expected[step], (world, accum, step)


@pytest.mark.parametrize("data_seed", [-1, 5])
def test_more_shards_never_reorder_the_batches_of_the_shards_present(tmp_path, data_seed):
    files = _make_shards(tmp_path, [5000, 3333, 4100])
    fewer, more = T.TrainLoader(files[:2], 32, 16, data_seed), T.TrainLoader(files, 32, 16, data_seed)
    steps = (5000 + 3333) // (16 * 33)  # steps wholly inside the first two shards
    for step in range(steps):
        assert torch.equal(fewer.batch(step, 0)[0], more.batch(step, 0)[0]), step
