"""Artifact bytes of a model under every compressor, packing, byte shuffle and per-group codec, with the times to write
and read each, against the 16,000,000 cap.

    python3 benchmarks/artifact_size.py                      # the default (full-size) model, Gaussian weights
    PACK_CODE=0 python3 benchmarks/artifact_size.py          # the same, counting the raw train_gpt.py
    PRESET=smoke python3 benchmarks/artifact_size.py --weights logs/<RUN_ID>_raw.pt   # trained weights
    python3 benchmarks/artifact_size.py --compressors brotli pergroup:lrzip   # some rows only

The model and the quantization settings come from the same env vars as train_gpt.py (QUANT_BITS, CLIP_K_*, ...).
Rounding is to nearest here (GPTQ needs calibration data; its output has the same grid, so about the same size).
Without --weights every quantized tensor is drawn Gaussian, the zero-initialized output projections included (at
init they are all zeros and would compress to almost nothing); SDClip's grid follows each row's std, so the size
depends on the shape of the weight distribution, not on its scale.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights",
                        help="a state dict saved by train_gpt.py (logs/<RUN_ID>_raw.pt); default: random init")
    parser.add_argument("--compressors", nargs="+", default=["zstd", "brotli", *(f"pergroup:{codec}" for codec in (
        "lzma", "brotli", "zstd", "smallest", "lrzip"))], help="whole-file compressors and pergroup:<codec> rows")
    args = parser.parse_args()
    hp, _ = T.Hyperparameters.from_env()
    torch.manual_seed(hp.seed)
    model = T.GPT(hp)
    groups = T.quantized_tensor_groups(model)
    if args.weights:
        model.load_state_dict(T.load_raw_weights(args.weights)[0])
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in groups:
                    p.normal_(std=p.size(1) ** -0.5)
    source = Path(T.__file__).read_bytes()
    packed, compressor, packed_sizes = T.pack_source(source)
    code_bytes = len(packed) if hp.pack_code else len(source)
    print(f"code: raw {len(source):,} bytes, packed " + ", ".join(f"{k} {v:,}" for k, v in packed_sizes.items())
          + f" (shipped: {compressor}); counted with PACK_CODE={int(hp.pack_code)}: {code_bytes:,}; packing frees "
          f"{len(source) - len(packed):,} bytes, about {8 * (len(source) - len(packed)) // hp.quant_bits:,} "
          f"int{hp.quant_bits} weights before compression")
    weights = 'trained: ' + args.weights if args.weights else 'Gaussian weights'
    print(f"model: {T.count_parameters(model)[0]:,} parameters ({weights}), "
          f"quant_bits:{hp.quant_bits} embed_bits:{hp.embed_quant_bits} clip:{hp.quant_clip} code_bytes:{code_bytes}")
    print("| packing | byte shuffle | compressor | model bytes | total bytes | headroom under 16,000,000 | write s | "
          "read s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    quantized_by_packing = {}  # each packing is quantized once, whatever the rows that compress it
    for packing, shuffle, compressor, codec in rows(args.compressors):
        if packing not in quantized_by_packing:
            quantized_by_packing[packing] = T.quantize_state_dict(model.state_dict(), groups,
                                                                  T.dataclasses.replace(hp, quant_packing=packing))
        quantized = quantized_by_packing[packing]
        start = time.perf_counter()
        blob = T.serialize_artifact(quantized, compressor, shuffle, codec)
        written = time.perf_counter()
        T.read_artifact("artifact", blob)
        name, size = f"pergroup ({codec})" if codec else compressor, len(blob)
        print(f"| {packing} | {shuffle} | {name} | {size:,} | {size + code_bytes:,} | "
              f"{T.ARTIFACT_LIMIT_BYTES - size - code_bytes:,} | {written - start:.1f} | "
              f"{time.perf_counter() - written:.1f} |", flush=True)


def rows(names):
    """(packing, byte shuffle, compressor, per-group codec) of each row: the whole-file compressors with both packings
    and shuffles, then the per-group layout (byte packing, its own layout) with each codec that is installed."""
    for name in names:
        if name in T.COMPRESSORS and T.compressor_available(name):
            yield from ((packing, shuffle, name, None) for packing in ("byte", "dense") for shuffle in (False, True))
        elif name.startswith("pergroup:"):
            codec = name.split(":", 1)[1]
            if all(T.compressor_available(c) for c in T.pergroup_codecs(codec)):
                yield "byte", False, "pergroup", codec
            else:
                print(f"({name}: not installed, skipped)")

if __name__ == "__main__":
    main()
