"""The prepared GPU check: one command that answers, on one H100 or H200 in at most 8 minutes, what the CPU cannot.

    python3 benchmarks/gpu_check.py --data-path D --tokenizer-path T.model --out gpu_check.md
    python3 benchmarks/gpu_check.py --tiny --data-path D --tokenizer-path T.model   # the CPU miniature CI runs

D is a dataset folder of shards (the README's "GPU check" section builds one from ../shared/corpus: the Gutenberg
train text with the challenge's sp1024 tokenizer, FineWeb documents as validation). It prints a markdown table and
writes it to --out:
  - versions (torch, CUDA, FlashAttention), the device, its table bf16 peak and a measured bf16 matmul rate;
  - each attention backend that is importable against SDPA, forward and backward in bf16, and its time, both plain
    causal and over packed documents (FlashAttention's varlen entry point against SDPA's block-diagonal mask);
  - compile time per layout, from the warmup's timed steps;
  - BENCHMARK_STEPS figures for PRESET=baseline, the default stack, and the default stack with DOC_ISOLATION=1 (FA
    varlen under compile where FlashAttention is installed) at 98,304 tokens per step (one GPU's share of the record
    batch, GRAD_ACCUM_STEPS=1): ms/step, tokens/s, MFU and peak memory before and after the recurrence;
  - a real two-minute training of the default stack to its round-trip val_bpb, with sliding-window and TTT
    tokens/s projected to the full FineWeb validation split on 8 GPUs, and GPTQ's time at full size.
Targets it reads against: the default stack >= 1.1 M tokens/s and >= 40% MFU per H100 before
the recurrence; sliding + TTT evaluation projected <= 400 s on 8xH100.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_gpt as T  # noqa: E402

FINEWEB_VAL_TOKENS = 62_021_632  # the challenge's sp1024 validation split (its logs' val_loader line)
GPUS = 8
TARGETS = dict(tokens_per_s=1.1e6, mfu=40.0, eval_s=400.0)
# The CPU miniature: the same phases at a size that runs in about two minutes on two cores. The default stack's
# loop and lanes move to fit four layers; the training run's export and TTT shrink with it.
TINY_MODEL = dict(NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="128",
                  VAL_BATCH_SIZE="4096", TRAIN_BATCH_TOKENS="1024", WARMUP_STEPS="2")
TINY_STACK = dict(LOOP_START="1", LOOP_END="2", PARALLEL_START_LAYER="3")
TINY_TRAINING = dict(TINY_STACK, GPTQ_CALIBRATION_BATCHES="2", SIZE_TARGET_BYTES="0", TTT_CHUNK_TOKENS="8192",
                     TTT_BATCH_SEQS="4", EVAL_STRIDE="64", ITERATIONS="30", MAX_WALLCLOCK_SECONDS="0")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", required=True, help="the shards folder (fineweb_train_*.bin, fineweb_val_*.bin)")
    parser.add_argument("--tokenizer-path", required=True, help="the SentencePiece model of those shards")
    parser.add_argument("--out", default="gpu_check.md", help="where the markdown table is written")
    parser.add_argument("--tiny", action="store_true", help="the CPU miniature (CI): tiny model, seconds per phase")
    parser.add_argument("--train-seconds", type=float, default=120.0, help="the real training's MAX_WALLCLOCK_SECONDS")
    parser.add_argument("--benchmark-steps", type=int, default=20, help="timed steps per layout")
    return parser.parse_args(argv)


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


def environment_rows(device, tiny):
    versions = T.package_versions()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((flops for key, flops in T.PEAK_BF16_FLOPS.items() if key in name), None)
    flash = " ".join(f"{k}:{versions[k]}" for k in ("flash_attn", "flash_attn_interface") if k in versions) or "none"
    return [("torch / CUDA / FlashAttention", f"{versions['torch']} / {versions['cuda']} / {flash}", "", ""),
            ("device", name, "", ""),
            ("bf16 peak (table)", f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown", "", ""),
            ("bf16 matmul (measured)", f"{measured_matmul_tflops(device, 256 if tiny else 8192):.3g} TFLOP/s", "", "")]


# --- attention backends --------------------------------------------------------------------------------------------

def attention_rows(device, tiny):
    """Each backend against SDPA on the same bf16 inputs (grouped-query: 8 query heads over 4 K/V heads)."""
    batch, seq_len = (2, 64) if tiny else (8, 2048)
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(batch, seq_len, heads, 64, device=device, dtype=torch.bfloat16, generator=generator)
              for heads in (8, 4, 4)]

    def forward_backward(fn):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = fn(q, k, v)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        return out, grads

    ids = torch.randint(2, 1024, (batch, seq_len), device=device, generator=generator)
    ids[:, torch.randint(seq_len, (seq_len // 256 + 2,), device=device, generator=generator)] = 1  # BOS = 1
    docs = T.packed_documents(ids, 1)
    rows = []
    for name, extra in (("", ()), (" over packed documents", (docs,))):
        reference, reference_grads = forward_backward(lambda q, k, v: T._sdpa(q, k, v, *extra))
        for backend in ("fa3", "fa2", "sdpa"):
            try:
                _, fn = T.select_attention(backend, device.type)
            except T.ConfigError:
                rows.append((f"attention {backend}{name}", "not available here", "", ""))
                continue
            if extra and fn is not T._sdpa and not fn.has_varlen:
                rows.append((f"attention {backend}{name}", "no flash_attn_varlen_func in this build", "", ""))
                continue
            call = lambda q, k, v: fn(q, k, v, *extra)
            out, grads = forward_backward(call)
            error = max([(out.float() - reference.float()).abs().max().item()] +
                        [(g.float() - r.float()).abs().max().item() / max(r.float().abs().max().item(), 1e-6)
                         for g, r in zip(grads, reference_grads)])
            sync(device)
            start = time.perf_counter()
            for _ in range(5):
                forward_backward(call)
            sync(device)
            ms = 1000 * (time.perf_counter() - start) / 5
            rows.append((f"attention {backend}{name} vs sdpa (fwd+bwd)", f"max error {error:.2e}, {ms:.2f} ms",
                         "< 2e-2", "ok" if error < 2e-2 else "MISMATCH"))
    return rows


# --- runs of train_gpt.py ------------------------------------------------------------------------------------------

def run_trainer(env, label, workdir, timeout):
    """One run of train_gpt.py in `workdir`; returns its log (or raises with the output's tail)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRESET")}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=workdir, env={**clean, **env},
                            capture_output=True, text=True, timeout=timeout)
    print(f"[gpu_check] {label}: {time.perf_counter() - started:.0f}s rc={result.returncode}", flush=True)
    if result.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return (Path(workdir) / "logs" / f"{env['RUN_ID']}.txt").read_text()


