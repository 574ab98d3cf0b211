"""MXFP4, the one place that knows the format (OCP microscaling FP4, as the gpt-oss checkpoints use it).

A weight [.., out, in] is stored along its input dimension in groups of 32 values:
  blocks [.., out, in/32, 16] uint8: two FP4 (e2m1) codes per byte, low nibble = even element;
         code bits 0-2 index FP4_VALUES, bit 3 is the sign;
  scales [.., out, in/32] uint8: E8M0 exponent, the group's values are multiplied by 2^(s - 127).
Checkpoints hold experts out-major (gate_up_proj_blocks [E, 2I, H/32, 16]); the dense HF form is
the transpose (gate_up_proj [E, H, 2I], down_proj [E, I, H]): see packed_to_dense / dense_to_packed.

On sm_90 the GPU keeps the blocks' 32-bit words with their bits permuted (WORD_BITS, permute_words):
the same codes, laid out for a 9-instruction dequant. `permuted=True` marks such blocks wherever
they are read.
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


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
               permuted: bool = False) -> torch.Tensor:
    """(blocks [.., out, G, 16], scales [.., out, G]) -> [.., out, G*32] in dtype. permuted: the
    blocks' words are in WORD_BITS order (permute_words)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    if permuted:
        blocks = unpermute_words(blocks)
    signed = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32, device=blocks.device)
    vals = torch.stack((signed[(blocks & 0x0F).long()], signed[(blocks >> 4).long()]), dim=-1)
    vals = vals.reshape(*scales.shape, GROUP)
    out = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - 127)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * GROUP).to(dtype)


def dense_to_packed(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense HF expert weight [E, in, out] -> checkpoint (blocks [E, out, in/32, 16], scales [E, out, in/32])."""
    return quantize(w.transpose(-1, -2))


def packed_to_dense(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                    permuted: bool = False) -> torch.Tensor:
    """Checkpoint (blocks [E, out, in/32, 16], scales) -> dense HF expert weight [E, in, out]."""
    return dequantize(blocks, scales, dtype, permuted).transpose(-1, -2).contiguous()


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


# The permuted word layout. A checkpoint word (4 bytes, little-endian) holds codes k = 0..7 at bits
# 4k..4k+3 (m, e0, e1, sign from low to high). The sm_90 dequant wants each output bf16 pair's two
# codes at bits {15 | 8, 7, 6} and {31 | 24, 23, 22} (sign | e1 e0 m, as bf16 sign and exponent/
# mantissa bits times 2^-126); in checkpoint order the sign and the magnitude of a code need different
# shifts, 3 integer instructions a pair. Stored with code k's (sign, e1, e0, m) at WORD_BITS[k],
# pairs (k0, k2), (k4, k6) and (k1, k3) are the word rotated left by 0, 4 and 10 under one mask
# 0x81C081C0, and (k5, k7) the word rotated by 6 (mask 0x80C080C0) or by 14 (0x01000100): 9 integer
# instructions a word instead of 14 (kernels/e2m1.py; no 4 rotations of one mask tile a word,
# searched exhaustively). The permutation is fixed per word, and a word never straddles a 32-code
# group, so shapes, scales and every byte offset a kernel computes stay as they were.
WORD_BITS = ((15, 8, 7, 6), (5, 30, 29, 28), (31, 24, 23, 22), (21, 14, 13, 12),
             (11, 4, 3, 2), (9, 26, 1, 0), (27, 20, 19, 18), (25, 10, 17, 16))


def _shift_terms(inverse: bool) -> tuple[tuple[int, int], ...]:
    """The permutation as (shift, mask) terms, one a distinct distance a bit moves: word -> OR of
    (word shifted left by `shift`, right where negative) & mask, the mask holding the bits' new
    places. The same terms as constants in kernels/e2m1.py's permute_words / unpermute_words
    (checked against these by tests/gpu)."""
    terms: dict[int, int] = {}
    for k, bits in enumerate(WORD_BITS):
        for j, dst in zip((3, 2, 1, 0), bits):
            src = 4 * k + j
            if inverse:
                src, dst = dst, src
            terms[dst - src] = terms.get(dst - src, 0) | 1 << dst
    return tuple(sorted(terms.items()))


_PERMUTE, _UNPERMUTE = _shift_terms(False), _shift_terms(True)
_WORDS_A_CHUNK = 1 << 25       # int32 temporaries of 128 MiB at most


def _signed(m: int) -> int:
    return m - (1 << 32) if m >> 31 else m


def _moved_bits(blocks: torch.Tensor, inverse: bool) -> torch.Tensor:
    """A new contiguous blocks tensor whose int32 words are permuted (inverse: unpermuted). On CUDA one
    Triton pass (kernels/word_permute.py: torch's elementwise form is ~40 passes over the words, and an
    int64 form of it made building 120b 7 s slower, PERF_NOTES v20); elsewhere torch on int32 a chunk
    at a time: a right shift's sign copies fall outside its mask, so no int64 is needed."""
    if blocks.dtype != torch.uint8 or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks must be uint8 [.., {GROUP // 2}], got {blocks.dtype} {tuple(blocks.shape)}")
    out = torch.empty_like(blocks, memory_format=torch.contiguous_format)
    src, dst = blocks.contiguous().view(torch.int32).reshape(-1), out.view(torch.int32).reshape(-1)
    if blocks.is_cuda:
        from gptoss_engine.kernels.word_permute import permute_words_into
        permute_words_into(src, dst, inverse)
        return out
    for start in range(0, src.numel(), _WORDS_A_CHUNK):
        w = src[start:start + _WORDS_A_CHUNK]
        acc = torch.zeros_like(w)
        for shift, mask in _UNPERMUTE if inverse else _PERMUTE:
            acc |= (w << shift if shift >= 0 else w >> -shift) & _signed(mask)
        dst[start:start + _WORDS_A_CHUNK] = acc
    return out


def permute_words(blocks: torch.Tensor) -> torch.Tensor:
    """Checkpoint blocks [.., 16] u8 -> a new tensor of the same shape, each word in WORD_BITS order."""
    return _moved_bits(blocks, False)


def unpermute_words(blocks: torch.Tensor) -> torch.Tensor:
    """permute_words' inverse: blocks in WORD_BITS order -> a new tensor in checkpoint order."""
    return _moved_bits(blocks, True)
