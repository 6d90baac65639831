"""Stand-ins for FlashAttention's Python packages, for tests on machines without CUDA: modules named like FA3's
(`flash_attn_interface`) and FA2's (`flash_attn`) with their documented `flash_attn_func` signatures and layouts,
computed with PyTorch SDPA. Like the real kernels they take (batch, seqlen, heads, head_dim) tensors in fp16 or
bf16 only, all of one dtype, and K/V with fewer heads (grouped-query) when the heads divide.

The variable-length entry point is, as in the FA2 (2.7+) and FA3 builds that torch.compile traces, a torch.library
custom op with a fake (shape-only) implementation and a registered backward, so a compiled graph holds it as one
opaque call whose cu_seqlens it never reads."""

import math
import types

import torch
import torch.nn.functional as F


def _check(q, k, v):
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"FlashAttention only support fp16 and bf16 data type "
                           f"(got q:{q.dtype} k:{k.dtype} v:{v.dtype})")
    if q.dim() != 4 or k.shape != v.shape or q.size(2) % k.size(2):
        raise RuntimeError(f"bad shapes q:{tuple(q.shape)} k:{tuple(k.shape)} v:{tuple(v.shape)}")


def _attention(q, k, v, softmax_scale, causal):
    """out (B, T, H, D) and the log-sum-exp (B, H, T) in fp32, as FA returns it."""
    _check(q, k, v)
    groups = q.size(2) // k.size(2)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)))
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.size(-1))
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
    scores = (qh.float() @ kh.float().transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return out.transpose(1, 2), torch.logsumexp(scores, dim=-1)


def fa3_module(returns_lse=False):
    """FA3's `flash_attn_interface`; some builds return (out, softmax_lse), others out alone."""
    module = types.ModuleType("flash_attn_interface")
    module.calls, module.returns_lse = [], returns_lse

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), softcap=0.0, deterministic=False):
        module.calls.append(dict(shape=tuple(q.shape), kv_heads=k.size(2), causal=causal))
        out, lse = _attention(q, k, v, softmax_scale, causal)
        return (out, lse) if returns_lse else out

    module.flash_attn_func = flash_attn_func
    return module


def fa2_module():
    """FA2's `flash_attn` package (version 2.x)."""
    module = types.ModuleType("flash_attn")
    module.__version__ = "2.7.4-standin"
    module.calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):
        if dropout_p:
            raise NotImplementedError("the stand-in has no dropout")
        module.calls.append(dict(shape=tuple(q.shape), kv_heads=k.size(2), causal=causal))
        out, lse = _attention(q, k, v, softmax_scale, causal)
        return (out, lse, None) if return_attn_probs else out

    module.flash_attn_func = flash_attn_func
    return module


VARLEN_CALLS = []  # (number of sequences, causal) of every varlen call, recorded when it runs, not when traced


def _sequences(cu_seqlens, total):
    if cu_seqlens.dtype != torch.int32:
        raise RuntimeError("cu_seqlens must be int32")
    bounds = cu_seqlens.tolist()
    if bounds[-1] != total or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise RuntimeError(f"cu_seqlens {bounds} do not cover the {total} tokens in order")
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@torch.library.custom_op("flash_standins::varlen_forward", mutates_args=())
def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                   causal: bool) -> torch.Tensor:
    """(total, H, D) tensors of concatenated sequences, each attended on its own."""
    _check(q[None], k[None], v[None])
    VARLEN_CALLS.append((cu_seqlens.numel() - 1, causal))
    out = torch.zeros_like(q)
    for a, b in _sequences(cu_seqlens, q.size(0)):
        out[a:b] = _attention(q[None, a:b], k[None, a:b], v[None, a:b], scale, causal)[0][0]
    return out


@torch.library.custom_op("flash_standins::varlen_backward", mutates_args=())
def varlen_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of varlen_forward, by the attention backward written out in fp32 (a custom op runs below
    autograd, so it cannot differentiate its own forward): with P = softmax(S) and O = P V, dV = P^T dO and
    dS = P * (dO V^T - rowsum(dO * O)); K/V heads shared by a group of query heads sum the group's gradients."""
    groups = q.size(1) // k.size(1)
    dq, dk, dv = (torch.zeros(t.shape[0], q.size(1), t.shape[2], dtype=torch.float32) for t in (q, k, v))
    for a, b in _sequences(cu_seqlens, q.size(0)):
        Q = q[a:b].float().transpose(0, 1)
        K, V = (t[a:b].float().repeat_interleave(groups, 1).transpose(0, 1) for t in (k, v))
        dO = grad[a:b].float().transpose(0, 1)
        S = Q @ K.transpose(-1, -2) * scale
        if causal:
            S = S.masked_fill(torch.ones_like(S, dtype=torch.bool).triu(1), float("-inf"))
        P = S.softmax(-1)
        dS = P * (dO @ V.transpose(-1, -2) - (dO * (P @ V)).sum(-1, keepdim=True))
        dq[a:b] = (dS @ K * scale).transpose(0, 1)
        dk[a:b] = (dS.transpose(-1, -2) @ Q * scale).transpose(0, 1)
        dv[a:b] = (P.transpose(-1, -2) @ dO).transpose(0, 1)
    fold = lambda g: g.view(g.size(0), -1, groups, g.size(2)).sum(2)  # query heads back onto their K/V head
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@varlen_forward.register_fake
def _(q, k, v, cu_seqlens, scale, causal):
    return torch.empty_like(q)


@varlen_backward.register_fake
def _(grad, q, k, v, cu_seqlens, scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_inputs(ctx, inputs, output):
    q, k, v, cu_seqlens, ctx.scale, ctx.causal = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)


def _varlen_grads(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    return *varlen_backward(grad, q, k, v, cu_seqlens, ctx.scale, ctx.causal), None, None, None


varlen_forward.register_autograd(_varlen_grads, setup_context=_save_inputs)


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
    if cu_seqlens_q is not cu_seqlens_k and not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise RuntimeError("the stand-in takes the same cu_seqlens for queries and keys")
    scale = softmax_scale if softmax_scale is not None else q.size(-1) ** -0.5
    return torch.ops.flash_standins.varlen_forward(q, k, v, cu_seqlens_q, scale, causal)


def with_varlen(module, fa3):
    """Adds `flash_attn_varlen_func` with FA3's (no dropout) or FA2's signature; returns the module."""
    def fa3_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False,
                   **_):
        out = _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
        return (out, None) if module.returns_lse else out

    def fa2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                   causal=False, **_):
        return _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)

    module.flash_attn_varlen_func = fa3_varlen if fa3 else fa2_varlen
    return module
