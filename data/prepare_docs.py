"""
Turn documents into a tokenizer and challenge-format shards.

    python3 data/prepare_docs.py stdlib                                  # the offline sample (no download)
    python3 data/prepare_docs.py docs.jsonl --vocab-size 1024 --name mydocs
    python3 data/prepare_docs.py books.jsonl.xz --tokenizer data/tokenizers/fineweb_1024_bpe.model --name books
    python3 data/prepare_docs.py hf:HuggingFaceFW/fineweb:sample-10BT --vocab-size 8192 --max-docs 2000000

Sources: `stdlib` (docstrings of the installed Python standard library: real human-written text on every machine),
a .jsonl file (optionally .gz/.xz) with a text field, a plain-text file (documents separated by blank lines), or
`hf:<dataset>[:<config>]` streamed with the `datasets` package.

By default the output is the challenge's exporter's (data/download_hf_docs_and_tokenize.py) byte for byte for the
same documents and tokenizer: every document becomes [BOS] + tokens (no EOS), packed back to back into shards of
--shard-tokens (10^8); the first --num-val-docs documents (50,000) are the validation split and the rest the
training split; datasets/fineweb10B_sp<V>/ and tokenizers/fineweb_<V>_bpe.model + .vocab (with --name N:
datasets/N_sp<V>/ and tokenizers/N_<V>_bpe.*); <output-root>/manifest.json in the exporter's schema (entries of
other datasets already in it are kept). A new tokenizer is SentencePiece BPE with the exporter's settings, trained
on the exporter's input: the leading documents of the stream (all of them, or --tokenizer-train-docs), whole.

Our additions, each recorded in the manifest's "prepare_docs" entry: --drop-val-duplicates (a training document
identical to a validation document is dropped, so no document is in both), --tokenizer-from train (the tokenizer
learns from the training documents only, by lines), --val-source (the validation split from another corpus), and
the sources beyond a .jsonl file.
"""

import argparse
import ast
import concurrent.futures
import functools
import gzip
import hashlib
import json
import lzma
import multiprocessing
import os
import random
import shutil
import signal
import sys
import sysconfig
import time
from collections import deque
from itertools import chain, islice
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from cached_challenge_fineweb import merge_into_manifest  # noqa: E402  (beside this file: the downloader's manifest)
from train_gpt import (CASE_ESCAPE, CASE_OPERATORS, SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION,  # noqa: E402
                       case_decode, case_encode, read_shard_header,  # (the shard format and the CaseOps transform
                       tokenizer_normalizes)  # are defined where they are read)

DATA_DIR = Path(__file__).resolve().parent
STDLIB_VAL_DOCS = 150  # the sample's validation split: a few percent of it, so a CPU evaluation takes seconds
NUM_VAL_DOCS = 50_000  # the challenge exporter's validation split


