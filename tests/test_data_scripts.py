"""data/: document export, tokenizer training, and the cached-shard downloader (with a local stand-in for the Hub)."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm

import cached_challenge_fineweb as cached
import check_overlap
import prepare_docs
import train_gpt as T
from prepare_docs import write_shard


def _split_docs(out_dir, split, bos):
    """The documents of a split, read back across all its shards (documents may straddle shard boundaries)."""
    files = sorted(out_dir.glob(f"fineweb_{split}_*.bin"))
    stream = np.concatenate([np.asarray(T.load_shard(f)) for f in files]).astype(np.int64)
    assert stream[0] == bos
    starts = np.flatnonzero(stream == bos).tolist() + [stream.size]
    return files, stream, [stream[a + 1:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def root_manifest_entry(root, name):
    manifest = json.loads((root / "manifest.json").read_text())
    return manifest, next(d for d in manifest["datasets"] if d["name"] == name)


def stdlib_texts(count):
    """Documents of the offline sample (docstrings of the standard library), present wherever the tests run."""
    return list(prepare_docs._stdlib_doc_list(0)[:count])


def fineweb_texts(corpus, count):
    return [json.loads(line)["text"] for line in open(corpus / "fineweb_docs_200.jsonl")][:count]


def test_drop_val_duplicates_drops_exactly_the_copies_of_validation_documents(corpus, tmp_path):
    texts = fineweb_texts(corpus, 40)
    source = tmp_path / "docs.jsonl"
    with_duplicates = texts[:20] + [texts[3]] + texts[20:] + [texts[7]]
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in with_duplicates))
    tokenizer = str(corpus / "tokenizers" / "fineweb_1024_bpe.model")
    out_dir, _ = prepare_docs.prepare(str(source), "t", tokenizer=tokenizer, num_val_docs=10, shard_tokens=5000,
                                      output_root=tmp_path / "out", drop_val_duplicates=True)
    _, entry = root_manifest_entry(tmp_path / "out", "t_sp1024")
    assert (entry["stats"]["docs_val"], entry["stats"]["docs_train"]) == (10, 30)
    assert entry["prepare_docs"]["train_docs_dropped_as_val_duplicates"] == 2
    assert entry["prepare_docs"]["drop_val_duplicates"]
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    _, _, val_docs = _split_docs(out_dir, "val", sp.bos_id())
    assert val_docs == sp.encode(texts[:10])
    train_files, stream, train_docs = _split_docs(out_dir, "train", sp.bos_id())
    assert len(train_files) > 1 and all(T.read_shard_header(f) <= 5000 for f in train_files)
    assert stream.size == entry["stats"]["tokens_train"]
    assert train_docs == sp.encode(texts[10:])  # in order, packed across shard boundaries, both copies dropped


@pytest.mark.parametrize("caseops", [False, True])
def test_any_number_of_workers_writes_the_files_one_writes(request, tmp_path, monkeypatch, caseops):
    texts = stdlib_texts(60)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts + texts[2:5]))  # 3 copies to drop
    tokenizer = request.getfixturevalue("caseops_sample" if caseops else "sample")[1]
    monkeypatch.setattr(prepare_docs, "BATCH_DOCS", 4)  # many batches, in flight at once, and shards cut inside them
    written = {}
    for workers in (1, 3):
        root = tmp_path / f"workers{workers}"
        prepare_docs.prepare(str(source), "w", tokenizer=tokenizer, num_val_docs=10, shard_tokens=1000,
                             output_root=root, drop_val_duplicates=True, caseops=caseops, workers=workers)
        written[workers] = {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}
    assert len([name for name in written[1] if "fineweb_train_" in name]) > 3
    assert any("fineweb_val_bytes_" in name for name in written[1]) == caseops
    assert written[3] == written[1]
    encoder = prepare_docs.BatchEncoder(tokenizer, caseops, sidecar=caseops)  # as a spawned worker receives it
    batch = [json.loads(line)["text"] for line in source.read_text().splitlines()[:6]]
    expected = encoder(batch)
    received = pickle.loads(pickle.dumps(encoder))(batch)
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(received, expected))
    manifest = json.loads(written[1]["manifest.json"])["datasets"][0]
    assert manifest["prepare_docs"]["train_docs_dropped_as_val_duplicates"] == 3


def test_a_document_a_worker_cannot_write_stops_the_export_naming_why(sample, tmp_path):
    """Twenty times over, in a process with torch's threads and a run's signal handlers in place: ending the pool
    with batches in flight once hung (a killed worker can hold its queue's lock), so this runs with a timeout."""
    source = tmp_path / "docs.jsonl"
    texts = stdlib_texts(200)
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    code = f"""
import prepare_docs, torch, train_gpt
torch.randn(256, 256) @ torch.randn(256, 256)
train_gpt.StopSignals().__enter__()  # a run's handlers, in place
plain_hash, bad = prepare_docs.doc_hash, {texts[150]!r}
def doc_hash(text):
    if text == bad:
        raise prepare_docs.ExportError("a document this export cannot write")
    return plain_hash(text)
prepare_docs.doc_hash, prepare_docs.BATCH_DOCS = doc_hash, 2
for attempt in range(20):
    try:
        prepare_docs.prepare({str(source)!r}, "w", tokenizer={str(sample[1])!r}, num_val_docs=5, overwrite=True,
                             output_root={str(tmp_path / "out")!r}, workers=3)
    except SystemExit as error:
        print("stopped:", error)
"""
    repo = T.Path(T.__file__).parent
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), str(repo / "data")])))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["stopped: a document this export cannot write"] * 20


