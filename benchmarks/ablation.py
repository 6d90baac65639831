"""An ablation: variants of one configuration, each run for several seeds, then each variant against the first by the
significance test of records/stats.py.

    python3 benchmarks/ablation.py --nproc 8 --seeds 1337 42 2025 \\
        --settings PRESET=record \\
        --variant record \\
        --variant "no parallel lanes" PARALLEL_RESIDUALS=0 \\
        --variant "no recurrence" NUM_LOOPS=0

Every run is `torchrun --standalone --nproc_per_node=N train_gpt.py` (N = --nproc; 1 runs plain python3) with the
--settings, then the variant's own KEY=VALUE settings, then SEED, and RUN_ID=ablation_<variant>_seed<SEED>. The
logs go to <log-dir>/logs/; each run's console output to logs/<RUN_ID>.out. A run that fails (a refused setting, a
crash, a diverged loss) is reported in its row with its exit code and last error line, and the ablation goes on.

The table rows are printed, and --out rewritten, as each run ends. Then, per variant: its seeds' mean and std, and
the one-sided test that it beats the first variant (Welch's t-test on val_loss, in nats), under --rule (challenge:
by more than 0.005 nats at p < 0.01; frontier: any improvement at p < 0.25), --margin and --alpha as in
records/stats.py. The exit code is 1 when a run failed.
"""

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "records"))
import make  # noqa: E402  (a log's summary_json line, read as records/make.py reads it)
import stats  # noqa: E402  (the significance test)

HEADER = ("| variant | seed | status | steps | step_avg ms | pre-quant val_bpb | round-trip val_bpb | final val_bpb | "
          "val_loss | artifact bytes | train s | eval s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def key_values(items, flag):
    """KEY=VALUE strings as a dict, refusing anything else."""
    pairs = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise SystemExit(f"{flag}: {item!r} is not KEY=VALUE with an upper-case KEY")
        pairs[key] = value
    return pairs


def run_id_of(variant, seed):
    return "ablation_" + (re.sub(r"\W+", "_", variant).strip("_") or "variant") + f"_seed{seed}"


def command_of(nproc):
    if nproc == 1:
        return [sys.executable, str(REPO / "train_gpt.py")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "train_gpt.py")]


