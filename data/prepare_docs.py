"""
Turn documents into a tokenizer and challenge-format shards.

    python3 data/prepare_docs.py stdlib                                  # the offline sample (no download)
    python3 data/prepare_docs.py docs.jsonl --vocab-size 1024 --name mydocs
    python3 data/prepare_docs.py books.jsonl.xz --tokenizer data/tokenizers/fineweb_1024_bpe.model --name books
    python3 data/prepare_docs.py hf:HuggingFaceFW/fineweb:sample-10BT --vocab-size 8192 --max-docs 2000000

Sources: `stdlib` (docstrings of the installed Python standard library: real human-written text on every machine),
a .jsonl file (optionally .gz/.xz) with a text field, a plain-text file (documents separated by blank lines), or
`hf:<dataset>[:<config>]` streamed with the `datasets` package.

As in the challenge's export: every document becomes [BOS] + tokens (no EOS), documents are packed back to back,
the first --num-val-docs documents are the validation split and the rest the training split. A training document
identical to a validation document is dropped (and counted), so no document is in both. A new tokenizer is
SentencePiece BPE with the challenge's settings and is trained on training documents only.
"""

import argparse
import ast
import gzip
import hashlib
import json
import lzma
import os
import random
import sys
import sysconfig
import time
from itertools import islice
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import read_shard_header, write_shard  # noqa: E402  (the shard format lives in one place)

DATA_DIR = Path(__file__).resolve().parent
STDLIB_VAL_DOCS = 150  # the sample's validation split: a few percent of it, so a CPU evaluation takes seconds


def stdlib_docs(seed=0):
    """Every substantial docstring (module, class or function) of the standard library is a document.
    Shuffled with a fixed seed so that the validation split is a sample of the whole library."""
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
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
        docs.extend(d for d in map(ast.get_docstring, nodes) if d and len(d) >= 200)
    random.Random(seed).shuffle(docs)
    return iter(docs)


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


def train_tokenizer(docs, vocab_size, model_path):
    """SentencePiece BPE with the challenge's settings: byte fallback, NFKC, digits split, no dummy prefix,
    pad/bos/eos/unk = 0/1/2/3. It learns from lines, since very long "sentences" are skipped by SentencePiece."""
    lines = (line for doc in docs for line in doc.split("\n") if line.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=str(model_path)[:-len(".model")], model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=0.999,
        input_sentence_size=5_000_000, shuffle_input_sentence=True, max_sentence_length=16384,
        num_threads=os.cpu_count() or 1, minloglevel=2)


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
            print(f"\r{self.label}: {docs:,} docs {tokens:,} tokens ({rate:,.0f} tok/s)", end=end, file=sys.stderr, flush=True)


def doc_hash(text):
    return hashlib.sha1(text.encode("utf-8")).digest()


def export_split(docs, sp, writer, label, skip_hashes=frozenset(), batch_docs=512):
    """Encode documents in batches and write [BOS] + tokens for each. Returns (docs written, docs skipped)."""
    progress, written, skipped = Progress(label), 0, 0
    docs = iter(docs)
    while batch := list(islice(docs, batch_docs)):
        kept = [d for d in batch if doc_hash(d) not in skip_hashes]
        skipped += len(batch) - len(kept)
        for ids in sp.encode(kept, num_threads=os.cpu_count() or 1):
            writer.add([sp.bos_id()] + ids)
        written += len(kept)
        progress.update(written, writer.tokens)
    writer.flush()
    progress.update(written, writer.tokens, final=True)
    return written, skipped


