"""The sampler on CUDA: it must queue its work without waiting for the device (the overlap
scheduler launches step N+1 while step N runs), and draw seeded tokens as the CPU path's tests
describe."""
from __future__ import annotations

import pytest
import torch

from gptoss_engine.sampling import SampleRequest, Sampler
from gptoss_engine.types import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_launch_does_not_wait_for_work_queued_before_it():
    """A ~1 s kernel is queued first; every kind of row (sampled with top-k/top-p, seeded,
    min_tokens masking, logprobs, greedy beside them) must be queued while it still runs."""
    s = Sampler((7,), "cuda")
    logits = torch.randn(6, 201088, device="cuda")
    reqs = [SampleRequest(SamplingParams(temperature=1.0), 0),
            SampleRequest(SamplingParams(temperature=0.8, top_k=50, top_p=0.9), 1),
            SampleRequest(SamplingParams(temperature=1.0, seed=3), 2),
            SampleRequest(SamplingParams(min_tokens=4), 0),
            SampleRequest(SamplingParams(logprobs=True, top_logprobs=3), 0),
            SampleRequest(SamplingParams(), 0)]
    s.launch(logits, reqs).resolve()   # warm-up: allocations, pinned buffers
    torch.cuda.synchronize()
    busy = torch.cuda.Event()
    torch.cuda._sleep(2_000_000_000)   # ~1 s of a spinning kernel
    busy.record()
    # PyTorch's sync debug mode names the operator that synchronises (a min_tokens mask written
    # with a Python float did, found here); the event check catches what the mode does not see.
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampled = s.launch(logits, reqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not busy.query(), "Sampler.launch waited for the device"
    out = sampled.resolve()
    assert len(out) == 6 and out[3].token_id != 7 and out[4].logprob is not None


def test_seeded_draw_does_not_depend_on_the_batch():
    s = Sampler((), "cuda")
    x = torch.randn(5, 201088, device="cuda") * 3
    seeded = SampleRequest(SamplingParams(temperature=1.0, top_p=0.95, seed=42), 3)
    others = [SampleRequest(SamplingParams(temperature=1.2, top_k=20), 0) for _ in range(4)]
    alone = s(x[4:], [seeded])[0].token_id
    assert s(x, others + [seeded])[4].token_id == alone
