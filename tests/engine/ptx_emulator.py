"""A tiny PTX emulator: just the integer and bf16x2 instructions of the e2m1 dequant block
(gptoss_engine/kernels/e2m1.py), so its bit tricks are checked exactly on a machine without a GPU."""
from __future__ import annotations

import struct

M32 = 0xFFFFFFFF


def bf16_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def _bf16_bits(x: float) -> int:
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF      # round to nearest even


def _mul_bf16x2(a: int, b: int) -> int:
    out = 0
    for lane in (0, 1):
        p = bf16_value(a >> 16 * lane) * bf16_value(b >> 16 * lane)
        out |= _bf16_bits(p) << 16 * lane
    return out


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        s = (sel >> 4 * i) & 0xF
        byte = src[s & 7]
        if s & 8:                                   # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = ((a >> bit) & 1) << 2 | ((b >> bit) & 1) << 1 | ((c >> bit) & 1)   # a=0xF0, b=0xCC, c=0xAA
        out |= ((lut >> idx) & 1) << bit
    return out


def run(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """Execute `asm` (statements separated by ';', braces and .reg lines ignored) on `regs`."""
    regs = dict(regs)

    def val(tok: str) -> int:
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    ops = {
        "mov.b32": lambda a: a[0] & M32,
        "prmt.b32": lambda a: _prmt(*a),
        "shl.b32": lambda a: (a[0] << a[1]) & M32,
        "shr.b32": lambda a: (a[0] & M32) >> a[1],
        "shr.u32": lambda a: (a[0] & M32) >> a[1],
        "and.b32": lambda a: a[0] & a[1],
        "or.b32": lambda a: a[0] | a[1],
        "lop3.b32": lambda a: _lop3(*a),
        # Funnel shift: the high 32 bits of (b:a) << c; with a == b, a left rotation.
        "shf.l.wrap.b32": lambda a: (((a[1] << 32 | a[0]) << (a[2] & 31)) >> 32) & M32,
        "mul.rn.bf16x2": lambda a: _mul_bf16x2(*a),
    }
    for stmt in asm.replace("\n", " ").split(";"):
        stmt = stmt.strip().strip("{}").strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        dst, *args = [t.strip() for t in rest.split(",")]
        if op not in ops:
            raise ValueError(f"the emulator does not know {op!r}")
        regs[dst] = ops[op]([val(t) for t in args])
    return regs