def common_env(args, run_id, tiny_extra=None):
    env = dict(DATA_PATH=str(Path(args.data_path).resolve()), TOKENIZER_PATH=str(Path(args.tokenizer_path).resolve()),
               RUN_ID=run_id, OVERWRITE_RUN="1", TRAIN_LOG_EVERY="50", GRAD_ACCUM_STEPS="1")
    if args.tiny:
        env.update(TINY_MODEL, **(tiny_extra or {}))
    else:
        env.update(TRAIN_BATCH_TOKENS="98304", WARMUP_STEPS="4")
    return env


def compile_rows(label, log):
    rows, layouts = [], set()
    for looping, seconds in re.findall(r"^warmup_step:\d+/\d+ looping:(\w+) time:([\d.]+)s", log, re.M):
        if looping not in layouts:  # a layout's first step carries its compile time
            layouts.add(looping)
            rows.append((f"{label}: first step, looping:{looping} (compile)", f"{float(seconds):.1f} s", "", ""))
    for seq_len, seconds in re.findall(r"^warmup_eval: seq_len:(\d+) .* time:([\d.]+)s", log, re.M):
        rows.append((f"{label}: evaluation graph, seq_len {seq_len} (compile)", f"{float(seconds):.1f} s", "", ""))
    return rows


def benchmark_rows(args, workdir, device_name):
    rows = []
    on_h100 = "H100" in device_name or "H200" in device_name  # an H200 has the H100's bf16 peak (more bandwidth)
    runs = (("baseline", "baseline", {}), ("default stack", "", {}), ("doc isolation", "", dict(DOC_ISOLATION="1")))
    for label, preset, extra in runs:
        env = dict(common_env(args, f"check_bench_{label.replace(' ', '_')}", {} if preset else TINY_STACK),
                   BENCHMARK_STEPS=str(args.benchmark_steps), **extra)
        if preset:
            env["PRESET"] = preset
        log = run_trainer(env, f"benchmark {label}", workdir, timeout=300)
        rows += compile_rows(label, log)
        attention = re.search(r"^world_size:.* attention:(\w+) ", log, re.M).group(1)
        for looping, ms, tokens, mfu, memory in re.findall(
                r"^benchmark: looping:(\w+) steps:\d+ ms_per_step:([\d.]+) tokens_per_s_per_gpu:(\d+) "
                r"(?:mfu:([\d.]+)% )?(?:peak_memory_allocated:(\d+)MiB)?", log, re.M):
            figure = (f"{float(ms):.1f} ms/step, {int(tokens):,} tok/s, MFU {mfu or '-'}%, peak {memory or '-'} MiB, "
                      f"attention {attention}")
            target, verdict = "", ""
            if label == "default stack" and looping == "False":
                target = f">= {TARGETS['tokens_per_s'] / 1e6:.1f} M tok/s, >= {TARGETS['mfu']:.0f}% MFU (H100)"
                met = int(tokens) >= TARGETS["tokens_per_s"] and float(mfu or 0) >= TARGETS["mfu"]
                verdict = ("met" if met else "NOT MET") if on_h100 else "n/a (not an H100)"
            rows.append((f"{label}: looping:{looping}", figure, target, verdict))
    return rows