def write_shard(path, tokens):
    """A shard in the challenge's format: the 256-int32 header (magic, version, token count), then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError(f"{path}: token ids must fit in uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def stdlib_docs(seed=0):
    """Every substantial docstring (module, class or function) of the standard library is a document.
    Shuffled with a fixed seed so that the validation split is a sample of the whole library."""
    return iter(_stdlib_doc_list(seed))


@functools.cache  # an export reads its source several times (split, tokenizer, shards): parse the library once
def _stdlib_doc_list(seed):
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or any(p in ("test", "tests", "idle_test") for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        nodes = (n for n in ast.walk(tree) if isinstance(n, documented))
        docs.extend(d for d in map(ast.get_docstring, nodes) if d and len(d) >= 200)
    random.Random(seed).shuffle(docs)
    return tuple(docs)


def open_text(path):
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def jsonl_docs(path, text_field):
    with open_text(path) as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError) as error:
                    raise SystemExit(f"{path}:{line_number}: not a JSON object with a {text_field!r} field ({error})")


def text_docs(path):
    """Plain text: documents are separated by one or more blank lines."""
    with open_text(path) as f:
        lines = []
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).strip("\n")
                lines = []
        if lines:
            yield "".join(lines).strip("\n")


def hf_docs(spec, text_field):
    try:
        import datasets  # only this source needs it (an optional extra: pyarrow and pandas come with it)
    except ImportError:
        raise SystemExit(f"the source hf:{spec} streams with the datasets package, which is not installed: "
                         f"pip install datasets") from None
    name, _, config = spec.partition(":")
    stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
    return (row[text_field] for row in stream)


def iter_docs(source, text_field="text"):
    if source == "stdlib":
        return stdlib_docs()
    if source.startswith("hf:"):
        return hf_docs(source[3:], text_field)
    if not os.path.isfile(source):
        raise SystemExit(f"{source}: no such file (sources: stdlib, a .jsonl[.gz|.xz] file, a text file, hf:<dataset>)")
    if ".jsonl" in source:
        return jsonl_docs(source, text_field)
    return text_docs(source)


# The challenge exporter's SentencePiece settings: BPE, byte fallback, NFKC, digits split, no dummy prefix,
# pad/bos/eos/unk = 0/1/2/3, coverage 0.999, no hard vocabulary limit.
EXPORTER_TOKENIZER = dict(model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
                          normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2,
                          unk_id=3, hard_vocab_limit=False)


# The CaseOps tokenizer (--caseops): the exporter's, with the four operators as pieces of their own, and no
# normalization or whitespace folding, so that its tokens decode to exactly the text they encode.
CASEOPS_TOKENIZER = dict(EXPORTER_TOKENIZER, normalization_rule_name="identity", remove_extra_whitespaces=False,
                         user_defined_symbols=list(CASE_OPERATORS))


def exporter_sentences(docs):
    """The exporter's tokenizer input: each whole document, NULs as spaces, stripped, empty ones skipped."""
    return (text for text in (doc.replace("\x00", " ").strip() for doc in docs) if text)


def train_tokenizer(docs, vocab_size, model_path, by_lines=False, caseops=False):
    """SentencePiece BPE with the exporter's settings, on whole documents as the exporter does, or on their lines
    (--tokenizer-from train: SentencePiece skips "sentences" longer than 4192 bytes, so long documents only count
    through their lines). Writes <prefix>.model and <prefix>.vocab."""
    if by_lines:
        sentences = (line for doc in docs for line in doc.split("\n") if line.strip())
        extra = dict(input_sentence_size=5_000_000, shuffle_input_sentence=True, max_sentence_length=16384,
                     num_threads=os.cpu_count() or 1)
    else:
        sentences, extra = exporter_sentences(docs), {}
    spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_prefix=str(model_path)[:-len(".model")],
                                   vocab_size=vocab_size, minloglevel=2,
                                   **(CASEOPS_TOKENIZER if caseops else EXPORTER_TOKENIZER), **extra)


class ShardWriter:
    """Packs documents into fineweb_<split>_NNNNNN.bin shards of at most `shard_tokens` tokens."""

    def __init__(self, out_dir, split, shard_tokens):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer, self.filled, self.files, self.tokens = np.empty(shard_tokens, np.uint16), 0, [], 0

    def add(self, tokens):
        tokens = np.asarray(tokens, dtype=np.uint16)
        while tokens.size:
            take = min(tokens.size, self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled, tokens, self.tokens = self.filled + take, tokens[take:], self.tokens + take
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self):
        if self.filled:
            path = self.out_dir / f"fineweb_{self.split}_{len(self.files):06d}.bin"
            write_shard(path, self.buffer[:self.filled])
            self.files.append(path.name)
            self.filled = 0


class Progress:
    """A one-line progress report on stderr, refreshed at most once a second."""

    def __init__(self, label):
        self.label, self.start, self.last = label, time.time(), 0.0

    def update(self, docs, tokens, final=False):
        now = time.time()
        if final or now - self.last >= 1.0:
            self.last = now
            rate = tokens / max(now - self.start, 1e-9)
            end = "\n" if final else ""
            print(f"\r{self.label}: {docs:,} docs {tokens:,} tokens ({rate:,.0f} tok/s)", end=end, file=sys.stderr,
                  flush=True)


