"""MXFP4, the one place that knows the format (OCP microscaling FP4, as the gpt-oss checkpoints use it).

A weight [.., out, in] is stored along its input dimension in groups of 32 values:
  blocks [.., out, in/32, 16] uint8: two FP4 (e2m1) codes per byte, low nibble = even element;
         code bits 0-2 index FP4_VALUES, bit 3 is the sign;
  scales [.., out, in/32] uint8: E8M0 exponent, the group's values are multiplied by 2^(s - 127).
Checkpoints hold experts out-major (gate_up_proj_blocks [E, 2I, H/32, 16]); the dense HF form is
the transpose (gate_up_proj [E, H, 2I], down_proj [E, I, H]): see packed_to_dense / dense_to_packed.
"""
from __future__ import annotations

import torch

GROUP = 32
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_MAX = 6.0


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., out, in] float -> (blocks [.., out, in/32, 16] u8, scales [.., out, in/32] u8), round to nearest."""
    if w.shape[-1] % GROUP:
        raise ValueError(f"MXFP4 needs the last dimension divisible by {GROUP}, got shape {tuple(w.shape)}")
    x = w.float().reshape(*w.shape[:-1], w.shape[-1] // GROUP, GROUP)
    amax = x.abs().amax(dim=-1, keepdim=True)
    # Smallest power of two that brings the group's largest magnitude into FP4's range [0, 6].
    exp = torch.ceil(torch.log2(amax.clamp_min(2.0 ** -126) / _FP4_MAX)).clamp(-127, 127)
    scaled = x / torch.exp2(exp)
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=w.device)
    idx = (scaled.abs().unsqueeze(-1) - table).abs().argmin(dim=-1).to(torch.uint8)
    codes = idx | ((scaled < 0) & (idx > 0)).to(torch.uint8) << 3
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exp.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(blocks [.., out, G, 16], scales [.., out, G]) -> [.., out, G*32] in dtype."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    signed = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32, device=blocks.device)
    vals = torch.stack((signed[(blocks & 0x0F).long()], signed[(blocks >> 4).long()]), dim=-1)
    vals = vals.reshape(*scales.shape, GROUP)
    out = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - 127)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * GROUP).to(dtype)


def dense_to_packed(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense HF expert weight [E, in, out] -> checkpoint (blocks [E, out, in/32, 16], scales [E, out, in/32])."""
    return quantize(w.transpose(-1, -2))


def packed_to_dense(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Checkpoint (blocks [E, out, in/32, 16], scales) -> dense HF expert weight [E, in, out]."""
    return dequantize(blocks, scales, dtype).transpose(-1, -2).contiguous()


def packed_shapes(num_experts: int, out_features: int, in_features: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (blocks, scales) for an expert weight with these features."""
    if in_features % GROUP:
        raise ValueError(f"MXFP4 needs in_features divisible by {GROUP}, got {in_features}")
    g = in_features // GROUP
    return (num_experts, out_features, g, GROUP // 2), (num_experts, out_features, g)


# Scale rows padded to this many bytes (groups) on the GPU: every row starts 16-byte aligned and a
# kernel reading whole K tiles (up to 1024 elements = 32 groups a trip) never needs a mask on the
# scales -- masks per byte kept those loads synchronous (PERF_NOTES v6).
SCALE_ROW_PAD = 32


def pad_scales(scales: torch.Tensor) -> torch.Tensor:
    """scales [.., out, G] -> the same values as a view into rows padded to SCALE_ROW_PAD bytes.
    The padding holds 127 (2^0), so a kernel that reads it with zero-masked weights adds zeros."""
    g = scales.shape[-1]
    gp = -(-g // SCALE_ROW_PAD) * SCALE_ROW_PAD
    if scales.stride(-1) == 1 and scales.stride(-2) == gp:
        return scales
    buf = torch.full((*scales.shape[:-1], gp), 127, dtype=scales.dtype, device=scales.device)
    buf[..., :g].copy_(scales)
    return buf[..., :g]


def readable_groups(scales: torch.Tensor) -> int:
    """How many groups of each scale row a kernel may read: the padded row length when `scales` is a
    pad_scales view (checked against its storage), else the row's own length."""
    g = scales.shape[-1]
    row = scales.stride(-2) if scales.dim() >= 2 else g
    if scales.stride(-1) != 1 or row < g or row % 16:
        return g
    last = scales.storage_offset() + sum((n - 1) * st for n, st in zip(scales.shape[:-1], scales.stride()[:-1]))
    return row if last + row <= scales.untyped_storage().nbytes() else g


def unmasked_scale_reads(scales: torch.Tensor, k_tile: int) -> bool:
    """True when a kernel stepping over the input dimension in tiles of `k_tile` elements may read
    each tile's scale groups without a mask (the rows are padded far enough: pad_scales)."""
    k = scales.shape[-1] * GROUP
    return readable_groups(scales) * GROUP >= -(-k // k_tile) * k_tile
