"""Attention projections and lm_head at 3-64 tokens: cuBLAS (F.linear) against kernels/splitk_gemm.

The shapes of bench/gemv_bench.py (q|k|v 5120 x 2880, o 2880 x 4096, lm_head 201088 x 2880; both
models), timed the same way: a CUDA graph of calls cycling through copies of the weight (200 MB or
more, 4x the L2), median of 20 replays. Every config is first checked against an fp32 reference.
Prints us and weight TB/s; --sweep times the configs of SWEEP; writes JSON to --out.

    python3 -m bench.splitk_bench --sweep --commit <sha> --out $OUT
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import torch

from bench import provenance
from bench.gemv_bench import SHAPES, cold_weights, cublas_case, time_us
from gptoss_engine.kernels import splitk_gemm

# (BLOCK_N, BLOCK_K, SPLITS (0: splitk_gemm.config's choice), warps, stages)
SWEEP = ([(bn, bk, s, 4, 3) for bn in (32, 64, 128) for bk in (64, 128) for s in (0, 2, 4, 8)]
         + [(64, 128, 0, 4, 4), (64, 64, 0, 4, 4), (32, 128, 0, 4, 4), (64, 64, 0, 4, 6), (64, 128, 0, 8, 3)])
LM_HEAD = [(bn, bk, 1, w, st) for bn in (64, 128, 256) for bk in (64, 128) for w in (4, 8) for st in (3, 4)
           if bn * bk <= 16384]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="4,8,16,32,64")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-tokens", default="8,64", help="token counts the sweep covers (others: the default)")
    p.add_argument("--shapes", default="qkv,o,lm_head")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    p.add_argument("--commit", default=None)
    a = p.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    sweep_tokens = {int(t) for t in a.sweep_tokens.split(",")}
    out: dict[str, object] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "gpu": torch.cuda.get_device_name(), "commit": a.commit or provenance.commit(),
                              "rows": []}
    for name in a.shapes.split(","):
        N, K = SHAPES[name]
        ws, b = cold_weights(N, K, gen)
        n = len(ws)
        for T in (int(t) for t in a.tokens.split(",")):
            x, ref, cublas_us = cublas_case(ws, b, T, gen)
            rows = [("cublas", cublas_us)]
            grid = (LM_HEAD if name == "lm_head" else SWEEP) if a.sweep and T in sweep_tokens else []
            for cfg in [None, *grid]:
                splitk_gemm.CONFIG_OVERRIDE = cfg
                try:
                    got = splitk_gemm.splitk_linear(x, ws[0], b).float()
                    err = ((got - ref).abs().max() / ref.abs().max()).item()
                    if not err < 1e-2:
                        print(f"{name} T={T} {cfg}: max rel error {err:.2e}", flush=True)
                        continue
                    used = splitk_gemm.config(T, N, K, x.device)
                    rows.append((f"splitk {used}{'' if cfg else ' default'}",
                                 time_us(lambda i: splitk_gemm.splitk_linear(x, ws[i], b), n)))
                except Exception as e:  # a config that does not compile (shared memory) is skipped
                    print(f"{name} T={T} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                finally:
                    splitk_gemm.CONFIG_OVERRIDE = None
            rows.sort(key=lambda r: r[1])
            mb = N * K * 2 / 1e6
            print(f"{name} T={T}: " + "; ".join(f"{c} {us:.1f} us ({mb / us:.2f} TB/s)" for c, us in rows[:6])
                  + ("" if rows[0][0] == "cublas" else f"; cublas {dict(rows)['cublas']:.1f} us"), flush=True)
            out["rows"].append({"shape": name, "T": T, "times_us": dict(rows)})  # type: ignore[union-attr]
        del ws
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "splitk_bench.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
