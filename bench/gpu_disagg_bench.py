"""Disaggregated TTFT on one GPU: a prefill process and a decode process share the device, KV over ucxx.

    python -m bench.gpu_disagg_bench [--preset 20b] [--device cuda] [--tokens 1024,8192] [--repeats 5]

Two processes, each an AsyncEngine on the same random model (`make_model.random_model`, fixed seed:
equal weights), coordinated over a multiprocessing pipe (no etcd/gRPC here):
  - this process: the decode side (KVTransferClient) and, with the same engine, the aggregated runs;
  - a spawned child: the prefill side (AsyncEngine.prefill + KVTransferServer).
Per prompt (fresh random tokens every repetition; prefix caching off, so nothing is reused):
  TTFT(agg)    = AsyncEngine.generate() called -> token 0 on its stream (one process).
  TTFT(disagg) = prompt sent to the prefill process -> it prefills, samples token 0, stages the KV
                 (KVTransferServer.stage) and sends the descriptor + token 0 back -> the decode
                 process reserves blocks (reserve_kv), fetches the staged blocks into them
                 (KVTransferClient.fetch, ack included) and hands them to generate_from_kv: from
                 then on it holds token 0 and the prompt's KV, ready to stream and decode.
  Also: token 1 (the first decode step) in both, the user-visible token 0 of a real deployment
  (the frontend streams the prefill's token 0 while decode fetches: prompt -> descriptor back),
  and the fetch alone (bytes, ms, GB/s).
Transfer modes: `cuda` (CUDA buffers over the control endpoint), `cuda_direct` (CUDA buffers over
the same-host data endpoint, kv_transfer/direct.py), `host` (host staging: the prefill side copies
the staged blocks into a pinned host mirror and serves those, the decode side fetches into its own
mirror over the same-host path and copies them into its reserved blocks). A mode that fails is
reported with its error and the others still run. Greedy tokens of every disaggregated run must
equal the aggregated run's. Writes <out>/gpu_disagg.json and appends rows to <out>/gpu_disagg.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import pathlib
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from bench import provenance
from gptoss_engine.async_engine import AsyncEngine
from gptoss_engine.config import EngineConfig
from gptoss_engine.engine import LLMEngine
from gptoss_engine.kv_layout import KVCache
from gptoss_engine.make_model import random_model
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset
from gptoss_engine.types import SamplingParams

RESULTS = pathlib.Path(__file__).parent / "results"
MODES = ("cuda", "cuda_direct", "host")
BLOCK_SIZE = 16
OUTPUT_TOKENS = 8          # greedy tokens compared between the aggregated and disaggregated runs
LEASE_S = 30.0


@dataclass(frozen=True)
class Options:
    preset: str
    device: str
    tokens: tuple[int, ...]
    seed: int
    ucx_wait: str = "future"   # "future": kv_transfer.ucx_runtime (the daemons' setting); "spin": ucxx's defaults

    @property
    def max_len(self) -> int:
        return max(self.tokens) + 4 * BLOCK_SIZE

    @property
    def mirror_blocks(self) -> int:
        return -(-self.max_len // BLOCK_SIZE)


def make_engine(opts: Options, decode: bool) -> AsyncEngine:
    """Both processes build the same weights (same seed). Fixed, small pools so that two engines
    share one GPU (free_gpu_memory_fraction would let the first take nearly all of it); the decode
    side graphs batch 1, the prefill side never decodes."""
    config = ModelConfig.from_dict(preset(opts.preset))
    model = random_model(config, opts.device, seed=opts.seed)
    blocks = 2 * opts.mirror_blocks + 8    # one aggregated or handed-off request + one in flight
    ec = EngineConfig(model_path=f"random-{opts.preset}-seed{opts.seed}", device=opts.device, block_size=BLOCK_SIZE,
                      max_num_tokens=max(opts.tokens), max_batch_size=4, max_model_len=opts.max_len,
                      num_kv_blocks=blocks, num_swa_blocks=blocks, enable_prefix_caching=False,
                      cuda_graph_batch_sizes=(1,) if decode else ())
    return AsyncEngine(LLMEngine(ec, model=model))


def host_mirror(engine: AsyncEngine, blocks: int) -> KVCache:
    """Pinned host copy of the KV pools' shape (host-staging mode)."""
    kv = KVCache.allocate(engine.layout, blocks, blocks, "cpu")
    if torch.cuda.is_available():
        kv = KVCache(kv.layout, kv.full.pin_memory(), kv.swa.pin_memory())
    return kv


