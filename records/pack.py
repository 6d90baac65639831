"""Writes the packed, self-extracting form of a source: what a run counts as code bytes and ships as train_gpt.py.

    python3 records/pack.py train_gpt.py /tmp/train_gpt_packed.py
    python3 records/pack.py records/<folder>/train_gpt_human.py records/<folder>/train_gpt.py

It prints the raw size and the packed size with each compressor; the smaller is written. The packed file runs
exactly like the source (`python3` or `torchrun`), with comments and docstrings removed and every line where it was.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the readable source, e.g. train_gpt.py")
    parser.add_argument("output", help="where the packed file goes")
    args = parser.parse_args()
    source = Path(args.source).read_bytes()
    try:
        packed, compressor, sizes = T.pack_source(source, T.READABLE_CODE_NAME)
    except ValueError as error:
        sys.exit(f"error: {args.source}: {error}")
    Path(args.output).write_bytes(packed)
    print(f"raw:{len(source)} " + " ".join(f"{name}:{size}" for name, size in sizes.items())
          + f" -> wrote {args.output} ({compressor}, {len(packed)} bytes)")


if __name__ == "__main__":
    main()
