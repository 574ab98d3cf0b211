"""The only owner of device tensors: the model, the KV cache, step inputs, sampling.

Pool sizing: the sliding pool only ever needs each sequence's window (+ one prompt chunk), so it
gets that much (or a fixed share of the budget, whichever is smaller) and the full pool the rest.
"""
from __future__ import annotations

from typing import Callable

import torch

from gptoss_engine.checkpoint import load_model
from gptoss_engine.config import EngineConfig
from gptoss_engine.kv_layout import KVCache, KVLayout
from gptoss_engine.model import GptOssForCausalLM
from gptoss_engine.sampling import Sampler, SampleRequest
from gptoss_engine.scheduler import ScheduledSeq
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

    def build_batch(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        bs = self.config.block_size
        ids: list[int] = []
        positions: list[int] = []
        full_slots: list[int] = []
        swa_slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        width = max(len(s.seq.blocks.full) for s in scheduled)
        full_tables: list[list[int]] = []
        swa_tables: list[list[int]] = []
        for s in scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_tokens
            full, swa = seq.blocks.full, seq.blocks.swa
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            full_slots += [full[p // bs] * bs + p % bs for p in range(start, end)]
            swa_slots += [swa[p // bs] * bs + p % bs if swa[p // bs] >= 0 else -1 for p in range(start, end)]
            starts.append(len(ids))
            seq_lens.append(end)
            full_tables.append(full + [-1] * (width - len(full)))
            swa_tables.append(swa + [-1] * (width - len(swa)))

        def t(x: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype).to(self.device, non_blocking=True)

        return StepBatch(
            input_ids=t(ids, torch.int64), positions=t(positions, torch.int64),
            query_start_loc=t(starts, torch.int32), seq_lens=t(seq_lens, torch.int32),
            full_block_tables=t(full_tables, torch.int32), swa_block_tables=t(swa_tables, torch.int32),
            full_slot_mapping=t(full_slots, torch.int64), swa_slot_mapping=t(swa_slots, torch.int64),
            logits_indices=t([x - 1 for x in starts[1:]], torch.int64),
            max_query_len=max(s.num_tokens for s in scheduled), max_seq_len=max(seq_lens))

    def run(self, scheduled: list[ScheduledSeq]) -> list[TokenOutput | None]:
        """One forward over the step; a token for each sequence whose last token was computed.

        A replayed CUDA graph returns a view of its static output buffer, which the next replay
        overwrites: the tokens are sampled here, before this returns, never later."""
        logits = self.forward_fn(self.build_batch(scheduled), self.kv_cache)
        rows = [i for i, s in enumerate(scheduled) if s.seq.num_computed_tokens + s.num_tokens == len(s.seq.token_ids)]
        out: list[TokenOutput | None] = [None] * len(scheduled)
        if not rows:
            return out
        picked = logits if len(rows) == len(scheduled) else logits[torch.tensor(rows, device=logits.device)]
        tokens = self.sampler(picked, [SampleRequest(scheduled[i].seq.sampling, len(scheduled[i].seq.outputs))
                                       for i in rows])
        for i, tok in zip(rows, tokens):
            out[i] = tok
        return out
