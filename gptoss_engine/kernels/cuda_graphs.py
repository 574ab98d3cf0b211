"""CUDA-graph decode: one captured forward per batch bucket (1, 2, 4, 8, 16, ... max), replayed.

`CudaGraphForward(model, kv, max_batch, max_blocks)` is a drop-in `forward_fn(batch, kv)` for the
model runner. A pure-decode step (max_query_len == 1, at most max_batch sequences, on the KV cache
it was built for) is copied into static input buffers padded to the next bucket and replayed;
anything else (prefill chunks, mixed steps, a larger batch) runs the model eagerly. `buckets`
replaces the default powers of two; with `padding=False` only a batch of exactly a bucket's size
is replayed (the others run eagerly).

Padding rows are inert: slot -1 (write_kv stores nothing), block table -1 and seq_len 0 (the
attention visits no key; the sink alone gives a zero output), position 0. Their logits are cut off.
The graphs are captured lazily, the first time a bucket is seen (one eager warm-up run first, so
Triton compiles outside the capture), and share one memory pool.

With FUSED_LOAD a step's inputs reach the static buffers in one launch (`_load_kernel`: every row of
the bucket, the batch's rows copied, the padding rows made inert) instead of a dozen torch copies and
fills at ~5 us of host each, which a device with nothing queued (one sequence, no step in flight)
waits for before the replay starts: PERF_NOTES v25 measured a single replay 0.06-0.16 ms slower than
back-to-back replays.

Requirement on the model: nothing in its decode forward may sync the host (no .item(), .tolist(),
boolean-mask indexing); the Triton kernels here are written that way.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from gptoss_engine.kv_layout import KVCache
from gptoss_engine.step_batch import StepBatch

Forward = Callable[[StepBatch, KVCache], torch.Tensor]

# The one-launch load is off until it has run on a GPU: checked against the copies under Triton's
# interpreter and compiled for sm_90 here, but its GPU test and `decode_ab inputs` have not run
# (PERF_NOTES v26). True: one launch; False: torch copies and fills.
FUSED_LOAD = False
_LOAD_BLOCK = 256   # block-table columns a trip of _load_kernel


@triton.jit(do_not_specialize=["n", "w", "width", "s_ftab", "s_stab", "s_dst"])  # one compile for every step
def _load_kernel(ids_src, pos_src, len_src, fslot_src, sslot_src, ftab_src, stab_src,
                 ids_dst, pos_dst, len_dst, fslot_dst, sslot_dst, ftab_dst, stab_dst,
                 n, w, width, s_ftab, s_stab, s_dst, BLOCK: tl.constexpr):
    """Row r of the bucket: batch row r (r < n) copied in, or an inert padding row (token 0 at
    position 0, seq_len 0, slots -1); block-table columns [0, w) from the batch, [w, width) -1."""
    r = tl.program_id(0)
    real = r < n
    tl.store(ids_dst + r, tl.load(ids_src + r, mask=real, other=0))
    tl.store(pos_dst + r, tl.load(pos_src + r, mask=real, other=0))
    tl.store(len_dst + r, tl.load(len_src + r, mask=real, other=0))
    tl.store(fslot_dst + r, tl.load(fslot_src + r, mask=real, other=-1))
    tl.store(sslot_dst + r, tl.load(sslot_src + r, mask=real, other=-1))
    for c0 in range(0, width, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        take = real & (c < w)
        put = c < width
        tl.store(ftab_dst + r * s_dst + c, tl.load(ftab_src + r * s_ftab + c, mask=take, other=-1), mask=put)
        tl.store(stab_dst + r * s_dst + c, tl.load(stab_src + r * s_stab + c, mask=take, other=-1), mask=put)


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, and max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch]


class CudaGraphForward:
    def __init__(self, model: Forward, kv: KVCache, max_batch: int, max_blocks: int,
                 buckets: Sequence[int] | None = None, padding: bool = True) -> None:
        if kv.full.device.type != "cuda":
            raise ValueError("CUDA graphs need the KV cache on a CUDA device")
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        self.model, self.kv, self.max_blocks, self.padding = model, kv, max_blocks, padding
        self.buckets = batch_buckets(max_batch) if buckets is None else sorted(set(buckets))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"graph batch sizes must be positive and at least one, got {buckets}")
        dev = kv.full.device
        n = self.buckets[-1]
        i64 = dict(dtype=torch.int64, device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        # Static inputs: replays read these addresses, so they are written in place, never rebound.
        self._batch = StepBatch(
            input_ids=torch.zeros(n, **i64), positions=torch.zeros(n, **i64),
            query_start_loc=torch.arange(n + 1, **i32), seq_lens=torch.zeros(n, **i32),
            full_block_tables=torch.full((n, max_blocks), -1, **i32),
            swa_block_tables=torch.full((n, max_blocks), -1, **i32),
            full_slot_mapping=torch.full((n,), -1, **i64), swa_slot_mapping=torch.full((n,), -1, **i64),
            logits_indices=torch.arange(n, **i64), max_query_len=1,
            max_seq_len=max_blocks * kv.layout.block_size)
        # Block-table columns any load has written: every column past them is still -1 in every row,
        # so a load clears up to here and not the whole max_blocks width.
        self._table_width = 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def _view(self, bucket: int) -> StepBatch:
        b = self._batch
        return replace(b, input_ids=b.input_ids[:bucket], positions=b.positions[:bucket],
                       query_start_loc=b.query_start_loc[:bucket + 1], seq_lens=b.seq_lens[:bucket],
                       full_block_tables=b.full_block_tables[:bucket], swa_block_tables=b.swa_block_tables[:bucket],
                       full_slot_mapping=b.full_slot_mapping[:bucket], swa_slot_mapping=b.swa_slot_mapping[:bucket],
                       logits_indices=b.logits_indices[:bucket])

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        view = self._view(bucket)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model(view, self.kv)  # compiles the kernels for these shapes outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model(view, self.kv)
        return graph, logits

    def _load(self, batch: StepBatch, bucket: int) -> None:
        b, n = self._batch, batch.num_seqs
        w = batch.full_block_tables.shape[1]
        if w > self.max_blocks:
            raise ValueError(f"block tables of {w} blocks exceed the {self.max_blocks} this graph was built for")
        src = (batch.input_ids, batch.positions, batch.seq_lens, batch.full_slot_mapping, batch.swa_slot_mapping)
        tables = (batch.full_block_tables, batch.swa_block_tables)
        if (FUSED_LOAD and all(t.device == b.seq_lens.device and t.stride(-1) == 1 for t in src + tables)
                and batch.swa_block_tables.shape[1] == w):
            width = max(w, self._table_width)
            _load_kernel[(bucket,)](
                *src, *tables, b.input_ids, b.positions, b.seq_lens, b.full_slot_mapping, b.swa_slot_mapping,
                b.full_block_tables, b.swa_block_tables, n, w, width,
                tables[0].stride(0), tables[1].stride(0), b.full_block_tables.stride(0), BLOCK=_LOAD_BLOCK,
                num_warps=1)
            self._table_width = width
            return
        b.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        b.positions[:n].copy_(batch.positions, non_blocking=True)
        b.seq_lens[:n].copy_(batch.seq_lens, non_blocking=True)
        b.full_slot_mapping[:n].copy_(batch.full_slot_mapping, non_blocking=True)
        b.swa_slot_mapping[:n].copy_(batch.swa_slot_mapping, non_blocking=True)
        for static, table in ((b.full_block_tables, batch.full_block_tables),
                              (b.swa_block_tables, batch.swa_block_tables)):
            static[:bucket].fill_(-1)
            static[:n, :w].copy_(table, non_blocking=True)
        self._table_width = max(self._table_width, w)
        # Padding rows (n .. bucket) go inert; the rows past the bucket are not part of the replay.
        b.seq_lens[n:bucket].zero_()
        b.positions[n:bucket].zero_()
        b.input_ids[n:bucket].zero_()
        b.full_slot_mapping[n:bucket].fill_(-1)
        b.swa_slot_mapping[n:bucket].fill_(-1)

    def __call__(self, batch: StepBatch, kv: KVCache) -> torch.Tensor:
        """Logits [B, vocab] float32. A replayed step returns a view of the graph's output buffer:
        valid until the next decode step (the runner samples from it before that)."""
        n = batch.num_seqs
        if batch.max_query_len != 1 or n > self.buckets[-1] or kv is not self.kv or batch.input_ids.shape[0] != n:
            return self.model(batch, kv)
        bucket = next(b for b in self.buckets if b >= n)
        if bucket != n and not self.padding:
            return self.model(batch, kv)
        self._load(batch, bucket)
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[:n]
