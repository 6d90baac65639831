"""The prepared GPU check: one command that answers, on one H100 or H200 in at most 7 minutes (the machine's start
not counted), what the CPU cannot.

    python3 benchmarks/gpu_check.py --data-path D --tokenizer-path T.model --out gpu_check.md
    python3 benchmarks/gpu_check.py --tiny --data-path D --tokenizer-path T.model   # the CPU miniature CI runs
    python3 benchmarks/gpu_check.py ... --phases fused_kernels,profile_rows         # a subset, in the same order

D is a dataset folder of shards (docs/gpu.md, "The GPU check", builds one of about 20 MB). Every row is printed
and the markdown table rewritten to --out the moment it is measured, so a run cut short still returns what it
measured. Every run shares one inductor cache (its graphs compile once), and a phase that no longer fits
--budget-seconds is listed as not measured. In order:
  1. versions and the device, its table bf16 peak and a measured bf16 matmul rate;
  2. the equalities: each importable attention backend against SDPA, plain causal and over packed documents; each
     fused Triton kernel against the unfused math, with both times;
  3. the default stack end to end at a short cap (--train-seconds), under COMPILE_SCOPE=block: the warmup and
     each graph's compile, the memory estimate beside the measured peak, the graph counts, training, GPTQ
     calibration against its reserve, the training data read inside the cap, quantization, the artifact's bytes,
     the round trip and the sliding window (its time projected to the full FineWeb validation split on 8 GPUs);
  4. on that artifact (EVAL_ONLY_QUANTIZED_PATH), chunk TTT (pr754's) and PRESET=record's TTT (per-document LoRA
     with its phases, their prefix scaled to this split), each projected likewise (LoRA's to the record's split)
     and, with the artifact's read, the round trip and the sliding pass where that run has one, held to 600 s;
  5. BENCHMARK_STEPS figures before and after the recurrence (ms/step, tokens/s, MFU, peak memory) at one GPU's
     share of the record batch (98,304 tokens, GRAD_ACCUM_STEPS=1), for both COMPILE_SCOPEs (which decides the
     default: model, the records', until block steps as fast), and with each speed switch on alone
     (FUSED_CE_ENABLED, FUSED_MLP_ENABLED, ADAMW_SIDE_STREAM);
  6. PRESET=pr754 at the 03-23 record's batch (786,432 tokens, 8 micro-steps) against its 580 ms target, and later,
     as time allows, without the records' bf16 state; PRESET=record's step time, its DOC_ISOLATION on the attention
     it selects (FA3 where installed, else FlexAttention);
  7. a profile of the default stack's step (benchmarks/profile_step.py): kernel time against the step, the share
     of each kind of kernel, the top ten kernels; PRESET=pr754 without the bf16 state; PRESET=record with each
     speed switch flipped alone; PRESET=baseline;
  8. PRESET=record with TRAIN_ROWS=packed at the record's batch in 8 micro-steps: each micro-batch one row of
     98,304 tokens, as the record's loader makes them (FlexAttention's block mask over such a row, or FA3's varlen
     path, has not run on a GPU); its tokens/s beside PRESET=record's row;
  9. PRESET=pr2014 likewise, at each stage of its length schedule (pieces of at most 1,024, 2,048, 3,072 tokens).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_gpt as T  # noqa: E402

FINEWEB_VAL_TOKENS = 62_021_632  # the challenge's sp1024 validation split (its logs' val_loader line)
# The 04-27 record's validation split in its CaseOps SP8192 tokens (its log's val_tokens), and its documents.
RECORD_VAL_TOKENS, RECORD_VAL_DOCUMENTS = 47_851_520, 50_000
GPUS = 8
# The step targets on one H100/H200: 1.2x the 1.08 M tok/s and 40% MFU for the default stack before the recurrence,
# 580 ms/step for PRESET=pr754 at the 03-23 record's batch (691.6 measured; the record's own script: 698.8).
TARGETS = dict(tokens_per_s=1.3e6, mfu=40.0, pr754_ms=580.0, eval_s=600.0, warmup_s=60.0)
# The CPU miniature: the same phases at a size that runs in a few minutes on two cores. The default stack's loop and
# lanes move to fit four layers; the export and TTT shrink with it.
TINY_MODEL = dict(NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="128",
                  VAL_BATCH_SIZE="4096", TRAIN_BATCH_TOKENS="1024", WARMUP_STEPS="2")
TINY_STACK = dict(LOOP_START="1", LOOP_END="2", PARALLEL_START_LAYER="3")  # not for baseline, pr754 (no loop)
TINY_TRAINING = dict(GPTQ_CALIBRATION_BATCHES="2", SIZE_TARGET_BYTES="0", EVAL_STRIDE="64", ITERATIONS="30",
                     MAX_WALLCLOCK_SECONDS="0")
TINY_TTT = dict(chunk=dict(TTT_CHUNK_TOKENS="8192", TTT_BATCH_SEQS="4", TTT_EPOCHS="1"),
                lora=dict(TTT_BATCH_SIZE="32", TTT_CHUNK_SIZE="128", TTT_LORA_RANK="8"))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True, help="the shards folder (fineweb_train_*.bin, fineweb_val_*.bin)")
    parser.add_argument("--tokenizer-path", required=True, help="the SentencePiece model of those shards")
    parser.add_argument("--out", default="gpu_check.md", help="where the markdown table is written, row by row")
    parser.add_argument("--tiny", action="store_true", help="the CPU miniature (CI): tiny model, seconds per phase")
    parser.add_argument("--train-seconds", type=float, default=45.0, help="the end-to-end run's MAX_WALLCLOCK_SECONDS")
    parser.add_argument("--benchmark-steps", type=int, default=10, help="timed steps per layout")
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="a phase that no longer fits is skipped")
    parser.add_argument("--phases", default="", help="a comma-separated subset of the phases, in the check's order "
                        "(default: all): a second call runs what the first one's budget skipped")
    args = parser.parse_args(argv)
    names = [phase.__name__ for phase, _ in PHASES]
    args.phases = set(filter(None, args.phases.split(",")))  # empty: every phase
    if args.phases - set(names):
        parser.error(f"--phases: {', '.join(sorted(args.phases - set(names)))} not among {', '.join(names)}")
    return args


class Table:
    """The check's markdown table: each row printed and the file rewritten as soon as it is added."""

    def __init__(self, path, started):
        self.path, self.started, self.rows = Path(path), started, []

    def add(self, check, figure, target="", verdict=""):
        self.rows.append((check, figure, target, verdict))
        print(f"| {check} | {figure} | {target} | {verdict} |", flush=True)
        self.path.write_text(self.markdown())

    def seconds(self):
        return time.perf_counter() - self.started

    def markdown(self):
        header = (f"GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {self.seconds():.0f} s: "
                  f"`python3 benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`\n\n")
        lines = ["| check | figure | target | verdict |", "| --- | --- | --- | --- |"]
        return header + "\n".join(lines + [f"| {' | '.join(map(str, row))} |" for row in self.rows]) + "\n"


