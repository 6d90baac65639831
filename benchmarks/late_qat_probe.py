"""Does a late-QAT switch kept as a class attribute reach a compiled model? The PR #549 family (and the PartialRoPE
record before it) turns QAT on mid-run by setting `CastedLinear._qat_enabled = True` after `torch.compile`.

    python3 benchmarks/late_qat_probe.py            # eager and inductor backends, the installed torch

The layer below restates that pattern (the class flag read in forward, the row-max int6 fake quantization with its
1/31 floor, the straight-through estimator). The probe compiles it as the records do (fullgraph, static shapes),
runs it, sets the flag, and runs it again: if the second output equals eager QAT, dynamo guarded on the flag and
recompiled; if it equals the first, the flag was frozen into the graph and QAT never ran.
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class FlaggedLinear(nn.Linear):
    qat_enabled = False

    def forward(self, x):
        w = self.weight.to(x.dtype)
        if FlaggedLinear.qat_enabled and self.training:
            with torch.no_grad():
                scale = (self.weight.float().abs().amax(dim=1) / 31.0).clamp_min(1.0 / 31.0)
                w_q = (torch.clamp(torch.round(self.weight.float() / scale[:, None]), -32, 31) * scale[:, None])
            w = w + (w_q.to(x.dtype) - w).detach()
        return F.linear(x, w)


def probe(backend):
    torch.manual_seed(0)
    FlaggedLinear.qat_enabled = False
    layer = FlaggedLinear(16, 16, bias=False).train()
    x = torch.randn(4, 16)
    compiled = torch.compile(layer, dynamic=False, fullgraph=True, backend=backend)
    before = compiled(x)
    FlaggedLinear.qat_enabled = True
    after, eager = compiled(x), layer(x)
    torch._dynamo.reset()
    if torch.equal(after, eager) and not torch.equal(after, before):
        return "recompiled: QAT runs"
    return "frozen: QAT never runs" if torch.equal(after, before) else "neither (unexpected)"


def main():
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    for backend in ("eager", "inductor"):
        print(f"{backend}: {probe(backend)}", flush=True)


if __name__ == "__main__":
    main()
