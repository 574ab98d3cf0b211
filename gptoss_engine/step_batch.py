"""What one forward pass over a continuous batch needs; built by the model runner, read by attention.

Passed explicitly to the model (never through a global). Tokens of all sequences in the step are
flattened: sequence i owns rows query_start_loc[i]:query_start_loc[i+1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepBatch:
    input_ids: torch.Tensor          # [T] int64
    positions: torch.Tensor          # [T] int64, absolute position of each token
    query_start_loc: torch.Tensor    # [B+1] int32, cumulative query lengths
    seq_lens: torch.Tensor           # [B] int32, context length after this step (cached + new)
    # Physical block ids per logical block (block j holds positions j*bs .. j*bs+bs-1), -1 = none.
    full_block_tables: torch.Tensor  # [B, max_blocks] int32, full-attention pool
    swa_block_tables: torch.Tensor   # [B, max_blocks] int32, sliding pool; -1 where the block fell out of the window
    full_slot_mapping: torch.Tensor  # [T] int64, block*bs+offset to write each token's K/V; -1 = skip (padding)
    swa_slot_mapping: torch.Tensor   # [T] int64, same for the sliding pool
    logits_indices: torch.Tensor     # [B] int64, rows whose hidden state gets the lm_head (last token of each seq)
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])