# --- what the device is -------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_tflops(device, size):
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    repeats, start = 10, time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


def environment(table, check):
    versions = T.package_versions()
    peak = next((flops for key, flops in T.PEAK_BF16_FLOPS.items() if key in check.device_name), None)
    flash = " ".join(f"{k}:{versions[k]}" for k in ("flash_attn", "flash_attn_interface") if k in versions) or "none"
    table.add("torch / CUDA / FlashAttention", f"{versions['torch']} / {versions['cuda']} / {flash}")
    table.add("device", check.device_name)
    table.add("bf16 peak (table)", f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown")
    rate = measured_matmul_tflops(check.device, 256 if check.tiny else 8192)
    table.add("bf16 matmul (measured)", f"{rate:.3g} TFLOP/s")


# --- runs of train_gpt.py ------------------------------------------------------------------------------------------

class Check:
    """What every phase shares: the arguments, the device, the folder the runs write in and the compile cache."""

    def __init__(self, args, table):
        self.args, self.table, self.tiny = args, table, args.tiny
        self.device = torch.device("cuda") if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.on_h100 = "H100" in self.device_name or "H200" in self.device_name  # an H200 has the H100's bf16 peak
        self.workdir = Path(args.out).resolve().parent / "gpu_check_runs"
        self.workdir.mkdir(parents=True, exist_ok=True)
        # What the end-to-end phase leaves to the TTT phase: the artifact, and its passes' seconds on 8 GPUs.
        self.artifact, self.roundtrip_projected, self.sliding_projected = None, 0.0, 0.0

    def env(self, run_id, **settings):
        env = dict(DATA_PATH=str(Path(self.args.data_path).resolve()),
                   TOKENIZER_PATH=str(Path(self.args.tokenizer_path).resolve()), RUN_ID=run_id, OVERWRITE_RUN="1",
                   TRAIN_LOG_EVERY="50", GRAD_ACCUM_STEPS="1",
                   TORCHINDUCTOR_CACHE_DIR=os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(self.workdir / "inductor")))
        env.update(TINY_MODEL if self.tiny else dict(TRAIN_BATCH_TOKENS="98304", WARMUP_STEPS="4"))
        if self.tiny and settings.get("PRESET") not in ("baseline", "pr754"):  # the stacks without recurrence
            env.update(TINY_STACK)
        if self.tiny:  # the miniature runs eager (COMPILE=auto on the CPU), where a compile scope is refused
            settings.pop("COMPILE_SCOPE", None)
        env = {**env, **settings}
        if "EVAL_ONLY_QUANTIZED_PATH" in env:  # such a run refuses the settings it never reads (the batch, warmup)
            unread = {name.upper() for name in T.unread_when_evaluating_only(T.Hyperparameters)}
            env = {name: value for name, value in env.items() if name not in unread}
        return env

    def run(self, env, label, script=REPO / "train_gpt.py"):
        """One run of train_gpt.py (or of a benchmark that runs it); returns its log, or raises with the output's
        tail."""
        clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRESET")}
        timeout = max(self.args.budget_seconds - self.table.seconds(), 30)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(script)], cwd=self.workdir, env={**clean, **env},
                                capture_output=True, text=True, timeout=timeout)
        print(f"[gpu_check] {label}: {time.perf_counter() - started:.0f}s rc={result.returncode}", flush=True)
        if result.returncode != 0:
            raise RuntimeError(f"{label} failed:\n{(result.stdout + result.stderr)[-4000:]}")
        return (self.workdir / "logs" / f"{env['RUN_ID']}.txt").read_text()