def run_one(variant, settings, seed, args):
    """One run; returns its row: the summary of its log, or the reason it failed."""
    run_id = run_id_of(variant, seed)
    ours = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SEEDS")  # the runner sets the seed of each run
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(settings, SEED=str(seed), RUN_ID=run_id, OVERWRITE_RUN="1")
    logs = Path(args.log_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{run_id}.out", "w") as console:
        code = subprocess.run(command_of(args.nproc), env=env, cwd=args.log_dir, stdout=console,
                              stderr=subprocess.STDOUT).returncode
    row = dict(variant=variant, seed=seed, log=logs / f"{run_id}.txt")
    text = row["log"].read_text(errors="replace") if row["log"].is_file() else ""
    if code == 0 and "\nsummary_json: " in text:
        return dict(row, status="ok", summary=make.summary_of(text))
    output = (logs / f"{run_id}.out").read_text(errors="replace").strip().splitlines()
    errors = [line for line in output if re.match(r"(config error|data error|error|interrupted)\b", line)]
    return dict(row, status=f"FAILED (exit {code}): {(errors or output or ['no output'])[-1][:200]}")


def table_row(row):
    if row["status"] != "ok":
        return f"| {row['variant']} | {row['seed']} | {row['status']} |" + " |" * 9
    s = row["summary"]
    roundtrip = next((v for k, v in s.items() if k.endswith("_roundtrip_val_bpb")), float("nan"))
    return (f"| {row['variant']} | {row['seed']} | ok | {s['steps']} | {s['step_avg_ms']:.1f} | "
            f"{s['pre_quant_val_bpb']:.5f} | {roundtrip:.5f} | {s['val_bpb']:.5f} | {s['val_loss']:.5f} | "
            f"{s['bytes_total']:,} | {s['train_time_ms'] / 1000:.0f} | {s['eval_time_s']:.0f} |")


def verdicts(variants, rows, margin, alpha, rule):
    """Each variant's mean and std, and its test against the first variant, as markdown lines."""
    finished = {name: [dict(seed=r["seed"], val_loss=r["summary"]["val_loss"], val_bpb=r["summary"]["val_bpb"])
                       for r in rows if r["variant"] == name and r["status"] == "ok"] for name in variants}
    lines = ["", "| variant | seeds finished | mean val_bpb | std val_bpb | mean val_loss | against the first |",
             "|---|---|---|---|---|---|"]
    first = variants[0]
    for name, runs in finished.items():
        bpbs, losses = [r["val_bpb"] for r in runs], [r["val_loss"] for r in runs]
        mean = lambda v: f"{statistics.fmean(v):.5f}" if v else "-"
        std = lambda v: f"{statistics.stdev(v):.5f}" if len(v) > 1 else "-"
        if name == first:
            verdict = "(the baseline)"
        elif len(runs) < 2 or len(finished[first]) < 2:
            verdict = "not tested: both need 2 finished seeds"
        else:
            test = stats.improvement_test(runs, finished[first], margin=margin)
            verdict = (f"improvement {test['improvement']:+.5f} nats, t {test['t']:.2f}, df {test['df']:.1f}, "
                       f"p {test['p']:.3g}: " + ("significant" if test["p"] < alpha else "not significant")
                       + f" ({rule}: > {margin} nats at p < {alpha})")
        lines.append(f"| {name} | {len(runs)} | {mean(bpbs)} | {std(bpbs)} | {mean(losses)} | {verdict} |")
    return lines


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                        help="a variant: its name, then its settings; the first variant is the baseline")
    parser.add_argument("--settings", nargs="+", default=[], metavar="KEY=VALUE", help="settings of every run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337, 42, 2025])
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun); 1 = plain python3")
    parser.add_argument("--log-dir", default=".", help="the runs' working folder (logs go to its logs/)")
    parser.add_argument("--out", help="also write the table to this markdown file")
    parser.add_argument("--rule", choices=sorted(stats.RULES), default="challenge")
    parser.add_argument("--margin", type=float, help="required improvement in nats (default: the rule's)")
    parser.add_argument("--alpha", type=float, help="significance level (default: the rule's)")
    parser.add_argument("--dry-run", action="store_true", help="print each run's command and run nothing")
    args = parser.parse_args()
    names = [variant[0] for variant in args.variant]
    if len(set(names)) != len(names) or len({run_id_of(name, 0) for name in names}) != len(names):
        parser.error(f"variant names must differ (also once reduced to letters, digits and _): {names}")
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    return args


def main():
    args = parse_args()
    shared = key_values(args.settings, "--settings")
    if any(key in ("SEED", "SEEDS", "RUN_ID") for v in args.variant for key in key_values(v[1:], "--variant") | shared):
        raise SystemExit("SEED, SEEDS and RUN_ID are the runner's: give the seeds with --seeds")
    variants = {v[0]: shared | key_values(v[1:], f"--variant {v[0]!r}") for v in args.variant}
    if args.dry_run:
        for name, settings in variants.items():
            for seed in args.seeds:
                env = settings | dict(SEED=str(seed), RUN_ID=run_id_of(name, seed))
                print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command_of(args.nproc)))
        return
    lines, rows = [HEADER], []

    def emit(*new):
        lines.extend(new)
        print("\n".join(new), flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")

    print(HEADER, flush=True)
    for name, settings in variants.items():
        for seed in args.seeds:
            rows.append(run_one(name, settings, seed, args))
            emit(table_row(rows[-1]))
    margin = stats.RULES[args.rule][0] if args.margin is None else args.margin
    alpha = stats.RULES[args.rule][1] if args.alpha is None else args.alpha
    emit(*verdicts(list(variants), rows, margin, alpha, args.rule))
    sys.exit(1 if any(row["status"] != "ok" for row in rows) else 0)


if __name__ == "__main__":
    main()
