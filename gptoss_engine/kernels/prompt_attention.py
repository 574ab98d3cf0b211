"""Full-window attention of one long prompt chunk through cuDNN's fused attention, with gpt-oss's sinks.

A long prompt with nothing cached spends most of its attention time in the full-window layers,
where every query sees every earlier key: a dense causal problem with no block table to read.
cuDNN's fused attention (torch's `_scaled_dot_product_cudnn_attention`; on the H100 an sm_90 wgmma
kernel) runs it faster than the paged Triton kernel: an 8k layer 1.31 ms against 1.70-1.78 (PERF_NOTES
v23). It knows nothing of sinks, so it runs without them and returns each row's log-sum-exp; a sink
is one more logit in a row's softmax denominator with no value, which scales that row's output by

    exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink),

applied here by one Triton pass that also lays the output out as [T, heads, D] for o_proj.

Only the step shape it is exact for takes this path (`takes`): one sequence, a full-window layer, a
chunk of at least MIN_TOKENS. After a cached prefix (a long prompt's later chunks, a prefix-cache hit)
the chunk's own keys still take cuDNN's top-left causal mask, and the prefix's keys, copied out of the
pool (prefix_kv), take a second call with no mask; the two calls' rows join in one softmax by their
log-sum-exps, the sink in the same denominator (_merge_kernel). MIN_TOKENS is the
shortest length measured (PERF_NOTES v23): a 1k layer took 84 us without the sink fold against the
paged kernel's 130, a whole 1k prefill came out even (28.52 against 28.75 ms), 8k 127.57 against
132.11. q, k and v are read from the fused projection output, with k rotated in place there by
rotary.rotary_store_kv(k_in_place=True); the KV cache is still written for the steps after.

The cached-prefix form: the second 8k chunk of a 16k prompt 151.8 ms against the paged kernel's
161.7 (20b, PERF_NOTES v25); the prefix copy is 2 x 8 MB a layer at 8k cached. MIN_TOKENS holds there
too: after 8k cached, 512 new tokens came out even and 256 slower.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gptoss_engine.step_batch import StepBatch

MIN_TOKENS = 1024
# The longest cached prefix this path takes. Its k and v are copied out of the pool for each layer
# (prefix_kv: 2 x 64 MB at 32k positions of the 20b / 120b layout, beside the step's activations in
# the 10% of free memory the KV pool leaves), and past 8k it was not measured; longer prefixes stay
# on the paged kernel, which reads them in place.
MAX_PREFIX = 32768
ENABLED = True   # False: every prompt takes the paged kernel (the bench's A/B)


def _cudnn(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, scale: float,
           causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's attention of [1, heads, T, D] views (causal: top-left aligned), GQA read from k4/v4's
    fewer heads: (output [1, Hq, T, D], natural-log log-sum-exp of each row)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q4, k4, v4, None, True, 0.0, causal, False,
                                                             scale=scale)
    return out[0], out[1]


@functools.cache
def _available(device: torch.device, hq: int, hkv: int, d: int) -> bool:
    """sm_90, and a cuDNN through this torch that runs these head counts as this module calls it and
    returns what it expects: tried once on 16 random tokens against torch's own arithmetic (output
    and natural-log log-sum-exp). torch is not pinned (>= 2.5), and a version whose cuDNN attention
    lacks GQA, this signature or this head size then leaves every prompt on the paged kernel instead
    of failing a request mid-prefill."""
    if torch.cuda.get_device_capability(device) < (9, 0) or not torch.backends.cudnn.is_available():
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(16, hq + 2 * hkv, d, device=device, generator=gen).to(torch.bfloat16)
    q4, k4, v4 = (x.unsqueeze(0).transpose(1, 2) for x in (qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]))
    try:
        out, lse = _cudnn(q4, k4, v4, d ** -0.5)
    except (AttributeError, RuntimeError, TypeError):
        return False
    scores = torch.einsum("bhqd,bhkd->bhqk", q4.float(), k4.float().repeat_interleave(hq // hkv, 1)) * d ** -0.5
    scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool, device=device).triu(1), float("-inf"))
    want = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v4.float().repeat_interleave(hq // hkv, 1))
    return (out.shape == want.shape and lse.numel() == hq * 16
            and torch.allclose(out.float(), want, atol=2e-2, rtol=2e-2)
            and torch.allclose(lse.float().reshape(hq, 16), scores.logsumexp(-1)[0], atol=2e-2, rtol=2e-2))


def cached_positions(batch: StepBatch) -> int:
    """Positions of the one sequence already in the cache before this step's chunk."""
    return batch.max_seq_len - batch.max_query_len


def takes(x: torch.Tensor, batch: StepBatch, window: int | None, hq: int, hkv: int, d: int) -> bool:
    """Whether this layer's attention of this step (hq query and hkv key/value heads of d) is one
    prompt chunk's full-window attention (after a cached prefix or not), on a GPU whose cuDNN runs it;
    x is the layer's q or the q|k|v projection output it is a view of (its device and dtype are read)."""
    return (ENABLED and window is None and x.is_cuda and x.dtype == torch.bfloat16 and batch.num_seqs == 1
            and batch.max_query_len >= MIN_TOKENS and cached_positions(batch) <= MAX_PREFIX
            and _available(x.device, hq, hkv, d))


