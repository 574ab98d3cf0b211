"""The only owner of device tensors: the model, the KV cache, step inputs, sampling.

Pool sizing: the sliding pool only ever needs each sequence's window (+ one prompt chunk), so it
gets that much (or a fixed share of the budget, whichever is smaller) and the full pool the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from gptoss_engine.block_manager import BlockTables
from gptoss_engine.checkpoint import load_model
from gptoss_engine.config import EngineConfig
from gptoss_engine.host_copy import to_device
from gptoss_engine.kv_layout import KVCache, KVLayout
from gptoss_engine.model import GptOssForCausalLM
from gptoss_engine.sampling import SampledTokens, Sampler, SampleRequest
from gptoss_engine.scheduler import ScheduledSeq
from gptoss_engine.sequence import PENDING_TOKEN, Sequence
from gptoss_engine.step_batch import StepBatch
from gptoss_engine.types import TokenOutput

MAX_SWA_SHARE = 0.5  # of the KV budget, at most, for the sliding pool


def pool_sizes(config: EngineConfig, layout: KVLayout, budget_bytes: int) -> tuple[int, int]:
    """(full blocks, sliding blocks) for a byte budget, unless the config fixes them."""
    bs = layout.block_size
    if layout.num_swa_layers == 0:
        num_swa = 0
    elif config.num_swa_blocks is not None:
        num_swa = config.num_swa_blocks
    else:
        wanted = config.max_batch_size * (layout.swa_blocks_per_window + 1) + -(-config.max_num_tokens // bs)
        num_swa = max(1, min(wanted, int(budget_bytes * MAX_SWA_SHARE) // max(1, layout.bytes_per_swa_block)))
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks, num_swa
    left = budget_bytes - num_swa * layout.bytes_per_swa_block
    num_full = left // max(1, layout.bytes_per_full_block)
    if num_full < 1:
        raise ValueError(f"KV budget of {budget_bytes} bytes leaves no room for full-attention blocks "
                         f"({layout.bytes_per_full_block} bytes each)")
    return int(num_full), num_swa


class ModelRunner:
    def __init__(self, config: EngineConfig, model: GptOssForCausalLM | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.model = model if model is not None else load_model(config.model_path, self.device, config.torch_dtype,
                                                                progress=False)
        self.model_config = self.model.config
        if config.moe_prefill_weights == "bf16":
            self.model.keep_bf16_experts()   # before the KV pool takes what is left
        self.layout = self.model_config.kv_layout(config.block_size, config.kv_torch_dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * config.free_gpu_memory_fraction)
        else:
            budget = config.cpu_kv_cache_bytes
        num_full, num_swa = pool_sizes(config, self.layout, budget)
        self.kv_cache = KVCache.allocate(self.layout, num_full, num_swa, self.device)
        self.sampler = Sampler(self.model_config.eos_token_ids, self.device)
        # Same contract as GptOssForCausalLM.forward; on CUDA, decode steps replay CUDA graphs.
        self.forward_fn: Callable[[StepBatch, KVCache], torch.Tensor] = self._graph_forward() or self.model.forward

    def _graph_forward(self) -> Callable[[StepBatch, KVCache], torch.Tensor] | None:
        """CudaGraphForward on CUDA (Triton there), sized by the config; None on CPU, or when
        cuda_graph_batch_sizes is empty (graphs off)."""
        c = self.config
        if self.device.type != "cuda" or c.cuda_graph_batch_sizes == ():
            return None
        try:
            from gptoss_engine.kernels.cuda_graphs import CudaGraphForward
        except ImportError:
            return None
        sizes = c.cuda_graph_batch_sizes
        max_batch = max(sizes) if sizes else min(c.cuda_graph_max_batch_size or c.max_batch_size, c.max_batch_size)
        max_len = c.max_model_len or self.model_config.max_position_embeddings
        return CudaGraphForward(self.model.forward, self.kv_cache, max_batch, -(-max_len // c.block_size),
                                buckets=sizes, padding=c.cuda_graph_padding)

    def build_batch(self, scheduled: list[ScheduledSeq], tables: BlockTables,
                    prev: LaunchedStep | None = None) -> StepBatch:
        """The step's inputs, computed with numpy over all tokens at once (no per-token Python) and
        sent to the device in one copy per dtype. `tables` holds the sequences' block rows.

        A PENDING_TOKEN input (overlap scheduling: the token `prev`, still on the device, drew for
        that sequence) is filled on the device from prev's draws, so nothing waits for them."""
        bs = self.config.block_size
        n = len(scheduled)
        seqs = [s.seq for s in scheduled]
        start_l = [seq.num_computed_tokens for seq in seqs]
        qlen_l = [s.num_tokens for s in scheduled]
        ids: list[int] = []
        for seq, start, q in zip(seqs, start_l, qlen_l):
            ids += seq.token_ids[start:start + q]
        starts = np.array(start_l, dtype=np.int64)
        qlens = np.array(qlen_l, dtype=np.int64)
        rows = np.array([seq.blocks.row for seq in seqs], dtype=np.intp)
        width = max(len(seq.blocks.full) for seq in seqs)
        query_start_loc = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(qlens, out=query_start_loc[1:])
        seq_lens = starts + qlens
        # Per token: its sequence, its position, and the physical slot its K/V goes to.
        seq_of = np.repeat(np.arange(n), qlens)
        positions = np.arange(len(ids)) + (starts - query_start_loc[:-1])[seq_of]
        full_tables, swa_tables = tables.full[rows, :width], tables.swa[rows, :width]
        logical, offset = positions // bs, positions % bs
        full_blocks = full_tables[seq_of, logical].astype(np.int64)
        swa_blocks = swa_tables[seq_of, logical].astype(np.int64)
        full_slots = full_blocks * bs + offset
        swa_slots = np.where(swa_blocks >= 0, swa_blocks * bs + offset, -1)
        ids_np = np.array(ids, dtype=np.int64)
        pending = np.flatnonzero(ids_np == PENDING_TOKEN)
        arrays = [ids_np, positions, full_slots, swa_slots, query_start_loc[1:] - 1]
        if pending.size:
            if prev is None or prev.sampled is None:
                raise RuntimeError("a pending input token with no launched step to take it from")
            arrays += [pending, np.array([prev.row_of[seqs[i]] for i in seq_of[pending]], dtype=np.int64)]
        input_ids, pos, fslots, sslots, logits_indices, *fill = to_device(arrays, torch.int64, self.device)
        if fill:
            input_ids[fill[0]] = prev.sampled.token_ids[fill[1]]  # type: ignore[union-attr]
        qsl, lens, ftab, stab = to_device([query_start_loc, seq_lens, full_tables, swa_tables], torch.int32,
                                          self.device)
        return StepBatch(
            input_ids=input_ids, positions=pos, query_start_loc=qsl, seq_lens=lens,
            full_block_tables=ftab.view(n, width), swa_block_tables=stab.view(n, width),
            full_slot_mapping=fslots, swa_slot_mapping=sslots, logits_indices=logits_indices,
            max_query_len=int(qlens.max()), max_seq_len=int(seq_lens.max()))

    def launch(self, scheduled: list[ScheduledSeq], tables: BlockTables, prev: LaunchedStep | None = None,
               on_launched: Callable[[], None] | None = None) -> LaunchedStep:
        """Queue one forward over the step and the draws for each sequence whose last token it
        computes; nothing here waits for the device. `prev`: the launched step whose draws fill this
        step's PENDING_TOKEN inputs. on_launched() runs once the forward is queued: host work
        placed there overlaps the device's.

        A replayed CUDA graph returns a view of its static output buffer, which the next replay
        overwrites: the draws are queued here, before the next forward, never later."""
        logits = self.forward_fn(self.build_batch(scheduled, tables, prev), self.kv_cache)
        if on_launched is not None:
            on_launched()
        rows = [i for i, s in enumerate(scheduled) if s.seq.num_computed_tokens + s.num_tokens == len(s.seq.token_ids)]
        if not rows:
            return LaunchedStep(scheduled, rows, None, {})
        picked = logits if len(rows) == len(scheduled) else logits[to_device([rows], torch.int64, self.device)[0]]
        # output_index counts the draws still in flight for the sequence (overlap scheduling).
        sampled = self.sampler.launch(picked, [SampleRequest(scheduled[i].seq.sampling,
                                                             len(scheduled[i].seq.outputs) + scheduled[i].seq.num_pending)
                                               for i in rows])
        return LaunchedStep(scheduled, rows, sampled, {scheduled[i].seq: n for n, i in enumerate(rows)})


@dataclass
class LaunchedStep:
    """A step queued on the device: its sequences, and the draws of those that produce a token."""
    scheduled: list[ScheduledSeq]
    rows: list[int]                    # indices into scheduled that draw a token
    sampled: SampledTokens | None
    row_of: dict[Sequence, int]        # sequence -> its draw's index in sampled.token_ids

    def resolve(self) -> list[TokenOutput | None]:
        """Wait for the draws (this step's work only) and return a token per scheduled sequence
        (None where it drew none)."""
        out: list[TokenOutput | None] = [None] * len(self.scheduled)
        if self.sampled is not None:
            for i, tok in zip(self.rows, self.sampled.resolve()):
                out[i] = tok
        return out