def test_a_sidecar_that_does_not_match_its_tokens_stops_the_export(caseops_sample, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_docs, "piece_surfaces", lambda sp, text: ([], []))
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_texts(12)))
    with pytest.raises(SystemExit, match="SentencePiece's pieces are not the document's tokens"):
        prepare_docs.prepare(str(source), "w", tokenizer=caseops_sample[1], num_val_docs=4,
                             output_root=tmp_path / "out", caseops=True)


def check_overlap_of(out_dir, capsys, *flags):
    status = check_overlap.main([str(out_dir), *flags])
    return status, capsys.readouterr().out


def test_the_overlap_check_finds_exactly_the_validation_documents_trained_on(sample, tmp_path, capsys):
    texts = stdlib_texts(40)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:20] + [texts[3]] + texts[20:]))
    tokenizer = str(sample[1])
    export = lambda name, val, **flags: prepare_docs.prepare(  # noqa: E731  (small shards: documents straddle them)
        str(source), name, tokenizer=tokenizer, num_val_docs=val, shard_tokens=500, output_root=tmp_path / "out",
        **flags)[0]
    clean = export("clean", 10, drop_val_duplicates=True)
    status, report = check_overlap_of(clean, capsys)
    shards = lambda split: sorted(clean.glob(f"fineweb_{split}_0*.bin"))  # noqa: E731
    assert len(shards("val")) > 1 and len(shards("train")) > 1
    assert status == 0 and (f"validation: 10 documents in {len(shards('val'))} shards; training: 30 documents in "
                            f"{len(shards('train'))} shards") in report
    assert "overlap: 0 of the 10 validation documents (0.00%)" in report
    copies = export("copies", 10)  # one validation document is in the corpus twice
    status, report = check_overlap_of(copies, capsys)
    assert status == 1 and "overlap: 1 of the 10 validation documents (10.00%)" in report
    assert "first: training document 10 is validation document 3" in report
    assert check_overlap_of(copies, capsys, "--max-fraction", "0.2")[0] == 0
    # prepare_caseops_data.py's way: training from document 4 on, scored on a validation split of 10 documents
    leaky = export("leaky", 4)
    for shard in leaky.glob("fineweb_val_*.bin"):
        shard.unlink()
    for shard in clean.glob("fineweb_val_*.bin"):
        shutil.copy(shard, leaky / shard.name)
    status, report = check_overlap_of(leaky, capsys)
    assert status == 1 and "overlap: 7 of the 10 validation documents (70.00%)" in report  # 4 to 9, and the copy of 3
    assert "first: training document 0 is validation document 4" in report
    status, report = check_overlap_of(leaky, capsys, "--train-shards", "1")  # what a run with one shard reads
    first_shard = np.asarray(T.load_shard(sorted(leaky.glob("fineweb_train_*.bin"))[0]))
    assert f"training: {np.count_nonzero(first_shard == first_shard[0])} documents in 1 shards" in report
    assert status == 1 and "first: training document 0 is validation document 4" in report


