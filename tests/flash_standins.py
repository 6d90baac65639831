"""Stand-ins for FlashAttention's Python packages, for tests on machines without CUDA: modules named like FA3's
(`flash_attn_interface`) and FA2's (`flash_attn`) with their documented `flash_attn_func` signatures and layouts,
computed with PyTorch SDPA. Like the real kernels they take (batch, seqlen, heads, head_dim) tensors in fp16 or
bf16 only, all of one dtype, and K/V with fewer heads (grouped-query) when the heads divide."""

import math
import types

import torch
import torch.nn.functional as F


def _check(q, k, v):
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"FlashAttention only support fp16 and bf16 data type (got q:{q.dtype} k:{k.dtype} v:{v.dtype})")
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


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
    """(total, H, D) tensors of concatenated sequences, each attended on its own."""
    if not torch.equal(cu_seqlens_q, cu_seqlens_k) or cu_seqlens_q.dtype != torch.int32:
        raise RuntimeError("the stand-in takes equal int32 cu_seqlens for queries and keys")
    bounds = cu_seqlens_q.tolist()
    outs = [_attention(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale, causal)[0][0]
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if bounds[-1] != q.size(0):
        raise RuntimeError(f"cu_seqlens ends at {bounds[-1]}, the tensors hold {q.size(0)} tokens")
    return torch.cat(outs)


def with_varlen(module, fa3):
    """Adds `flash_attn_varlen_func` with FA3's (no dropout) or FA2's signature; returns the module."""
    def fa3_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False,
                   **_):
        module.calls.append(dict(varlen=len(cu_seqlens_q) - 1, causal=causal))
        out = _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
        return (out, None) if module.returns_lse else out

    def fa2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                   causal=False, **_):
        module.calls.append(dict(varlen=len(cu_seqlens_q) - 1, causal=causal))
        return _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)

    module.flash_attn_varlen_func = fa3_varlen if fa3 else fa2_varlen
    return module
