"""kernels/cuda_graphs' input load: the one-launch load (_load_kernel) leaves the graph's static inputs
exactly as the torch copies and fills do, across steps that shrink and grow the batch and its tables.
(Replays against eager decode: tests/gpu/test_model_cuda.py.)"""
from __future__ import annotations

import pytest
import torch

from gptoss_engine.kv_layout import KVCache
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset
from gptoss_engine.step_batch import StepBatch

pytestmark = pytest.mark.gpu

MAX_BLOCKS = 300   # wider than one 256-column trip of the kernel


def _batch(n: int, w: int, gen: torch.Generator, device: str, table_stride: int | None = None) -> StepBatch:
    """A decode step of n sequences with random inputs and block tables w wide; table_stride: the
    tables are a column slice of a wider tensor (rows table_stride apart)."""
    i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
    wide = table_stride or w
    full = torch.randint(0, 10_000, (n, wide), generator=gen, **i32)[:, :w]
    swa = torch.randint(-1, 10_000, (n, wide), generator=gen, **i32)[:, :w]
    lens = torch.randint(1, 16 * w + 1, (n,), generator=gen, **i32)
    return StepBatch(input_ids=torch.randint(0, 200_000, (n,), generator=gen, **i64), positions=lens.long() - 1,
                     query_start_loc=torch.arange(n + 1, **i32), seq_lens=lens, full_block_tables=full,
                     swa_block_tables=swa, full_slot_mapping=torch.randint(0, 99_999, (n,), generator=gen, **i64),
                     swa_slot_mapping=torch.randint(-1, 99_999, (n,), generator=gen, **i64),
                     logits_indices=torch.arange(n, **i64), max_query_len=1, max_seq_len=int(lens.max()))


def _inputs(g: object) -> list[torch.Tensor]:
    b = g._batch  # type: ignore[attr-defined]
    return [b.input_ids, b.positions, b.seq_lens, b.full_slot_mapping, b.swa_slot_mapping, b.full_block_tables,
            b.swa_block_tables, b.query_start_loc, b.logits_indices]


def test_fused_load_leaves_what_the_copies_leave(device: str, interpreted: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if interpreted:
        pytest.skip("the graphs' static buffers live on CUDA")
    from gptoss_engine.kernels import cuda_graphs
    config = ModelConfig.from_dict(preset("tiny"))
    kv = KVCache.allocate(config.kv_layout(16, torch.bfloat16), 4, 4, device)
    never = lambda batch, kv: pytest.fail("no replay here")  # noqa: E731 - only _load runs
    fused = cuda_graphs.CudaGraphForward(never, kv, 8, MAX_BLOCKS)
    copies = cuda_graphs.CudaGraphForward(never, kv, 8, MAX_BLOCKS)
    gen = torch.Generator(device=device).manual_seed(0)
    # (sequences, table width, bucket, table row stride): padding rows, a narrower table after a wider
    # one (its old columns must go back to -1), the whole max width, a strided table, one sequence.
    steps = [(3, 5, 4, None), (8, 260, 8, None), (5, 2, 8, None), (1, MAX_BLOCKS, 1, None), (6, 40, 8, 97),
             (2, 1, 2, None)]
    for n, w, bucket, stride in steps:
        batch = _batch(n, w, gen, device, stride)
        monkeypatch.setattr(cuda_graphs, "FUSED_LOAD", True)
        fused._load(batch, bucket)
        monkeypatch.setattr(cuda_graphs, "FUSED_LOAD", False)
        copies._load(batch, bucket)
        for got, want in zip(_inputs(fused), _inputs(copies)):
            assert torch.equal(got, want), (n, w, bucket)
        rows = fused._batch
        assert torch.equal(rows.full_block_tables[:n, :w], batch.full_block_tables)
        assert (rows.seq_lens[n:bucket] == 0).all() and (rows.full_slot_mapping[n:bucket] == -1).all()
        assert (rows.full_block_tables[:bucket, w:] == -1).all()
