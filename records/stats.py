"""Statistics over record runs, and the check of a records folder against the contract in records/README.md.

    python3 records/stats.py records/<candidate> --baseline records/<baseline>   # two sets of seeds
    python3 records/stats.py records/<candidate> --baseline-value 1.8930         # against a record's val_loss
    python3 records/stats.py records/<candidate> --baseline <challenge record folder> --rule frontier
    python3 records/stats.py --check records/<folder>                            # the contract

Inputs are records folders or log files: ours (train_seed*.log with a summary_json line), or an official record
folder of openai/parameter-golf as it is in that repository (its submission.json's seed_results, else the score
line of each train_seed*.log / train.log: the last `*_exact` line, else the last final score line).

--rule challenge (the default) is the challenge's acceptance rule: beat the current record by at least 0.005 nats
of val_loss at p < 0.01. --rule frontier is the leaderboard's chronological-progression rule (PR #1902): a better
mean at p < 0.25. --margin and --alpha override either. The test is one-sided: H0: mean(baseline) -
mean(candidate) <= margin against H1: the improvement is larger; with two sets of seeds Welch's t-test, against a
single value the one-sample t-test. Runs whose config hash or code hash differ are never pooled into one set.
"""

import argparse
import hashlib
import json
import math
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make  # noqa: E402  (the submission, as records/make.py derives it from the logs)
import train_gpt as T  # noqa: E402  (the log format and the packed code are defined there)

RULES = {"challenge": (0.005, 0.01), "frontier": (0.0, 0.25)}  # (margin in nats, alpha)
MARGIN_NATS, ALPHA = RULES["challenge"]


SCORE_LINE = re.compile(r"^(?!step:|\d+/\d+ |diagnostic )(\S+) val_loss:\s*([\d.]+) val_bpb:\s*([\d.]+)", re.M)


def log_paths(item):
    found = sorted(item.glob("train_seed*.log")) or sorted(item.glob("train*.log")) if item.is_dir() else [item]
    if not found and not (item / "submission.json").is_file():
        raise SystemExit(f"{item}: no train_seed*.log in this folder")
    return found


def official_score(text, path):
    """(val_loss, val_bpb) of a challenge log: its last `*_exact` line, else its last final score line."""
    scores = SCORE_LINE.findall(text)
    exact = [score for score in scores if score[0].endswith("_exact")]
    if not (exact or scores):
        raise SystemExit(f"{path}: neither a summary_json line nor a score line (... val_loss:X val_bpb:Y)")
    _, val_loss, val_bpb = (exact or scores)[-1]
    return float(val_loss), float(val_bpb)


def official_seed(text, path):
    named = re.search(r"seed(\d+)", path.name)
    logged = re.search(r"^\s*seed[:=]\s*(\d+)\s*$", text, re.M)
    return int(named.group(1)) if named else int(logged.group(1)) if logged else 0


def logged_loss(texts, seed, val_bpb):
    """The val_loss of the score line whose val_bpb is the one submission.json gives this seed (some records give
    only val_bpb, and their logs also hold evaluations that were not the score)."""
    for path, text in texts.items():
        if official_seed(text, path) == seed:
            for _, val_loss, logged_bpb in SCORE_LINE.findall(text):
                if abs(float(logged_bpb) - float(val_bpb)) < 5e-9:
                    return float(val_loss)
    raise SystemExit(f"submission.json gives seed {seed} val_bpb {val_bpb} but no log line has that score")