def challenge_exporter_shards(texts, sp, num_val_docs, shard_size):
    """A re-statement of the challenge exporter's shard writer: [BOS] + tokens per document, packed, validation
    documents first, a new shard whenever one fills or the split changes. {file name: bytes}."""
    shards, buffer, split, counts = {}, [], "val", {"val": 0, "train": 0}

    def flush():
        if buffer:
            header = np.zeros(256, dtype="<i4")
            header[:3] = (20240520, 1, len(buffer))
            shards[f"fineweb_{split}_{counts[split]:06d}.bin"] = header.tobytes() + np.array(buffer, "<u2").tobytes()
            counts[split] += 1
            buffer.clear()
    for index, ids in enumerate(sp.encode(texts)):
        if (index >= num_val_docs) != (split == "train"):
            flush()
            split = "train"
        for token in [sp.bos_id()] + ids:
            buffer.append(token)
            if len(buffer) == shard_size:
                flush()
    flush()
    return shards


def test_the_default_export_is_the_challenge_exporters_byte_for_byte(corpus, tmp_path):
    texts = fineweb_texts(corpus, 40)
    texts.append(texts[3])  # the exporter keeps a training copy of a validation document: so does the default
    source = tmp_path / "docs_selected.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = corpus / "tokenizers" / "fineweb_1024_bpe.model"
    prepare_docs.main([str(source), "--tokenizer", str(tokenizer), "--num-val-docs", "10", "--chunk-tokens", "5000",
                       "--output-root", str(tmp_path / "out")])  # the exporter's names by default
    out_dir = tmp_path / "out" / "datasets" / "fineweb10B_sp1024"
    model = tmp_path / "out" / "tokenizers" / "fineweb_1024_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    expected = challenge_exporter_shards(texts, sp, 10, 5000)
    assert {p.name: p.read_bytes() for p in out_dir.glob("fineweb_*.bin")} == expected
    assert model.read_bytes() == tokenizer.read_bytes()
    manifest, entry = root_manifest_entry(tmp_path / "out", "fineweb10B_sp1024")
    assert list(manifest) == ["version", "num_docs", "num_val_docs", "shuffle_seed", "shard_size", "append_eos",
                              "docs_jsonl", "docs_meta", "tokenizer_specs", "tokenizers", "datasets"]
    assert (manifest["num_docs"], manifest["num_val_docs"], manifest["shard_size"], manifest["append_eos"]) == \
        (41, 10, 5000, False)
    assert entry["stats"] == dict(docs_total=41, docs_val=10, docs_train=31, files_total=len(expected),
                                  files_val=sum(n.startswith("fineweb_val") for n in expected),
                                  files_train=sum(n.startswith("fineweb_train") for n in expected),
                                  tokens_total=sum(len(b) - 1024 for b in expected.values()) // 2,
                                  tokens_val=sum(len(b) - 1024 for n, b in expected.items() if "val" in n) // 2,
                                  tokens_train=sum(len(b) - 1024 for n, b in expected.items() if "train" in n) // 2)
    assert (entry["tokenizer_name"], entry["path"], entry["train_glob"]) == (
        "sp_bpe_1024", "datasets/fineweb10B_sp1024", "datasets/fineweb10B_sp1024/fineweb_train_*.bin")
    assert manifest["tokenizers"][0]["model_path"] == "tokenizers/fineweb_1024_bpe.model"


def test_a_new_tokenizer_is_trained_as_the_exporter_trains_it(corpus, tmp_path):
    texts = fineweb_texts(corpus, 60)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    _, model = prepare_docs.prepare(str(source), vocab_size=512, num_val_docs=10, output_root=tmp_path / "out")
    assert model.name == "fineweb_512_bpe.model" and model.with_suffix(".vocab").is_file()
    reference = tmp_path / "reference" / "fineweb_512_bpe"
    reference.parent.mkdir()
    spm.SentencePieceTrainer.train(  # the exporter's call: every document of the file, whole, NULs as spaces
        sentence_iterator=(t.replace("\x00", " ").strip() for t in texts if t.replace("\x00", " ").strip()),
        model_prefix=str(reference), model_type="bpe", vocab_size=512, character_coverage=0.999, byte_fallback=True,
        split_digits=True, normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2,
        unk_id=3, hard_vocab_limit=False, minloglevel=2)
    ours, theirs = (spm.SentencePieceProcessor(model_file=str(m)) for m in (model, reference.with_suffix(".model")))
    vocabulary = lambda sp: [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.vocab_size())]  # noqa: E731
    assert vocabulary(ours) == vocabulary(theirs)  # (the files differ only in the output path they record)
    assert ours.encode(texts) == theirs.encode(texts)


