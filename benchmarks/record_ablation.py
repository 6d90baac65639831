"""PRESET=record against the default stack, and the record with document isolation, phased TTT or CaseOps switched
off in turn, at the smoke size, each with every seed given. Prints a markdown table.

    python3 benchmarks/record_ablation.py --plain-data D --plain-tokenizer T --caseops-data DC --caseops-tokenizer TC \
        --seeds 1337 42 ITERATIONS=200

--plain-* is an export of the documents (prepare_docs.py), --caseops-* the same documents with --caseops. KEY=VALUE
arguments are env vars applied to every run. Each run keeps its own evaluation (the default's sliding window, the
record's TTT), so the last column is each variant's own final score. CPU-size differences do not predict 8xH100 ones.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

VARIANTS = {  # name: (data: plain or caseops, env overrides)
    "default stack": ("plain", dict(PRESET="smoke")),
    "record": ("caseops", dict(PRESET="record,smoke")),
    "record - document isolation": ("caseops", dict(PRESET="record,smoke", DOC_ISOLATION="0", EVAL_DOC_ISOLATED="0")),
    "record - phased TTT": ("caseops", dict(PRESET="record,smoke", PHASED_TTT_ENABLED="0")),
    "record - CaseOps": ("plain", dict(PRESET="record,smoke", CASEOPS_ENABLED="0")),
}


def run(name, data, overrides, seed, shared, log_dir):
    run_id = "record_ablation_" + re.sub(r"\W+", "_", name).strip("_") + f"_seed{seed}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRESET")}
    env.update(RUN_ID=run_id, OVERWRITE_RUN="1", SEED=str(seed), DATA_PATH=data[0], TOKENIZER_PATH=data[1])
    env.update(overrides)
    env.update(shared)
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=log_dir, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} (seed {seed}) failed:\n{result.stderr[-3000:]}")
    log = (Path(log_dir) / "logs" / f"{run_id}.txt").read_text()
    summary = json.loads(re.search(r"^summary_json: (.*)$", log, re.M).group(1))
    roundtrip = next(v for k, v in summary.items() if k.endswith("_roundtrip_val_bpb"))
    return dict(step_avg_ms=summary["step_avg_ms"], pre_quant=summary["pre_quant_val_bpb"], roundtrip=roundtrip,
                final=summary["val_bpb"], eval_s=summary["eval_time_s"],
                final_name="ttt" if summary.get("ttt_score_first") else "sliding")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain-data", required=True)
    parser.add_argument("--plain-tokenizer", required=True)
    parser.add_argument("--caseops-data", required=True)
    parser.add_argument("--caseops-tokenizer", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337, 42])
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--log-dir", default=".")
    parser.add_argument("settings", nargs="*", help="KEY=VALUE env vars for every run")
    args = parser.parse_args()
    shared = dict(item.split("=", 1) for item in args.settings)
    data = dict(plain=(args.plain_data, args.plain_tokenizer), caseops=(args.caseops_data, args.caseops_tokenizer))
    print("| variant | data | seed | step_avg ms | pre-quant val_bpb | round-trip val_bpb | final val_bpb | eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (kind, overrides) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            r = run(name, data[kind], overrides, seed, shared, args.log_dir)
            print(f"| {name} | {kind} | {seed} | {r['step_avg_ms']:.0f} | {r['pre_quant']:.4f} | {r['roundtrip']:.4f} | "
                  f"{r['final']:.4f} ({r['final_name']}) | {r['eval_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