def found(pattern, log, default="-"):
    match = re.search(pattern, log, re.M)
    return match.group(1) if match else default


def projected_seconds(log, name, val_tokens, split_tokens=FINEWEB_VAL_TOKENS):
    """(val_bpb, seconds here, seconds projected to a validation split of `split_tokens` on 8 GPUs) of a final
    line."""
    match = re.search(rf"^{name} val_loss:[\d.]+ val_bpb:([\d.]+).* eval_time:(\d+)ms", log, re.M)
    if not match:
        return None
    seconds = int(match.group(2)) / 1000
    return float(match.group(1)), seconds, split_tokens / (val_tokens / seconds * GPUS)


def compile_rows(table, label, log):
    """The warmup: its total against the target, each layout's first step and each evaluation graph, the counts."""
    layouts = set()
    for looping, seconds in re.findall(r"^warmup_step:\d+/\d+ looping:(\w+) time:([\d.]+)s", log, re.M):
        if looping not in layouts:  # a layout's first step carries its compile time
            layouts.add(looping)
            table.add(f"{label}: first step, looping:{looping} (compile)", f"{float(seconds):.1f} s")
    evaluation_graphs = re.findall(r"^warmup_eval: seq_len:(\d+) .*looping:(\w+) time:([\d.]+)s", log, re.M)
    for seq_len, looping, seconds in evaluation_graphs:
        table.add(f"{label}: evaluation graph, seq_len {seq_len}, looping:{looping} (compile)",
                  f"{float(seconds):.1f} s")
    warmup = float(found(r"^warmup:done steps:\d+ time:([\d.]+)s", log, "nan"))
    table.add(f"{label}: untimed warmup", f"{warmup:.1f} s", f"<= {TARGETS['warmup_s']:.0f} s",
              "n/a (CPU)" if table_is_cpu(log) else ("met" if warmup <= TARGETS["warmup_s"] else "NOT MET"))
    counts = dict(re.findall(r"^compile: after:(\w+) graphs:(\d+)$", log, re.M))
    verdict = "n/a (not compiled)" if not counts else "ok" if len(set(counts.values())) == 1 else "COMPILED LATE"
    figure = " / ".join(counts.get(phase, "-") for phase in ("warmup", "training", "evaluation"))
    table.add(f"{label}: graphs after warmup / training / evaluation", figure, "all equal", verdict)


def table_is_cpu(log):
    return "device:cpu" in log


def memory_row(table, label, log):
    estimate = found(r"^memory_estimate: per_gpu:(\d+)MiB", log)
    measured = re.search(r"^memory_measured: peak_allocated:(\d+)MiB peak_reserved:(\d+)MiB", log, re.M)
    figure = f"estimate {estimate} MiB" + (f", peak allocated {measured.group(1)} MiB, reserved {measured.group(2)} MiB"
                                           if measured else ", peak not measured (not CUDA)")
    verdict = "" if not measured else ("bounded" if int(measured.group(1)) <= int(estimate) else "ESTIMATE LOW")
    table.add(f"{label}: memory per GPU", figure, "estimate >= peak allocated", verdict)


# --- the phases ----------------------------------------------------------------------------------------------------