def test_validation_from_another_source(corpus, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("First training document.\nStill the first.\n\n\nSecond training document.\n")
    tokenizer = str(corpus / "tokenizers" / "fineweb_1024_bpe.model")
    prepare_docs.prepare(str(train), "mix", tokenizer=tokenizer, val_source=str(corpus / "fineweb_docs_200.jsonl"),
                         num_val_docs=5, output_root=tmp_path / "out")
    _, entry = root_manifest_entry(tmp_path / "out", "mix_sp1024")
    assert (entry["stats"]["docs_val"], entry["stats"]["docs_train"]) == (5, 2)
    assert entry["prepare_docs"]["val_source"] == str(corpus / "fineweb_docs_200.jsonl")


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
    _, entry = root_manifest_entry(data_dir.parent.parent, "stdlib_sp1024")
    assert entry["stats"]["docs_val"] == prepare_docs.STDLIB_VAL_DOCS
    stats = entry["stats"]
    assert stats["tokens_train"] > 200_000 and stats["tokens_val"] < stats["tokens_train"] / 5


# ---- the downloader, with a directory standing in for the Hub ----

MANIFEST = {
    "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                  "stats": {"files_train": 3, "files_val": 1}},
                 {"name": "fineweb10B_byte260", "tokenizer_name": "pure_byte_260",
                  "stats": {"files_train": 1, "files_val": 1}}],
    "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                    "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
                   {"name": "pure_byte_260", "path": "tokenizers/fineweb_pure_byte_260.json"}],
}


def fake_repo(root, prefix="datasets", manifest=MANIFEST):
    """A folder laid out like the challenge's dataset repository under `prefix`."""
    base = root / prefix
    for entry in manifest["datasets"]:
        folder = base / "datasets" / entry["name"]
        folder.mkdir(parents=True)
        splits = [("val", entry["stats"]["files_val"]), ("train", entry["stats"]["files_train"])]
        if entry.get("val_bytes_glob"):
            splits.append(("val_bytes", entry["stats"]["files_val"]))
        for split, count in splits:
            for index in range(count):
                write_shard(folder / f"fineweb_{split}_{index:06d}.bin", np.arange(100) + index)
    (base / "tokenizers").mkdir()
    for tokenizer in manifest["tokenizers"]:
        for key in ("model_path", "vocab_path", "path"):
            if key in tokenizer:
                (base / tokenizer[key]).write_bytes(f"{tokenizer['name']}:{key}".encode())
    (base / "manifest.json").write_text(json.dumps(manifest))
    (base / "docs_selected.jsonl").write_text('{"text": "a document"}\n')
    (base / "docs_selected.source_manifest.json").write_text("{}")
    return base


class FakeHubClient:
    """hf_hub_download's signature over a local repository folder, with a cache of its own (blobs the caller links)."""

    def __init__(self, repos, cache):
        self.repos, self.cache, self.calls = repos, cache, []

    def __call__(self, repo_id, filename, subfolder=None, repo_type=None, etag_timeout=None):
        assert repo_type == "dataset" and etag_timeout
        remote = f"{subfolder}/{filename}" if subfolder else filename
        self.calls.append((repo_id, remote))
        blob = self.cache / repo_id.replace("/", "--") / remote
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.repos[repo_id] / remote, blob)
        return str(blob)


CASEOPS = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_MANIFEST = {  # the CaseOps records' export (2026-04-18, PR #1729): a validation byte sidecar per val shard
    "datasets": [{"name": CASEOPS, "tokenizer_name": "sp_bpe_8192_caseops", "stats": {"files_train": 3, "files_val": 1},
                  "val_bytes_glob": f"datasets/{CASEOPS}/fineweb_val_bytes_*.bin"}],
    "tokenizers": [{"name": "sp_bpe_8192_caseops",
                    "model_path": "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"}]}


