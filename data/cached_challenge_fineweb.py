"""
Download the challenge's pre-tokenized FineWeb shards and tokenizer from the Hugging Face Hub, exactly as the
challenge's data/cached_challenge_fineweb.py does (same flags, environment variables and paths):

    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10
    python3 data/cached_challenge_fineweb.py --variant sp1024 10                  # the positional shard count
    MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf python3 data/cached_challenge_fineweb.py --variant sp8192
    python3 data/cached_challenge_fineweb.py --variant sp1024 --with-docs         # + docs_selected.jsonl
    MATCHED_FINEWEB_REPO_ID=romeerp/parameter-golf-caseops-v1 MATCHED_FINEWEB_REMOTE_ROOT_PREFIX=datasets \
        python3 data/cached_challenge_fineweb.py --variant sp8192_lossless_caps_caseops_v1_reserved --train-shards 80

MATCHED_FINEWEB_REPO_ID (default willdepueoai/parameter-golf) is the dataset repository and
MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default datasets) the folder in it that holds manifest.json, datasets/ and
tokenizers/. The manifest (data/manifest.json; --skip-manifest uses the local one and never downloads it) names each
dataset, its tokenizer and its shard counts. The full validation split is always fetched, plus the first N training
shards, into data/datasets/fineweb10B_<variant>/ and data/tokenizers/, through the Hugging Face cache (files are
hard-linked from it, or copied), several at a time. A file already in place is kept (a shard only if it is valid),
so an interrupted download resumes; every shard's header and size are checked. Offline, HF_HUB_OFFLINE=1 takes
what the cache already has. Only huggingface_hub is needed (not torch).

The CaseOps records' copy of this script (2026-04-18, PR #1729) adds two things, kept here so that their published
command (the last one above) runs: a variant may be sp<VOCAB_SIZE>_<name> (the folder fineweb10B_<variant>), and a
dataset whose manifest entry has val_bytes_glob brings its validation byte sidecars (fineweb_val_bytes_NNNNNN.bin,
one per validation shard), which CaseOps needs to count val_bpb's bytes.
"""

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
PARALLEL_DOWNLOADS = 8
ETAG_TIMEOUT_S = 10  # how long the hub client waits for a file's metadata before it gives up
# The shard format (train_gpt.py's read_shard_header; a test keeps the two in step): 256 little-endian int32s
# (magic, version, token count, zeros), then the uint16 tokens.
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 256 * 4
WHAT_TO_DO = ("Check the network (or HF_ENDPOINT and a proxy's HTTPS_PROXY); offline, HF_HUB_OFFLINE=1 uses what "
              "the Hugging Face cache already holds; without the Hub, export shards from local documents with "
              "python3 data/prepare_docs.py <docs.jsonl> --tokenizer <model>.")


class DownloadError(RuntimeError):
    pass


def shard_problem(path):
    """Why the file at `path` is not a whole shard, or None when it is one."""
    try:
        with open(path, "rb") as f:
            header = f.read(SHARD_HEADER_BYTES)
        size = os.path.getsize(path)
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if len(header) < SHARD_HEADER_BYTES:
        return f"{size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header"
    magic, version, count = struct.unpack("<3i", header[:12])
    if (magic, version) != (SHARD_MAGIC, SHARD_VERSION):
        return f"header magic/version {magic}/{version}, expected {SHARD_MAGIC}/{SHARD_VERSION}"
    if size != SHARD_HEADER_BYTES + 2 * count:
        return f"{size} bytes where its header's {count} tokens make {SHARD_HEADER_BYTES + 2 * count}"
    return None


def dataset_dir_for_variant(variant):
    if variant == "byte260" or re.fullmatch(r"sp[0-9]+(_[A-Za-z0-9_.-]+)?", variant):
        return f"fineweb10B_{variant}"
    raise DownloadError(f"unsupported --variant {variant!r}; expected byte260, sp<VOCAB_SIZE> or sp<VOCAB_SIZE>_<name> "
                        f"(sp8192_lossless_caps_caseops_v1_reserved: the CaseOps export)")