def end_to_end(table, check):
    """The default stack at a short cap, through export and sliding windows; its artifact serves the TTT phase."""
    env = check.env("check_train", **{"MAX_WALLCLOCK_SECONDS": str(check.args.train_seconds), "ITERATIONS": "100000",
                                      "COMPILE_SCOPE": "block", **(TINY_TRAINING if check.tiny else {})})
    log = check.run(env, "end to end")
    compile_rows(table, "default stack, COMPILE_SCOPE=block", log)
    memory_row(table, "default stack, COMPILE_SCOPE=block", log)
    summary = json.loads(found(r"^summary_json: (.*)$", log, "{}"))
    table.add("training", f"{summary.get('steps')} steps of {env['TRAIN_BATCH_TOKENS']} tokens, "
              f"{summary.get('step_avg_ms', 0):.1f} ms/step, {summary.get('train_time_ms', 0) / 1000:.1f} s")
    calibration, reserve = found(r"^gptq_calibration: .* time:([\d.]+)s", log), found(r"reserved:([\d.]+)s$", log)
    within = found(r"^compliance: training_data_read_until:(\S+ max_wallclock:\S+ within_cap:\w+)", log)
    table.add("GPTQ calibration against its reserve", f"{calibration} s of a {reserve} s reserve; read until {within}",
              "within the cap", "ok" if within.endswith("yes") else ("-" if within == "-" else "OVER THE CAP"))
    quantization, export = found(r"^quantization: .* time:([\d.]+)s", log), found(r" export:([\d.]+)s", log)
    table.add("quantization", f"{quantization} s; export {export} s")
    table.add("artifact", found(r"^artifact: (bytes_code:\d+ bytes_model:\d+ bytes_total:\d+)", log))
    val_tokens = int(found(r"^val_tokens:(\d+)", log, "0"))
    roundtrip = next((k[:-len("_val_bpb")] for k in summary if k.endswith("_roundtrip_val_bpb")), "")
    projected = {}
    for name, label in ((roundtrip, "round trip"), ("final_sliding_window", "sliding window")):
        scored = projected_seconds(log, name, val_tokens) if name else None
        table.add(f"evaluation: {label}", "not run" if scored is None else
                  f"val_bpb {scored[0]:.4f}, {scored[1]:.1f} s here, projected {scored[2]:.0f} s on {GPUS} GPUs")
        projected[label] = scored[2] if scored else 0.0
    export_name = found(r"^final_(\w+?)_roundtrip ", log)
    check.artifact = str(check.workdir / "logs" / f"check_train_model.{export_name.split('_')[0]}.ptz")
    check.roundtrip_projected, check.sliding_projected = projected["round trip"], projected["sliding window"]


def record_ttt_settings(check):
    """PRESET=record's TTT (per-document LoRA at its rank and optimizer, its phases of global SGD over documents kept
    apart), its phases' prefix scaled to this validation split: the record's 2,500 of its 50,000 documents."""
    record = T.PRESETS["record"]
    settings = {name.upper(): str(value) for name, value in record.items() if name.startswith(("ttt_", "phased_"))}
    tokens = T.load_validation_tokens(T.shard_files(check.args.data_path, "val"))
    bos = spm.SentencePieceProcessor(model_file=str(check.args.tokenizer_path)).bos_id()
    documents = len(T.documents_of(T.doc_starts_of(tokens, bos), tokens.numel() - 1))  # as TTT counts them
    prefix = round(documents * record["phased_ttt_prefix_docs"] / RECORD_VAL_DOCUMENTS)
    return dict(settings, PHASED_TTT_PREFIX_DOCS=str(max(prefix, record["phased_ttt_num_phases"])),
                DOC_ISOLATION=str(int(record["doc_isolation"])))


def ttt_on_the_artifact(table, check):
    """Chunk TTT (the default's, pr754's) and PRESET=record's per-document LoRA TTT with its phases, on the
    end-to-end run's artifact, nothing trained; each against the whole eval clock of the runs that use it."""
    if not check.artifact or not Path(check.artifact).is_file():
        raise RuntimeError("no artifact: the end-to-end phase did not finish")
    for method in ("chunk", "lora"):
        settings = {"TTT_ENABLED": "1", "TTT_METHOD": method,
                    **(record_ttt_settings(check) if method == "lora" else {}),
                    "EVAL_ONLY_QUANTIZED_PATH": check.artifact, "TTT_EVAL_ONLY": "1",
                    **(TINY_TTT[method] if check.tiny else {})}
        log = check.run(check.env(f"check_ttt_{method}", **settings), f"TTT {method}")
        # LoRA's is PRESET=record's evaluation, so projected to the record's split (its SP8192 tokens).
        split = RECORD_VAL_TOKENS if method == "lora" else FINEWEB_VAL_TOKENS
        scored = projected_seconds(log, "final_ttt", int(found(r"^val_tokens:(\d+)", log, "0")), split)
        warmup = found(r"untimed_warmup:([\d.]+)s", log)
        if scored is None:
            table.add(f"evaluation: TTT {method}", "not run")
            continue
        # A run's whole evaluation clock: the artifact's read (each rank reads it whole, so it is not scaled), the
        # round trip, and with chunk TTT the sliding pass (pr754's evaluation; PRESET=record, LoRA's, runs none).
        read = float(found(r"^artifact_read_time:(\d+)ms", log, "0")) / 1000
        passes = (check.roundtrip_projected * split / FINEWEB_VAL_TOKENS
                  + (check.sliding_projected if method == "chunk" else 0.0))
        total = read + passes + scored[2]
        with_passes = "the round trip and the sliding pass" if method == "chunk" else "the round trip"
        label = "chunk TTT" if method == "chunk" else "PRESET=record's TTT (lora, phased)"
        table.add(f"evaluation: {label} on the artifact", f"val_bpb {scored[0]:.4f}, {scored[1]:.1f} s here "
                  f"(graphs built in {warmup} s before), projected {scored[2]:.0f} s on {GPUS} GPUs; with the "
                  f"artifact's read ({read:.1f} s) and {with_passes}: {total:.0f} s",
                  f"<= {TARGETS['eval_s']:.0f} s (8xH100)",
                  ("met" if total <= TARGETS["eval_s"] else "NOT MET") if check.on_h100 else "n/a (not an H100)")


