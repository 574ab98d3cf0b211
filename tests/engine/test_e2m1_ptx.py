"""The MoE kernels' inline-PTX e2m1 dequant, run in a small emulator against mxfp4.dequantize.

The PTX text is read from the kernel module's source (importing it needs Triton, which CPU CI
lacks); the GPU parity tests (tests/gpu) then check the kernels that use it on the device."""
from __future__ import annotations

import pathlib
import random
import re

import torch

from gptoss_engine import mxfp4
from tests.engine.ptx_emulator import bf16_value, run

SRC = pathlib.Path(__file__).parents[2] / "gptoss_engine" / "kernels" / "e2m1.py"


def _asm() -> str:
    m = re.search(r'E2M1_ASM: tl\.constexpr = tl\.constexpr\("""(.*?)"""\)', SRC.read_text(), re.S)
    assert m, "E2M1_ASM not found in e2m1.py"
    return m.group(1)


def _s64(s: int) -> int:
    """dequant_asm's scale operand: bf16 2^(s-64) in both lanes."""
    b = ((s + 63) << 7) & 0xFFFF
    return b | b << 16


def _reference(byte: int, scale: int) -> tuple[float, float]:
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = byte
    v = mxfp4.dequantize(blocks, torch.tensor([[scale]], dtype=torch.uint8))[0, :2]
    return float(v[0]), float(v[1])


def test_dequant_asm_is_bit_exact_for_every_byte() -> None:
    asm = _asm()
    rng = random.Random(0)
    # Every byte value in every position, scales from tiny to large (2^-27 .. 2^64).
    for first in range(0, 256, 4):
        for scale_pair in ((127, 127), (100, 191), (rng.randrange(100, 192), rng.randrange(100, 192))):
            data = [(first + i * 67) % 256 for i in range(4)]
            word = data[0] | data[1] << 8 | data[2] << 16 | data[3] << 24
            out = run(asm, {"$4": word, "$5": _s64(scale_pair[0]), "$6": _s64(scale_pair[1])})
            lo = [out["$0"], out["$0"] >> 16, out["$1"], out["$1"] >> 16]
            hi = [out["$2"], out["$2"] >> 16, out["$3"], out["$3"] >> 16]
            for i in range(4):
                want = _reference(data[i], scale_pair[i // 2])
                got = (bf16_value(lo[i]), bf16_value(hi[i]))
                assert got == want, (data[i], scale_pair[i // 2], got, want)
