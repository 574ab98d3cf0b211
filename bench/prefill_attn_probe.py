"""Probe: the prefill attention of one fresh prompt, our paged kernel against torch's fused
attention backends (cuDNN, FlashAttention-2), with the sink folded in afterwards from the returned
log-sum-exp (out * sigmoid(lse - sink)); and the prefill dequant pass's tiles. Prints us a layer and
TFLOP/s, and each variant's error against our kernel.

    python3 -m bench.prefill_attn_probe --out $OUT/probe.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import traceback

import torch
import triton

from bench.gpu_bench import BLOCK_SIZE, time_ms, uniform_batch
from gptoss_engine.kernels.paged_attention import paged_attention

HQ, HKV, D, WINDOW = 64, 8, 64, 128


def _sink_fold(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """out [1, H, S, D] and natural-log lse [1, H, S] of a sink-less softmax -> the sink's output
    [S, H, D]: the sink adds exp(sink) to each row's denominator, scaling it by sigmoid(lse - sink)."""
    w = torch.sigmoid(lse.float().reshape(1, -1, out.shape[2]) - sinks.float()[None, :, None])
    return (out.float() * w[..., None]).to(out.dtype)[0].transpose(0, 1)


def attention(results: dict, lengths: list[int]) -> None:
    scale = D ** -0.5
    for S in lengths:
        blocks = S // BLOCK_SIZE + 2
        b = uniform_batch(1, 0, S, blocks)
        qkv = torch.randn(S, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
        q = qkv[:, :HQ * D].view(S, HQ, D)
        k = qkv[:, HQ * D:(HQ + HKV) * D].view(S, HKV, D)
        v = qkv[:, (HQ + HKV) * D:].view(S, HKV, D)
        pool = torch.zeros(blocks, 1, 2, BLOCK_SIZE, HKV, D, device="cuda", dtype=torch.bfloat16)
        for t in range(0, S, BLOCK_SIZE):
            n = min(BLOCK_SIZE, S - t)
            pool[t // BLOCK_SIZE, 0, 0, :n] = k[t:t + n]
            pool[t // BLOCK_SIZE, 0, 1, :n] = v[t:t + n]
        sinks = torch.randn(HQ, device="cuda")
        flops_full = 4 * S * S / 2 * HQ * D
        for window in (None, WINDOW):
            name = f"S{S} {'full' if window is None else 'sliding'}"
            ref = paged_attention(q, pool, 0, b.full_block_tables, b, sinks, scale, window)
            row: dict = {}

            def rec(label: str, fn, check: bool = True) -> None:
                try:
                    got = fn()
                    err = None
                    if check:
                        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                    us = time_ms(fn, warmup=3, iters=20) * 1e3
                    row[label] = {"us": us, "rel_err": err}
                    tf = flops_full / us / 1e6 if window is None else None
                    print(f"{name} {label}: {us:.1f} us" + (f" ({tf:.0f} TFLOP/s)" if tf else "")
                          + (f" rel err {err:.2e}" if err is not None else ""), flush=True)
                except Exception as e:  # a backend that refuses these shapes: recorded, not fatal
                    row[label] = {"error": f"{type(e).__name__}: {e}"[:400]}
                    print(f"{name} {label}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)

            rec("ours", lambda: paged_attention(q, pool, 0, b.full_block_tables, b, sinks, scale, window))
            q4 = q.unsqueeze(0).transpose(1, 2)                       # [1, HQ, S, D], strided
            k4, v4 = k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2)
            if window is None:
                def cudnn_expand() -> torch.Tensor:
                    ke = k4.repeat_interleave(HQ // HKV, dim=1)
                    ve = v4.repeat_interleave(HQ // HKV, dim=1)
                    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q4, ke, ve, None, True, 0.0, True, False,
                                                                            scale=scale)
                    return _sink_fold(r[0], r[1], sinks)

                def cudnn_gqa() -> torch.Tensor:
                    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q4, k4, v4, None, True, 0.0, True, False,
                                                                            scale=scale)
                    return _sink_fold(r[0], r[1], sinks)

                def cudnn_only() -> torch.Tensor:
                    ke = k4.repeat_interleave(HQ // HKV, dim=1)
                    ve = v4.repeat_interleave(HQ // HKV, dim=1)
                    return torch.ops.aten._scaled_dot_product_cudnn_attention(q4, ke, ve, None, True, 0.0, True,
                                                                               False, scale=scale)[0]

                def flash_gqa() -> torch.Tensor:
                    r = torch.ops.aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, True, False, scale=scale)
                    return _sink_fold(r[0], r[1], sinks)

                rec("cudnn_expand+sink", cudnn_expand)
                rec("cudnn_gqa+sink", cudnn_gqa)
                rec("cudnn_expand_nosink", cudnn_only, check=False)
                rec("flash_gqa+sink", flash_gqa)
                try:
                    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q4, k4.repeat_interleave(8, 1),
                                                                           v4.repeat_interleave(8, 1), None, True,
                                                                           0.0, True, False, scale=scale)
                    row["cudnn_shapes"] = {"out": [list(r[0].shape), list(r[0].stride())],
                                           "lse": [list(r[1].shape), list(r[1].stride()), str(r[1].dtype)]}
                    print(f"{name} cudnn shapes {row['cudnn_shapes']}", flush=True)
                except Exception as e:
                    print(f"{name} cudnn shapes: ERROR {e}", flush=True)
            cu = torch.tensor([0, S], device="cuda", dtype=torch.int32)

            def flash_varlen() -> torch.Tensor:
                r = torch.ops.aten._flash_attention_forward(
                    q, k, v, cu, cu, S, S, 0.0, True, False, scale=scale,
                    window_size_left=(window - 1) if window else -1, window_size_right=0 if window else -1)
                out, lse = r[0], r[1]            # [S, HQ, D]; lse [HQ, S] or [1, HQ, S]
                lse = lse.reshape(1, HQ, S)
                return _sink_fold(out.unsqueeze(0).transpose(1, 2), lse, sinks)

            rec("flash_varlen+sink", flash_varlen)
            try:
                r = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, S, S, 0.0, True, False, scale=scale)
                row["flash_varlen_shapes"] = {"out": list(r[0].shape), "lse": list(r[1].shape)}
                print(f"{name} flash varlen shapes {row['flash_varlen_shapes']}", flush=True)
            except Exception as e:
                print(f"{name} flash varlen shapes: ERROR {e}", flush=True)
            results[name] = row


def dequant(results: dict) -> None:
    from gptoss_engine.kernels import moe_grouped_mm as g
    E, H, I = 32, 2880, 2880
    for label, (N, K) in {"gate_up": (2 * I, H), "down": (H, I)}.items():
        blocks = torch.randint(0, 256, (E * N, K // 2), device="cuda", dtype=torch.uint8)
        scales = torch.randint(118, 128, (E * N, K // 32), device="cuda", dtype=torch.uint8)
        out = torch.empty(E * N, K, device="cuda", dtype=torch.bfloat16)
        moved = blocks.numel() + scales.numel() + out.numel() * 2
        src = torch.empty_like(out)
        copy_us = time_ms(lambda: out.copy_(src), 3, 20) * 1e3
        fill_us = time_ms(lambda: out.zero_(), 3, 20) * 1e3
        print(f"dequant {label}: bf16 copy {copy_us:.1f} us ({out.numel() * 4 / copy_us / 1e6:.2f} TB/s r+w), "
              f"zero {fill_us:.1f} us ({out.numel() * 2 / fill_us / 1e6:.2f} TB/s w)", flush=True)
        del src
        rows = {}
        for R, BK, warps in [(16, 512, 4), (8, 1024, 4), (4, 1024, 4), (8, 2048, 4), (4, 2048, 4), (8, 1024, 8),
                             (8, 2048, 8), (4, 2048, 8), (2, 2048, 4), (16, 2048, 8)]:
            def run() -> None:
                g._dequant_kernel[(triton.cdiv(E * N, R), triton.cdiv(K, BK))](
                    blocks, scales, out, E * N, K, blocks.stride(0), scales.stride(0), out.stride(0), ROWS=R, BK=BK,
                    PERM=True, ONE_MUL=True, num_warps=warps)
            try:
                us = time_ms(run, warmup=3, iters=20) * 1e3
                rows[f"{R}x{BK}w{warps}"] = us
                print(f"dequant {label} rows {R} bk {BK} warps {warps}: {us:.1f} us ({moved / us / 1e6:.2f} TB/s)",
                      flush=True)
            except Exception as e:
                print(f"dequant {label} {R}x{BK}w{warps}: ERROR {e}", flush=True)
        results[f"dequant_{label}"] = rows


def dense(results: dict) -> None:
    """The decode projections through cuBLAS (F.linear with bias): us, weight GB/s, and each kernel's
    grid from the profiler's trace (does the tile grid cover the 132 SMs?). The timed calls take five
    weight copies in turn (a graph of five calls: 118-147 MB, past the 50 MB L2), so each reads its
    weights from DRAM as a decode step does; the first H100 call (f2adf9e) reused one copy and timed L2."""
    import itertools

    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from bench.moe_kernel_bench import time_us
    rows = {}
    for name, (K, N) in {"qkv": (2880, 5120), "o": (4096, 2880)}.items():
        copies = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(5)]
        w = copies[0]
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        for M in (8, 64, 256):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            turn = itertools.cycle(copies)
            us = time_us(lambda: F.linear(x, next(turn), bias), graph=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                F.linear(x, w, bias)
                torch.cuda.synchronize()
            path = pathlib.Path(f"/tmp/trace_{name}_{M}.json")
            prof.export_chrome_trace(str(path))
            kernels = [(e.get("name", "")[:90], e.get("args", {}).get("grid"), e.get("args", {}).get("block"),
                        e.get("dur")) for e in json.loads(path.read_text())["traceEvents"]
                       if e.get("cat") == "kernel"]
            rows[f"{name} M{M}"] = {"us": us, "GB/s": N * K * 2 / us / 1e3, "kernels": kernels}
            print(f"dense {name} M{M}: {us:.1f} us ({N * K * 2 / us / 1e3:.0f} GB/s) {kernels}", flush=True)
    results["dense"] = rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--commit", default="")
    ap.add_argument("--parts", default="attention,dequant,dense")
    args = ap.parse_args()
    results: dict = {"commit": args.commit, "device": torch.cuda.get_device_name(),
                     "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    print(results, flush=True)
    parts = {"attention": lambda: attention(results, [int(x) for x in args.lengths.split(",")]),
             "dequant": lambda: dequant(results), "dense": lambda: dense(results)}
    for part in (parts[p] for p in args.parts.split(",")):
        try:
            part()
        except Exception:
            traceback.print_exc()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