def benchmark_rows(table, check, label, log):
    attention = found(r"^world_size:.* attention:(\w+) ", log)
    for looping, ms, tokens, mfu, memory, pieces in re.findall(
            r"^benchmark: looping:(\w+) steps:\d+ ms_per_step:([\d.]+) tokens_per_s_per_gpu:(\d+)"
            r"(?: mfu:([\d.]+)%)?(?: peak_memory_allocated:(\d+)MiB)?(?: pieces:(\d+))?$", log, re.M):
        target, verdict = "", ""
        if label.startswith("default stack") and looping == "False":
            target = f">= {TARGETS['tokens_per_s'] / 1e6:.1f} M tok/s, >= {TARGETS['mfu']:.0f}% MFU (H100)"
            met = int(tokens) >= TARGETS["tokens_per_s"] and float(mfu or 0) >= TARGETS["mfu"]
            verdict = ("met" if met else "NOT MET") if check.on_h100 else "n/a (not an H100)"
        if label.startswith("PRESET=pr754 at the record's batch"):
            target = f"<= {TARGETS['pr754_ms']:.0f} ms/step (H100)"
            met = float(ms) <= TARGETS["pr754_ms"]
            verdict = ("met" if met else "NOT MET") if check.on_h100 else "n/a (not an H100)"
        table.add(f"{label}: looping:{looping}" + (f" pieces:{pieces}" if pieces else ""),
                  f"{float(ms):.1f} ms/step, {int(tokens):,} tok/s, MFU {mfu or '-'}%, peak {memory or '-'} MiB, "
                  f"attention {attention}", target, verdict)


def step_times(table, check, scope="block"):
    """BENCHMARK_STEPS of the default stack; COMPILE_SCOPE=model compiles every graph anew."""
    label = f"default stack, COMPILE_SCOPE={scope}"
    log = check.run(check.env(f"check_bench_{scope}", BENCHMARK_STEPS=str(check.args.benchmark_steps),
                              COMPILE_SCOPE=scope), label)
    table.add(f"{label}: untimed warmup", found(r"^warmup:done steps:\d+ time:([\d.]+)s", log) + " s")
    memory_row(table, label, log)
    benchmark_rows(table, check, label, log)


def whole_model_step_times(table, check):
    step_times(table, check, scope="model")


SPEED_SWITCHES = {"FUSED_CE_ENABLED": r"^fused_ce: (.*)$", "FUSED_MLP_ENABLED": r"^fused_mlp: (.*)$",
                  "ADAMW_SIDE_STREAM": r"^optimizer: .* adamw_stream:(\w+)"}


def speed_switch_step_times(table, check):
    """The default stack with each speed switch on alone, beside its COMPILE_SCOPE=block rows. The CPU miniature
    (--tiny) runs them all in one run, whose log still says what each switch ran."""
    runs = [[switch] for switch in SPEED_SWITCHES] if not check.tiny else [list(SPEED_SWITCHES)]
    for switches in runs:
        log = check.run(check.env(f"check_bench_{'_'.join(switches).lower()}",
                                  BENCHMARK_STEPS=str(check.args.benchmark_steps), COMPILE_SCOPE="block",
                                  **{switch: "1" for switch in switches}), " ".join(f"{s}=1" for s in switches))
        for switch in switches:
            table.add(f"default stack + {switch}=1: what ran", found(SPEED_SWITCHES[switch], log))
            benchmark_rows(table, check, f"default stack + {switch}=1, COMPILE_SCOPE=block", log)


