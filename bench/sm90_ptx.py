"""Compile the MoE kernels for sm_90 on a machine without a GPU and count their loop's instructions.

Triton compiles without a device: this builds a kernel for GPUTarget("cuda", 90) with the
divisibility the JIT would infer for 16-divisible pointers and sizes (without it Triton shows no
pipelining at all), writes the TTGIR and PTX, and prints what decides the speed of a K loop: which
loads are asynchronous copies, the instruction mix of one trip, and the registers `ptxas -v` reports
(Triton's wheel ships ptxas). PERF_NOTES v5/v6 were found this way before any device time was spent.

    pip install --target /tmp/tritonpkg triton==3.6.0      # once; CPU wheels are the same wheel
    PYTHONPATH=/tmp/tritonpkg:. python -m bench.sm90_ptx grouped --bm 16 --bn 64 --bk 128 --mode 4
    PYTHONPATH=/tmp/tritonpkg:. python -m bench.sm90_ptx gemv --bn 8 --bk 512
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gptoss_engine.kernels import moe_gemv, moe_mxfp4

_POINTER_AND_SIZE = re.compile(r"^(\*|H$|I$|s_)")


def compile_sm90(fn: triton.runtime.jit.JITFunction, signature: dict[str, str], constexprs: dict[str, object],
                 warps: int, stages: int) -> triton.compiler.CompiledKernel:
    names = list(signature)
    # What the JIT assumes for pointers and for ints that are multiples of 16 (all sizes and strides
    # of the 20b/120b shapes except the unpadded scale stride, which the padded layout makes 96).
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or (signature[n] == "i32" and _POINTER_AND_SIZE.match(n))}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def loop_stats(ptx: str) -> tuple[int, collections.Counter[str]]:
    """Statements of the first inner loop (inline asm expanded), by opcode; moves excluded from the total."""
    lines = ptx.split("\n")
    start = next(i for i, line in enumerate(lines) if "Inner Loop Header" in line)
    label = lines[start].split(":")[0]
    end = next(i for i in range(start + 1, len(lines)) if "bra" in lines[i] and label in lines[i])
    ops: collections.Counter[str] = collections.Counter()
    for line in lines[start:end + 1]:
        for stmt in line.strip().split(";"):
            stmt = stmt.strip().lstrip("{}").strip()
            if stmt and not stmt.startswith(("$", "//", ".reg", ".loc")):
                words = stmt.split()
                ops[words[1] if words[0].startswith("@") else words[0]] += 1
    return sum(n for op, n in ops.items() if not op.startswith("mov.")), ops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernel", choices=["grouped", "gemv"])
    p.add_argument("--bm", type=int, default=16)
    p.add_argument("--bn", type=int, default=64)
    p.add_argument("--bk", type=int, default=128)
    p.add_argument("--mode", type=int, default=4, help="grouped: 0 dot_scaled, 3 PTX dequant, 4 one multiply")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--prefetch", action="store_true", help="gemv: next trip's loads issued first (PREFETCH)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/sm90_ptx"))
    args = p.parse_args(argv)
    if args.kernel == "grouped":
        fn = moe_mxfp4._gate_up_kernel
        sig = {"x_ptr": "*bf16", "blk_ptr": "*u8", "scl_ptr": "*u8", "bias_ptr": "*bf16", "inter_ptr": "*bf16",
               "sorted_pair_ptr": "*i32", "block_expert_ptr": "*i32", "num_pairs": "i32", "H": "i32", "I": "i32",
               "limit": "fp32", "alpha": "fp32", "s_xt": "i32", "s_be": "i32", "s_bn": "i32", "s_se": "i32",
               "s_sn": "i32", "s_bias_e": "i32", "s_it": "i32", "TOPK": "constexpr", "BM": "constexpr",
               "BN": "constexpr", "BK": "constexpr", "MODE": "constexpr", "SWAP": "constexpr", "PAD_S": "constexpr"}
        ce = dict(TOPK=4, BM=args.bm, BN=args.bn, BK=args.bk, MODE=args.mode, SWAP=args.mode != 0, PAD_S=True)
    else:
        fn = moe_gemv._gate_up_gemv
        sig = {"x_ptr": "*bf16", "ids_ptr": "*i32", "blk_ptr": "*u8", "scl_ptr": "*u8", "bias_ptr": "*bf16",
               "inter_ptr": "*fp32", "H": "i32", "I": "i32", "limit": "fp32", "alpha": "fp32", "s_xt": "i32",
               "s_be": "i32", "s_bn": "i32", "s_se": "i32", "s_sn": "i32", "s_bias_e": "i32", "s_it": "i32",
               "TOPK": "constexpr", "BN": "constexpr", "BK": "constexpr", "ASM": "constexpr", "PAD_S": "constexpr",
               "ONE_MUL": "constexpr", "PREFETCH": "constexpr"}
        ce = dict(TOPK=4, BN=args.bn, BK=args.bk, ASM=True, PAD_S=True, ONE_MUL=True, PREFETCH=args.prefetch)
    k = compile_sm90(fn, sig, ce, args.warps, args.stages)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.kernel}_{args.bm}x{args.bn}x{args.bk}_m{args.mode}_w{args.warps}_s{args.stages}{'_pf' if args.prefetch else ''}"
    for ext in ("ttgir", "ptx"):
        (args.out / f"{name}.{ext}").write_text(k.asm[ext])
    total, ops = loop_stats(k.asm["ptx"])
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    regs = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(args.out / f"{name}.ptx"), "-o", "/dev/null"],
                          capture_output=True, text=True).stderr
    used = " ".join(re.findall(r"Used \d+ registers", regs)) or "registers: ptxas not run"
    print(f"{name}: async copies {k.asm['ttgir'].count('async_copy_global_to_local')}, shared {k.metadata.shared} B, "
          f"{used}")
    print(f"loop: {total} instructions besides moves; " + ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))
    print(f"TTGIR/PTX in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
