"""Worker token logprobs -> the OpenAI shapes (chat `logprobs.content[]`, legacy completions).

Every generated token gets an entry, harmony header tokens included: they are what the model
sampled, and dropping some would misalign the list with `usage.completion_tokens`."""
from __future__ import annotations

from gptoss_engine.types import TokenOutput


def _entry(enc, token_id: int, logprob: float | None) -> dict:
    text = enc.decode([token_id])
    return {"token": text, "logprob": logprob if logprob is not None else 0.0, "bytes": list(text.encode())}


def chat_logprobs(enc, tokens: list[TokenOutput], top_logprobs: int) -> dict:
    content = []
    for t in tokens:
        e = _entry(enc, t.token_id, t.logprob)
        e["top_logprobs"] = [_entry(enc, tid, lp) for tid, lp in t.top_logprobs[:top_logprobs]]
        content.append(e)
    return {"content": content, "refusal": None}


def completion_logprobs(enc, tokens: list[TokenOutput], top_logprobs: int, text_offset: int) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text = enc.decode([t.token_id])
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({enc.decode([tid]): lp for tid, lp in t.top_logprobs[:top_logprobs]})
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out
