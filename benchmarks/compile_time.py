"""Compile time of the model under each COMPILE_SCOPE: the first forward and backward of a training micro-batch
(where torch.compile builds its graphs), then the time of the next steps, each scope in a fresh process with an
empty inductor cache, so nothing is reused between them.

    python3 benchmarks/compile_time.py                              # the default stack at width 128, on this device
    python3 benchmarks/compile_time.py --model-dim 512 --vocab-size 8192 --seq-len 2048 --batch 48   # on a GPU

The model is the default stack (looped, as after the recurrence switches on) with the width, vocabulary and batch
given; bf16 autocast on any device. Prints one line per scope: graphs built, first step (compile) and ms per step.
"""

import argparse
import json
import os
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
    parser.add_argument("--scope", choices=["block", "model"], help="(internal) measure this scope in this process")
    return parser.parse_args(argv)


def measure(args):
    """{graphs, first_step_s, step_ms} of one scope, in this process."""
    import torch
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
    step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return dict(graphs=T.compiled_graphs(), first_step_s=first,
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


if __name__ == "__main__":
    main()