def prepare(source, name, vocab_size=1024, tokenizer=None, num_val_docs=None, max_docs=0, shard_tokens=10**8,
            tokenizer_train_docs=200_000, text_field="text", output_root=DATA_DIR, val_source=None):
    output_root = Path(output_root)
    docs = iter_docs(source, text_field)
    if max_docs:
        docs = islice(docs, max_docs)
    if val_source:  # validation from another corpus (all of it, or its first --num-val-docs documents)
        val_docs = list(islice(iter_docs(val_source, text_field), num_val_docs))
    else:
        num_val_docs = num_val_docs if num_val_docs is not None else (STDLIB_VAL_DOCS if source == "stdlib" else 50_000)
        val_docs = list(islice(docs, num_val_docs))
        if len(val_docs) < num_val_docs:
            raise SystemExit(f"{source}: only {len(val_docs)} documents, fewer than --num-val-docs={num_val_docs} + training documents")
    # The head of the training stream is kept in memory to train the tokenizer, then exported first.
    train_head = list(islice(docs, tokenizer_train_docs))
    if not train_head:
        raise SystemExit(f"{source}: no documents are left for the training split after {num_val_docs} validation documents")

    tokenizer_dir = output_root / "tokenizers"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        sp = spm.SentencePieceProcessor(model_file=tokenizer)
        tokenizer_path = Path(tokenizer)
    else:
        tokenizer_path = tokenizer_dir / f"{name}_{vocab_size}_bpe.model"
        print(f"training a {vocab_size}-piece BPE tokenizer on {len(train_head):,} training documents", file=sys.stderr)
        train_tokenizer(train_head, vocab_size, tokenizer_path)
        tokenizer_path.with_suffix(".vocab").unlink(missing_ok=True)  # a human-readable copy nobody reads
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    if sp.bos_id() < 0:
        raise SystemExit(f"{tokenizer_path}: the tokenizer has no BOS piece, but every document must start with BOS")

    out_dir = output_root / "datasets" / f"{name}_sp{sp.vocab_size()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("fineweb_*.bin"):
        stale.unlink()
    val_writer = ShardWriter(out_dir, "val", shard_tokens)
    val_count, _ = export_split(val_docs, sp, val_writer, "val")
    val_hashes = frozenset(doc_hash(d) for d in val_docs)
    train_writer = ShardWriter(out_dir, "train", shard_tokens)
    train_count, dropped = export_split((d for part in (train_head, docs) for d in part), sp, train_writer, "train", val_hashes)
    manifest = dict(source=source, val_source=val_source or source, tokenizer=str(tokenizer_path), vocab_size=sp.vocab_size(),
                    tokenizer_sha256=hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest(),
                    val_docs=val_count, val_tokens=val_writer.tokens, val_files=val_writer.files,
                    train_docs=train_count, train_tokens=train_writer.tokens, train_files=train_writer.files,
                    train_docs_dropped_as_val_duplicates=dropped)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for file in val_writer.files + train_writer.files:  # read every shard back through the trainer's validator
        read_shard_header(out_dir / file)
    print(f"wrote {out_dir} ({val_count:,} val docs / {val_writer.tokens:,} tokens, {train_count:,} train docs / "
          f"{train_writer.tokens:,} tokens; {dropped} training docs dropped as copies of validation docs) "
          f"and tokenizer {tokenizer_path}", file=sys.stderr)
    return out_dir, tokenizer_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="stdlib, a .jsonl[.gz|.xz] file, a text file, or hf:<dataset>[:<config>]")
    parser.add_argument("--name", help="dataset name: data/datasets/<name>_sp<vocab>/ (default: from the source)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="size of a newly trained tokenizer")
    parser.add_argument("--tokenizer", help="use this existing SentencePiece .model instead of training one")
    parser.add_argument("--num-val-docs", type=int, help="leading documents that form the validation split "
                        f"(default 50000, or {STDLIB_VAL_DOCS} for stdlib)")
    parser.add_argument("--val-source", help="take the validation split from this source instead (all of it, "
                        "or its first --num-val-docs documents); the whole of SOURCE is then training data")
    parser.add_argument("--max-docs", type=int, default=0, help="stop after this many documents (0 = all)")
    parser.add_argument("--shard-tokens", type=int, default=10**8, help="tokens per shard")
    parser.add_argument("--tokenizer-train-docs", type=int, default=200_000, help="training documents the tokenizer learns from")
    parser.add_argument("--text-field", default="text", help="JSON / dataset field holding the text")
    parser.add_argument("--output-root", default=str(DATA_DIR), help="root of datasets/ and tokenizers/")
    args = parser.parse_args(argv)
    name = args.name or ("stdlib" if args.source == "stdlib" else Path(args.source.split(":")[-1]).name.split(".")[0].replace("/", "_"))
    prepare(args.source, name, args.vocab_size, args.tokenizer, args.num_val_docs, args.max_docs, args.shard_tokens,
            args.tokenizer_train_docs, args.text_field, args.output_root, args.val_source)


if __name__ == "__main__":
    main()
