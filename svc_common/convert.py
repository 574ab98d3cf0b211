"""Protobuf <-> engine dataclasses, at the daemons' edge (the engine never sees protobuf).

Also the request checks both servicers share: a bad request is answered with a status code and
a message the caller can act on, before the engine sees it.
"""
from __future__ import annotations

from collections.abc import Sequence

import grpc
import torch

from gptoss_engine.kv_layout import KVLayout
from gptoss_engine.types import FinishReason, InvalidRequest, SamplingParams, TokenOutput
from gptoss_pb.v1 import common_pb2

_FINISH_TO_PB = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}


class RequestRejected(Exception):
    """Answer the RPC with `code` and `message` (raised by checks; the servicer aborts with it)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def sampling_from_pb(pb: common_pb2.SamplingParams) -> SamplingParams:
    """Proto defaults mean "off": top_p 0 -> 1.0; max_tokens must be given (> 0)."""
    params = SamplingParams(
        temperature=float(pb.temperature),
        top_p=float(pb.top_p) if pb.top_p != 0 else 1.0,
        top_k=int(pb.top_k),
        seed=int(pb.seed) if pb.HasField("seed") else None,
        max_tokens=int(pb.max_tokens),
        min_tokens=int(pb.min_tokens),
        ignore_eos=bool(pb.ignore_eos),
        stop_token_ids=tuple(int(t) for t in pb.stop_token_ids),
        logprobs=bool(pb.logprobs),
        top_logprobs=int(pb.top_logprobs),
    )
    params.validate()
    return params


def check_request(model: str, served_model_name: str, prompt_token_ids: Sequence[int],
                  sampling: common_pb2.SamplingParams, vocab_size: int) -> SamplingParams:
    """Shared checks of Prefill and Decode requests; raises RequestRejected."""
    if model and model != served_model_name:
        raise RequestRejected(grpc.StatusCode.NOT_FOUND,
                              f"model {model!r} is not served here (this worker serves {served_model_name!r})")
    if not prompt_token_ids:
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT,
                              f"prompt_token_ids has ids outside [0, {vocab_size}): {bad[:5]}")
    try:
        return sampling_from_pb(sampling)
    except InvalidRequest as e:
        raise RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None


def finish_to_pb(reason: FinishReason | None) -> int:
    return _FINISH_TO_PB[reason]


def token_to_pb(tok: TokenOutput) -> common_pb2.TokenOutput:
    pb = common_pb2.TokenOutput(token_id=tok.token_id)
    if tok.logprob is not None:
        pb.logprob = tok.logprob
    pb.top_logprobs.extend(common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in tok.top_logprobs)
    return pb


def token_from_pb(pb: common_pb2.TokenOutput) -> TokenOutput:
    return TokenOutput(token_id=pb.token_id, logprob=pb.logprob if pb.logprob else None,
                       top_logprobs=[(t.token_id, t.logprob) for t in pb.top_logprobs])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layout_to_pb(layout: KVLayout, fingerprint: str) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        block_size=layout.block_size, dtype=dtype_name(layout.dtype), num_full_layers=layout.num_full_layers,
        num_swa_layers=layout.num_swa_layers, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
        sliding_window=layout.sliding_window, model_fingerprint=fingerprint)


def layout_mismatches(theirs: common_pb2.KVLayout, ours: common_pb2.KVLayout) -> list[str]:
    """Fields that differ, as "name: theirs X, ours Y" (empty: compatible)."""
    out = []
    for f in common_pb2.KVLayout.DESCRIPTOR.fields:
        a, b = getattr(theirs, f.name), getattr(ours, f.name)
        if a != b:
            out.append(f"{f.name}: hand-off has {a!r}, this worker has {b!r}")
    return out