class Hub:
    """One dataset repository seen through the Hugging Face cache. `download` is huggingface_hub.hf_hub_download
    (tests pass a stand-in with its signature)."""

    def __init__(self, repo_id, remote_root, data_dir=DATA_DIR, download=None):
        self.repo_id, self.remote_root, self.data_dir = repo_id, remote_root, Path(data_dir)
        if download is None:
            try:
                from huggingface_hub import hf_hub_download as download
            except ImportError:
                raise DownloadError("huggingface_hub is not installed: pip install huggingface-hub") from None
        self.download = download

    def local_path(self, remote):
        """Where a file of the repository goes: <prefix>/datasets/... -> data/datasets/..., <prefix>/tokenizers/...
        -> data/tokenizers/..., anything else under <prefix>/ -> data/ (manifest.json, docs_selected.jsonl)."""
        parts = Path(remote).parts
        if self.remote_root and parts[:1] == (self.remote_root,):
            parts = parts[1:]
        return self.data_dir.joinpath(*parts)

    def cached(self, remote):
        """The path of one file of the repository in the Hugging Face cache (fetched there if it is not)."""
        folder, name = Path(remote).parent.as_posix(), Path(remote).name
        try:
            subfolder = None if folder == "." else folder
            return Path(self.download(repo_id=self.repo_id, filename=name, subfolder=subfolder,
                                      repo_type="dataset", etag_timeout=ETAG_TIMEOUT_S)).resolve(strict=True)
        except Exception as error:  # the client raises many types (offline, HTTP, DNS, missing entry)
            raise DownloadError(f"could not get {remote} from the Hugging Face dataset {self.repo_id} "
                                f"({type(error).__name__}: {error}).\n{WHAT_TO_DO}") from None

    def get(self, remote):
        """Fetch one file into place unless a valid copy is there; returns its local path."""
        destination = self.local_path(remote)
        is_shard = destination.suffix == ".bin"
        if destination.is_file() and not (is_shard and shard_problem(destination)):
            return destination
        cached = self.cached(remote)
        if is_shard and shard_problem(cached):
            raise DownloadError(f"{remote} from {self.repo_id} is not a whole shard ({shard_problem(cached)}): "
                                f"delete {cached} from the Hugging Face cache and run again")
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        partial.unlink(missing_ok=True)
        try:
            os.link(cached, partial)  # the cache's blob itself: no second copy on disk
        except OSError:
            shutil.copy2(cached, partial)
        os.replace(partial, destination)
        return destination


