"""The TTT methods on one trained artifact per seed: no TTT, chunk SGD TTT, per-document LoRA TTT, and per-document
LoRA TTT with phases. Each seed trains once (its log gives the no-TTT scores); each method then evaluates the same
artifact with EVAL_ONLY_QUANTIZED_PATH and TTT_EVAL_ONLY=1. Prints a markdown table with the score and the
evaluation time per validation token.

    python3 benchmarks/ttt_methods.py --data D --tokenizer T --seeds 1337 42 PRESET=record,smoke ITERATIONS=120

KEY=VALUE arguments are env vars applied to every run: the training, and the evaluations but for those an
evaluation-only run never reads (ITERATIONS, the optimizer's, the export's), which it would refuse. CPU-size gains
do not predict 8xH100 ones.
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
import train_gpt as T  # noqa: E402  (the settings an evaluation-only run refuses)

METHODS = {  # name: env of the evaluation (the preset's phases are switched off where a method has none)
    "chunk SGD TTT": dict(TTT_ENABLED="1", TTT_METHOD="chunk", PHASED_TTT_ENABLED="0", TTT_LR="0.005"),
    "per-document LoRA TTT": dict(TTT_ENABLED="1", TTT_METHOD="lora", PHASED_TTT_ENABLED="0"),
    "per-document LoRA TTT + phases": dict(TTT_ENABLED="1", TTT_METHOD="lora", PHASED_TTT_ENABLED="1"),
}


def run(run_id, env_overrides, log_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRESET")}
    env.update(env_overrides, RUN_ID=run_id, OVERWRITE_RUN="1")
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=log_dir, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"{run_id} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    log = (Path(log_dir) / "logs" / f"{run_id}.txt").read_text()
    return log, json.loads(re.search(r"^summary_json: (.*)$", log, re.M).group(1))


def eval_seconds(log, name):
    return int(re.search(rf"^{name} val_loss:\S+ val_bpb:\S+ .*eval_time:(\d+)ms$", log, re.M).group(1)) / 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337, 42])
    parser.add_argument("--log-dir", default=".")
    parser.add_argument("settings", nargs="*", help="KEY=VALUE env vars for every run")
    args = parser.parse_args()
    shared = dict(item.split("=", 1) for item in args.settings)
    shared.update(DATA_PATH=args.data, TOKENIZER_PATH=args.tokenizer)
    unread = {name.upper() for name in T.unread_when_evaluating_only(T.Hyperparameters)}  # refused there
    evaluating = {name: value for name, value in shared.items() if name not in unread}
    print("| method | seed | val_bpb | eval s | us per token |\n|---|---|---|---|---|", flush=True)
    for seed in args.seeds:
        train_id = f"ttt_methods_train_seed{seed}"
        log, summary = run(train_id, dict(shared, SEED=str(seed), TTT_ENABLED="0"), args.log_dir)
        tokens = int(re.search(r"^val_tokens:(\d+)", log, re.M).group(1))
        name = "final_sliding_window" if "final_sliding_window_val_bpb" in summary else next(
            key[:-len("_val_bpb")] for key in summary if key.endswith("_roundtrip_val_bpb"))
        seconds = eval_seconds(log, name)
        print(f"| no TTT ({name[len('final_'):]}) | {seed} | {summary[name + '_val_bpb']:.4f} | {seconds:.0f} | "
              f"{1e6 * seconds / tokens:.0f} |", flush=True)
        artifact = Path(args.log_dir) / "logs" / f"{train_id}_model.{summary_format(log)}.ptz"
        for method, overrides in METHODS.items():
            run_id = f"ttt_methods_{re.sub(r'[^a-z]+', '_', method.lower()).strip('_')}_seed{seed}"
            env = dict(evaluating, SEED=str(seed), EVAL_ONLY_QUANTIZED_PATH=str(artifact.resolve()), TTT_EVAL_ONLY="1",
                       **overrides)
            log, summary = run(run_id, env, args.log_dir)
            seconds = eval_seconds(log, "final_ttt")
            print(f"| {method} | {seed} | {summary['final_ttt_val_bpb']:.4f} | {seconds:.0f} | "
                  f"{1e6 * seconds / tokens:.0f} |", flush=True)


def summary_format(log):
    """The artifact's format in its file name (int6, int8, ...), from the round-trip line of the training log."""
    return re.search(r"^final_(int\d+|fp16)_\w+_roundtrip ", log, re.M).group(1)


if __name__ == "__main__":
    main()
