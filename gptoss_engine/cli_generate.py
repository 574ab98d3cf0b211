"""`gptoss generate`: run the engine alone (no server) on token ids or raw text.

--prompt TEXT is encoded as-is with the harmony (o200k) tokenizer: no chat template is applied.
"""
from __future__ import annotations

import argparse
import json
import sys

from gptoss_engine.types import InvalidRequest, SamplingParams


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gptoss generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", type=_ids, help="comma-separated prompt token ids")
    src.add_argument("--prompt", help="raw text, encoded with the harmony tokenizer")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stop-token-ids", type=_ids, default=[])
    p.add_argument("--logprobs", type=int, default=None, metavar="N", help="report logprobs and the top N")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gptoss_engine.config import EngineConfig
    from gptoss_engine.engine import LLMEngine

    encoding = None
    if args.prompt is not None:
        from gptoss_engine.vocab import harmony_encoding

        encoding = harmony_encoding()
        prompt = list(encoding.encode(args.prompt, allowed_special=set()))
    else:
        prompt = args.prompt_ids
    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, ignore_eos=args.ignore_eos,
        stop_token_ids=tuple(args.stop_token_ids), logprobs=args.logprobs is not None,
        top_logprobs=args.logprobs or 0)
    try:
        sampling.validate()
        engine = LLMEngine(EngineConfig(args.model, device=args.device, num_kv_blocks=args.num_kv_blocks))
        result = engine.generate([prompt], sampling)[0]
    except (InvalidRequest, ValueError) as e:
        print(f"gptoss generate: {e}", file=sys.stderr)
        return 2
    out: dict = {"prompt_token_ids": prompt, "token_ids": result.token_ids,
                 "finish_reason": result.finish_reason.value}
    if encoding is not None:
        out["text"] = encoding.decode(result.token_ids)
    if sampling.logprobs:
        out["logprobs"] = [{"token_id": t.token_id, "logprob": t.logprob,
                            "top_logprobs": [[i, v] for i, v in t.top_logprobs]} for t in result.tokens]
    if args.json:
        print(json.dumps(out))
    else:
        print(out.get("text", " ".join(map(str, result.token_ids))))
        print(f"[{result.finish_reason.value}, {len(result.token_ids)} tokens]", file=sys.stderr)
    return 0
