"""Where a training step's time goes: a run of train_gpt.py exactly as BENCHMARK_STEPS runs it (the same settings,
data, compile and untimed warmup), whose timed steps run under torch.profiler instead of the clock.

    BENCHMARK_STEPS=3 DATA_PATH=... TOKENIZER_PATH=... python3 benchmarks/profile_step.py [--top 15]

For each training layout (without and with depth recurrence) the run's log gains, per step:
    profile: looping:L step_ms:S busy_ms:B idle:I%          wall time, summed kernel time, the device's idle share
    profile: looping:L kind:K ms:M share:P%                 matmul, attention, inductor's kernels, ... (KINDS)
    profile: looping:L rank:R ms:M share:P% calls:C name:N  the top kernels by their own time
On a GPU the times are the device's kernels; on the CPU (where nothing runs asynchronously) the operators' own CPU
time. The GPU check reads these lines (its `profile` phase).
"""

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402

# Kernel kinds by name, first match first: the collectives, our fused Triton kernels, inductor's generated kernels
# (templates are its matmuls and FlexAttention; pointwise; reductions and persistent reductions), attention
# kernels, cuBLAS/CUTLASS GEMMs, then ATen's copies, reductions and elementwise kernels.
KINDS = (("comm", r"nccl|gloo|all_reduce|reduce_scatter|all_gather"),
         ("fused_kernels", r"leaky_relu2|softcapped_ce"),
         ("inductor_template", r"^triton_tem"),
         ("inductor_pointwise", r"^triton_poi"),
         ("inductor_reduction", r"^triton_(red|per)"),
         ("inductor_other", r"^triton"),
         ("attention", r"flash|fmha|attention|sdpa|flex"),
         ("matmul", r"gemm|cutlass|xmma|nvjet|matmul|\bmm\b|addmm|bmm|sm90_|sm80_|linear"),
         ("copy", r"copy|memcpy|memset|cat|fill|clone"),
         ("reduce", r"reduce|norm|sum|mean|softmax|max"),
         ("elementwise", r"elementwise|vectorized|unrolled|mul|add|div|where|tanh|sigmoid|relu|pow|sqrt|exp"))


def kind_of(name):
    return next((kind for kind, pattern in KINDS if re.search(pattern, name, re.I)), "other")


def own_times(events, on_cuda):
    """[(name, own microseconds, calls)] of the device's kernels (CUDA) or the CPU operators' own time."""
    rows = []
    for event in events:
        if on_cuda:
            own = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            own = event.self_cpu_time_total
        if own > 0:
            rows.append((event.key, own, event.count))
    return sorted(rows, key=lambda row: -row[1])


def profiled_benchmark(top):
    """Replaces train_gpt's `benchmark` phase: per layout, one untimed step, then BENCHMARK_STEPS profiled ones."""
    def benchmark(run, data, model):
        on_cuda, steps = run.device.type == "cuda", run.hp.benchmark_steps
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        for looping in ([False, True] if run.hp.num_loops else [False]):
            model.net.looping = looping
            T.train_step(run, model, data.train_loader, 0, lr_scale=1.0)
            T.synchronize(run)
            with profile(activities=activities) as profiler:
                start = time.perf_counter()
                for step in range(1, steps + 1):
                    T.train_step(run, model, data.train_loader, step, lr_scale=1.0)
                T.synchronize(run)
                step_ms = 1000 * (time.perf_counter() - start) / steps
            if on_cuda:
                events = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            else:  # operators only: the profiler's own and Python's frames are not work
                events = [e for e in profiler.key_averages() if e.key.startswith(("aten::", "train_gpt::"))]
            rows = own_times(events, on_cuda)
            busy_ms = sum(own for _, own, _ in rows) / 1000 / steps
            run.log(f"profile: looping:{looping} step_ms:{step_ms:.2f} busy_ms:{busy_ms:.2f} "
                    f"idle:{max(0.0, 100 * (1 - busy_ms / step_ms)):.1f}%")
            by_kind = {}
            for name, own, _ in rows:
                by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0) + own
            for kind, own in sorted(by_kind.items(), key=lambda item: -item[1]):
                ms = own / 1000 / steps
                run.log(f"profile: looping:{looping} kind:{kind} ms:{ms:.3f} share:{100 * ms / busy_ms:.1f}%")
            for rank, (name, own, calls) in enumerate(rows[:top], 1):
                ms = own / 1000 / steps
                run.log(f"profile: looping:{looping} rank:{rank} ms:{ms:.3f} share:{100 * ms / busy_ms:.1f}% "
                        f"calls:{calls // steps} name:{' '.join(name.split())[:100]}")
    return benchmark


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=15, help="how many kernels to list by their own time")
    args = parser.parse_args()
    hp, _ = T.Hyperparameters.from_env()
    if not hp.benchmark_steps:
        sys.exit("profile_step: set BENCHMARK_STEPS (the profiled steps per layout)")
    T.benchmark = profiled_benchmark(args.top)  # main() calls it after the warmup, as it calls the timed benchmark
    T.main()


if __name__ == "__main__":
    main()
