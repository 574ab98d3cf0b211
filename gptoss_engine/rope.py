"""Rotary position embedding with YaRN scaling, as gpt-oss uses it (split-halves rotation).

YaRN (Peng et al. 2023, https://arxiv.org/abs/2309.00071): frequencies that rotate fewer than
beta_slow times over the original context are interpolated (divided by `factor`), those that rotate
more than beta_fast times are kept, with a linear ramp between; cos/sin are multiplied by the
attention scaling 0.1*ln(factor)+1. Computed in float32 exactly as transformers' GptOss does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from gptoss_engine.model_config import ModelConfig


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention scaling)."""
    dim, base = config.head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    y = config.rope_scaling
    if y is None:
        return 1.0 / pos_freqs, 1.0

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 where the frequency is kept as is
    inv_freq = (1.0 / (y.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    scaling = 0.1 * math.log(y.factor) + 1.0 if y.factor > 1 else 1.0
    return inv_freq, scaling


class RotaryEmbedding(nn.Module):
    """cos/sin for given absolute positions; inv_freq is a non-persistent buffer (not in checkpoints)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.table: torch.Tensor | None = None

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        return (freqs.cos() * self.attention_scaling).to(dtype), (freqs.sin() * self.attention_scaling).to(dtype)

    @torch.no_grad()
    def cache(self, max_positions: int, dtype: torch.dtype) -> None:
        """Keep cos|sin of positions 0 .. max_positions - 1 ([P, 2, D/2] in dtype, 16.8 MB for gpt-oss
        in bf16): forward then gathers a row a token, one launch where computing them took ~9 a step.
        The table comes from the same element-wise ops on the same values: on CUDA, the same bits."""
        cos, sin = self._compute(torch.arange(max_positions, device=self.inv_freq.device), dtype)
        self.table = torch.stack((cos, sin), dim=1)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D/2] of positions (which the engine keeps below max_model_len <= the table's size)."""
        if self.table is not None and self.table.dtype == dtype and self.table.device == positions.device:
            rows = self.table[positions]
            return rows[:, 0], rows[:, 1]
        return self._compute(positions, dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D/2]: rotate the pairs (i, i + D/2)."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