def _ids(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


async def recv(conn: Any) -> Any:
    """Await one message on a multiprocessing connection without blocking the event loop."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv()


# ---- prefill process ---------------------------------------------------------------------------------
def prefill_main(conn: Any, opts: Options) -> None:
    try:
        asyncio.run(_prefill_serve(conn, opts))
    finally:
        _ucx_stop()


def _ucx_start(opts: Options) -> None:
    """Both processes set ucxx up the way the daemons do (svc_common.worker), unless told to spin."""
    from kv_transfer import ucx_runtime
    if opts.ucx_wait == "future":
        ucx_runtime.start()


def _ucx_stop() -> None:
    from kv_transfer import ucx_runtime
    ucx_runtime.stop()


async def _prefill_serve(conn: Any, opts: Options) -> None:
    from kv_transfer import KVTransferServer
    _ucx_start(opts)
    engine = make_engine(opts, decode=False)
    await engine.start()
    server = KVTransferServer(engine.kv_cache)
    mirror = host_mirror(engine, opts.mirror_blocks)
    host_server = KVTransferServer(mirror)
    conn.send({"address": await server.start(), "host_address": await host_server.start()})
    while (msg := await recv(conn)) is not None:
        t0 = time.perf_counter()
        result = await engine.prefill(msg["rid"], msg["prompt"], SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True))
        t1 = time.perf_counter()
        staged = result.staged
        full, swa = list(staged.full_block_ids), list(staged.swa_block_ids)
        if msg["mode"] == "host":
            # Host staging: copy the blocks out, then the GPU blocks are free at once; the mirror
            # holds one request at a time (the decode side reads it before sending the next).
            kv = engine.kv_cache
            mirror.full[:len(full)].copy_(kv.full.index_select(0, _ids(full, kv.full.device)))
            mirror.swa[:len(swa)].copy_(kv.swa.index_select(0, _ids(swa, kv.swa.device)))
            await engine.release_staged(staged.handle)
            host_server.stage(msg["rid"], range(len(full)), range(len(swa)), lease_s=LEASE_S)
        else:
            # The staged blocks stay pinned until the transfer server says they were read (or expired).
            server.stage(msg["rid"], full, swa, lease_s=LEASE_S,
                         on_release=lambda _tid, _reason, h=staged.handle: engine.release_staged_nowait(h))
        t2 = time.perf_counter()
        conn.send({"first": result.first, "num_full": len(full), "num_swa": len(swa),
                   "swa_first": staged.swa_first_logical_block, "prefill_s": t1 - t0, "stage_s": t2 - t1})
    await server.close(timeout_s=1)
    await host_server.close(timeout_s=1)
    await engine.shutdown()


# ---- decode process (this one) --------------------------------------------------------------------
async def drain(stream: Any, t0: float, times: list[float], tokens: list[int]) -> None:
    async for out in stream:
        for tok in out.tokens:
            times.append(time.perf_counter() - t0)
            tokens.append(tok.token_id)


async def run_agg(engine: AsyncEngine, rid: str, prompt: list[int]) -> dict:
    times: list[float] = []
    tokens: list[int] = []
    t0 = time.perf_counter()
    await drain(engine.generate(rid, prompt, SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True)), t0, times, tokens)
    return {"ttft": times[0], "tok1": times[1], "tokens": tokens}


class Decoder:
    def __init__(self, engine: AsyncEngine, conn: Any, addresses: dict, mirror: KVCache) -> None:
        from kv_transfer import KVTransferClient
        self.engine, self.conn, self.addresses, self.mirror = engine, conn, addresses, mirror
        self.clients = {"cuda": KVTransferClient(same_host=False), "cuda_direct": KVTransferClient(same_host=True),
                        "host": KVTransferClient(same_host=True)}

    async def connect(self) -> None:
        for mode, client in self.clients.items():
            await client.connect(self.addresses["host_address" if mode == "host" else "address"])

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()

    async def run(self, mode: str, rid: str, prompt: list[int]) -> dict:
        engine, kv = self.engine, self.engine.kv_cache
        t0 = time.perf_counter()
        self.conn.send({"rid": rid, "prompt": prompt, "mode": mode})
        reply = await recv(self.conn)
        t_desc = time.perf_counter()
        reservation = await engine.reserve_kv(len(prompt))
        try:
            shape = (len(reservation.full_block_ids), len(reservation.swa_block_ids), reservation.swa_first_logical_block)
            if shape != (reply["num_full"], reply["num_swa"], reply["swa_first"]):
                raise RuntimeError(f"hand-off shape {shape} != prefill's {reply}")
            t_res = time.perf_counter()
            full, swa = list(reservation.full_block_ids), list(reservation.swa_block_ids)
            if mode == "host":
                m = self.mirror
                nbytes = await self.clients[mode].fetch(self.addresses["host_address"], rid, m, range(len(full)),
                                                        range(len(swa)), timeout_s=LEASE_S)
                kv.full.index_copy_(0, _ids(full, kv.full.device), m.full[:len(full)].to(kv.full.device, non_blocking=True))
                kv.swa.index_copy_(0, _ids(swa, kv.swa.device), m.swa[:len(swa)].to(kv.swa.device, non_blocking=True))
            else:
                nbytes = await self.clients[mode].fetch(self.addresses["address"], rid, kv, full, swa, timeout_s=LEASE_S)
            if kv.full.is_cuda:
                torch.cuda.synchronize()
            t_fetch = time.perf_counter()
            stream = engine.generate_from_kv(rid, prompt, reply["first"], reservation,
                                             SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True))
        except BaseException:
            await engine.free_reservation(reservation)
            raise
        t_ready = time.perf_counter()
        times: list[float] = []
        tokens = [reply["first"].token_id]
        await drain(stream, t0, times, tokens)
        return {"ttft": t_ready - t0, "tok1": times[0], "user_tok0": t_desc - t0, "prefill": reply["prefill_s"],
                "stage": reply["stage_s"], "reserve": t_res - t_desc, "fetch": t_fetch - t_res, "nbytes": nbytes,
                "tokens": tokens}


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


async def bench(opts: Options, modes: list[str], warmup: int, repeats: int, log: Any) -> dict:
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=prefill_main, args=(child_conn, opts), name="prefill", daemon=True)
    child.start()
    try:
        _ucx_start(opts)
        t0 = time.perf_counter()
        engine = make_engine(opts, decode=True)
        await engine.start()
        addresses = await asyncio.wait_for(recv(conn), 600)
        log(f"both engines up in {time.perf_counter() - t0:.1f} s; prefill listens on {addresses}")
        dec = Decoder(engine, conn, addresses, host_mirror(engine, opts.mirror_blocks))
        await dec.connect()
        g = torch.Generator().manual_seed(opts.seed)
        vocab = engine.model_config.vocab_size
        results: dict[str, Any] = {}
        for n in opts.tokens:
            agg: list[dict] = []
            dis: dict[str, list[dict]] = {m: [] for m in modes}
            errors: dict[str, str] = {}
            for i in range(warmup + repeats):
                prompt = torch.randint(0, vocab, (n,), generator=g).tolist()
                a = await run_agg(engine, f"agg-{n}-{i}", prompt)
                for mode in modes:
                    if mode in errors:
                        continue
                    try:
                        d = await dec.run(mode, f"{mode}-{n}-{i}", prompt)
                    except Exception as e:  # noqa: BLE001 - report the mode as broken, keep the others
                        errors[mode] = f"{type(e).__name__}: {e}"
                        log(f"{n} tokens, mode {mode} FAILED: {errors[mode]}")
                        continue
                    if d["tokens"] != a["tokens"]:
                        errors[mode] = f"tokens differ: disagg {d['tokens']} vs agg {a['tokens']}"
                        log(f"{n} tokens, mode {mode}: {errors[mode]}")
                        continue
                    if i >= warmup:
                        dis[mode].append(d)
                if i >= warmup:
                    agg.append(a)
            row: dict[str, Any] = {"agg_ttft_ms": median(agg, "ttft") * 1e3, "agg_tok1_ms": median(agg, "tok1") * 1e3,
                                   "modes": {}, "errors": errors}
            for mode, rows in dis.items():
                if not rows:
                    continue
                m = {k: median(rows, k) * 1e3 for k in ("ttft", "tok1", "user_tok0", "prefill", "stage", "reserve", "fetch")}
                m["nbytes"] = rows[0]["nbytes"]
                m["fetch_gbps"] = m["nbytes"] / m["fetch"] / 1e6
                m["ratio_ttft"] = m["ttft"] / row["agg_ttft_ms"]
                m["ratio_tok1"] = m["tok1"] / row["agg_tok1_ms"]
                m["ratio_user_tok0"] = m["user_tok0"] / row["agg_ttft_ms"]
                m["tokens_equal"] = len(rows)
                row["modes"][mode] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()}
                log(f"{n} tokens {mode:>11}: TTFT agg {row['agg_ttft_ms']:.1f} ms, disagg {m['ttft']:.1f} ms "
                    f"(ratio {m['ratio_ttft']:.3f}); token 1 {row['agg_tok1_ms']:.1f} vs {m['tok1']:.1f} ms "
                    f"({m['ratio_tok1']:.3f}); prefill {m['prefill']:.1f} stage {m['stage']:.2f} reserve "
                    f"{m['reserve']:.2f} fetch {m['fetch']:.2f} ms = {m['nbytes'] / 2**20:.1f} MiB at "
                    f"{m['fetch_gbps']:.1f} GB/s; tokens equal in {len(rows)}/{repeats}")
            results[str(n)] = row
        await dec.close()
        conn.send(None)
        await engine.shutdown()
        return results
    finally:
        _ucx_stop()
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()


def write_results(out: pathlib.Path, doc: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_disagg.json").write_text(json.dumps(doc, indent=2))
    md = out / "gpu_disagg.md"
    if not md.exists():
        md.write_text("# Disaggregated TTFT on one GPU (bench/gpu_disagg_bench.py; definitions in its docstring)\n\n"
                      "| date | device | commit | preset | tokens | mode | TTFT agg ms | TTFT disagg ms | ratio "
                      "| token 1 agg / disagg ms | ratio | user token 0 ms | prefill ms | fetch ms | MiB | GB/s "
                      "| tokens equal |\n|" + "---|" * 17 + "\n")
    with md.open("a") as f:
        for n, row in doc["results"].items():
            for mode, m in row["modes"].items():
                label = mode if doc.get("ucx_wait", "future") == "future" else f"{mode}, ucx spin"
                f.write(f"| {doc['date']} | {doc['device']} | {doc['commit']} | {doc['preset']} | {n} | {label} | "
                        f"{row['agg_ttft_ms']:.1f} | {m['ttft']:.1f} | {m['ratio_ttft']:.3f} | "
                        f"{row['agg_tok1_ms']:.1f} / {m['tok1']:.1f} | {m['ratio_tok1']:.3f} | {m['user_tok0']:.1f} | "
                        f"{m['prefill']:.1f} | {m['fetch']:.2f} | {m['nbytes'] / 2**20:.1f} | {m['fetch_gbps']:.1f} | "
                        f"{m['tokens_equal']}/{doc['repeats']} |\n")
            for mode, err in row["errors"].items():
                f.write(f"| {doc['date']} | {doc['device']} | {doc['commit']} | {doc['preset']} | {n} | {mode} | "
                        f"FAILED: {err[:200].replace('|', '/')} |" + " |" * 11 + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_disagg_bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="20b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", default="1024,8192")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--commit", default=None)
    p.add_argument("--ucx-wait", choices=("future", "spin"), default="future",
                   help="how awaited ucxx requests complete: future (kv_transfer.ucx_runtime, as the daemons run) "
                        "or spin (ucxx's defaults: the event loop busy-waits)")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes) or args.repeats < 1 or args.warmup < 0:
        p.error(f"--modes from {MODES}, --repeats >= 1, --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    opts = Options(args.preset, args.device, tuple(int(t) for t in args.tokens.split(",")), args.seed, args.ucx_wait)
    log = lambda s: print(s, flush=True)  # noqa: E731
    results = asyncio.run(bench(opts, modes, args.warmup, args.repeats, log))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    doc = {"date": datetime.date.today().isoformat(), "device": device, "commit": args.commit or provenance.commit(),
           "preset": args.preset, "repeats": args.repeats, "warmup": args.warmup, "torch": torch.__version__,
           "ucx_wait": args.ucx_wait,
           "ucx_env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")}, "results": results}
    write_results(args.out, doc)
    log(json.dumps(doc))
    return 0 if not any(r["errors"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
