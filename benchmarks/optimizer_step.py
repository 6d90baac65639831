"""Optimizer step time and optimizer memory: banked Parallel Muon against one Muon update per matrix.

    PRESET=smoke python3 benchmarks/optimizer_step.py                      # one process (CPU or one GPU)
    PRESET=smoke torchrun --standalone --nproc_per_node=2 benchmarks/optimizer_step.py

The model comes from the same env vars as train_gpt.py (PRESET=smoke: the CPU miniature; no preset: the full-size
default stack). Gradients are random and fixed, so only the optimizer is timed: the collectives, momentum,
orthogonalization and AdamW of `Optimizers.step`. "per-matrix" puts every matrix in a bank of its own: the same
code without batching or packing, i.e. plain Muon distributed matrix by matrix. "launches/step" is the host's share
of a step: on a GPU the kernels one step launches (torch.profiler), on the CPU the ATen operators it runs, views
excluded (each of which would be at least one launch on a GPU; the orthogonalization runs eager there).
"""

import argparse
import collections
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402


def build(hp, device, rank, world_size, banked):
    torch.manual_seed(0)
    model = T.GPT(hp).to(device)
    compiled = device.type == "cuda"  # the orthogonalization, as a compiled GPU run builds it
    optimizers = T.Optimizers(model, hp, rank, world_size, compiled=compiled)
    if not banked:  # re-bank: one matrix per bank
        params = [p for bank in optimizers.banks for p in bank.params]
        optimizers.banks = [T.ParameterBank([p], world_size) for p in params]
        optimizers.muon = T.ParallelMuon(optimizers.banks, hp, rank, world_size, compiled=compiled)
    generator = torch.Generator(device=device).manual_seed(1)
    grads = {p: torch.randn(p.shape, generator=generator, device=device) * 1e-3 for p in model.parameters()}
    return model, optimizers, grads


class DispatchedOperators(TorchDispatchMode):
    """Counts the ATen operators that run, views excluded: on a GPU each one is at least a kernel launch."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def set_grads(grads):
    for p, g in grads.items():
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def time_steps(optimizers, grads, steps, device):
    times = []
    for _ in range(steps):
        set_grads(grads)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizers.step(lr_scale=1.0, momentum=0.95)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        optimizers.zero_grad()
    return 1000 * sorted(times[2:])[len(times[2:]) // 2]  # the median after two warmup steps


def launches_per_step(optimizers, grads, device):
    """One more step's kernels (CUDA) or ATen operators (CPU)."""
    set_grads(grads)
    if device.type == "cuda":
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            optimizers.step(lr_scale=1.0, momentum=0.95)
            torch.cuda.synchronize()
        launches = sum(e.count for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        with DispatchedOperators() as dispatched:
            optimizers.step(lr_scale=1.0, momentum=0.95)
        launches = sum(dispatched.counts.values())
    optimizers.zero_grad()
    return launches


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    hp, _ = T.Hyperparameters.from_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
              else torch.device("cpu"))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = []
    for banked in (True, False):
        for int8 in (False, True):
            hp_variant = dataclasses.replace(hp, muon_momentum_int8=int8)
            model, optimizers, grads = build(hp_variant, device, rank, world_size, banked)
            ms = time_steps(optimizers, grads, args.steps, device)
            launches = launches_per_step(optimizers, grads, device)
            adam_bytes = optimizers.adam_state_bytes()
            rows.append((("banked" if banked else "per-matrix") + (", int8 momentum" if int8 else ""),
                         len(optimizers.banks), ms, launches, optimizers.muon.momentum_bytes(), adam_bytes))
    if rank == 0:
        matrices = sum(bank.size for bank in optimizers.banks)
        print(f"device:{device.type} world_size:{world_size} matrices:{matrices} "
              f"matrix_params:{sum(b.weights.numel() for b in optimizers.banks)} muon:{hp.muon_orthogonalizer}")
        print("| variant | banks | ms/step (median) | launches/step | Muon momentum bytes/rank "
              "| AdamW state bytes/rank |")
        print("|---|---|---|---|---|---|")
        for name, banks, ms, launches, momentum, adam in rows:
            print(f"| {name} | {banks} | {ms:.2f} | {launches} | {momentum:,} | {adam:,} |")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