def doc_hash(text):
    return hashlib.sha1(text.encode("utf-8")).digest()


def _varint(data, at):
    value = shift = 0
    while True:
        byte, at = data[at], at + 1
        value, shift = value | (byte & 0x7F) << shift, shift + 7
        if byte < 0x80:
            return value, at


def proto_fields(data):
    """(field number, value) of a serialized protobuf message: ints for varints, bytes for the rest."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        wire = key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 2:
            length, at = _varint(data, at)
            value, at = data[at:at + length], at + length
        elif wire in (1, 5):
            value, at = data[at:at + (8 if wire == 1 else 4)], at + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire} is not one SentencePiece writes")
        yield key >> 3, value


def piece_surfaces(sp, text):
    """(ids, surfaces) of `text`'s pieces, as SentencePiece reports them (SentencePieceText: pieces = field 2; in
    each, id = 2 and surface = 3, the span of the text before normalization that the piece covers), read from its
    serialized proto so that no protobuf package is needed."""
    pieces = [dict(proto_fields(piece)) for number, piece in proto_fields(sp.encode(text, out_type="serialized_proto"))
              if number == 2]
    return [piece.get(2, 0) for piece in pieces], [piece.get(3, b"").decode("utf-8") for piece in pieces]


def surface_original_bytes(surfaces):
    """The bytes of original text each surface stands for: operators count none, an escaped operator its own."""
    counts, literal = [], False
    for surface in surfaces:
        count = 0
        for char in surface:
            if not literal and char == CASE_ESCAPE:
                literal = True
                continue
            count += 0 if char in CASE_OPERATORS and not literal else len(char.encode("utf-8"))
            literal = False
        counts.append(count)
    return counts


class ExportError(Exception):
    """A document the export cannot write faithfully (raised in a worker as in the main process)."""


def sidecar_counts(sp, normalizes, tokens, original, encoded):
    """The CaseOps byte sidecar of one document ([BOS] + tokens), counted as the records' exporter counts it (PR
    #1729's, the 04-27 record's prepare_caseops_data.py): for each piece, the original bytes of the surface
    SentencePiece gives it, so a normalizing tokenizer's sidecar counts the text before normalization. With a
    tokenizer that does not normalize (ours), also checks that the tokens decode to a CaseOps string whose original
    has exactly the sidecar's bytes. Returns (counts, whether the tokens give back the original exactly)."""
    ids, surfaces = piece_surfaces(sp, encoded)
    if ids != tokens[1:]:
        raise ExportError("CaseOps byte sidecar: SentencePiece's pieces are not the document's tokens")
    counts = [0] + surface_original_bytes(surfaces)  # BOS stands for no text
    if normalizes:
        return counts, True
    represented = case_decode(sp.decode(tokens[1:]))
    if sum(counts) != len(represented.encode("utf-8")):
        raise ExportError(f"CaseOps byte sidecar: a document's tokens count {sum(counts)} bytes, the text they decode "
                          f"to has {len(represented.encode('utf-8'))}")
    return counts, represented == original  # not so with e.g. a literal U+2581, which SentencePiece decodes as a space


