"""`gptoss generate` as a real process on the tiny checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

from gptoss_engine.config import EngineConfig
from gptoss_engine.engine import LLMEngine
from gptoss_engine.types import SamplingParams


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss_cli", "generate", *args],
                          capture_output=True, text=True, timeout=120)


def test_json_output_matches_engine(tiny_model_dir):
    p = run("--model", str(tiny_model_dir), "--prompt-ids", "1,2,3,4,5", "--max-tokens", "4",
            "--ignore-eos", "--num-kv-blocks", "64", "--logprobs", "2", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    engine = LLMEngine(EngineConfig(str(tiny_model_dir), num_kv_blocks=64))
    expected = engine.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out["token_ids"] == expected.token_ids
    assert out["finish_reason"] == "length"
    assert [len(x["top_logprobs"]) for x in out["logprobs"]] == [2] * 4


def test_text_prompt_and_bad_values(tiny_model_dir):
    p = run("--model", str(tiny_model_dir), "--prompt", "Hello world", "--max-tokens", "3",
            "--ignore-eos", "--num-kv-blocks", "64", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["prompt_token_ids"] and len(out["token_ids"]) == 3 and isinstance(out["text"], str)
    bad = run("--model", str(tiny_model_dir), "--prompt-ids", "1,2", "--top-p", "0", "--json")
    assert bad.returncode == 2 and "top_p" in bad.stderr
