"""What the start-up checks of the training shards cost: the header and size of every shard, and the scan of every
token id against VOCAB_SIZE (one process; under torchrun each rank scans 1/WORLD_SIZE of the shards). Then the
host's work for one micro-batch of the record's shape (one GPU's share of 786,432 tokens: 48 rows of 2,048), which
a step does while the GPU runs the one before: the rows, their document bounds (cu_seqlens, with DOC_ISOLATION on
FlashAttention), and TRAIN_ROWS=packed's single row cut into pieces.

    python3 benchmarks/data_checks.py                                   # 80 shards of 10M tokens in a temp folder
    python3 benchmarks/data_checks.py --shards 80 --tokens 100000000    # the challenge's 80 x 100M (16 GB of disk)
    python3 benchmarks/data_checks.py --data-path data/datasets/fineweb10B_sp1024   # real shards

The shards it writes are random ids below the vocabulary. The page cache is warm (the files were just written);
on a cold disk the scan reads every byte once, so it takes the data's size over the disk's read speed.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
import prepare_docs  # noqa: E402
import train_gpt as T  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", help="a folder of fineweb_train_*.bin shards; default: write synthetic ones")
    parser.add_argument("--shards", type=int, default=80)
    parser.add_argument("--tokens", type=int, default=10_000_000, help="tokens per synthetic shard")
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.data_path
        if folder is None:
            folder, rng = scratch, np.random.default_rng(0)
            start = time.perf_counter()
            for index in range(args.shards):
                prepare_docs.write_shard(Path(folder) / f"fineweb_train_{index:06d}.bin",
                              rng.integers(0, args.vocab_size, args.tokens, dtype=np.uint16))
            print(f"wrote {args.shards} shards of {args.tokens:,} tokens in {time.perf_counter() - start:.1f}s")
        files = T.shard_files(folder, "train")
        start = time.perf_counter()
        shards = [T.load_shard(f) for f in files]
        headers_s = time.perf_counter() - start
        start = time.perf_counter()
        T.check_token_ids(files, shards, args.vocab_size)
        scan_s = time.perf_counter() - start
        total = sum(len(shard) for shard in shards)
        batch_ms = {name: micro_batch_ms(files, **settings) for name, settings in MICRO_BATCHES.items()}
    print(f"shards:{len(files)} tokens:{total:,}")
    print(f"header and size check of every shard: {headers_s * 1000:.1f} ms")
    print(f"token-id scan of every shard: {scan_s:.2f} s ({total / scan_s / 1e9:.1f} G tokens/s)")
    for name, ms in batch_ms.items():
        print(f"one micro-batch of 98,304 tokens on the host, {name}: {ms:.2f} ms (median of 20)")


# The loader's three kinds of micro-batch (BOS is id 1 in the challenge's tokenizers).
MICRO_BATCHES = {"rows": {}, "rows and cu_seqlens": dict(varlen_bos_id=1),
                 "one packed row and cu_seqlens": dict(varlen_bos_id=1, piece_len=2048)}


def micro_batch_ms(files, **settings):
    """The median time of TrainLoader.batch for rank 0 of 8, one micro-step, 48 rows of 2,048 (no device copy)."""
    loader = T.TrainLoader(files, 2048, 8 * 48, -1, rank=0, world_size=8, **settings)
    times = []
    for step in range(20):
        start = time.perf_counter()
        loader.batch(step, 0)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


if __name__ == "__main__":
    main()
