"""e2m1 (MXFP4) decoding inside Triton kernels, shared by the MoE kernels.

Two forms: `e2m1_x2e14` + `scale_x2e14` (plain Triton: fp16 bit placement, runs anywhere, the CPU
interpreter included) and `dequant_asm` (inline PTX, sm_90 only: bf16x2 mul).
"""
import triton
import triton.language as tl


@triton.jit
def e2m1_x2e14(nib):
    """u8/int nibbles (0..15) -> their e2m1 values * 2^-14, fp32. A code s|e1e0|m placed as fp16
    bits s<<15 | e<<10 | m<<9 reads 2^(e-15) * (1 + m/2) for e > 0 and m * 2^-15 for e = 0 (an fp16
    subnormal): the e2m1 value times 2^-14 in both cases."""
    n = nib.to(tl.int32)
    bits = ((n & 8) << 12) | ((n & 7) << 9)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def scale_x2e14(s):
    """e8m0 scales -> 2^(s-127) * 2^14 (fp32, built from its bits): with e2m1_x2e14, the weight."""
    return ((s.to(tl.int32) + 14) << 23).to(tl.float32, bitcast=True)


@triton.jit
def load_scales(s_ptr, rows, row_ok, s_sn, kg, K, OTHER: tl.constexpr, PAD_S: tl.constexpr):
    """Scale groups kg of rows -> [R, G] u8. PAD_S (mxfp4.unmasked_scale_reads): no mask along kg, so
    the load can be an asynchronous copy; the padding holds 127 and meets zero-masked weights."""
    ptrs = s_ptr + rows[:, None].to(tl.int64) * s_sn + kg[None, :]
    if PAD_S:
        return tl.load(ptrs, mask=row_ok[:, None], other=OTHER)
    return tl.load(ptrs, mask=row_ok[:, None] & (kg[None, :] < K // 32), other=OTHER)


# Four packed bytes (8 e2m1 codes) -> the 4 low-nibble and the 4 high-nibble values as bf16x2 pairs,
# each times its group scale. prmt puts bytes (b0, b1) in the high bytes of the two 16-bit lanes; a
# code s|e1e0|m must land as bf16 bits s<<15 | e1e0m<<6, which reads exactly 2^-126 times the e2m1
# value (e = 0 gives the bf16 subnormal m * 2^-127). The magnitude bits and the sign bit need
# different shifts; one lop3 computes (a | b) & mask over both shifted copies, which is right because
# each copy is zero where the other one's bits belong (the high nibble's copy needs the low nibble
# cleared first): 7 integer instructions per 4 weights, the integer pipe being what bounds the decode
# MoE (PERF_NOTES v6). Then the scale, exactly:
#   two multiplies, by 2^63 and by the group's 2^(s-64) (operands $5/$6): any scale s <= 191;
#   one multiply by 2^(s-1): s <= 128 (bf16's largest power of two is 2^127) -- the weights' largest
#   scale is recorded at load time (ExpertWeights.scale_max) to choose.
# Both are checked bit-exact against mxfp4.dequantize by tests/engine/test_e2m1_ptx.py.
_E2M1_PTX = """
{
.reg .b32 y, h, a, b, z, c, m;
mov.b32 z, 0;
mov.b32 c, 0x5F005F00;
mov.b32 m, 0x81C081C0;
prmt.b32 y, $4, z, 0x1404;
shr.b32 a, y, 2; shl.b32 b, y, 4; lop3.b32 a, a, b, m, 0xA8;
SCALE $0, a, $5;
and.b32 h, y, 0xF000F000; shr.b32 a, h, 6; lop3.b32 a, a, h, m, 0xA8;
SCALE $2, a, $5;
prmt.b32 y, $4, z, 0x3424;
shr.b32 a, y, 2; shl.b32 b, y, 4; lop3.b32 a, a, b, m, 0xA8;
SCALE $1, a, $6;
and.b32 h, y, 0xF000F000; shr.b32 a, h, 6; lop3.b32 a, a, h, m, 0xA8;
SCALE $3, a, $6;
}
"""


def _scaled(ptx: str, one_mul: bool) -> str:
    """A dequant template with its SCALE statements as two bf16x2 multiplies (by 2^63, then by the
    scale operand) or one (and no 2^63 constant)."""
    mul = "mul.rn.bf16x2 $" if one_mul else "mul.rn.bf16x2 a, a, c; mul.rn.bf16x2 $"
    return "".join(line.replace("SCALE $", mul) + "\n" for line in ptx.strip("\n").splitlines()
                   if not (one_mul and "mov.b32 c," in line))


E2M1_ASM: tl.constexpr = tl.constexpr(_scaled(_E2M1_PTX, False))
E2M1_ASM_1MUL: tl.constexpr = tl.constexpr(_scaled(_E2M1_PTX, True))


# The same on one int32 word (4 bytes) with one scale for all 8 codes (a word never straddles a
# 32-code group): operands $4 the word, $5 the scale pair; outputs bf16x2 words
# $0 = (k0, k2), $1 = (k4, k6), $2 = (k1, k3), $3 = (k5, k7) (low half first; k = code index in the word).
E2M1_WORD_ASM: tl.constexpr = tl.constexpr(E2M1_ASM.value.replace("$6", "$5"))
E2M1_WORD_ASM_1MUL: tl.constexpr = tl.constexpr(E2M1_ASM_1MUL.value.replace("$6", "$5"))


# The same outputs from a word in mxfp4.WORD_BITS order (the permuted layout the GPU keeps on sm_90):
# each pair's four bits a code already sit where the bf16 pair wants them after one left rotation
# (0, 4, 10) under the mask 0x81C081C0, and the last pair's after rotations by 6 and 14 -- 9 integer
# instructions a word (and, 3 x (shf + and), shf, shf, and, lop3) against the 14 above. Word form
# only: a kernel reads permuted blocks as int32 words (dequant_words_asm / dequant_words_bf16).
_E2M1_PERM_PTX = """
{
.reg .b32 a, b, c, m, n;
mov.b32 c, 0x5F005F00;
mov.b32 m, 0x81C081C0;
mov.b32 n, 0x80C080C0;
and.b32 a, $4, m;
SCALE $0, a, $5;
shf.l.wrap.b32 a, $4, $4, 4; and.b32 a, a, m;
SCALE $1, a, $5;
shf.l.wrap.b32 a, $4, $4, 10; and.b32 a, a, m;
SCALE $2, a, $5;
shf.l.wrap.b32 a, $4, $4, 6; shf.l.wrap.b32 b, $4, $4, 14; and.b32 b, b, 0x01000100; lop3.b32 a, a, n, b, 0xEA;
SCALE $3, a, $5;
}
"""
E2M1_PERM_ASM: tl.constexpr = tl.constexpr(_scaled(_E2M1_PERM_PTX, False))
E2M1_PERM_ASM_1MUL: tl.constexpr = tl.constexpr(_scaled(_E2M1_PERM_PTX, True))


def word_asm(permuted: bool, one_mul: bool) -> str:
    """The one-word dequant for a layout (checkpoint or mxfp4.WORD_BITS words) and scale form."""
    if permuted:
        return (E2M1_PERM_ASM_1MUL if one_mul else E2M1_PERM_ASM).value
    return (E2M1_WORD_ASM_1MUL if one_mul else E2M1_WORD_ASM).value


@triton.jit
def permute_words(words):
    """int32 words in checkpoint order -> the same words in mxfp4.WORD_BITS order: mxfp4._PERMUTE's
    shift terms as constants (kernels/word_permute.py's load-time pass; checked by tests/gpu)."""
    w = words.to(tl.uint32, bitcast=True)
    out = (w & 0x08007000) | ((w << 4) & 0x04000000) | ((w << 6) & 0x002001C0) | ((w << 12) & 0x00008000)
    out |= ((w << 14) & 0x01C00000) | ((w << 20) & 0x80000000) | ((w << 24) & 0x70000000)
    out |= ((w >> 2) & 0x00000020) | ((w >> 6) & 0x021C0000) | ((w >> 8) & 0x00000800)
    out |= ((w >> 12) & 0x00030000) | ((w >> 14) & 0x0000021C) | ((w >> 20) & 0x00000403)
    return out.to(tl.int32, bitcast=True)


@triton.jit
def unpermute_words(words):
    """int32 words in mxfp4.WORD_BITS order -> the same words in checkpoint order (plain integer
    Triton, so the paths without the PTX dequant read permuted blocks too): mxfp4._UNPERMUTE's shift
    terms as constants, checked against it by tests/gpu/test_moe_mxfp4.py."""
    w = words.to(tl.uint32, bitcast=True)
    out = (w & 0x08007000) | ((w << 2) & 0x00000080) | ((w << 6) & 0x87000000) | ((w << 8) & 0x00080000)
    out |= ((w >> 24) & 0x00000070) | ((w << 12) & 0x30000000) | ((w >> 20) & 0x00000800)
    out |= ((w << 14) & 0x00870000) | ((w >> 14) & 0x00000700) | ((w << 20) & 0x40300000)
    out |= ((w >> 12) & 0x00000008) | ((w >> 6) & 0x00008007) | ((w >> 4) & 0x00400000)
    return out.to(tl.int32, bitcast=True)


@triton.jit
def dequant_words_asm(words, s, R: tl.constexpr, W: tl.constexpr, ONE_MUL: tl.constexpr = False,
                      PERMUTED: tl.constexpr = False):
    """words [R, W] int32 (8 codes each) and scales s [R, W//4] u8 -> four [R, W] int32 tensors of
    scaled bf16 pairs, ordered as E2M1_WORD_ASM's outputs. PERMUTED: words in mxfp4.WORD_BITS order."""
    if ONE_MUL:
        sb = (s.to(tl.int32) + 126) << 7                                   # bf16 bits of 2^(s-1)
    else:
        sb = (s.to(tl.int32) + 63) << 7                                    # 2^(s-64)
    sb = sb | (sb << 16)
    sb = tl.reshape(tl.broadcast_to(sb[:, :, None], (R, W // 4, 4)), (R, W))
    return tl.inline_asm_elementwise((E2M1_PERM_ASM_1MUL if ONE_MUL else E2M1_PERM_ASM) if PERMUTED
                                     else (E2M1_WORD_ASM_1MUL if ONE_MUL else E2M1_WORD_ASM), "=r,=r,=r,=r,r,r",
                                     [words, sb], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                     is_pure=True, pack=1)


@triton.jit
def bf16_halves(pair):
    """int32 holding a bf16 pair -> (low, high) bf16: register halves, no instruction once compiled."""
    return tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pair], dtype=(tl.bfloat16, tl.bfloat16),
                                     is_pure=True, pack=1)


@triton.jit
def dequant_words_codes(words, s, R: tl.constexpr, W: tl.constexpr, ONE_MUL: tl.constexpr = False,
                        PERMUTED: tl.constexpr = False):
    """dequant_words_asm's pairs as the eight scaled codes k0..k7 of each word, [R, W] bf16 each."""
    p02, p46, p13, p57 = dequant_words_asm(words, s, R, W, ONE_MUL, PERMUTED)
    k0, k2 = bf16_halves(p02)
    k4, k6 = bf16_halves(p46)
    k1, k3 = bf16_halves(p13)
    k5, k7 = bf16_halves(p57)
    return k0, k1, k2, k3, k4, k5, k6, k7


@triton.jit
def dequant_words_bf16(words, s, R: tl.constexpr, W: tl.constexpr, ONE_MUL: tl.constexpr = False,
                       PERMUTED: tl.constexpr = False):
    """words [R, W] int32 (8 codes each) and scales s [R, W//4] u8 -> the weights [R, 8 W] bf16 in k
    order (dequant_words_asm's pairs split and interleaved back). For blocks in mxfp4.WORD_BITS order,
    whose codes need whole words: dequant_asm packs whichever 4 bytes a thread's registers hold next."""
    k0, k1, k2, k3, k4, k5, k6, k7 = dequant_words_codes(words, s, R, W, ONE_MUL, PERMUTED)
    # join stacks on a new last axis, so the most significant bit of k within the word goes first.
    a = tl.join(tl.join(tl.join(k0, k4), tl.join(k2, k6)), tl.join(tl.join(k1, k5), tl.join(k3, k7)))
    return tl.reshape(a, (R, 8 * W))


@triton.jit
def dequant_asm(packed, s, R: tl.constexpr, C: tl.constexpr, ONE_MUL: tl.constexpr = False):
    """packed [R, C] u8 (two codes a byte) and scales s [R, C//16] u8 -> (low-nibble, high-nibble)
    weights, each [R, C] bf16, scaled (E2M1_ASM; ONE_MUL: E2M1_ASM_1MUL, every scale <= 128)."""
    if ONE_MUL:
        sb = ((s.to(tl.int32) + 126) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)   # 2^(s-1)
        sb = tl.reshape(tl.broadcast_to(sb[:, :, None], (R, C // 16, 16)), (R, C))
        return tl.inline_asm_elementwise(E2M1_ASM_1MUL, "=r,=r,=r,=r,r,r,r", [packed, sb],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    sb = ((s.to(tl.int32) + 63) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)   # 2^(s-64)
    sb = tl.reshape(tl.broadcast_to(sb[:, :, None], (R, C // 16, 16)), (R, C))
    return tl.inline_asm_elementwise(E2M1_ASM, "=r,=r,=r,=r,r,r,r", [packed, sb],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