def final_seconds(log, name):
    match = re.search(rf"^{name} val_loss:[\d.]+ val_bpb:([\d.]+).* eval_time:(\d+)ms", log, re.M)
    return (float(match.group(1)), int(match.group(2)) / 1000) if match else (None, None)


def training_rows(args, workdir, device_name):
    env = dict(common_env(args, "check_train"), MAX_WALLCLOCK_SECONDS=str(args.train_seconds), TTT_ENABLED="1",
               TTT_METHOD="chunk", ITERATIONS="100000")
    if args.tiny:
        env.update(TINY_TRAINING)
    log = run_trainer(env, "two-minute training", workdir, timeout=int(args.train_seconds) + 420)
    val_tokens = int(re.search(r"^val_tokens:(\d+)", log, re.M).group(1))
    summary = json.loads(re.search(r"^summary_json: (.*)$", log, re.M).group(1))
    roundtrip = next(value for key, value in summary.items() if key.endswith("_roundtrip_val_bpb"))
    rows = [("training: steps in the budget", f"{summary['steps']} steps of {env['TRAIN_BATCH_TOKENS']} tokens, "
             f"{summary['step_avg_ms']:.1f} ms/step", "", ""),
            ("training: round-trip val_bpb", f"{roundtrip:.4f} (pre-quant {summary['pre_quant_val_bpb']:.4f})", "", "")]
    projected_total = 0.0
    for name, label in (("final_sliding_window", "sliding window"), ("final_ttt", "TTT")):
        bpb, seconds = final_seconds(log, name)
        if seconds is None:
            rows.append((f"evaluation: {label}", "not run", "", ""))
            continue
        rate = val_tokens / seconds
        projected = FINEWEB_VAL_TOKENS / (rate * GPUS)
        projected_total += projected
        rows.append((f"evaluation: {label}", f"val_bpb {bpb:.4f}, {rate:,.0f} tok/s on one device (its compile "
                     f"included), projected {projected:.0f} s for the full split on {GPUS}", "", ""))
    verdict = "met" if projected_total <= TARGETS["eval_s"] else "NOT MET"
    rows.append(("evaluation: sliding + TTT projected on 8 GPUs", f"{projected_total:.0f} s",
                 f"<= {TARGETS['eval_s']:.0f} s (8xH100)", verdict if re.search("H100|H200", device_name) else "n/a (not an H100)"))
    calibration = re.search(r"^gptq_calibration: .* time:([\d.]+)s", log, re.M)
    quantize = re.search(r"^quantization: .* time:([\d.]+)s", log, re.M)
    rows.append(("GPTQ at full size", f"calibration {calibration.group(1) if calibration else '-'} s, quantization "
                 f"{quantize.group(1) if quantize else '-'} s", "", ""))
    return rows


def markdown(rows, args, started):
    header = (f"GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{time.perf_counter() - started:.0f} s: `python3 benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`\n\n")
    lines = ["| check | figure | target | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]
    return header + "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda") if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    if not args.tiny and device.type != "cuda":
        sys.exit("gpu_check: no CUDA device here; --tiny runs the CPU miniature")
    workdir = Path(args.out).resolve().parent / "gpu_check_runs"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = environment_rows(device, args.tiny)
    device_name = rows[1][1]
    rows += attention_rows(device, args.tiny)
    for phase in (benchmark_rows, training_rows):
        try:
            rows += phase(args, workdir, device_name)
        except (RuntimeError, subprocess.TimeoutExpired, AttributeError) as error:  # report it; the rest still runs
            rows.append((phase.__name__, f"FAILED: {str(error).splitlines()[0][:200]}", "", "FAILED"))
            print(error, file=sys.stderr)
    table = markdown(rows, args, started)
    Path(args.out).write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