def folder_runs(item):
    """The runs of one input: ours (summary_json), or an official folder's seed_results or score lines. A log of
    ours that cannot be counted (no summary_json line: the run did not finish; a score that is not finite) is named,
    with the reason, on stderr."""
    texts = {path: path.read_text(encoding="utf-8", errors="replace") for path in log_paths(item)}
    ours = {path: text for path, text in texts.items() if "\nsummary_json: " in text}
    if ours:
        runs = []
        for path in sorted(set(texts) - set(ours)):
            print(f"{path}: left out: no summary_json line (the run did not finish; FINISH_FROM finishes it)",
                  file=sys.stderr)
        for path, text in ours.items():
            try:
                summary = make.summary_of(text)
            except ValueError:
                print(f"{path}: left out: its summary_json line is cut short or damaged", file=sys.stderr)
                continue
            if not all(math.isfinite(summary[key]) for key in ("val_loss", "val_bpb")):
                print(f"{path}: left out: its score is not finite (val_loss {summary['val_loss']}: the run diverged)",
                      file=sys.stderr)
                continue
            runs.append(dict(seed=summary["seed"], val_loss=summary["val_loss"], val_bpb=summary["val_bpb"],
                             config_hash=summary["config_hash"], code_sha256=summary["code_sha256"], path=str(path)))
        return runs
    official = dict(config_hash="official", code_sha256=item.name if item.is_dir() else item.parent.name)
    submission = item / "submission.json" if item.is_dir() else None
    if submission is not None and submission.is_file():
        results = json.loads(submission.read_text()).get("seed_results") or {}
        if results and all(isinstance(r, dict) and "val_bpb" in r for r in results.values()):
            return [dict(seed=int(seed), val_bpb=float(r["val_bpb"]), path=str(submission), **official,
                         val_loss=(float(r["val_loss"]) if "val_loss" in r else
                                   logged_loss(texts, int(seed), r["val_bpb"])))
                    for seed, r in results.items()]
    runs = []
    for path, text in texts.items():
        val_loss, val_bpb = official_score(text, path)
        runs.append(dict(seed=official_seed(text, path), val_loss=val_loss, val_bpb=val_bpb, path=str(path),
                         **official))
    return runs


def load_runs(inputs, label):
    """One set of seeds: [{seed, val_loss, val_bpb, config_hash, code_sha256, path}], refusing mixed configs."""
    runs = []
    for item in map(Path, inputs):
        try:
            runs += folder_runs(item)
        except ValueError as error:
            raise SystemExit(f"{item}: {error}")
    if not runs:
        raise SystemExit(f"no {label} run could be counted (see the lines above)")
    fingerprints = {(run["config_hash"], run["code_sha256"]) for run in runs}
    if len(fingerprints) > 1:
        listing = "\n".join(f"  {run['path']}: config_hash {run['config_hash']} code {run['code_sha256']}"
                            for run in runs)
        raise SystemExit(f"refusing to pool the {label} runs: they come from {len(fingerprints)} different "
                         f"configurations or codes\n{listing}")
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"the {label} runs repeat a seed: {sorted(seeds)}")
    return sorted(runs, key=lambda run: run["seed"])


def regularized_incomplete_beta(x, a, b):
    """I_x(a, b) by its continued fraction (modified Lentz), using the symmetry where that converges faster."""
    if x <= 0.0 or x >= 1.0:
        return min(max(x, 0.0), 1.0)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    tiny = 1e-300
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction


def student_t_sf(t, df):
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2, 0.5)
    return tail if t > 0 else 1.0 - tail


def improvement_test(candidate, baseline=None, baseline_value=None, margin=MARGIN_NATS):
    """The one-sided test that the candidate's mean val_loss is more than `margin` below the baseline's.
    Returns {improvement, t, df, p}."""
    c = [run["val_loss"] for run in candidate]
    if len(c) < 2:
        raise SystemExit("the candidate needs at least 2 seeds for a t-test")
    mean_c, var_c = statistics.fmean(c), statistics.variance(c)
    if baseline_value is not None:
        improvement, se, df = baseline_value - mean_c, math.sqrt(var_c / len(c)), len(c) - 1
    else:
        b = [run["val_loss"] for run in baseline]
        if len(b) < 2:
            raise SystemExit("the baseline needs at least 2 seeds for Welch's t-test (or use --baseline-value)")
        mean_b, var_b = statistics.fmean(b), statistics.variance(b)
        improvement = mean_b - mean_c
        se = math.sqrt(var_b / len(b) + var_c / len(c))
        df = se ** 4 / ((var_b / len(b)) ** 2 / (len(b) - 1) + (var_c / len(c)) ** 2 / (len(c) - 1)) if se else math.inf
    if se == 0:
        return dict(improvement=improvement, t=math.copysign(math.inf, improvement - margin), df=df,
                    p=0.0 if improvement > margin else 1.0)
    t = (improvement - margin) / se
    return dict(improvement=improvement, t=t, df=df, p=student_t_sf(t, df))


