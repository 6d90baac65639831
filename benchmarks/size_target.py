"""What the size target does with the bytes a compressor saves: the clip grid it keeps and the round-trip score.

    DATA_PATH=... TOKENIZER_PATH=... VOCAB_SIZE=... python3 benchmarks/size_target.py --weights logs/<RUN_ID>_raw.pt \
        --compressors brotli pergroup:lrzip pergroup:smallest

The model, data and quantization settings come from the same env vars as train_gpt.py. For each compressor (a
whole-file one, or pergroup:<codec>) the export searches, as a run does, the finest SDClip grid whose artifact fits
SIZE_TARGET_BYTES with the counted code; the artifact is then read back, dequantized and scored on the validation
split with plain windows of TRAIN_SEQ_LEN. Rounding is to nearest unless --gptq (Hessians from
GPTQ_CALIBRATION_BATCHES training batches), the same for every row.
"""

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="logs/<RUN_ID>_raw.pt written by train_gpt.py")
    parser.add_argument("--compressors", nargs="+", default=["brotli", "pergroup:smallest", "pergroup:lrzip"])
    parser.add_argument("--gptq", action="store_true", help="GPTQ rounding (slower on a CPU), else round to nearest")
    args = parser.parse_args()
    hp, _ = T.Hyperparameters.from_env()
    sp = T.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    val = T.load_validation_tokens(T.shard_files(hp.data_path, "val"))
    target_bytes = T.TargetBytes(T.target_byte_counts(val.numpy(), T.build_byte_luts(sp, hp.vocab_size)))
    model = T.GPT(hp, bos_id=sp.bos_id())
    weights = T.load_raw_weights(args.weights)[0]
    model.load_state_dict(weights)
    score = lambda: T.evaluate(model, val, target_bytes, hp.train_seq_len, hp.train_seq_len, hp.val_batch_size, 0, 1,
                               torch.device("cpu"), contextlib.nullcontext)[1]
    pre = score()
    hessians = None
    if args.gptq:
        loader = T.TrainLoader(T.shard_files(hp.data_path, "train"), hp.train_seq_len,
                               hp.train_batch_tokens // hp.train_seq_len, hp.data_seed)
        batches = [loader.batch(hp.iterations + i, 0)[0] for i in range(hp.gptq_calibration_batches)]
        hessians = T.collect_hessians(model, batches, contextlib.nullcontext)
    code_bytes = len(T.Code.read(T.__file__, hp.pack_code).counted)  # what a run counts
    groups = T.quantized_tensor_groups(model, hp)
    print(f"weights:{args.weights} params:{T.count_parameters(model)[0]:,} bits:{hp.quant_bits} "
          f"embed_bits:{hp.embed_quant_bits} gptq:{args.gptq} size_target:{hp.size_target_bytes:,} "
          f"code_bytes:{code_bytes:,} pre-quant val_bpb:{pre:.4f}")
    print("| compressor | clip k scale | model bytes | total bytes | round-trip val_bpb | gap | search s | read s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.compressors:
        compressor, _, codec = name.partition(":")
        row_hp = dataclasses.replace(hp, compressor=compressor, pergroup_codec=codec or hp.pergroup_codec,
                                     byte_shuffle=hp.byte_shuffle and compressor != "pergroup")
        start = time.perf_counter()
        quantized, blob, k_scale = T.quantize_to_fit(weights, groups, row_hp, hessians, code_bytes, log=print)
        searched = time.perf_counter()
        model.load_state_dict(T.dequantize_state_dict(T.read_artifact(name, blob)))
        read = time.perf_counter() - searched
        post = score()
        print(f"| {name} | {k_scale:.3f} | {len(blob):,} | {len(blob) + code_bytes:,} | {post:.4f} | "
              f"{post - pre:+.4f} | "
              f"{searched - start:.0f} | {read:.1f} |", flush=True)


if __name__ == "__main__":
    main()
