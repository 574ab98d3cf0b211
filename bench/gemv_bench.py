"""Attention projections at decode sizes: cuBLAS (F.linear) against kernels/gemv.dense_gemv.

The two gpt-oss projection shapes (q|k|v 5120 x 2880 and o 2880 x 4096, both models) and lm_head
(201088 x 2880) at T = 1..8 tokens. Each timing is a CUDA graph of calls that cycle through copies of
the weight (200 MB or more in all, 4x the 50 MB L2), as a decode step meets each layer's weights
cold; median of 20 replays.
Every form is first checked against an fp32 reference. Prints us and weight TB/s; --sweep times
every (rows a program, ring stages) config; writes JSON to --out.

    python3 -m bench.gemv_bench --sweep --out $OUT
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
from typing import Callable

import torch
import torch.nn.functional as F

from bench import provenance
from gptoss_engine.kernels import gemv

SHAPES = {"qkv": (5120, 2880), "o": (2880, 4096), "lm_head": (201088, 2880)}


def copies(nbytes: int) -> int:
    """Weight copies to cycle through: at least 200 MB in all (4x the L2)."""
    return max(1, -(-200_000_000 // nbytes))


def cold_weights(N: int, K: int, gen: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """copies(...) random bf16 [N, K] weights to cycle through, and a bias [N]."""
    ws = [torch.randn(N, K, generator=gen, device="cuda").to(torch.bfloat16) * 0.02 for _ in range(copies(N * K * 2))]
    return ws, torch.randn(N, generator=gen, device="cuda").to(torch.bfloat16) * 0.02


def cublas_case(ws: list[torch.Tensor], b: torch.Tensor, T: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Random bf16 x [T, K], its fp32 reference x @ ws[0]^T + b, and cuBLAS's us a call over the copies."""
    x = torch.randn(T, ws[0].shape[1], generator=gen, device="cuda").to(torch.bfloat16)
    ref = x.float() @ ws[0].float().T + b.float()
    return x, ref, time_us(lambda i: F.linear(x, ws[i], b), len(ws))


def time_us(fn: Callable[[int], object], n: int) -> float:
    """Median us a call of fn(i) over graph replays of n calls (i = weight copy)."""
    for i in range(n):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(0)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for i in range(n):
            fn(i)
    g.replay()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,2,4,8")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    p.add_argument("--commit", default=None)
    a = p.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    configs = [(r, s) for r in (1, 2, 4) for s in (3, 4, 6, 8)] if a.sweep else [None]
    gemv.MAX_TOKENS = max(gemv.MAX_TOKENS, max(int(t) for t in a.tokens.split(",")))  # the bench may go past
    out: dict[str, object] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                              "gpu": torch.cuda.get_device_name(), "commit": a.commit or provenance.commit(),
                              "default": list(gemv._CONFIG), "rows": []}
    for name, (N, K) in SHAPES.items():
        ws, b = cold_weights(N, K, gen)
        n = len(ws)
        for T in (int(t) for t in a.tokens.split(",")):
            x, ref, cublas_us = cublas_case(ws, b, T, gen)
            rows = [("cublas", cublas_us)]
            for cfg in configs:
                gemv._CONFIG_OVERRIDE = cfg
                got = gemv.dense_gemv(x, ws[0], b).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                if not err < 1e-2:
                    print(f"{name} T={T} {cfg}: max rel error {err:.2e}", flush=True)
                    continue
                rows.append((f"gemv {cfg or gemv._CONFIG}", time_us(lambda i: gemv.dense_gemv(x, ws[i], b), n)))
            gemv._CONFIG_OVERRIDE = None
            rows.sort(key=lambda r: r[1])
            mb = N * K * 2 / 1e6
            print(f"{name} T={T}: " + "; ".join(f"{n} {us:.1f} us ({mb / us:.2f} TB/s)" for n, us in rows), flush=True)
            out["rows"].append({"shape": name, "T": T, "times_us": dict(rows)})  # type: ignore[union-attr]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gemv_bench.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