def read_manifest(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DownloadError(f"{path} is not valid JSON ({error}); delete it and run again") from None


def has_dataset(manifest, dataset_dir):
    return any(d.get("name") == dataset_dir for d in manifest.get("datasets", []))


def load_manifest(hub, skip_manifest, dataset_dir):
    """The manifest that names `dataset_dir`: the local one (data/manifest.json) if it does, else the repository's,
    merged into the local one. The challenge's script fetches a manifest only where there is none, so a second
    repository's variant (kevclark's sp8192 after the challenge's sp1024) is "not found" there. Here the local file
    keeps its other datasets and tokenizers, and takes the repository's entries and top-level fields."""
    path = hub.local_path(f"{hub.remote_root}/manifest.json")
    local = read_manifest(path) if path.is_file() else None
    if skip_manifest:
        if local is None:
            raise DownloadError(f"--skip-manifest: manifest.json is required for the shard counts but is not "
                                f"present locally at {path}")
        return local, path
    if local is not None and has_dataset(local, dataset_dir):
        return local, path
    return merge_into_manifest(path, read_manifest(hub.cached(f"{hub.remote_root}/manifest.json"))), path


def merge_into_manifest(path, update):
    """Writes the manifest at `path` (or a new one) with `update` merged in: its top-level fields, and its
    datasets and tokenizers in place of the entries of the same names (the others are kept). The file is written
    anew, never in place: a downloaded manifest is hard-linked to the Hugging Face cache's copy. Returns the merged
    manifest. prepare_docs.py writes its entries through this too."""
    path = Path(path)
    local = read_manifest(path) if path.is_file() else {}
    merged = dict(local, **update)
    for key in ("datasets", "tokenizers"):
        names = {entry.get("name") for entry in update.get(key, [])}
        merged[key] = [e for e in local.get(key, []) if e.get("name") not in names] + update.get(key, [])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return merged


def plan_downloads(manifest, manifest_path, variant, train_shards, remote_root, with_docs):
    """The repository paths to fetch: the tokenizer's artifacts, the docs (with --with-docs), every validation
    shard (and its byte sidecar where the dataset has them) and the first `train_shards` training shards."""
    dataset_dir = dataset_dir_for_variant(variant)
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset_dir), None)
    if entry is None:
        known = sorted(d.get("name", "?") for d in manifest.get("datasets", []))
        raise DownloadError(f"dataset {dataset_dir} not found in {manifest_path} (it has {known}); another "
                            f"MATCHED_FINEWEB_REPO_ID may hold it")
    stats = entry.get("stats") or {}
    if "files_train" not in stats or "files_val" not in stats:
        raise DownloadError(f"{manifest_path}: {dataset_dir} lacks stats.files_train / stats.files_val")
    if train_shards > int(stats["files_train"]):
        raise DownloadError(f"{variant} only has {stats['files_train']} training shards, requested {train_shards}")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tokenizer is None:
        raise DownloadError(f"tokenizer {entry.get('tokenizer_name')} not found in {manifest_path}")
    artifacts = [str(tokenizer[key]) for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)]
    if not artifacts:
        raise DownloadError(f"{manifest_path}: tokenizer {tokenizer.get('name')} lists no file "
                            f"(model_path, vocab_path, path)")
    files = [f"{remote_root}/{artifact}" for artifact in artifacts]
    if with_docs:
        files += [f"{remote_root}/docs_selected.jsonl", f"{remote_root}/docs_selected.source_manifest.json"]
    prefix = f"{remote_root}/datasets/{dataset_dir}"
    files += [f"{prefix}/fineweb_val_{i:06d}.bin" for i in range(int(stats["files_val"]))]
    if entry.get("val_bytes_glob"):  # CaseOps: each validation token's bytes in the original text
        files += [f"{prefix}/fineweb_val_bytes_{i:06d}.bin" for i in range(int(stats["files_val"]))]
    files += [f"{prefix}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    return files


def download(hub, variant, train_shards, skip_manifest=False, with_docs=False, workers=PARALLEL_DOWNLOADS, log=print):
    manifest, manifest_path = load_manifest(hub, skip_manifest, dataset_dir_for_variant(variant))
    files = plan_downloads(manifest, manifest_path, variant, train_shards, hub.remote_root, with_docs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for done, path in enumerate(pool.map(hub.get, files), 1):
            if done % 10 == 0 or done == len(files):
                log(f"[{done}/{len(files)}] {path.relative_to(hub.data_dir)}")
    log(f"done: {len(files)} files from {hub.repo_id} under {hub.data_dir}")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_shards_positional", nargs="?", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train-shards", type=int, default=80, help="training shards of 100M tokens (default 80)")
    parser.add_argument("--variant", default="sp1024",
                        help="sp1024, sp4096, sp8192, byte260, sp8192_lossless_caps_caseops_v1_reserved, ... (as in "
                             "the manifest)")
    parser.add_argument("--skip-manifest", action="store_true",
                        help="use the local data/manifest.json, never download it")
    parser.add_argument("--with-docs", action="store_true",
                        help="also fetch docs_selected.jsonl and its sidecar (for retokenizing or re-exporting)")
    return parser


def main(argv=None, environ=None, download_function=None, data_dir=DATA_DIR):
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    train_shards = args.train_shards_positional if args.train_shards_positional is not None else args.train_shards
    try:
        if train_shards < 0:
            raise DownloadError("train_shards must be non-negative")
        hub = Hub(environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID),
                  environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT), data_dir, download_function)
        download(hub, args.variant, train_shards, args.skip_manifest, args.with_docs,
                 log=lambda line: print(line, file=sys.stderr))
    except DownloadError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
