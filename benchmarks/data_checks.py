"""What checking the training shards costs: the start-up header check of every shard, the token-id check of one
global step (what the loader does before serving a step), and, for comparison, a full scan of every shard's ids.

    python3 benchmarks/data_checks.py                                   # 80 shards of 10M tokens in a temp folder
    python3 benchmarks/data_checks.py --shards 80 --tokens 100000000    # the challenge's 80 x 100M (16 GB of disk)
    python3 benchmarks/data_checks.py --data-path data/datasets/fineweb10B_sp1024   # real shards

The shards it writes are random ids below the vocabulary; the page cache is warm for every figure (it has just
written or read the files), so the full scan is a lower bound of what it costs on a cold disk.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", help="a folder of fineweb_train_*.bin shards; default: write synthetic ones")
    parser.add_argument("--shards", type=int, default=80)
    parser.add_argument("--tokens", type=int, default=10_000_000, help="tokens per synthetic shard")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=786_432, help="global tokens per step (the records')")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.data_path
        if folder is None:
            folder, rng = scratch, np.random.default_rng(0)
            start = time.perf_counter()
            for index in range(args.shards):
                T.write_shard(Path(folder) / f"fineweb_train_{index:06d}.bin",
                              rng.integers(0, args.vocab_size, args.tokens, dtype=np.uint16))
            print(f"wrote {args.shards} shards of {args.tokens:,} tokens in {time.perf_counter() - start:.1f}s")
        files = T.shard_files(folder, "train")
        start = time.perf_counter()
        loader = T.TrainLoader(files, args.seq_len, args.batch_tokens // args.seq_len, seed=1337,
                               vocab_size=args.vocab_size)
        headers_s = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(args.steps):
            loader.check_tokens(loader.global_window_ids(step))
        step_ms = 1000 * (time.perf_counter() - start) / args.steps
        start = time.perf_counter()
        largest = max(int(shard.max()) for shard in loader.shards)
        scan_s = time.perf_counter() - start
    total = sum(len(shard) for shard in loader.shards)
    print(f"shards:{len(files)} tokens:{total:,}")
    print(f"start-up header and size check of every shard: {headers_s * 1000:.1f} ms")
    print(f"token-id check of one global step ({args.batch_tokens:,} tokens, every rank): {step_ms:.2f} ms")
    print(f"full scan of every shard's ids (not done; for comparison): {scan_s:.2f} s (max id {largest})")


if __name__ == "__main__":
    main()