@pytest.fixture
def hub(tmp_path):
    fake_repo(tmp_path / "willdepueo")
    fake_repo(tmp_path / "kevclark", prefix="exports", manifest={
        "datasets": [{"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192",
                      "stats": {"files_train": 2, "files_val": 2}}],
        "tokenizers": [{"name": "sp_bpe_8192", "model_path": "tokenizers/fineweb_8192_bpe.model"}]})
    fake_repo(tmp_path / "romeerp", manifest=CASEOPS_MANIFEST)
    return FakeHubClient({"willdepueoai/parameter-golf": tmp_path / "willdepueo",
                          "kevclark/parameter-golf": tmp_path / "kevclark",
                          "romeerp/parameter-golf-caseops-v1": tmp_path / "romeerp"}, tmp_path / "cache")


def fetch(hub, tmp_path, argv, **environ):
    cached.main(argv, environ=environ, download_function=hub, data_dir=tmp_path / "data")
    return tmp_path / "data"


def test_download_writes_the_challenges_paths_from_the_cache(hub, tmp_path):
    data = fetch(hub, tmp_path, ["--variant", "sp1024", "2"])  # the positional shard count
    assert sorted(p.name for p in (data / "datasets" / "fineweb10B_sp1024").iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    assert (data / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"sp_bpe_1024:model_path"
    assert (data / "tokenizers" / "fineweb_1024_bpe.vocab").read_bytes() == b"sp_bpe_1024:vocab_path"
    assert json.loads((data / "manifest.json").read_text()) == MANIFEST
    shard = data / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    blob = (tmp_path / "cache" / "willdepueoai--parameter-golf" / "datasets" / "datasets" / "fineweb10B_sp1024"
            / "fineweb_train_000001.bin")
    assert shard.stat().st_ino == blob.stat().st_ino  # linked from the cache, not a second copy
    assert ("willdepueoai/parameter-golf", "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin") in hub.calls


def test_download_resumes_and_fetches_only_missing_or_damaged_shards(hub, tmp_path):
    data = fetch(hub, tmp_path, ["--train-shards", "2"])
    (data / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin").unlink()
    damaged = data / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    damaged.unlink()  # a copy cut short (a fresh file: writing through the hard link would damage the cache too)
    damaged.write_bytes(b"partial")
    hub.calls.clear()
    fetch(hub, tmp_path, ["--train-shards", "3"])
    assert sorted(remote for _, remote in hub.calls) == [
        f"datasets/datasets/fineweb10B_sp1024/fineweb_train_00000{i}.bin" for i in (0, 1, 2)]
    for index in range(3):
        assert cached.shard_problem(data / "datasets" / "fineweb10B_sp1024" / f"fineweb_train_{index:06d}.bin") is None


def test_another_repo_and_root_prefix_from_the_challenges_env_vars(hub, tmp_path):
    data = fetch(hub, tmp_path, ["--variant", "sp8192", "--train-shards", "1"],
                 MATCHED_FINEWEB_REPO_ID="kevclark/parameter-golf", MATCHED_FINEWEB_REMOTE_ROOT_PREFIX="exports")
    assert sorted(p.name for p in (data / "datasets" / "fineweb10B_sp8192").iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert (data / "tokenizers" / "fineweb_8192_bpe.model").is_file()
    assert {repo for repo, _ in hub.calls} == {"kevclark/parameter-golf"}
    assert all(remote.startswith("exports/") for _, remote in hub.calls)


def test_the_caseops_records_command_brings_the_sidecar_to_where_preset_record_reads(hub, tmp_path):
    # the command of the CaseOps records' READMEs (2026-04-18 onwards), as published
    data = fetch(hub, tmp_path, ["--variant", "sp8192_lossless_caps_caseops_v1_reserved", "--train-shards", "2"],
                 MATCHED_FINEWEB_REPO_ID="romeerp/parameter-golf-caseops-v1",
                 MATCHED_FINEWEB_REMOTE_ROOT_PREFIX="datasets")
    assert sorted(p.name for p in (data / "datasets" / CASEOPS).iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin",
        "fineweb_val_bytes_000000.bin"]
    record = T.PRESETS["record"]  # its default paths are where the download puts the data
    assert (tmp_path / record["data_path"]).resolve() == (data / "datasets" / CASEOPS).resolve()
    assert (tmp_path / record["tokenizer_path"]).resolve().is_file()
    assert T.shard_files(str(data / "datasets" / CASEOPS), "val") == [
        str(data / "datasets" / CASEOPS / "fineweb_val_000000.bin")]
    # the trainer, missing the preset's data, names the command that brings it
    with pytest.raises(T.ConfigError, match="get it with MATCHED_FINEWEB_REPO_ID") as refusal:
        T.load_tokenizer(str(tmp_path / "elsewhere.model"), 8192, record["data_path"])
    environment, _, arguments = str(refusal.value).partition("get it with ")[2].partition(
        " python3 data/cached_challenge_fineweb.py ")
    elsewhere = tmp_path / "elsewhere"
    cached.main(arguments.split() + ["--train-shards", "1"], environ=dict(v.split("=") for v in environment.split()),
                download_function=hub, data_dir=elsewhere / "data")
    assert (elsewhere / record["data_path"]).is_dir() and (elsewhere / record["tokenizer_path"]).is_file()


def test_a_second_repository_s_variant_after_the_first_is_found(hub, tmp_path):
    # the challenge's script keeps the first manifest it fetched, and so reports the second variant "not found"
    data = fetch(hub, tmp_path, ["--variant", "sp1024", "1"])
    blob = tmp_path / "cache" / "willdepueoai--parameter-golf" / "datasets" / "manifest.json"
    (data / "manifest.json").unlink()
    os.link(blob, data / "manifest.json")  # as the challenge's script leaves it: the cache's copy, hard-linked
    fetch(hub, tmp_path, ["--variant", "sp8192", "--train-shards", "1"],
                 MATCHED_FINEWEB_REPO_ID="kevclark/parameter-golf", MATCHED_FINEWEB_REMOTE_ROOT_PREFIX="exports")
    assert (data / "datasets" / "fineweb10B_sp8192" / "fineweb_train_000000.bin").is_file()
    names = [d["name"] for d in json.loads((data / "manifest.json").read_text())["datasets"]]
    assert names == ["fineweb10B_sp1024", "fineweb10B_byte260", "fineweb10B_sp8192"]
    assert json.loads(blob.read_text()) == MANIFEST  # the cache's copy of the first manifest is untouched
    hub.calls.clear()
    fetch(hub, tmp_path, ["--variant", "sp1024", "1"])  # both are now known locally: nothing is fetched
    assert hub.calls == []


def test_byte260_json_tokenizer_docs_and_skip_manifest(hub, tmp_path):
    with pytest.raises(SystemExit, match="--skip-manifest: manifest.json is required"):
        fetch(hub, tmp_path, ["--variant", "byte260", "--skip-manifest"])
    data = fetch(hub, tmp_path, ["--variant", "byte260", "--train-shards", "1", "--with-docs"])
    assert (data / "tokenizers" / "fineweb_pure_byte_260.json").read_bytes() == b"pure_byte_260:path"
    assert (data / "docs_selected.jsonl").is_file() and (data / "docs_selected.source_manifest.json").is_file()
    hub.calls.clear()
    fetch(hub, tmp_path, ["--variant", "byte260", "--train-shards", "1", "--skip-manifest"])
    assert hub.calls == []  # everything is in place, and the local manifest is used


def test_a_damaged_shard_in_the_cache_is_named_and_never_put_in_place(hub, tmp_path):
    shard = tmp_path / "willdepueo" / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(SystemExit,
                       match="fineweb_train_000000.bin from willdepueoai/parameter-golf is not a whole shard"):
        fetch(hub, tmp_path, ["--train-shards", "1"])
    assert not (tmp_path / "data" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").exists()


@pytest.mark.parametrize("argv, message", [(["--variant", "sp4096"], "dataset fineweb10B_sp4096 not found"),
                                           (["--train-shards", "9"], "only has 3 training shards"),
                                           (["--variant", "gpt2"], "unsupported --variant"),
                                           (["--variant", "sp_caseops"], "unsupported --variant")])
def test_download_refuses_what_the_manifest_does_not_have(hub, tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        fetch(hub, tmp_path, argv)


def test_shard_check_agrees_with_the_trainer(tmp_path):
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(50))
    assert cached.shard_problem(good) is None and T.read_shard_header(good)
    for name, data in (("short", good.read_bytes()[:-2]), ("magic", b"\x00" * 4 + good.read_bytes()[4:]),
                       ("tiny", b"\x01\x02")):
        bad = tmp_path / f"{name}.bin"
        bad.write_bytes(data)
        assert cached.shard_problem(bad) is not None
        with pytest.raises((ValueError, OSError)):
            T.read_shard_header(bad)


def hf_cache(root, repo_id, repo_folder):
    """A Hugging Face hub cache holding `repo_folder` as the dataset's main revision (the client's own layout)."""
    entry = root / f"datasets--{repo_id.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0" * 40)
    shutil.copytree(repo_folder, entry / "snapshots" / ("0" * 40))
    return root


def run_downloader(tmp_path, args, **env):
    script_dir = tmp_path / "checkout" / "data"
    script_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(cached.__file__, script_dir)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MATCHED_"))}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(script_dir / "cached_challenge_fineweb.py"), *args], env=clean | env,
                            capture_output=True, text=True, timeout=120)
    return result, time.perf_counter() - started, script_dir


def test_the_real_hub_client_serves_the_cache_offline(tmp_path):
    pytest.importorskip("huggingface_hub")
    cache = hf_cache(tmp_path / "hf", "kevclark/parameter-golf", fake_repo(tmp_path / "repo").parent)
    result, _, data = run_downloader(tmp_path, ["--variant", "sp1024", "1"], HF_HUB_OFFLINE="1",
                                     HF_HUB_CACHE=str(cache), MATCHED_FINEWEB_REPO_ID="kevclark/parameter-golf")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (data / "datasets" / "fineweb10B_sp1024").iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert "torch" not in result.stderr


def test_offline_without_the_files_fails_in_seconds_naming_the_repo_and_the_file(tmp_path):
    pytest.importorskip("huggingface_hub")
    result, seconds, _ = run_downloader(tmp_path, ["--variant", "sp1024"], HF_HUB_OFFLINE="1",
                                        HF_HUB_CACHE=str(tmp_path / "empty"))
    assert result.returncode != 0 and seconds < 30
    assert "datasets/manifest.json" in result.stderr and "willdepueoai/parameter-golf" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr and "prepare_docs.py" in result.stderr


def test_the_downloader_does_not_import_torch():
    code = "import sys; sys.path.insert(0, 'data'); import cached_challenge_fineweb; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=T.Path(T.__file__).parent, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_the_hf_source_says_what_to_install_when_datasets_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(SystemExit, match="pip install datasets"):
        next(iter(prepare_docs.hf_docs("HuggingFaceFW/fineweb:sample-10BT", "text")))


def test_an_export_adds_its_entry_to_a_downloaded_manifest_without_writing_into_the_cache(sample, tmp_path):
    blob = tmp_path / "cache" / "manifest.json"  # the Hugging Face cache's copy, which the download hard-links
    blob.parent.mkdir()
    blob.write_text(json.dumps(MANIFEST))
    (tmp_path / "out").mkdir()
    os.link(blob, tmp_path / "out" / "manifest.json")
    source = tmp_path / "mine.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_texts(12)))
    prepare_docs.main([str(source), "--tokenizer", str(sample[1]), "--num-val-docs", "2", "--name", "mine",
                       "--output-root", str(tmp_path / "out")])
    assert json.loads(blob.read_text()) == MANIFEST
    names = [d["name"] for d in json.loads((tmp_path / "out" / "manifest.json").read_text())["datasets"]]
    assert names == ["fineweb10B_sp1024", "fineweb10B_byte260", "mine_sp1024"]


def test_an_export_never_replaces_shards_another_source_made(corpus, tmp_path):
    downloaded = tmp_path / "out" / "datasets" / "fineweb10B_sp1024"
    downloaded.mkdir(parents=True)
    write_shard(downloaded / "fineweb_train_000000.bin", np.arange(10))  # as the downloader leaves it
    source = tmp_path / "mine.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in fineweb_texts(corpus, 12)))
    args = [str(source), "--tokenizer", str(corpus / "tokenizers" / "fineweb_1024_bpe.model"), "--num-val-docs", "2",
            "--output-root", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="already holds shards from elsewhere"):
        prepare_docs.main(args)
    assert (downloaded / "fineweb_train_000000.bin").is_file()
    prepare_docs.main(args + ["--overwrite"])
    prepare_docs.main(args)  # the same export again is fine
