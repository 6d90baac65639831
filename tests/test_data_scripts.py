"""data/: document export, tokenizer training, and the cached-shard downloader (with a local stand-in for the Hub)."""

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

import cached_challenge_fineweb as cached
import prepare_docs
import train_gpt as T


def _split_docs(out_dir, split, bos):
    """The documents of a split, read back across all its shards (documents may straddle shard boundaries)."""
    files = sorted(out_dir.glob(f"fineweb_{split}_*.bin"))
    stream = np.concatenate([np.asarray(T.load_shard(f)) for f in files]).astype(np.int64)
    assert stream[0] == bos
    starts = np.flatnonzero(stream == bos).tolist() + [stream.size]
    return files, stream, [stream[a + 1:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def test_export_puts_bos_before_every_document_and_keeps_splits_disjoint(corpus, tmp_path):
    texts = [json.loads(line)["text"] for line in open(corpus / "fineweb_docs_200.jsonl")][:40]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts + [texts[3]]))  # a val doc again
    tokenizer = str(corpus / "tokenizers" / "fineweb_1024_bpe.model")
    out_dir, _ = prepare_docs.prepare(str(source), "t", tokenizer=tokenizer, num_val_docs=10, shard_tokens=5000,
                                      output_root=tmp_path / "out")
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert (manifest["val_docs"], manifest["train_docs"], manifest["train_docs_dropped_as_val_duplicates"]) == (10, 30, 1)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    _, _, val_docs = _split_docs(out_dir, "val", sp.bos_id())
    assert val_docs == sp.encode(texts[:10])
    train_files, stream, train_docs = _split_docs(out_dir, "train", sp.bos_id())
    assert len(train_files) > 1 and all(T.read_shard_header(f) <= 5000 for f in train_files)
    assert stream.size == manifest["train_tokens"]
    assert train_docs == sp.encode(texts[10:])  # in order, packed across shard boundaries, the duplicate dropped


def test_validation_from_another_source(corpus, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("First training document.\nStill the first.\n\n\nSecond training document.\n")
    tokenizer = str(corpus / "tokenizers" / "fineweb_1024_bpe.model")
    out_dir, _ = prepare_docs.prepare(str(train), "mix", tokenizer=tokenizer, val_source=str(corpus / "fineweb_docs_200.jsonl"),
                                      num_val_docs=5, output_root=tmp_path / "out")
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert (manifest["val_docs"], manifest["train_docs"]) == (5, 2)


def test_plain_text_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a b\nc\n\n\nd\n\ne f\n")
    assert list(prepare_docs.text_docs(str(path))) == ["a b\nc", "d", "e f"]


def test_a_new_tokenizer_has_the_challenge_settings(sample):
    _, tokenizer = sample
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256  # byte fallback
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # digits split
    assert not sp.encode("hello", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert sp.piece_to_id("\u2581") != sp.unk_id()


def test_the_stdlib_sample_is_real_text_with_a_small_validation_split(sample):
    data_dir, _ = sample
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["val_docs"] == prepare_docs.STDLIB_VAL_DOCS
    assert manifest["train_tokens"] > 200_000 and manifest["val_tokens"] < manifest["train_tokens"] / 5


# ---- the downloader, with a directory standing in for the Hub ----

MANIFEST = {
    "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {"files_train": 3, "files_val": 1}}],
    "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model"}],
}


@pytest.fixture
def fake_hub(tmp_path):
    remote = tmp_path / "remote" / cached.REMOTE_ROOT
    (remote / "datasets" / "fineweb10B_sp1024").mkdir(parents=True)
    (remote / "tokenizers").mkdir()
    (remote / "manifest.json").write_text(json.dumps(MANIFEST))
    (remote / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model")
    for name in ("val_000000", "train_000000", "train_000001", "train_000002"):
        T.write_shard(remote / "datasets" / "fineweb10B_sp1024" / f"fineweb_{name}.bin", np.arange(100))
    fetched = []

    def fetch(remote_path):  # like hf_hub_download into a staging folder: returns a fresh local copy
        fetched.append(remote_path)
        staged = tmp_path / "staging" / remote_path
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "remote" / remote_path, staged)
        return str(staged)
    return remote, fetch, fetched


def test_download_fetches_val_and_n_train_shards_and_resumes(fake_hub, tmp_path):
    remote, fetch, fetched = fake_hub
    local = tmp_path / "data"
    cached.download("sp1024", 2, fetch, local)
    assert sorted(p.name for p in (local / "datasets" / "fineweb10B_sp1024").iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert (local / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model"
    fetched.clear()
    (local / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin").write_bytes(b"partial")
    cached.download("sp1024", 3, fetch, local)  # only the damaged and the new shard are fetched again
    assert sorted(fetched) == [f"datasets/datasets/fineweb10B_sp1024/fineweb_train_00000{i}.bin" for i in (1, 2)]


def test_download_verifies_every_shard(fake_hub, tmp_path):
    remote, fetch, _ = fake_hub
    shard = remote / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(cached.DownloadError, match="failed verification"):
        cached.download("sp1024", 1, fetch, tmp_path / "data")


@pytest.mark.parametrize("variant, shards, message", [("sp4096", 1, "no dataset fineweb10B_sp4096"), ("sp1024", 9, "only 3 training shards")])
def test_download_refuses_what_the_manifest_does_not_have(fake_hub, tmp_path, variant, shards, message):
    _, fetch, _ = fake_hub
    with pytest.raises(cached.DownloadError, match=message):
        cached.download(variant, shards, fetch, tmp_path / "data")


def test_offline_fails_at_once_with_what_to_do(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")
    monkeypatch.setattr(cached.socket, "create_connection", no_network)
    with pytest.raises(cached.DownloadError, match="prepare_docs.py"):
        cached.hub_fetcher("willdepueoai/parameter-golf", "/tmp/unused")
