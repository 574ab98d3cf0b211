"""e2m1 (MXFP4) -> bf16 dequantization in inline PTX, shared by the MoE kernels (sm_90 only: bf16x2 mul)."""
import triton.language as tl

# Four packed bytes (8 e2m1 codes) -> the 4 low-nibble and the 4 high-nibble values as bf16x2 pairs,
# each times its group scale. prmt spreads bytes (b0, b1) into the two 16-bit lanes; in each lane a
# code s|e1e0|m lands as bf16 bits s<<15 | e1e0m<<6, which reads exactly 2^-126 times the e2m1 value
# (e = 0 gives the bf16 subnormal m * 2^-127); the two bf16x2 products by 2^63 and by the group's
# 2^(s-64) restore it and apply the scale, all exact. About 3 instructions per weight instead of the
# ~8.6 of Triton's dot_scaled upcast (PTX count, PERF_NOTES v5).
E2M1_ASM: tl.constexpr = tl.constexpr("""
{
.reg .b32 y, t, u, z, c;
mov.b32 z, 0;
mov.b32 c, 0x5F005F00;
prmt.b32 y, $4, z, 0x4140;
shl.b32 t, y, 6;  and.b32 t, t, 0x01C001C0; shl.b32 u, y, 12; and.b32 u, u, 0x80008000; or.b32 t, t, u;
mul.rn.bf16x2 t, t, c; mul.rn.bf16x2 $0, t, $5;
shl.b32 t, y, 2;  and.b32 t, t, 0x01C001C0; shl.b32 u, y, 8;  and.b32 u, u, 0x80008000; or.b32 t, t, u;
mul.rn.bf16x2 t, t, c; mul.rn.bf16x2 $2, t, $5;
prmt.b32 y, $4, z, 0x4342;
shl.b32 t, y, 6;  and.b32 t, t, 0x01C001C0; shl.b32 u, y, 12; and.b32 u, u, 0x80008000; or.b32 t, t, u;
mul.rn.bf16x2 t, t, c; mul.rn.bf16x2 $1, t, $6;
shl.b32 t, y, 2;  and.b32 t, t, 0x01C001C0; shl.b32 u, y, 8;  and.b32 u, u, 0x80008000; or.b32 t, t, u;
mul.rn.bf16x2 t, t, c; mul.rn.bf16x2 $3, t, $6;
}
""")