def profile_rows(table, check):
    """Where the default stack's step goes (benchmarks/profile_step.py, COMPILE_SCOPE=block): per layout, the step
    against its kernels' summed time, each kind's share, and the top ten kernels by their own time."""
    log = check.run(check.env("check_profile", BENCHMARK_STEPS="3", COMPILE_SCOPE="block"), "profile",
                    script=REPO / "benchmarks" / "profile_step.py")
    for looping, step_ms, busy_ms, idle in re.findall(
            r"^profile: looping:(\w+) step_ms:([\d.]+) busy_ms:([\d.]+) idle:([\d.]+)%", log, re.M):
        kinds = re.findall(rf"^profile: looping:{looping} kind:(\w+) ms:[\d.]+ share:([\d.]+)%", log, re.M)
        shares = ", ".join(f"{kind} {share}%" for kind, share in kinds)
        table.add(f"profile, default stack: looping:{looping}",
                  f"{step_ms} ms/step, kernels {busy_ms} ms, idle {idle}%; {shares}")
        top = re.findall(rf"^profile: looping:{looping} rank:(\d+) ms:([\d.]+) share:([\d.]+)% calls:(\d+) name:(.*)$",
                         log, re.M)
        for rank, ms, share, calls, name in top[:10]:
            table.add(f"profile, looping:{looping}: kernel {rank}",
                      f"{ms} ms ({share}%, {calls} calls a step) {name[:80].replace('|', '/')}")


def pr754_step_time(table, check, bf16_state=True):
    """PRESET=pr754 at the 03-23 record's batch, 786,432 tokens in 8 micro-steps on one GPU, where that record's own
    script took 698.8 ms/step; with bf16_state=False, without the records' bf16 state (MUON_BF16_STATE, EMBED_BF16)."""
    settings = dict(PRESET="pr754", BENCHMARK_STEPS=str(check.args.benchmark_steps))
    if not check.tiny:
        settings.update(TRAIN_BATCH_TOKENS="786432", GRAD_ACCUM_STEPS="8")
    if not bf16_state:
        settings.update(MUON_BF16_STATE="0", EMBED_BF16="0")
    label = "PRESET=pr754 at the record's batch" + ("" if bf16_state else ", MUON_BF16_STATE=0 EMBED_BF16=0")
    log = check.run(check.env(f"check_bench_pr754{'' if bf16_state else '_fp32_state'}", **settings), label)
    benchmark_rows(table, check, label, log)


def pr754_fp32_state_step_time(table, check):
    pr754_step_time(table, check, bf16_state=False)


def record_step_time(table, check, switches=None, preset="record", shape=None):
    """PRESET=record's stack (or `preset`'s) and DOC_ISOLATION on this data (its sp1024 head is smaller than the
    record's SP8192); `switches`: settings on top of the preset (which sets FUSED_CE_ENABLED), named in the rows;
    `shape`: settings of the batch, not named."""
    settings = dict(PRESET=preset, BENCHMARK_STEPS=str(check.args.benchmark_steps), VOCAB_SIZE="1024",
                    CASEOPS_ENABLED="0", DATA_PATH=str(Path(check.args.data_path).resolve()),
                    TOKENIZER_PATH=str(Path(check.args.tokenizer_path).resolve()), **(switches or {}), **(shape or {}))
    named = " ".join(f"{switch}={value}" for switch, value in (switches or {}).items())
    log = check.run(check.env(f"check_bench_{preset}" + "_".join([""] + [s.lower() for s in switches or {}]),
                              **settings), f"PRESET={preset} {named}".strip())
    benchmark_rows(table, check, f"PRESET={preset} {named + ' ' if named else ''}(sp1024 data), DOC_ISOLATION", log)
    for switch in [switch for switch, value in (switches or {}).items() if value == "1"]:
        table.add(f"PRESET={preset} {named}: what {switch} ran", found(SPEED_SWITCHES[switch], log))


def record_speed_switch_step_times(table, check):
    """PRESET=record with each speed switch flipped alone: its fused cross-entropy off, the others on. The CPU
    miniature runs them in one run."""
    flipped = {switch: "0" if switch == "FUSED_CE_ENABLED" else "1" for switch in SPEED_SWITCHES}
    for switches in [{switch: value} for switch, value in flipped.items()] if not check.tiny else [flipped]:
        record_step_time(table, check, switches)


def record_packed_rows_step_time(table, check):
    """PRESET=record with TRAIN_ROWS=packed: the record's batch in 8 micro-steps, each one row of 98,304 tokens (a
    step holds 8 spans of the stream, one per micro-batch). Not in the CPU miniature: tests/test_doc_isolation.py
    trains with packed rows on the CPU."""
    if check.tiny:
        table.add("PRESET=record TRAIN_ROWS=packed", "not run in the CPU miniature")
        return
    record_step_time(table, check, dict(TRAIN_ROWS="packed", TRAIN_BATCH_TOKENS="786432", GRAD_ACCUM_STEPS="8"))


