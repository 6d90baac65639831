"""Compile time of the model under each COMPILE_SCOPE: the first forward and backward of a training micro-batch
(where torch.compile builds its graphs), then the time of the next steps, each scope in a fresh process with an
empty inductor cache, so nothing is reused between them.

    python3 benchmarks/compile_time.py                              # the default stack at width 128, on this device
    python3 benchmarks/compile_time.py --model-dim 512 --vocab-size 8192 --seq-len 2048 --batch 48   # on a GPU

The model is the default stack (looped, as after the recurrence switches on) with the width, vocabulary and batch
given; bf16 autocast on any device. Prints one line per scope: graphs built, first step (compile) and ms per step.
Under COMPILE_SCOPE=model, whose forward and backward are one graph each, a second line counts the kernels a
micro-step launches, read from the code inductor generated: its fused pointwise and reduction kernels (C++ on the
CPU, Triton on a GPU), the matmuls, attention and any other call, per graph; `--kernels` lists the fused ones by
the operators each fuses.
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dim", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--kernels", action="store_true", help="list COMPILE_SCOPE=model's fused kernels")
    parser.add_argument("--scope", choices=["block", "model"], help="(internal) measure this scope in this process")
    return parser.parse_args(argv)


# A kernel launch in inductor's generated code: a fused kernel (cpp_fused_... on the CPU, triton_{poi,red,per}_...
# on a GPU, triton_tem_... for its matmul templates), an extern matmul, or an operator it calls as is.
LAUNCH = re.compile(r"^\s+(?:[\w, ]+ = )?(cpp_fused_\w+|triton_\w+|extern_kernels\.\w+|torch\.ops\.[\w.]+)(?:\.run)?\(",
                    re.M)
KINDS = (("fused", r"^(cpp_fused_|triton_(poi|red|per)_)"), ("attention", r"attention|flash|flex"),
         ("matmul", r"^(extern_kernels\.|triton_tem_)"), ("other", r""))


def kernel_launches(codes):
    """[(graph's launches by kind, its fused kernels' names)] of each graph's generated code, in compile order."""
    graphs = []
    for code in codes:
        names = LAUNCH.findall(code)
        kinds = collections.Counter(next(kind for kind, pattern in KINDS if re.search(pattern, name)) for name in names)
        graphs.append((dict(kinds), [name for name in names if re.search(KINDS[0][1], name)]))
    return graphs


def measure(args):
    """{graphs, first_step_s, kernels, step_ms, device} of one scope, in this process."""
    import torch
    from torch._inductor.utils import run_and_get_code
    sys.path.insert(0, str(REPO))
    import train_gpt as T
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heads = max(args.model_dim // 64, 2)
    hp = T.Hyperparameters(model_dim=args.model_dim, num_heads=heads, num_kv_heads=heads // 2,
                           vocab_size=args.vocab_size, train_seq_len=args.seq_len)
    torch.manual_seed(0)
    model = T.GPT(hp).to(device)
    model.looping = True
    compiled = T.train_model_of(model, use_compile=True, varlen=False, scope=args.scope)
    tokens = torch.randint(hp.vocab_size, (args.batch, args.seq_len + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = compiled(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    start = time.perf_counter()
    _, codes = run_and_get_code(step)  # the first step, where the graphs are built
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return dict(graphs=T.compiled_graphs(), first_step_s=first, kernels=kernel_launches(codes),
                step_ms=1000 * (time.perf_counter() - start) / args.steps, device=str(device))


def main(argv=None):
    args = parse_args(argv)
    if args.scope:
        print(json.dumps(measure(args)))
        return
    for scope in ("block", "model"):
        with tempfile.TemporaryDirectory() as cache:
            command = [sys.executable, __file__, "--scope", scope] + (argv if argv is not None else sys.argv[1:])
            result = subprocess.run(command, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
                                    capture_output=True, text=True, check=True)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"COMPILE_SCOPE={scope}: {figures['graphs']} graphs, "
              f"first step (compile) {figures['first_step_s']:.1f} s, "
              f"then {figures['step_ms']:.1f} ms/step on {figures['device']}", flush=True)
        if scope == "model":
            counts = "; ".join(f"{role}: " + " ".join(f"{kind}:{n}" for kind, n in kinds.items())
                               for role, (kinds, _) in zip(("forward", "backward"), figures["kernels"]))
            print(f"COMPILE_SCOPE=model: kernels a micro-step launches, {counts}", flush=True)
            for role, (_, names) in zip(("forward", "backward"), figures["kernels"] if args.kernels else []):
                for name, n in collections.Counter(names).most_common():
                    print(f"  {role} {n}x {name}", flush=True)


if __name__ == "__main__":
    main()
