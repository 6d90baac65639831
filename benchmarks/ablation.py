"""Architecture ablation: the baseline preset, the default stack, and the stack with one technique flipped.

Runs train_gpt.py once per variant, one after the other, with the same data, steps and seed, and prints a markdown
table of val_bpb (pre-quantization and quantized round-trip, plain windows) with the parameter counts and step times,
and, with PR_EVERY set, the participation ratios at the last step (means over layers; Q/K/V/I per head).

    python3 benchmarks/ablation.py --data-path ./data/datasets/mydata --tokenizer-path ./data/tokenizers/my.model \
        ITERATIONS=1000

KEY=VALUE arguments are env vars applied to every variant (after PRESET=smoke sizes); `--only` picks variants.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from train_gpt import NEON_KERNEL_SCHEDULE  # noqa: E402

VARIANTS = {  # name: env overrides on top of the shared settings
    "baseline": dict(PRESET="baseline,smoke"),
    "stack": {},
    "stack - xsa": dict(XSA_LAYERS=""),
    "stack + bigram_hash": dict(BIGRAM_BUCKETS="2816"),
    "stack - smear_gate": dict(SMEAR_GATE="0"),
    "stack - depth_recurrence": dict(NUM_LOOPS="0"),
    "stack - parallel_lanes": dict(PARALLEL_RESIDUALS="0"),
    "stack - ema": dict(WEIGHT_AVERAGING="none"),
    "stack + conv attention": dict(  # neon213's convs on Q/K/V/Intent with the Intent gate, grown 1 -> 21 on its schedule
        CONV_K="21", INTENT_GATE="1", KERNEL_SCHEDULE=NEON_KERNEL_SCHEDULE),
    "stack + conv attention / identity init": dict(
        CONV_K="21", INTENT_GATE="1", KERNEL_SCHEDULE=NEON_KERNEL_SCHEDULE, CONV_INIT="identity"),
    "neon213 at smoke size": dict(PRESET="neon213,smoke"),
    "neon213 at smoke size / identity init": dict(PRESET="neon213,smoke", CONV_INIT="identity"),
    # The seeds by name at the smoke size (their own evaluations switched off like every variant's: plain windows).
    "pr754 at smoke size": dict(PRESET="pr754,smoke"),
    "pr703 at smoke size": dict(PRESET="pr703,smoke"),
    "pr1392 at smoke size": dict(PRESET="pr1392,smoke"),
    "neon213 regime at smoke size": dict(PRESET="neon213,smoke"),
    "stack with baseline optimizer": dict(  # PRESET=baseline's optimizer and schedule on the default model
        MATRIX_LR="0.04", SCALAR_LR="0.04", TIED_EMBED_LR="0.05", EMBED_WEIGHT_DECAY="0", SCALAR_WEIGHT_DECAY="0",
        BETA2="0.95", MUON_MOMENTUM="0.95", MUON_MOMENTUM_WARMUP_START="0.85", MUON_ORTHOGONALIZER="quintic",
        MUON_ROW_NORMALIZE="0", MUON_WEIGHT_DECAY="0", GRAD_CLIP_NORM="0", WARMDOWN_FRAC="0.087",
        WEIGHT_AVERAGING="none"),
}


def run_variant(name, overrides, shared, log_dir):
    run_id = "ablation_" + re.sub(r"\W+", "_", name).strip("_") + (f"_seed{overrides['SEED']}" if "SEED" in overrides else "")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PRESET="smoke", RUN_ID=run_id, EVAL_STRIDE="0", TTT_ENABLED="0", OVERWRITE_RUN="1")
    env.update(shared)
    env.update(overrides)
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=log_dir, capture_output=True, text=True)
    log_path = Path(log_dir) / "logs" / f"{run_id}.txt"
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    log = log_path.read_text()
    summary = json.loads(re.search(r"^summary_json: (.*)$", log, re.M).group(1))
    params = re.findall(r"model_params:(\d+)", log)[-1]  # after the last kernel growth
    return dict(name=name, overrides=" ".join(f"{k}={v}" for k, v in overrides.items()) or "(defaults)",
                params=int(params), log=str(log_path), prs=last_prs(log), **summary)


def last_prs(log):
    """The last `pr:` line as "q/k/v/i/residual" means over layers ("-" for a kind the model lacks), or "" without."""
    lines = re.findall(r"^pr: step:\d+ (.*)$", log, re.M)
    if not lines:
        return ""
    means = {kind: sum(map(float, values.split("/"))) / len(values.split("/"))
             for kind, values in (item.split(":") for item in lines[-1].split())}
    return "/".join(f"{means[kind]:.1f}" if kind in means else "-" for kind in ("q", "k", "v", "i", "residual"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--tokenizer-path", required=True)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--log-dir", default=".", help="where logs/ablation_*.txt go")
    parser.add_argument("--seeds", default="", help="comma-separated seeds, each variant run once per seed (default: SEED)")
    parser.add_argument("settings", nargs="*", help="KEY=VALUE env vars applied to every variant")
    args = parser.parse_args()
    shared = dict(DATA_PATH=os.path.abspath(args.data_path), TOKENIZER_PATH=os.path.abspath(args.tokenizer_path))
    shared.update(setting.split("=", 1) for setting in args.settings)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()] or [None]
    print("| variant | overrides | seed | params | steps | step_avg ms | pre-quant val_bpb | round-trip val_bpb | "
          "artifact bytes | PR q/k/v/i/res |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        for seed in seeds:
            overrides = VARIANTS[name] | ({} if seed is None else {"SEED": str(seed)})
            row = run_variant(name, overrides, shared, args.log_dir)
            print(f"| {row['name']} | `{row['overrides']}` | {row['seed']} | {row['params']:,} | {row['steps']} | "
                  f"{row['step_avg_ms']:.0f} | {row['pre_quant_val_bpb']:.4f} | {row['val_bpb']:.4f} | "
                  f"{row['bytes_total']:,} | {row['prs']} |", flush=True)


if __name__ == "__main__":
    main()
