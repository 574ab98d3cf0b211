"""The MoE kernels' inline-PTX e2m1 dequant, run in a small emulator against mxfp4.dequantize.

The kernel module needs Triton to import, which CPU CI lacks: its source is executed here against a
stub of `triton` that is just enough for the module's top level, so the PTX strings checked are the
ones the kernels compile. The GPU parity tests (tests/gpu) check the kernels that use them."""
from __future__ import annotations

import pathlib
import random
import sys
import types

import pytest
import torch

from gptoss_engine import mxfp4
from tests.engine.ptx_emulator import bf16_value, run

SRC = pathlib.Path(__file__).parents[2] / "gptoss_engine" / "kernels" / "e2m1.py"


def _module_strings(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    class Constexpr:
        def __init__(self, value: object) -> None:
            self.value = value

    tl = types.ModuleType("triton.language")
    tl.constexpr = Constexpr  # type: ignore[attr-defined]
    triton = types.ModuleType("triton")
    triton.jit = lambda fn: fn  # type: ignore[attr-defined]
    triton.language = tl  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.language", tl)
    ns: dict[str, object] = {"__name__": "e2m1_under_test"}
    exec(compile(SRC.read_text(), str(SRC), "exec"), ns)  # noqa: S102 - our own source file
    return {k: v.value for k, v in ns.items() if isinstance(v, Constexpr) and isinstance(v.value, str)}


def _scale_operand(s: int, one_mul: bool) -> int:
    """dequant_asm's scale operand in both lanes: bf16 2^(s-1) (one multiply) or 2^(s-64)."""
    b = (((s + 126) if one_mul else (s + 63)) << 7) & 0xFFFF
    return b | b << 16


def _reference(byte: int, scale: int) -> tuple[float, float]:
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = byte
    v = mxfp4.dequantize(blocks, torch.tensor([[scale]], dtype=torch.uint8))[0, :2]
    return float(v[0]), float(v[1])


@pytest.mark.parametrize("name,max_scale", [("E2M1_ASM", 191), ("E2M1_ASM_1MUL", 128)])
def test_dequant_asm_is_bit_exact_for_every_byte(monkeypatch: pytest.MonkeyPatch, name: str,
                                                 max_scale: int) -> None:
    asm = _module_strings(monkeypatch)[name]
    rng = random.Random(0)
    # Every byte value in every position; scales from tiny (2^-27) to the variant's largest.
    for first in range(0, 256, 4):
        for scale_pair in ((127, 127), (100, max_scale), (rng.randrange(100, max_scale + 1),
                                                          rng.randrange(100, max_scale + 1))):
            data = [(first + i * 67) % 256 for i in range(4)]
            word = data[0] | data[1] << 8 | data[2] << 16 | data[3] << 24
            one = name.endswith("1MUL")
            out = run(asm, {"$4": word, "$5": _scale_operand(scale_pair[0], one),
                            "$6": _scale_operand(scale_pair[1], one)})
            lo = [out["$0"], out["$0"] >> 16, out["$1"], out["$1"] >> 16]
            hi = [out["$2"], out["$2"] >> 16, out["$3"], out["$3"] >> 16]
            for i in range(4):
                want = _reference(data[i], scale_pair[i // 2])
                got = (bf16_value(lo[i]), bf16_value(hi[i]))
                assert got == want, (name, data[i], scale_pair[i // 2], got, want)


@pytest.mark.parametrize("name,max_scale", [("E2M1_WORD_ASM", 191), ("E2M1_WORD_ASM_1MUL", 128)])
def test_word_dequant_asm_order_and_bits(monkeypatch: pytest.MonkeyPatch, name: str, max_scale: int) -> None:
    """The one-word form the GEMV uses: one scale operand for all 8 codes, and its outputs in the
    documented order $0 = (k0, k2), $1 = (k4, k6), $2 = (k1, k3), $3 = (k5, k7), low half first."""
    asm = _module_strings(monkeypatch)[name]
    assert "$6" not in asm
    one = name.endswith("1MUL")
    rng = random.Random(1)
    for _ in range(200):
        data = [rng.randrange(256) for _ in range(4)]
        scale = rng.randrange(100, max_scale + 1)
        blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
        blocks[0, 0, :4] = torch.tensor(data, dtype=torch.uint8)
        want = mxfp4.dequantize(blocks, torch.tensor([[scale]], dtype=torch.uint8))[0, :8].tolist()
        out = run(asm, {"$4": data[0] | data[1] << 8 | data[2] << 16 | data[3] << 24,
                        "$5": _scale_operand(scale, one)})
        order = {"$0": (0, 2), "$1": (4, 6), "$2": (1, 3), "$3": (5, 7)}
        for reg, (k_lo, k_hi) in order.items():
            assert bf16_value(out[reg]) == want[k_lo], (name, data, scale, reg)
            assert bf16_value(out[reg] >> 16) == want[k_hi], (name, data, scale, reg)


@pytest.mark.parametrize("name,max_scale", [("E2M1_PERM_ASM", 191), ("E2M1_PERM_ASM_1MUL", 128)])
def test_permuted_word_dequant_matches_the_checkpoint_word(monkeypatch: pytest.MonkeyPatch, name: str,
                                                           max_scale: int) -> None:
    """The 9-instruction dequant of a word in mxfp4.WORD_BITS order gives exactly what the checkpoint
    word's dequant gives, in the same output order (so every kernel's x shuffles stay)."""
    strings = _module_strings(monkeypatch)
    asm = strings[name]
    one = name.endswith("1MUL")
    ints = [ln for ln in asm.splitlines() if ln.split()[:1] and ln.split()[0] in
            ("and.b32", "shf.l.wrap.b32", "lop3.b32", "shr.b32", "shl.b32", "prmt.b32")]
    assert sum(ln.count(";") for ln in ints) == 9          # the point of the layout
    rng = random.Random(2)
    words = [0, 0xFFFFFFFF] + [rng.getrandbits(32) for _ in range(2000)]
    for word in words:
        scale = rng.randrange(100, max_scale + 1)
        blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
        blocks[0, 0, :4] = torch.tensor([(word >> 8 * i) & 0xFF for i in range(4)], dtype=torch.uint8)
        stored = int(mxfp4.permute_words(blocks).view(torch.int32)[0, 0, 0]) & 0xFFFFFFFF
        operand = _scale_operand(scale, one)
        got = run(asm, {"$4": stored, "$5": operand, "$6": 0})
        want = run(strings[name.replace("PERM", "WORD")], {"$4": word, "$5": operand})
        for reg in ("$0", "$1", "$2", "$3"):
            assert got[reg] == want[reg], (name, hex(word), scale, reg)