def describe(runs, label):
    losses, bpbs = [run["val_loss"] for run in runs], [run["val_bpb"] for run in runs]
    std = lambda values: statistics.stdev(values) if len(values) > 1 else float("nan")
    lines = [f"{label}: {len(runs)} seed(s), config_hash {runs[0]['config_hash']}, code {runs[0]['code_sha256']}",
             "  seed        val_loss     val_bpb"]
    lines += [f"  {run['seed']:<8} {run['val_loss']:11.8f} {run['val_bpb']:11.8f}" for run in runs]
    lines.append(f"  mean     {statistics.fmean(losses):11.8f} {statistics.fmean(bpbs):11.8f}")
    lines.append(f"  std      {std(losses):11.8f} {std(bpbs):11.8f}")
    return "\n".join(lines)


def source_of(folder, code):
    """(the source the logs must start with, a problem or None): the readable file beside a packed train_gpt.py,
    which the packed file must decode to; the packed file's own payload when there is none; else train_gpt.py."""
    if not code.startswith(T.PACKED_CODE_PREFIX):
        return code, None
    try:
        payload = T.unpack_source(code)
    except Exception as error:
        return code, f"train_gpt.py looks packed but does not decode: {error}"
    readable = folder / T.READABLE_CODE_NAME
    if not readable.is_file():
        return payload, None
    source = readable.read_bytes()
    if T.strip_source(source.decode("utf-8")).encode("utf-8") != payload:
        return source, (f"train_gpt.py does not decode to {T.READABLE_CODE_NAME} (regenerate it: "
                        f"python3 records/pack.py "
                        f"{folder / T.READABLE_CODE_NAME} {folder / 'train_gpt.py'})")
    return source, None