def prefix_kv(pool: torch.Tensor, layer_in_pool: int, table: torch.Tensor,
              cached: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k and v of a sequence's first `cached` positions, [cached, kv_heads, D] each, copied out of
    the block-major pool through its block-table row (kv_layout: pool [blocks, layers, 2, bs, kv_heads,
    D]). A copy: cuDNN needs one stride between keys, and consecutive blocks are anywhere in the pool.
    k and v are gathered one at a time straight into their final layout (the gather's [n, bs, kv_heads,
    D] is already key-major), so nothing beyond the two results is allocated. The pool's blocks stay the
    block manager's; the copies are this layer's, freed when its attention call returns."""
    bs = pool.shape[3]
    idx = table[:-(-cached // bs)].long()
    k, v = (pool[idx, layer_in_pool, i].reshape(-1, *pool.shape[4:])[:cached] for i in (0, 1))
    return k, v


@triton.jit
def _merge_kernel(oa_ptr, lsea_ptr, ob_ptr, lseb_ptr, sinks_ptr, out_ptr, T, s_oh, s_ot, s_lh, s_outt, s_outh,
                  D: tl.constexpr, BLOCK_T: tl.constexpr, TWO: tl.constexpr):
    """out[t, h] = the sink-less partials' rows (a over one key range, b over another when TWO, both
    [heads, T, D] with the same strides) joined in one softmax with the sink: each weighs exp(its lse),
    the sink exp(sink) in the denominator only. One partial: o * sigmoid(lse - sink)."""
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < T
    d = tl.arange(0, D)
    sink = tl.load(sinks_ptr + h).to(tl.float32)
    at = h * s_oh + t[:, None].to(tl.int64) * s_ot + d[None, :]
    lse_a = tl.load(lsea_ptr + h * s_lh + t, mask=ok, other=0.0)
    o = tl.load(oa_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    if TWO:
        lse_b = tl.load(lseb_ptr + h * s_lh + t, mask=ok, other=0.0)
        m = tl.maximum(tl.maximum(lse_a, lse_b), sink)
        wa, wb = tl.exp(lse_a - m), tl.exp(lse_b - m)
        o_b = tl.load(ob_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
        o = (o * wa[:, None] + o_b * wb[:, None]) / (wa + wb + tl.exp(sink - m))[:, None]
    else:
        o = o * tl.sigmoid(lse_a - sink)[:, None]
    tl.store(out_ptr + t[:, None].to(tl.int64) * s_outt + h * s_outh + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=ok[:, None])


def _rows(o4: torch.Tensor, lse: torch.Tensor, hq: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's output with a unit last stride and its lse as contiguous fp32 [hq, T]."""
    o4 = o4 if o4.stride(3) == 1 else o4.contiguous()
    lse = lse.reshape(hq, T)
    return o4, (lse if lse.dtype == torch.float32 and lse.stride(1) == 1 else lse.float().contiguous())


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
                     k_prefix: torch.Tensor | None = None, v_prefix: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] (rotated, strided views are fine: last dimension contiguous)
    -> [T, Hq, D]: causal attention of token t over keys 0..t, with the sinks. With k_prefix and
    v_prefix ([P, Hkv, D], a cached prefix's keys: prefix_kv), token t sits at position P + t and also
    sees every prefix key: a second cuDNN call over those, with no mask, whose rows join the causal
    call's in one softmax by their log-sum-exps (torch's causal mask is top-left, so one call over
    P + T keys would hide the prefix from the first rows)."""
    T, hq, d = q.shape
    hkv = k.shape[1]
    if hq % hkv or k.shape != v.shape or k.shape[0] != T or k.shape[2] != d:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not one GQA attention")
    if (k_prefix is None) != (v_prefix is None) or (k_prefix is not None and (
            k_prefix.shape != v_prefix.shape or k_prefix.shape[1:] != k.shape[1:])):   # type: ignore[union-attr]
        raise ValueError("k_prefix and v_prefix go together, [P, Hkv, D] like k")
    # [1, heads, T, D] views of the projection output; cuDNN reads the GQA group's shared k/v head
    # itself (no copy of k and v per query head: that copy cost 93 us a layer at 8k, PERF_NOTES v23).
    q4, k4, v4 = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
    o_a, lse_a = _rows(*_cudnn(q4, k4, v4, scale), hq, T)
    o_b, lse_b = o_a, lse_a
    if k_prefix is not None and k_prefix.shape[0] > 0:
        kp4, vp4 = (x.unsqueeze(0).transpose(1, 2) for x in (k_prefix, v_prefix))   # type: ignore[union-attr]
        o_b, lse_b = _rows(*_cudnn(q4, kp4, vp4, scale, causal=False), hq, T)
        if o_b.stride() != o_a.stride():     # the merge reads both with one set of strides
            o_a, o_b = o_a.contiguous(), o_b.contiguous()
    out = torch.empty((T, hq, d), dtype=q.dtype, device=q.device)
    block_t = 64
    _merge_kernel[(triton.cdiv(T, block_t), hq)](
        o_a, lse_a, o_b, lse_b, sinks, out, T, o_a.stride(1), o_a.stride(2), lse_a.stride(0), out.stride(0),
        out.stride(1), D=d, BLOCK_T=block_t, TWO=o_b is not o_a, num_warps=4)
    return out
