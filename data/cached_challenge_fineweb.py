"""
Download the challenge's pre-tokenized FineWeb shards and tokenizer from the Hugging Face Hub.

    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10
    python3 data/cached_challenge_fineweb.py --variant sp8192 --repo-id kevclark/parameter-golf

Manifest-driven: `<remote-root>/manifest.json` in the dataset repo names each dataset, its tokenizer and its shard
counts. The full validation split is always downloaded, plus the first N training shards. Files land in
data/datasets/fineweb10B_<variant>/ and data/tokenizers/, the layout train_gpt.py expects by default. A shard that is
already present and valid is skipped, so an interrupted download resumes; every shard's header and size are
verified. Delete a stale data/manifest.json when switching repositories (the manifest is cached there).
"""

import argparse
import json
import shutil
import socket
import sys
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import read_shard_header  # noqa: E402  (the shard format lives in one place)

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"
OFFLINE_HINT = ("This script needs internet access. Offline, export shards from local documents instead "
                "(python3 data/prepare_docs.py <docs.jsonl> --tokenizer <model>), or copy data/datasets/ and "
                "data/tokenizers/ from a machine that has them.")


class DownloadError(RuntimeError):
    pass


def check_reachable(timeout=5.0):
    """Fail at once when the Hub cannot be reached, instead of after the client's retries."""
    from huggingface_hub import constants
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        raise DownloadError(f"cannot reach {host} ({error}).\n{OFFLINE_HINT}") from None


def hub_fetcher(repo_id, staging_dir):
    """A function that downloads `<remote path>` from the dataset repo and returns the local file path."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DownloadError("huggingface_hub is not installed: pip install -r requirements.txt") from None

    check_reachable()

    def fetch(remote_path):
        try:
            return hf_hub_download(repo_id, remote_path, repo_type="dataset", local_dir=staging_dir)
        except Exception as error:  # network errors come in many types (OSError, HTTPError, offline mode, ...)
            raise DownloadError(
                f"could not download {remote_path} from the Hugging Face Hub dataset {repo_id} "
                f"({type(error).__name__}: {error}).\n{OFFLINE_HINT}") from error
    return fetch


def load_manifest(fetch, cache_path):
    if not cache_path.exists():
        shutil.copyfile(fetch(f"{REMOTE_ROOT}/manifest.json"), cache_path)
    try:
        return json.loads(cache_path.read_text())
    except json.JSONDecodeError as error:
        raise DownloadError(f"{cache_path} is not valid JSON ({error}); delete it and run again") from None


def plan_downloads(manifest, variant, train_shards):
    """[(remote path, local path relative to data/)] for the variant: tokenizer files, all val shards, N train shards."""
    dataset_name = f"fineweb10B_{variant}"
    datasets = {d.get("name"): d for d in manifest.get("datasets", [])}
    if dataset_name not in datasets:
        known = sorted(n[len("fineweb10B_"):] for n in datasets if n and n.startswith("fineweb10B_"))
        raise DownloadError(f"--variant {variant}: the manifest has no dataset {dataset_name}; it has {known}")
    entry = datasets[dataset_name]
    stats = entry.get("stats") or {}
    if "files_train" not in stats or "files_val" not in stats:
        raise DownloadError(f"manifest entry {dataset_name} lacks stats.files_train / stats.files_val")
    available = int(stats["files_train"])
    if train_shards > available:
        raise DownloadError(f"--train-shards {train_shards}: {dataset_name} has only {available} training shards")
    files = []
    tokenizers = {t.get("name"): t for t in manifest.get("tokenizers", [])}
    tokenizer = tokenizers.get(entry.get("tokenizer_name"))
    if tokenizer is None and entry.get("tokenizer_name") != "byte260":  # the byte-level variant needs no model
        raise DownloadError(f"the manifest names tokenizer {entry.get('tokenizer_name')!r} for {dataset_name} but does not list it")
    for key in ("model_path", "vocab_path"):
        if tokenizer and tokenizer.get(key):
            files.append((f"{REMOTE_ROOT}/{tokenizer[key]}", f"tokenizers/{Path(tokenizer[key]).name}"))
    for split, count in (("val", int(stats["files_val"])), ("train", train_shards)):
        for index in range(count):
            name = f"fineweb_{split}_{index:06d}.bin"
            files.append((f"{REMOTE_ROOT}/datasets/{dataset_name}/{name}", f"datasets/{dataset_name}/{name}"))
    return files


def is_valid_shard(path):
    try:
        read_shard_header(path)
        return True
    except (OSError, ValueError):
        return False


def download(variant, train_shards, fetch, data_dir=DATA_DIR):
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    files = plan_downloads(load_manifest(fetch, data_dir / "manifest.json"), variant, train_shards)
    for index, (remote, local) in enumerate(files, 1):
        target = data_dir / local
        is_shard = target.suffix == ".bin"
        if target.exists() and (not is_shard or is_valid_shard(target)):
            print(f"[{index}/{len(files)}] {local}: present", file=sys.stderr)
            continue
        print(f"[{index}/{len(files)}] {local}: downloading", file=sys.stderr)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(fetch(remote), target)
        if is_shard and not is_valid_shard(target):
            bad = target.with_suffix(".bin.bad")
            target.replace(bad)
            raise DownloadError(f"{remote} failed verification ({bad}): run again to download it anew")
    print(f"done: {len(files)} files under {data_dir}", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sp1024", help="sp1024, sp4096, sp8192, byte260, ... (as in the manifest)")
    parser.add_argument("--train-shards", type=int, default=80, help="training shards of 100M tokens to fetch")
    parser.add_argument("--repo-id", default=DEFAULT_REPO_ID, help="Hugging Face dataset repository")
    args = parser.parse_args(argv)
    if args.train_shards < 0:
        parser.error("--train-shards must be zero or positive")
    try:
        download(args.variant, args.train_shards, hub_fetcher(args.repo_id, DATA_DIR / ".hf_download"))
    except DownloadError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
