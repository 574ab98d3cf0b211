"""Next-token sampling for one step's logits, per request parameters.

Seeded sampling is stateless per step: output token i of a request is drawn with a generator
seeded from (seed, i) alone, so a prefill process (token 0) and a decode process (tokens 1..)
reproduce exactly the tokens of one aggregated run. Unseeded requests share one engine RNG.

Logprobs are those of the model's distribution (log_softmax of the raw logits), as the OpenAI API
reports them, independent of temperature/top-k/top-p.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
import random
from typing import Callable, NamedTuple

import torch

from gptoss_engine.host_copy import to_device
from gptoss_engine.types import SamplingParams, TokenOutput


class SampleRequest(NamedTuple):   # a tuple: one is built per sequence per step, a dataclass cost 3x
    sampling: SamplingParams
    output_index: int  # which output token of its request this draw is (0 = the first)


def step_seed(seed: int, output_index: int) -> int:
    """A 63-bit seed for draw `output_index` of a request seeded with `seed` (same in every process)."""
    digest = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _thresholds(x: torch.Tensor, temperature: torch.Tensor, top_k: tuple[int, torch.Tensor, torch.Tensor] | None,
                top_p: tuple[torch.Tensor, torch.Tensor, bool] | None) -> torch.Tensor | None:
    """Top-k and top-p as one threshold a row in raw-logit space: the row draws among logits >= it
    (-inf: every token; None: no row cuts). x [R, V] the drawn rows' logits; temperature [R]; top_k
    (largest k, each row's k - 1, rows without top-k); top_p (the rows that cut, their p, whether
    each of them has a top-k). A fixed number of operators a step, not a few per row; the rows that
    ask for top-p without a top-k pay a sort (on CUDA, with TOP_P_RADIX_SELECT, a radix select over
    their logits instead: kernels/top_p.py). Tokens tied with the last one kept are kept too."""
    if top_k is None and top_p is None:
        return None
    thr = torch.full((x.shape[0],), float("-inf"), device=x.device, dtype=torch.float32)
    top = None
    if top_k is not None:
        k_max, k_index, no_k = top_k
        top = torch.topk(x, k_max, dim=-1)   # sorted, largest first
        thr = top.values.gather(1, k_index[:, None])[:, 0].float().masked_fill(no_k, float("-inf"))
    if top_p is not None:
        # Drop a token when the tokens ranked above it already reach top_p (the top one always
        # stays); the threshold is the raw logit of the last token kept.
        rows, p, all_k = top_p
        if top is not None and all_k:
            # Every cutting row has a top-k too: its nucleus lies inside its k largest, which topk
            # has sorted already, so no sort over the vocabulary (ranks past the row's k masked).
            vals = top.values[rows]
            past_k = torch.arange(vals.shape[1], device=x.device)[None, :] > k_index[rows, None]
            sorted_z = (vals / temperature[rows, None]).masked_fill(past_k, float("-inf"))
            ranked = vals
        elif TOP_P_RADIX_SELECT and x.is_cuda and (select := _top_p_select()) is not None:
            # A radix select over the logits' bits instead of sorting each cutting row's 201k logits.
            select(x, rows, temperature, p, thr)
            return thr
        else:
            xr = x[rows]
            z = (xr / temperature[rows, None]).masked_fill(xr < thr[rows, None].to(xr.dtype), float("-inf"))
            sorted_z, order = torch.sort(z, dim=-1, descending=True)
            ranked = xr.gather(1, order)
        probs = torch.softmax(sorted_z, dim=-1)
        kept = ((torch.cumsum(probs, dim=-1) - probs) < p[:, None]).sum(-1, keepdim=True).clamp_(min=1)
        last = ranked.gather(1, kept - 1)[:, 0].float()
        thr[rows] = torch.maximum(thr[rows], last)
    return thr


def _draw(x: torch.Tensor, temperature: torch.Tensor, threshold: torch.Tensor | None,
          noise: torch.Tensor) -> torch.Tensor:
    """The torch form of kernels/sample.gumbel_draw (the CPU path): one draw per row of x [R, V]
    from softmax(x / T) over the logits >= threshold, noise [R, V] ~ Exp(1)."""
    z = x / temperature[:, None]
    if threshold is not None:
        z = z.masked_fill(x < threshold[:, None].to(x.dtype), float("-inf"))
    # argmax(p / Exp(1)) draws from p normalised (the exponential-race form of the Gumbel trick).
    return torch.argmax(torch.softmax(z, dim=-1) / noise, dim=-1)


# Top-p without top-k on CUDA by kernels/top_p.py's radix select instead of a sort over the vocabulary
# (tests/gpu/test_top_p.py: the same threshold as the sort). One sampling step at temperature 1, top_p
# 0.9, H100 (bench/sampler_bench.py --top-p both, PERF_NOTES v20), select against sort: batch 1 0.93 ms
# against 1.34, 8 1.18 / 1.46, 64 1.56 / 3.77, 256 4.33 / 8.15. False keeps the sort.
TOP_P_RADIX_SELECT = True


@functools.cache
def _triton_kernel(module: str, name: str) -> Callable[..., None] | None:
    """gptoss_engine.kernels.<module>.<name>, or None without Triton (the CPU-only install)."""
    try:
        return getattr(importlib.import_module(f"gptoss_engine.kernels.{module}"), name)
    except ImportError:
        return None


def _top_p_select() -> Callable[..., None] | None:
    return _triton_kernel("top_p", "top_p_thresholds")


def _gumbel_draw() -> Callable[..., None] | None:
    return _triton_kernel("sample", "gumbel_draw")


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], device: torch.device | str) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = torch.device(device)
        self._rng = torch.Generator(device=self.device)
        self._rng.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self._host_rng = random.Random(os.urandom(16))   # the CUDA draw's seeds for unseeded rows

    def _generator(self, s: SamplingParams, output_index: int) -> torch.Generator:
        if s.seed is None:
            return self._rng
        g = torch.Generator(device=self.device)
        g.manual_seed(step_seed(s.seed, output_index))
        return g

    def _stop_ids(self, s: SamplingParams) -> list[int]:
        return list(s.stop_token_ids) + ([] if s.ignore_eos else list(self.eos_token_ids))

    def __call__(self, logits: torch.Tensor, requests: list[SampleRequest]) -> list[TokenOutput]:
        """logits [B, vocab] float32, one row per request -> one token per request (waits for them)."""
        return self.launch(logits, requests).resolve()

    def launch(self, logits: torch.Tensor, requests: list[SampleRequest]) -> "SampledTokens":
        """Queue the draws on logits' device and their copy to the host; nothing here waits for
        the device (the per-row values go over in one asynchronous copy: host_copy). The
        result's token_ids stay readable on the device (the next step's inputs)."""
        if logits.shape[0] != len(requests):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(requests)} requests")
        vocab = logits.shape[-1]
        # min_tokens: no stop token (the user's or, unless ignore_eos, the model's) before it.
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        for row, r in enumerate(requests):
            if r.output_index < r.sampling.min_tokens and (stop := self._stop_ids(r.sampling)):
                mask_rows += [row] * len(stop)
                mask_ids += stop
        drawn = [row for row, r in enumerate(requests) if r.sampling.temperature > 0.0]
        want = [row for row, r in enumerate(requests) if r.sampling.logprobs or r.sampling.top_logprobs]
        if not (mask_rows or drawn or want):   # all greedy: nothing to send
            token_ids = logits.argmax(dim=-1)
            return SampledTokens(token_ids, [token_ids], requests, want)
        params = [requests[row].sampling for row in drawn]
        ks = [s.top_k if 0 < s.top_k < vocab else 0 for s in params]
        cut = [n for n, s in enumerate(params) if s.top_p < 1.0]
        # Indices travel as float32 beside the values (exact below 2**24: rows, token ids).
        (mask_rows_d, mask_ids_d, drawn_d, temperature, k_index, no_k, cut_d, top_p, want_d) = to_device(
            [mask_rows, mask_ids, drawn, [s.temperature for s in params], [max(k, 1) - 1 for k in ks],
             [k == 0 for k in ks], cut, [params[n].top_p for n in cut], want], torch.float32, logits.device)
        masked = logits
        if mask_rows:
            masked = logits.clone()
            # The value as a device tensor: a Python float would be copied from the host with
            # non_blocking=False, which synchronises (seen on the H100: tests/gpu/test_sampling_cuda.py).
            masked.index_put_((mask_rows_d.long(), mask_ids_d.long()),
                              logits.new_full((len(mask_rows),), float("-inf")))
        every = len(drawn) == len(requests)
        # Greedy rows take the argmax; a batch that draws every row skips that pass.
        token_ids = (torch.empty(len(requests), dtype=torch.int64, device=logits.device) if every
                     else masked.argmax(dim=-1))
        if drawn:
            gumbel = _gumbel_draw() if logits.is_cuda else None
            # The drawn rows' own copy only where something reads it (the kernel reads `masked`).
            rows = None if every or (gumbel and not (cut or any(ks))) else drawn_d.long()
            x = masked if rows is None else masked[rows]
            thr = _thresholds(x, temperature, (max(ks), k_index.long(), no_k.bool()) if any(ks) else None,
                              (cut_d.long(), top_p, all(ks[n] for n in cut)) if cut else None)
            if gumbel is not None:
                # Seeded rows: their own (seed, index) stream; the others: fresh host randomness.
                seeds = [step_seed(s.seed, requests[row].output_index) if s.seed is not None
                         else self._host_rng.getrandbits(63) for row, s in zip(drawn, params)]
                seeds_d, rows_d = to_device([seeds, drawn], torch.int64, logits.device)
                gumbel(masked, rows_d, temperature, thr, seeds_d, token_ids)
            else:
                noise = torch.empty((len(drawn), vocab), device=logits.device, dtype=logits.dtype)
                noise.exponential_(generator=self._rng)   # one launch for the unseeded rows
                for n, r in enumerate(requests[row] for row in drawn):
                    if r.sampling.seed is not None:   # its own stream: the draw depends on (seed, index) alone
                        noise[n].exponential_(generator=self._generator(r.sampling, r.output_index))
                draws = _draw(x, temperature, thr, noise)
                if rows is None:
                    token_ids = draws
                else:
                    token_ids[rows] = draws
        if not want:
            return SampledTokens(token_ids, [token_ids], requests, want)
        lp_rows = want_d.long()
        logp = torch.log_softmax(logits[lp_rows], dim=-1)
        chosen = logp.gather(1, token_ids[lp_rows, None])[:, 0]
        k = max(r.sampling.top_logprobs for r in requests)
        extra = [chosen] + (list(torch.topk(logp, k)) if k else [])
        return SampledTokens(token_ids, [token_ids, *extra], requests, want)


class SampledTokens:
    """One step's draws: token_ids on the device now, TokenOutputs once resolve() has waited.

    The draws (and logprobs) are copied to the host without blocking it: on CUDA into pinned memory
    behind an event, so resolve() waits for this step's work only, not for work queued on the
    stream afterwards (the next step's forward, with overlap scheduling)."""

    def __init__(self, token_ids: torch.Tensor, tensors: list[torch.Tensor], requests: list[SampleRequest],
                 logprob_rows: list[int]) -> None:
        self.token_ids = token_ids   # [B] int64 on the device
        self._requests, self._want = requests, logprob_rows
        self._event: torch.cuda.Event | None = None
        if token_ids.device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self._host, tensors):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensors   # nothing writes them after the draw

    def resolve(self) -> list[TokenOutput]:
        if self._event is not None:
            self._event.synchronize()
        host = self._host
        out = [TokenOutput(t) for t in host[0].tolist()]
        if not self._want:
            return out
        chosen_l = host[1].tolist()
        top_v, top_i = (host[2].tolist(), host[3].tolist()) if len(host) > 2 else ([], [])
        for n, row in enumerate(self._want):
            out[row].logprob = chosen_l[n]
            kr = self._requests[row].sampling.top_logprobs
            out[row].top_logprobs = list(zip(top_i[n][:kr], top_v[n][:kr])) if kr else []
        return out