def check_record(folder):
    """The records contract (records/README.md). Returns (problems, notes): a folder passes when there is no problem."""
    folder, problems, notes = Path(folder), [], []
    for name in ("README.md", "submission.json", "train_gpt.py", "index.jsonl"):
        if not (folder / name).is_file():
            problems.append(f"missing {name}")
    logs = sorted(folder.glob("train_seed*.log"))
    if not logs:
        problems.append("no train_seed<SEED>.log")
    if problems:
        return problems, notes
    code = (folder / "train_gpt.py").read_bytes()
    source, problem = source_of(folder, code)
    if problem:
        return [problem], notes
    texts = [path.read_text(encoding="utf-8") for path in logs]
    summaries = []
    for path, text in zip(logs, texts):
        try:
            summary = make.summary_of(text)
        except ValueError as error:
            problems.append(f"{path.name}: {error}")
            continue
        summaries.append(summary)
        if path.name != f"train_seed{summary['seed']}.log":
            problems.append(f"{path.name} holds seed {summary['seed']}")
        if not text.startswith(source.decode("utf-8")):
            problems.append(f"{path.name} does not start with this folder's source: another code ran")
        if summary["code_sha256"] != hashlib.sha256(code).hexdigest()[:16]:
            problems.append(f"{path.name}: code_sha256 {summary['code_sha256']} is not this folder's train_gpt.py")
        if summary["bytes_total"] > T.ARTIFACT_LIMIT_BYTES:
            problems.append(f"{path.name}: artifact {summary['bytes_total']} bytes > {T.ARTIFACT_LIMIT_BYTES}")
        for key in ("val_loss", "val_bpb"):
            if not math.isfinite(summary[key]):
                problems.append(f"{path.name}: {key} is {summary[key]!r}: a non-finite score is never a result")
        if not {"python", "torch", "cuda"} <= set(summary.get("versions", {})):
            problems.append(f"{path.name}: the versions that ran are not recorded")
    if len({(s["config_hash"], s["code_sha256"]) for s in summaries}) > 1:
        problems.append("the logs come from different configurations or codes: seeds must not be pooled")
    if problems:
        return problems, notes
    submission = json.loads((folder / "submission.json").read_text())  # reads NaN and Infinity as floats
    for key in ("val_loss", "val_bpb"):
        if not isinstance(submission.get(key), (int, float)) or not math.isfinite(submission[key]):
            problems.append(f"submission.json: {key} is {submission.get(key)!r}, not a finite score")
    if problems:
        return problems, notes
    expected = make.submission_from_logs(texts)
    for key, value in expected.items():
        if key not in make.USER_FIELDS + ("date",) and submission.get(key) != value:
            problems.append(f"submission.json {key} is {submission.get(key)!r}, its logs say {value!r} "
                            f"(it is generated: never edit it by hand)")
    if make.RESULTS_BEGIN not in (folder / "README.md").read_text(encoding="utf-8"):
        problems.append("README.md lacks the generated results block")
    events = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines() if line.strip()]
    finished = {e["seed"] for e in events if e["event"] == "finished"}
    launched = {e["seed"] for e in events if e["event"] == "launched"}
    for summary in summaries:
        if summary["seed"] not in finished:
            problems.append(f"seed {summary['seed']} has a log but no 'finished' entry in index.jsonl")
    unfinished = sorted(launched - finished)
    if unfinished:
        notes.append(f"launched but never finished (crashed or stopped): seeds {unfinished}; a reviewer will ask")
    dropped = sorted(finished - {s["seed"] for s in summaries})
    if dropped:
        notes.append(f"finished but not in this folder's logs: seeds {dropped}; a reviewer will ask")
    return problems, notes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidate", nargs="*", help="records folders or logs of the candidate")
    parser.add_argument("--baseline", nargs="+", help="records folders or logs of the baseline")
    parser.add_argument("--baseline-value", type=float,
                        help="the baseline's val_loss (nats), e.g. the current record's")
    parser.add_argument("--rule", choices=sorted(RULES), default="challenge",
                        help="challenge: > 0.005 nats at p < 0.01; frontier: any improvement at p < 0.25")
    parser.add_argument("--margin", type=float, help="required improvement in nats (default: the rule's)")
    parser.add_argument("--alpha", type=float, help="significance level (default: the rule's)")
    parser.add_argument("--check", metavar="FOLDER", help="check a records folder against the contract")
    args = parser.parse_args()
    if args.check:
        problems, notes = check_record(args.check)
        for note in notes:
            print(f"note: {note}")
        for problem in problems:
            print(f"problem: {problem}")
        print(f"{args.check}: {'passes' if not problems else 'FAILS'} the records contract")
        sys.exit(1 if problems else 0)
    if not args.candidate or (args.baseline is None) == (args.baseline_value is None):
        parser.error("give candidate logs and exactly one of --baseline or --baseline-value")
    candidate = load_runs(args.candidate, "candidate")
    print(describe(candidate, "candidate"))
    baseline = None
    if args.baseline:
        baseline = load_runs(args.baseline, "baseline")
        print(describe(baseline, "baseline"))
    margin = RULES[args.rule][0] if args.margin is None else args.margin
    alpha = RULES[args.rule][1] if args.alpha is None else args.alpha
    result = improvement_test(candidate, baseline, args.baseline_value, margin)
    against = f"the baseline value {args.baseline_value}" if baseline is None else "the baseline seeds (Welch)"
    print(f"improvement over {against}: {result['improvement']:+.5f} nats (required > {margin}, rule {args.rule})")
    print(f"one-sided t:{result['t']:.3f} df:{result['df']:.1f} p:{result['p']:.3g} -> "
          + ("significant" if result["p"] < alpha else "NOT significant") + f" at p < {alpha}")


if __name__ == "__main__":
    main()
