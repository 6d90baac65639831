"""
Which validation documents of a data folder are also training documents: the train/val overlap that no score may
rest on.

    python3 data/check_overlap.py data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
    python3 data/check_overlap.py data/datasets/fineweb10B_sp1024 --train-shards 10   # the shards a run reads

A document is what lies between two BOS tokens (every document of the challenge's shards starts with one, and may run
on into the next shard). The folder's validation documents (fineweb_val_*.bin, as the trainer reads them) are
compared token for token with every document of its training shards, in the trainer's order. The report counts the
validation documents found in training, and where the first of them is.

Two things give an overlap. A training split that starts inside the validation split: the records' CaseOps script
prepare_caseops_data.py, at its default --val-docs 10000 and paired with a 50,000-document validation split, trains
on 40,000 of the 50,000 scored documents (the challenge's issue #2127). And exact copies within the corpus: FineWeb
holds a few documents twice, which prepare_docs.py --drop-val-duplicates leaves out of training. The exit status is
1 when at least --max-fraction of the validation documents are trained on (default: any one), else 0.
"""

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import ConfigError, DataError, load_shard, shard_files  # noqa: E402  (the trainer's own reading)


def documents(stream, bos):
    """The token bytes of each whole document of `stream` (which starts at a BOS), and the rest: the last document,
    which may go on in the next shard."""
    starts = np.flatnonzero(stream == bos)
    whole = [stream[a:b].tobytes() for a, b in zip(starts[:-1], starts[1:])]
    return whole, stream[starts[-1]:] if starts.size else stream


def validation_documents(files):
    stream = np.concatenate([np.asarray(load_shard(f)) for f in files])
    if stream.size == 0:
        raise DataError(f"{files[0]}: the validation split is empty")
    bos = int(stream[0])  # every document starts with BOS, so the split's first token is the BOS id
    whole, last = documents(stream, bos)
    return bos, whole + [last.tobytes()]


def training_overlap(files, bos, scored, log):
    """(training documents read, {validation document: index of the first training document equal to it})."""
    found, count, carry, start = {}, 0, np.empty(0, np.uint16), time.time()
    for shard, path in enumerate(files):
        stream = np.concatenate([carry, np.asarray(load_shard(path))])
        if shard == 0 and stream.size and stream[0] != bos:
            raise DataError(f"{path}: the training split starts with token {stream[0]}, not the validation "
                            f"split's first token {bos} (BOS); are these shards of one export?")
        whole, carry = documents(stream, bos)
        if shard == len(files) - 1:
            whole.append(carry.tobytes())
        for document in whole:
            if document in scored:
                found.setdefault(document, count)
            count += 1
        log(f"\rtraining shard {shard + 1}/{len(files)}: {count:,} documents, {len(found):,} of them scored "
            f"({time.time() - start:.0f} s)", end="")
    log("")
    return count, found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_path", help="a folder of fineweb_train_*.bin and fineweb_val_*.bin shards (DATA_PATH)")
    parser.add_argument("--train-shards", type=int, default=0, help="only the first N training shards (0: all)")
    parser.add_argument("--max-fraction", type=float, default=0.0,
                        help="the fraction of validation documents in training that still passes (default 0)")
    args = parser.parse_args(argv)
    log = lambda *a, **k: print(*a, file=sys.stderr, flush=True, **k)  # noqa: E731
    try:
        val_files, train_files = shard_files(args.data_path, "val"), shard_files(args.data_path, "train")
        bos, val_docs = validation_documents(val_files)
        train_files = train_files[:args.train_shards or None]
        scored = collections.Counter(val_docs)  # a document the split holds twice counts twice
        trained, found = training_overlap(train_files, bos, scored, log)
    except (ConfigError, DataError) as error:
        sys.exit(f"error: {error}")
    overlap = sum(scored[document] for document in found)
    fraction = overlap / len(val_docs)
    print(f"validation: {len(val_docs):,} documents in {len(val_files)} shards; training: {trained:,} documents in "
          f"{len(train_files)} shards")
    print(f"overlap: {overlap:,} of the {len(val_docs):,} validation documents ({100 * fraction:.2f}%) are also "
          f"training documents")
    if found:
        document, first = min(found.items(), key=lambda item: item[1])
        print(f"first: training document {first:,} is validation document {val_docs.index(document):,}")
    return 1 if overlap and fraction >= args.max_fraction else 0

if __name__ == "__main__":
    sys.exit(main())