class BatchEncoder:
    """Turns a batch of documents into what its split writes: [BOS] + tokens for each document not skipped, in
    order, and with `sidecar` the CaseOps byte counts. The main process (one worker) and each worker process run the
    same object, so N workers write what one does."""

    def __init__(self, tokenizer_path, caseops=False, sidecar=False, skip_hashes=frozenset(), threads=1):
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))  # picklable, for spawned workers
        self.normalizes, self.caseops, self.sidecar = tokenizer_normalizes(self.sp), caseops, sidecar
        self.skip_hashes, self.threads = skip_hashes, threads

    def __call__(self, batch):
        kept = [d for d in batch if doc_hash(d) not in self.skip_hashes]
        encoded = [case_encode(d) for d in kept] if self.caseops else kept
        tokens, counts, inexact = [], [], 0
        for original, text, ids in zip(kept, encoded, self.sp.encode(encoded, num_threads=self.threads)):
            tokens.append([self.sp.bos_id()] + ids)
            if self.sidecar:
                document_counts, exact = sidecar_counts(self.sp, self.normalizes, tokens[-1], original, text)
                counts.append(document_counts)
                inexact += not exact
        flat = lambda lists: np.fromiter(chain.from_iterable(lists), dtype=np.uint16)  # noqa: E731  (raises past it)
        return flat(tokens), flat(counts) if self.sidecar else None, len(kept), len(batch) - len(kept), inexact


_WORKER_ENCODER = None  # a worker process's BatchEncoder


def _encode_in_worker(batch):
    return _WORKER_ENCODER(batch)  # its ExportError comes back through the pool (a SystemExit would end the worker)


def _start_worker(encoder):
    global _WORKER_ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's, which then shuts the pool down
    _WORKER_ENCODER = encoder


def encoded_batches(encoder, docs, workers, batch_docs):
    """encoder(batch) for each batch of `docs`, in order: in this process with one worker, else in `workers`
    processes with at most two batches a worker in flight, so that a source of any size is read as it is written.
    On an error the pool finishes those batches and ends (it never kills a worker, which could leave its queue's lock
    held)."""
    batches = iter(lambda: list(islice(docs, batch_docs)), [])
    if workers <= 1:
        yield from map(encoder, batches)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, context, initializer=_start_worker,
                                                initargs=(encoder,)) as pool:
        pending = deque(pool.submit(_encode_in_worker, batch) for batch in islice(batches, 2 * workers))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(_encode_in_worker, batch) for batch in islice(batches, 1))
            yield result


BATCH_DOCS = 512  # documents a worker encodes at a time


def export_split(docs, encoder, writer, label, sidecar_writer=None, workers=1):
    """Encode documents in batches (see BatchEncoder) and write them, and their byte counts to `sidecar_writer`.
    Returns (docs written, docs skipped, docs whose tokens do not give back their text exactly)."""
    progress, written, skipped, inexact = Progress(label), 0, 0, 0
    try:
        for tokens, counts, kept, dropped, differing in encoded_batches(encoder, iter(docs), workers, BATCH_DOCS):
            writer.add(tokens)
            if sidecar_writer is not None:
                sidecar_writer.add(counts)
            written, skipped, inexact = written + kept, skipped + dropped, inexact + differing
            progress.update(written, writer.tokens)
    except ExportError as error:
        raise SystemExit(str(error)) from None
    writer.flush()
    if sidecar_writer is not None:
        sidecar_writer.flush()
    progress.update(written, writer.tokens, final=True)
    return written, skipped, inexact


def exporter_names(name, vocab_size, caseops=False):
    """(dataset folder, tokenizer prefix): the exporter's fineweb10B_sp<V> / fineweb_<V>_bpe, or <name>_sp<V> /
    <name>_<V>_bpe; with --caseops both end in _caseops."""
    dataset, prefix = ((f"{name}_sp{vocab_size}", f"{name}_{vocab_size}_bpe") if name else
                       (f"fineweb10B_sp{vocab_size}", f"fineweb_{vocab_size}_bpe"))
    return (dataset + "_caseops", prefix + "_caseops") if caseops else (dataset, prefix)


def bring_tokenizer(tokenizer, tokenizer_dir, prefix):
    """An existing model (and its .vocab) under the export's name, as the exporter's --reuse-sp-model does."""
    target = tokenizer_dir / f"{prefix}.model"
    source = Path(tokenizer)
    if source.resolve() != target.resolve():
        shutil.copy2(source, target)
        if source.with_suffix(".vocab").is_file():
            shutil.copy2(source.with_suffix(".vocab"), target.with_suffix(".vocab"))
    return target


