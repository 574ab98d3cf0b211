"""cuDNN's fused attention for one prompt chunk's full-window layers (kernels/prompt_attention.py):
parity with the PyTorch reference (sinks, GQA, after a cached prefix), the step shapes it takes and
refuses, and the model with the path on against off."""
from __future__ import annotations

import pytest
import torch

from bench.gpu_bench import BLOCK_SIZE, uniform_batch
from gptoss_engine.attention import paged_attention_reference
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.make_model import random_model
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset
from tests.gpu.test_model_cuda import packed_cuda_copy

pytestmark = pytest.mark.gpu


def _cuda(device: str, interpreted: bool) -> None:
    if interpreted:
        pytest.skip("cuDNN needs a real GPU")


@pytest.mark.parametrize("tokens,hq,hkv,d", [(300, 64, 8, 64), (257, 4, 2, 16), (1000, 8, 8, 64)])
def test_matches_reference(device: str, interpreted: bool, tokens: int, hq: int, hkv: int, d: int) -> None:
    """Causal over the prompt's own keys, the sink in each row's denominator; q/k/v strided views of
    one projection output as the model passes them."""
    _cuda(device, interpreted)
    from gptoss_engine.kernels.prompt_attention import prompt_attention
    gen = torch.Generator().manual_seed(tokens + hq)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen).to(device, torch.bfloat16)
    heads = qkv.view(tokens, hq + 2 * hkv, d)
    q, k, v = heads[:, :hq], heads[:, hq:hq + hkv], heads[:, hq + hkv:]
    sinks = (torch.randn(hq, generator=gen) * 2).to(device, torch.bfloat16)
    blocks = -(-tokens // BLOCK_SIZE)
    pool = torch.zeros(blocks, 1, 2, BLOCK_SIZE, hkv, d, device=device, dtype=torch.bfloat16)
    for b in range(blocks):                      # logical block b at physical block b
        lo = b * BLOCK_SIZE
        n = min(BLOCK_SIZE, tokens - lo)
        pool[b, 0, 0, :n], pool[b, 0, 1, :n] = k[lo:lo + n], v[lo:lo + n]
    batch = uniform_batch(1, 0, tokens, blocks, device)
    want = paged_attention_reference(q, pool, 0, batch.full_block_tables, batch, sinks, d ** -0.5, None)
    got = prompt_attention(q, k, v, sinks, d ** -0.5)
    assert got.shape == (tokens, hq, d) and got.dtype == torch.bfloat16
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < 1e-2, rel
    # The sink matters here (not vacuous): without it the rows differ by more than the tolerance.
    no_sink = prompt_attention(q, k, v, torch.full_like(sinks, -1e4), d ** -0.5)
    assert ((no_sink.float() - want.float()).norm() / want.float().norm()).item() > 5e-2


@pytest.mark.parametrize("cached,new,hq,hkv,d", [(300, 200, 64, 8, 64), (1000, 1100, 8, 2, 64), (17, 40, 4, 4, 16)])
def test_after_a_cached_prefix_matches_reference(device: str, interpreted: bool, cached: int, new: int, hq: int,
                                                 hkv: int, d: int) -> None:
    """A chunk after `cached` positions: the prefix's k, v copied out of shuffled pool blocks (prefix_kv,
    bit-equal), the chunk's own keys causal, both joined with the sink as the reference does."""
    _cuda(device, interpreted)
    from gptoss_engine.kernels.prompt_attention import prefix_kv, prompt_attention
    gen = torch.Generator().manual_seed(cached + new)
    total = cached + new
    blocks = -(-total // BLOCK_SIZE)
    table = torch.randperm(blocks + 5, generator=gen)[:blocks].to(torch.int32)
    k_all, v_all = (torch.randn(total, hkv, d, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    pool = torch.zeros(blocks + 5, 2, 2, BLOCK_SIZE, hkv, d, device=device, dtype=torch.bfloat16)
    for b in range(blocks):
        lo = b * BLOCK_SIZE
        n = min(BLOCK_SIZE, total - lo)
        pool[table[b], 1, 0, :n], pool[table[b], 1, 1, :n] = k_all[lo:lo + n], v_all[lo:lo + n]
    batch = uniform_batch(1, cached, new, blocks, device)
    batch.full_block_tables = table[None].to(device)
    q = torch.randn(new, hq, d, generator=gen).to(device, torch.bfloat16)
    sinks = (torch.randn(hq, generator=gen) * 2).to(device, torch.bfloat16)
    want = paged_attention_reference(q, pool, 1, batch.full_block_tables, batch, sinks, d ** -0.5, None)
    k_pre, v_pre = prefix_kv(pool, 1, batch.full_block_tables[0], cached)
    assert torch.equal(k_pre, k_all[:cached]) and torch.equal(v_pre, v_all[:cached])
    got = prompt_attention(q, k_all[cached:], v_all[cached:], sinks, d ** -0.5, k_pre, v_pre)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < 1e-2, rel
    # Not vacuous: leaving the prefix out gives another answer.
    alone = prompt_attention(q, k_all[cached:], v_all[cached:], sinks, d ** -0.5)
    assert ((alone.float() - want.float()).norm() / want.float().norm()).item() > 5e-2


def test_takes_one_long_prompt_chunk(device: str, interpreted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(device, interpreted)
    from gptoss_engine.kernels import prompt_attention as pa
    monkeypatch.setattr(pa, "MIN_TOKENS", 64)
    q = torch.zeros(1, device=device, dtype=torch.bfloat16)
    heads = (64, 8, 64)
    assert pa.takes(q, uniform_batch(1, 0, 64, 8, device), None, *heads)
    assert not pa.takes(q, uniform_batch(1, 0, 64, 8, device), 128, *heads)         # sliding layer
    assert not pa.takes(q, uniform_batch(1, 0, 63, 8, device), None, *heads)        # short prompt
    assert pa.takes(q, uniform_batch(1, 16, 64, 8, device), None, *heads)           # after a cached prefix
    monkeypatch.setattr(pa, "MAX_PREFIX", 16)
    assert pa.takes(q, uniform_batch(1, 16, 64, 8, device), None, *heads)
    assert not pa.takes(q, uniform_batch(1, 17, 64, 8, device), None, *heads)       # a longer prefix
    assert not pa.takes(q, uniform_batch(2, 0, 64, 8, device), None, *heads)        # two sequences
    assert not pa.takes(q.float(), uniform_batch(1, 0, 64, 8, device), None, *heads)
    monkeypatch.setattr(pa, "ENABLED", False)
    assert not pa.takes(q, uniform_batch(1, 0, 64, 8, device), None, *heads)


def test_a_cudnn_that_fails_its_check_is_not_used(device: str, interpreted: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The once-per-shape check (_available): this GPU's cuDNN passes it for gpt-oss's heads; a cuDNN
    that raises, or returns its log-sum-exp in another base, leaves the prompt on the paged kernel."""
    _cuda(device, interpreted)
    from gptoss_engine.kernels import prompt_attention as pa
    dev = torch.device(device, torch.cuda.current_device())
    assert pa._available.__wrapped__(dev, 64, 8, 64)
    real = pa._cudnn

    def raises(*args: object) -> None:
        raise RuntimeError("no kernel for this configuration")

    monkeypatch.setattr(pa, "_cudnn", raises)
    assert not pa._available.__wrapped__(dev, 64, 8, 64)
    monkeypatch.setattr(pa, "_cudnn", lambda *a: (real(*a)[0], real(*a)[1] * 1.4426950408889634))
    assert not pa._available.__wrapped__(dev, 64, 8, 64)


@pytest.mark.parametrize("chunks", [[700], [400, 300]], ids=["one-chunk", "two-chunks"])
def test_model_prefill_with_and_without(device: str, interpreted: bool, monkeypatch: pytest.MonkeyPatch,
                                        chunks: list[int]) -> None:
    """A prompt's prefill through cuDNN on its full-window layers (in one chunk, or in two: the second
    after the first's cached prefix) gives the paged kernel's logits (within bf16 rounding) and the
    same KV cache, so the decode step after it agrees too."""
    _cuda(device, interpreted)
    from gptoss_engine.kernels import prompt_attention as pa
    monkeypatch.setattr(pa, "MIN_TOKENS", 128)
    config = ModelConfig.from_dict(preset("tiny"))
    gpu = packed_cuda_copy(random_model(config, "cpu", torch.float32, seed=4))
    prompt = 700
    max_blocks = -(-(prompt + 2) // BLOCK_SIZE)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (prompt,), generator=gen).to(device)
    calls = []
    real = pa.prompt_attention
    monkeypatch.setattr(pa, "prompt_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(pa, "ENABLED", enabled)
        kv = KVCache.allocate(config.kv_layout(BLOCK_SIZE, torch.bfloat16), max_blocks, max_blocks, device)
        done = 0
        for n in chunks:
            batch = uniform_batch(1, done, n, max_blocks, device)
            batch.input_ids = ids[done:done + n]
            first = gpu(batch, kv).float()
            done += n
        step = uniform_batch(1, prompt, 1, max_blocks, device)
        step.input_ids = first.argmax(-1)
        runs.append((first, gpu(step, kv).float(), kv.full.clone(), kv.swa.clone()))
    # The path ran for every chunk's full-window layers, and only when on.
    assert len(calls) == len(chunks) * sum(t == "full_attention" for t in config.layer_types)
    (a_first, a_step, a_full, a_swa), (b_first, b_step, b_full, b_swa) = runs
    for got, want in ((a_first, b_first), (a_step, b_step)):
        assert ((got - want).norm() / want.norm()).item() < 2e-2
    # The first layer's cache is written before any attention ran: the same bits either way; the
    # later layers' within the rounding that their inputs carry.
    assert torch.equal(a_swa[:, 0], b_swa[:, 0])
    assert ((a_full.float() - b_full.float()).norm() / b_full.float().norm()).item() < 2e-2