def pr2014_stage_step_times(table, check):
    """PRESET=pr2014 at the record's batch in 8 micro-steps, each one packed row of 98,304 tokens: its step at each
    stage of its length schedule (pieces of at most 1,024, 2,048 and 3,072 tokens), before and after the recurrence.
    The CPU miniature runs the schedule at 32, 64 and 128 (its rows of 128 tokens)."""
    shape = (dict(GRAD_ACCUM_STEPS="8", TRAIN_SEQ_SCHEDULE="32@0.100,64@0.700,128@1.000") if check.tiny else
             dict(TRAIN_BATCH_TOKENS="786432", GRAD_ACCUM_STEPS="8"))
    record_step_time(table, check, preset="pr2014", shape=shape)


def baseline_step_time(table, check):
    log = check.run(check.env("check_bench_baseline", PRESET="baseline",
                              BENCHMARK_STEPS=str(check.args.benchmark_steps)), "PRESET=baseline")
    benchmark_rows(table, check, "PRESET=baseline", log)


def timed_ms(device, fn, repeats=5):
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return 1000 * (time.perf_counter() - start) / repeats


def attention(table, check):
    """Each backend against SDPA on the same bf16 inputs (grouped-query: 8 query heads over 4 K/V heads)."""
    device = check.device
    batch, seq_len = (2, 64) if check.tiny else (8, 2048)
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(batch, seq_len, heads, 64, device=device, dtype=torch.bfloat16, generator=generator)
              for heads in (8, 4, 4)]

    def forward_backward(fn):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = fn(q, k, v)
        return out, torch.autograd.grad(out.float().square().sum(), (q, k, v))

    ids = torch.randint(2, 1024, (batch, seq_len), device=device, generator=generator)
    ids[:, torch.randint(seq_len, (seq_len // 256 + 2,), device=device, generator=generator)] = 1  # BOS = 1
    for name, extra in (("", ()), (" over packed documents", (T.packed_documents(ids, 1),))):
        reference, reference_grads = forward_backward(lambda q, k, v: T._sdpa(q, k, v, *extra))
        for backend in ("fa3", "fa2", "flex", "sdpa") if extra else ("fa3", "fa2", "sdpa"):
            try:
                _, fn = T.select_attention(backend, device.type)
            except T.ConfigError:
                table.add(f"attention {backend}{name}", "not available here")
                continue
            if extra and backend in ("fa3", "fa2") and not fn.has_varlen:
                table.add(f"attention {backend}{name}", "no flash_attn_varlen_func in this build")
                continue
            args = extra
            if backend == "flex":  # compiled, as a run compiles it, with the documents' block mask
                fn, args = torch.compile(fn, fullgraph=True), (T.packed_documents(ids, 1, block_mask=True),)
            call = lambda q, k, v: fn(q, k, v, *args)
            out, grads = forward_backward(call)
            error = max([(out.float() - reference.float()).abs().max().item()] +
                        [(g.float() - r.float()).abs().max().item() / max(r.float().abs().max().item(), 1e-6)
                         for g, r in zip(grads, reference_grads)])
            ms = timed_ms(device, lambda: forward_backward(call))
            table.add(f"attention {backend}{name} vs sdpa (fwd+bwd)", f"max error {error:.2e}, {ms:.2f} ms", "< 2e-2",
                      "ok" if error < 2e-2 else "MISMATCH")
    document_block_mask(table, check)


def document_block_mask(table, check):
    """FlexAttention's block mask of one TRAIN_ROWS=packed row (the record's 98,304 tokens, documents in pieces of
    2,048), built once per forward: its time, and whether it is the mask create_block_mask finds by evaluating every
    token pair (compared on the row's first 8,192 tokens, where that is affordable)."""
    device = check.device
    length, piece_len, compared = (1024, 128, 512) if check.tiny else (98_304, 2048, 8192)
    generator = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(2, 1024, (1, length), device=device, generator=generator)
    tokens[:, torch.randint(length, (length // 1000 + 1,), device=device, generator=generator)] = 1  # BOS = 1
    ids = T.packed_documents(tokens, 1, piece_len=piece_len).ids
    ms = timed_ms(device, lambda: T.document_block_mask(ids))
    head = ids[:, :compared]
    ours = T.document_block_mask(head)
    theirs = create_block_mask(lambda b, h, q, k: (q >= k) & (head[b, q] == head[b, k]), 1, None, compared, compared,
                               device=device)
    equal = all(torch.equal(getattr(ours, name), getattr(theirs, name))
                for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"))
    table.add(f"document block mask, one packed row of {length:,} tokens",
              f"{ms:.2f} ms; create_block_mask's at {compared:,} tokens: {'equal' if equal else 'different'}", "equal",
              "ok" if equal else "MISMATCH")


def fused_kernels(table, check):
    """Each fused kernel and the unfused bf16 ops against the fp32 math of the same bf16 inputs, forward and
    backward, at one micro-step of the default stack (16,384 tokens, width 512, MLP 4x, slope 0.5, an SP8192 head,
    softcap 30), and their times. The CPU tests run the kernels in Triton's interpreter; these are the compiled
    kernels on the GPU, which should err no more than the unfused ops."""
    device = check.device
    if not T.triton_drives(device):
        table.add("fused kernels", f"not available here (Triton does not drive {device.type})")
        return
    tokens, dim, vocab = (256, 64, 512) if check.tiny else (16384, 512, 8192)
    generator = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape, scale=1.0: (scale * torch.randn(*shape, device=device, generator=generator)).bfloat16()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    unfused_mlp = lambda x, up, down: F.linear(F.leaky_relu(F.linear(x, up), 0.5).square(), down)
    unfused_ce = lambda raw: F.cross_entropy(30.0 * torch.tanh(raw.float() / 30.0), targets, reduction="none")
    fused_mlp, fused_ce = T.fused_leaky_relu2_mlp(), T.fused_softcapped_ce()
    cases = (("LeakyReLU^2 MLP", (randn(tokens, dim), randn(4 * dim, dim, scale=dim ** -0.5),
                                  randn(dim, 4 * dim, scale=0.02)),
              unfused_mlp, lambda x, up, down: fused_mlp(x, up, down, 0.5)),
             ("softcapped cross-entropy", (randn(tokens, vocab, scale=10.0),), unfused_ce,
              lambda raw: fused_ce(raw, targets, 30.0)))
    for name, inputs, unfused_fn, fused_fn in cases:
        def forward_backward(fn, dtype=torch.bfloat16):
            leaves = [t.to(dtype).requires_grad_() for t in inputs]
            out = fn(*leaves)
            return [out] + list(torch.autograd.grad(out.float().square().sum(), leaves))

        exact = forward_backward(unfused_fn, torch.float32)
        error = lambda results: max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(results, exact))
        fused_error, unfused_error = error(forward_backward(fused_fn)), error(forward_backward(unfused_fn))
        fused_ms, unfused_ms = (timed_ms(device, lambda fn=fn: forward_backward(fn)) for fn in (fused_fn, unfused_fn))
        table.add(f"fused {name} (fwd+bwd): error against fp32, time", f"{fused_error:.2e}, {fused_ms:.2f} ms; unfused "
                  f"bf16: {unfused_error:.2e}, {unfused_ms:.2f} ms", "error <= 1.5x unfused",
                  "ok" if fused_error <= 1.5 * unfused_error + 1e-6 else "MISMATCH")


# (phase, the seconds it needs on one H200 to be started: a phase that no longer fits the budget is skipped)
# The equalities come first, the cheapest rows: a kernel that errs on the GPU makes its speed rows moot.
PHASES = ((attention, 30), (fused_kernels, 10), (end_to_end, 150), (ttt_on_the_artifact, 90), (step_times, 30),
          (speed_switch_step_times, 60), (pr754_step_time, 60), (whole_model_step_times, 120),
          (record_step_time, 50), (profile_rows, 60), (pr754_fp32_state_step_time, 60),
          (record_speed_switch_step_times, 150), (baseline_step_time, 40), (record_packed_rows_step_time, 90),
          (pr2014_stage_step_times, 240))


def main(argv=None):
    args = parse_args(argv)
    table = Table(args.out, time.perf_counter())
    check = Check(args, table)
    if not args.tiny and check.device.type != "cuda":
        sys.exit("gpu_check: no CUDA device here; --tiny runs the CPU miniature")
    environment(table, check)
    for phase, needs in PHASES:
        if args.phases and phase.__name__ not in args.phases:
            continue
        if table.seconds() + (0 if args.tiny else needs) > args.budget_seconds:
            table.add(phase.__name__, f"not measured: {table.seconds():.0f} s of the {args.budget_seconds:.0f} s "
                      f"budget spent, it needs about {needs} s", "", "SKIPPED")
            continue
        try:
            phase(table, check)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, AttributeError) as error:  # the rest still runs
            table.add(phase.__name__, f"FAILED: {str(error).splitlines()[0][:200]}", "", "FAILED")
            print(error, file=sys.stderr)
    print(table.markdown())
    return table.rows


if __name__ == "__main__":
    main()