def refuse_to_replace(output_root, out_dir, dataset_name, source, overwrite):
    """Shards in the way that another source made (a download of the challenge's, another export) are never
    deleted without --overwrite: the default names are the challenge's own."""
    if overwrite or not any(out_dir.glob("fineweb_*.bin")):
        return
    path = output_root / "manifest.json"
    entries = json.loads(path.read_text(encoding="utf-8")).get("datasets", []) if path.is_file() else []
    mine = next((e for e in entries if e.get("name") == dataset_name), {}).get("prepare_docs", {})
    if mine.get("source") != source:
        raise SystemExit(f"{out_dir} already holds shards from {mine.get('source') or 'elsewhere (a download?)'}; "
                         f"choose --name or another --output-root, or pass --overwrite to replace them")


def update_root_manifest(output_root, top, tokenizer_entry, dataset_entry):
    """<output-root>/manifest.json in the exporter's schema; entries of other datasets and tokenizers are kept."""
    path = output_root / "manifest.json"
    merge_into_manifest(path, dict(top, tokenizers=[tokenizer_entry], datasets=[dataset_entry]))
    return path


def prepare(source, name=None, vocab_size=1024, tokenizer=None, num_val_docs=None, max_docs=0, shard_tokens=10**8,
            tokenizer_train_docs=None, text_field="text", output_root=DATA_DIR, val_source=None,
            drop_val_duplicates=False, tokenizer_from="all", overwrite=False, caseops=False, workers=1):
    """Export `source` (see the module docstring); returns (dataset folder, tokenizer model path)."""
    output_root = Path(output_root)
    # a fresh pass over the source
    passes = lambda: islice(iter_docs(source, text_field), max_docs or None)  # noqa: E731
    if val_source:  # validation from another corpus (all of it, or its first --num-val-docs documents)
        val_docs = list(islice(iter_docs(val_source, text_field), num_val_docs))
        train_docs = passes
    else:
        if num_val_docs is None:
            num_val_docs = STDLIB_VAL_DOCS if source == "stdlib" else NUM_VAL_DOCS
        val_docs = list(islice(passes(), num_val_docs))
        if len(val_docs) < num_val_docs:
            raise SystemExit(f"{source}: only {len(val_docs)} documents, fewer than --num-val-docs={num_val_docs} + "
                             f"training documents")
        train_docs = lambda: islice(passes(), num_val_docs, None)  # noqa: E731
    if next(iter(train_docs()), None) is None:
        raise SystemExit(f"{source}: no documents are left for the training split after {len(val_docs)} validation "
                         f"documents")

    tokenizer_dir = output_root / "tokenizers"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
        dataset_name, prefix = exporter_names(name, vocab_size, caseops)
        tokenizer_path = bring_tokenizer(tokenizer, tokenizer_dir, prefix)
    else:
        dataset_name, prefix = exporter_names(name, vocab_size, caseops)
        tokenizer_path = tokenizer_dir / f"{prefix}.model"
        learn_from = chain(val_docs, train_docs()) if tokenizer_from == "all" else train_docs()
        which = "the leading" if tokenizer_from == "all" else "training"
        print(f"training a {vocab_size}-piece BPE tokenizer on {which} "
              f"documents" + (f" (at most {tokenizer_train_docs:,})" if tokenizer_train_docs else ""), file=sys.stderr)
        learn_from = map(case_encode, learn_from) if caseops else learn_from
        train_tokenizer(islice(learn_from, tokenizer_train_docs), vocab_size, tokenizer_path,
                        by_lines=tokenizer_from == "train", caseops=caseops)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    if sp.bos_id() < 0:
        raise SystemExit(f"{tokenizer_path}: the tokenizer has no BOS piece, but every document must start with BOS")
    if caseops and any(sp.encode(op) != [sp.piece_to_id(op)] or sp.piece_to_id(op) == sp.unk_id()
                       for op in CASE_OPERATORS):
        raise SystemExit(f"{tokenizer_path}: --caseops needs a tokenizer with the CaseOps operators U+E001..U+E004 as "
                         f"pieces of their own; leave out --tokenizer to train one")

    out_dir = output_root / "datasets" / dataset_name
    refuse_to_replace(output_root, out_dir, dataset_name, source, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("fineweb_*.bin"):
        stale.unlink()
    val_writer = ShardWriter(out_dir, "val", shard_tokens)
    sidecar_writer = ShardWriter(out_dir, "val_bytes", shard_tokens) if caseops else None
    threads = (os.cpu_count() or 1) if workers == 1 else 1  # SentencePiece's own threads, where one process encodes
    val_encoder = BatchEncoder(tokenizer_path, caseops, sidecar=caseops, threads=threads)
    val_count, _, inexact = export_split(val_docs, val_encoder, val_writer, "val", sidecar_writer, workers)
    sidecar_files = sidecar_writer.files if caseops else []
    if inexact:
        print(f"caseops: {inexact} validation documents hold text the tokenizer cannot reproduce exactly (a literal "
              f"U+2581); the sidecar counts the bytes of the text their tokens stand for", file=sys.stderr)
    skip = frozenset(doc_hash(d) for d in val_docs) if drop_val_duplicates else frozenset()
    train_writer = ShardWriter(out_dir, "train", shard_tokens)
    train_encoder = BatchEncoder(tokenizer_path, caseops, skip_hashes=skip, threads=threads)
    train_count, dropped, _ = export_split(train_docs(), train_encoder, train_writer, "train", workers=workers)
    for file in val_writer.files + sidecar_files + train_writer.files:  # every shard back through the trainer's check
        read_shard_header(out_dir / file)

    relative = lambda path: os.path.relpath(path, output_root)  # noqa: E731
    tokenizer_name, bigram = f"sp_bpe_{sp.vocab_size()}", ((sp.vocab_size() + 127) // 128) * 128 * 5
    ids = dict(vocab_size=sp.vocab_size(), bos_id=sp.bos_id(), eos_id=sp.eos_id(), recommended_bigram_vocab_size=bigram)
    spec = dict(name=tokenizer_name, kind="sentencepiece_bpe", vocab_size=sp.vocab_size(),
                **({"reuse_model_path": str(tokenizer)} if tokenizer else {}),
                **({"tokenizer_train_docs": tokenizer_train_docs} if tokenizer_train_docs and not tokenizer else {}))
    tokenizer_entry = dict(name=tokenizer_name, kind="sentencepiece_bpe", **ids, source_spec=spec,
                           model_path=relative(tokenizer_path),
                           vocab_path=relative(tokenizer_path.with_suffix(".vocab")))
    stats = dict(docs_total=val_count + train_count, docs_val=val_count, docs_train=train_count,
                 files_total=len(val_writer.files) + len(train_writer.files), files_val=len(val_writer.files),
                 files_train=len(train_writer.files), tokens_total=val_writer.tokens + train_writer.tokens,
                 tokens_val=val_writer.tokens, tokens_train=train_writer.tokens)
    ours = dict(source=source, val_source=val_source or source, drop_val_duplicates=drop_val_duplicates,
                train_docs_dropped_as_val_duplicates=dropped, tokenizer_from=None if tokenizer else tokenizer_from,
                tokenizer_sha256=hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
                **(dict(caseops="case_encode of train_gpt.py (TITLE/ALLCAPS/CAPNEXT/ESCAPE = U+E001..U+E004)",
                        val_bytes_glob=relative(out_dir / "fineweb_val_bytes_*.bin"),
                        val_docs_not_reproduced_exactly=inexact) if caseops else {}))
    dataset_entry = dict(name=dataset_name, tokenizer_name=tokenizer_name, tokenizer_kind="sentencepiece_bpe",
                         path=relative(out_dir), train_glob=relative(out_dir / "fineweb_train_*.bin"),
                         val_glob=relative(out_dir / "fineweb_val_*.bin"), **ids, stats=stats, prepare_docs=ours)
    top = dict(version="10B", num_docs=stats["docs_total"] + dropped, num_val_docs=val_count, shuffle_seed=None,
               shard_size=shard_tokens, append_eos=False, docs_jsonl=source, docs_meta=dict(source=source),
               tokenizer_specs=[spec])
    manifest_path = update_root_manifest(output_root, top, tokenizer_entry, dataset_entry)
    print(f"wrote {out_dir} ({val_count:,} val docs / {val_writer.tokens:,} tokens, {train_count:,} train docs / "
          f"{train_writer.tokens:,} tokens" + (f"; {dropped} training docs dropped as copies of validation docs" if
                                                drop_val_duplicates else "") +
          f"), tokenizer {tokenizer_path} and {manifest_path}", file=sys.stderr)
    return out_dir, tokenizer_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="stdlib, a .jsonl[.gz|.xz] file, a text file, or hf:<dataset>[:<config>]")
    parser.add_argument("--name", help="datasets/<name>_sp<vocab>/ and tokenizers/<name>_<vocab>_bpe.model (default: "
                        "the "
                        "exporter's fineweb10B_sp<vocab>/ and fineweb_<vocab>_bpe.model; stdlib for the sample)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="size of a newly trained tokenizer")
    parser.add_argument("--tokenizer", help="use this existing SentencePiece .model instead of training one")
    parser.add_argument("--num-val-docs", type=int, help="leading documents that form the validation split "
                        f"(default 50000, or {STDLIB_VAL_DOCS} for stdlib)")
    parser.add_argument("--val-source", help="take the validation split from this source instead (all of it, "
                        "or its first --num-val-docs documents); the whole of SOURCE is then training data")
    parser.add_argument("--max-docs", type=int, default=0, help="stop after this many documents (0 = all)")
    parser.add_argument("--chunk-tokens", "--shard-tokens", dest="chunk_tokens", type=int, default=10**8,
                        help="tokens per shard (the exporter's --chunk-tokens)")
    parser.add_argument("--tokenizer-train-docs", type=int, default=None,
                        help="documents a new tokenizer learns from (default: all, as the exporter)")
    parser.add_argument("--tokenizer-from", choices=("all", "train"), default="all",
                        help="all: the leading documents, whole (the exporter's input); train: training documents "
                        "only, by lines")
    parser.add_argument("--drop-val-duplicates", action="store_true",
                        help="drop every training document identical to a validation document")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset folder that another source filled (a download, another export)")
    parser.add_argument("--skip-byte", action="store_true",
                        help="the exporter's flag, accepted: no byte260 export is made here either way")
    parser.add_argument("--caseops", action="store_true",
                        help="write the CaseOps form of every document (a lossless case transform), train the "
                        "tokenizer "
                        "on it with the operators as pieces, and write the validation byte sidecar for "
                        "CASEOPS_ENABLED=1")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes that encode documents (default: one per CPU core); any number writes the "
                             "same files")
    parser.add_argument("--text-field", default="text", help="JSON / dataset field holding the text")
    parser.add_argument("--output-root", default=str(DATA_DIR), help="root of datasets/ and tokenizers/")
    args = parser.parse_args(argv)
    if args.chunk_tokens <= 0 or args.workers <= 0:
        parser.error("--chunk-tokens and --workers must be positive")
    name = args.name or ("stdlib" if args.source == "stdlib" else None)
    prepare(args.source, name, args.vocab_size, args.tokenizer, args.num_val_docs, args.max_docs, args.chunk_tokens,
            args.tokenizer_train_docs, args.text_field, args.output_root, args.val_source, args.drop_val_duplicates,
            args.tokenizer_from, args.overwrite, args.caseops, args.workers)


if __name__ == "__main__":
    main()
