"""Round-trip val_bpb of trained weights under each quantization method, with export times.

    PRESET=smoke DATA_PATH=... TOKENIZER_PATH=... python3 benchmarks/quant_compare.py --weights logs/<RUN_ID>_raw.pt

The model, data and quantization settings come from the same env vars as train_gpt.py. Each method quantizes the
same weights at QUANT_BITS (tables at EMBED_QUANT_BITS), writes nothing, and scores the dequantized model on the
validation split with plain windows. GPTQ's Hessians come from GPTQ_CALIBRATION_BATCHES training batches.
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

METHODS = {  # name: (settings, use GPTQ)
    "round to nearest, row max": (dict(quant_clip="rowmax"), False),
    "GPTQ-lite (percentile search)": (dict(quant_clip="percentile"), False),
    "SDClip": (dict(quant_clip="sdclip"), False),
    "full GPTQ + SDClip": (dict(quant_clip="sdclip"), True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="logs/<RUN_ID>_raw.pt written by train_gpt.py")
    args = parser.parse_args()
    hp, _ = T.Hyperparameters.from_env()
    sp = T.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    val = T.load_validation_tokens(T.shard_files(hp.data_path, "val"))
    target_bytes = T.TargetBytes(T.target_byte_counts(val.numpy(), T.build_byte_luts(sp, hp.vocab_size)))
    loader = T.TrainLoader(T.shard_files(hp.data_path, "train"), hp.train_seq_len,
                           hp.train_batch_tokens // hp.train_seq_len, hp.data_seed)
    model = T.GPT(hp, bos_id=sp.bos_id())
    weights = T.load_raw_weights(args.weights)[0]
    model.load_state_dict(weights)
    cpu, no_autocast = torch.device("cpu"), contextlib.nullcontext
    score = lambda: T.evaluate(model, val, target_bytes, hp.train_seq_len, hp.train_seq_len, hp.val_batch_size, 0, 1,
                               cpu, no_autocast)[1]
    pre = score()
    start = time.perf_counter()
    batches = [loader.batch(hp.iterations + i, 0)[0] for i in range(hp.gptq_calibration_batches)]
    hessians = T.collect_hessians(model, batches, no_autocast)
    calibration_s = time.perf_counter() - start
    groups = T.quantized_tensor_groups(model)
    print(f"weights:{args.weights} bits:{hp.quant_bits} embed_bits:{hp.embed_quant_bits} pre-quant val_bpb:{pre:.4f} "
          f"calibration:{hp.gptq_calibration_batches} batches in {calibration_s:.1f}s")
    print(f"| method | post-quant val_bpb | gap | {hp.compressor} model bytes | quantize s |")
    print("|---|---|---|---|---|", flush=True)
    for name, (settings, use_gptq) in METHODS.items():
        method_hp = dataclasses.replace(hp, **settings)
        start = time.perf_counter()
        quantized = T.quantize_state_dict(weights, groups, method_hp, hessians if use_gptq else None)
        seconds = time.perf_counter() - start
        size = len(T.serialize_artifact(quantized, hp.compressor, hp.byte_shuffle))
        model.load_state_dict(T.dequantize_state_dict(quantized))
        post = score()
        print(f"| {name} | {post:.4f} | {post - pre:+.4f} | {size:,} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
