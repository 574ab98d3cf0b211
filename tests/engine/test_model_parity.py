"""Our paged, continuously batched model against HF transformers' GptOssForCausalLM on one checkpoint.

Greedy parity is checked by teacher forcing: HF runs prompt + our generated tokens in one forward;
if HF's argmax at every position equals our next token, HF's greedy decode would produce exactly
our tokens (induction over steps). One literal `hf.generate` run backs that up.
"""
from __future__ import annotations

import pathlib

import pytest
import torch
from transformers import GptOssForCausalLM as HFGptOss
from transformers import Mxfp4Config

from gptoss_engine.checkpoint import load_model
from gptoss_engine.model import GptOssForCausalLM
from tests.fixtures.models import greedy_generate

ATOL = 1e-4
NEW_TOKENS = 64
WINDOW = 128  # the tiny preset's sliding window


def _prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 199_998, (length,), generator=g).tolist()


# Shorter than the window, longer than it, and one that crosses it while decoding.
PROMPTS = [_prompt(7, 1), _prompt(WINDOW - 28, 2), _prompt(WINDOW + 22, 3)]


def _hf(model_dir: pathlib.Path) -> HFGptOss:
    return HFGptOss.from_pretrained(model_dir, dtype=torch.float32,
                                    quantization_config=Mxfp4Config(dequantize=True)).eval()


@pytest.fixture(scope="module")
def ours(tiny_model_dir: pathlib.Path) -> GptOssForCausalLM:
    return load_model(tiny_model_dir, progress=False)


@pytest.fixture(scope="module")
def hf(tiny_model_dir: pathlib.Path) -> HFGptOss:
    return _hf(tiny_model_dir)


@pytest.fixture(scope="module")
def batched(ours: GptOssForCausalLM) -> tuple[list[list[int]], torch.Tensor]:
    return greedy_generate(ours, PROMPTS, NEW_TOKENS)


def _hf_logits(hf: HFGptOss, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """HF logits predicting each generated token: [len(generated), vocab]."""
    ids = torch.tensor([prompt + generated[:-1]])
    with torch.no_grad():
        return hf(ids).logits[0, len(prompt) - 1:].float()


def _assert_matches_hf(hf: HFGptOss, prompts: list[list[int]], tokens: list[list[int]], logits: torch.Tensor) -> None:
    for i, (prompt, gen) in enumerate(zip(prompts, tokens)):
        ref = _hf_logits(hf, prompt, gen)
        diff = (logits[i] - ref).abs().max().item()
        assert diff < ATOL, f"sequence {i} (prompt {len(prompt)}): max |logit diff| {diff}"
        assert ref.argmax(dim=-1).tolist() == gen, f"sequence {i}: greedy tokens differ from HF"


def test_prefill_logits_match_hf(ours: GptOssForCausalLM, hf: HFGptOss) -> None:
    for prompt in PROMPTS:
        tokens, logits = greedy_generate(ours, [prompt], 1)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1]
        assert (logits[0, 0] - ref).abs().max().item() < ATOL
        # Logits of a random model are still spread out (greedy is not decided by noise).
        assert ref.std().item() > 1.0


def test_batched_greedy_matches_hf(hf: HFGptOss, batched: tuple[list[list[int]], torch.Tensor]) -> None:
    tokens, logits = batched
    assert [len(t) for t in tokens] == [NEW_TOKENS] * len(PROMPTS)
    assert all(len(set(t)) > 1 for t in tokens)  # not one token repeated: a degenerate model would be
    _assert_matches_hf(hf, PROMPTS, tokens, logits)


def test_one_at_a_time_equals_batched(ours: GptOssForCausalLM, batched: tuple[list[list[int]], torch.Tensor]) -> None:
    tokens, logits = batched
    for i, prompt in enumerate(PROMPTS):
        t, lg = greedy_generate(ours, [prompt], NEW_TOKENS)
        assert t[0] == tokens[i]
        assert (lg[0] - logits[i]).abs().max().item() < ATOL


@pytest.mark.parametrize("chunk_size", [16, 37])
def test_chunked_prefill_equals_whole(ours: GptOssForCausalLM, batched: tuple[list[list[int]], torch.Tensor],
                                      chunk_size: int) -> None:
    tokens, logits = batched
    t, lg = greedy_generate(ours, PROMPTS, NEW_TOKENS, chunk_size=chunk_size)
    assert t == tokens
    assert (lg - logits).abs().max().item() < ATOL


def test_hf_generate_gives_our_tokens(hf: HFGptOss, batched: tuple[list[list[int]], torch.Tensor]) -> None:
    tokens, _ = batched
    prompt = PROMPTS[1]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert out[0, len(prompt):].tolist() == tokens[1]


def test_small_window_many_dropped_blocks(make_tiny_checkpoint) -> None:  # noqa: ANN001 - fixture factory
    """Window 8 with 4-token blocks: most sliding blocks are -1 in the table; still equal to HF."""
    model_dir = make_tiny_checkpoint(seed=5, sliding_window=8)
    ours = load_model(model_dir, progress=False)
    assert ours.config.sliding_window == 8
    prompts = [_prompt(30, 7), _prompt(3, 8)]
    tokens, logits = greedy_generate(ours, prompts, 24, chunk_size=5, block_size=4)
    _assert_matches_hf(_hf(model_dir), prompts, tokens, logits)


def test_mxfp4_and_dense_checkpoints_give_equal_logits(ours: GptOssForCausalLM, tiny_dense_model_dir: pathlib.Path,
                                                       batched: tuple[list[list[int]], torch.Tensor]) -> None:
    dense = load_model(tiny_dense_model_dir, progress=False)
    assert not dense.packed_experts and dense.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    tokens, logits = greedy_generate(dense, PROMPTS, 8)
    # The dense checkpoint holds the dequantized MXFP4 values of the same seed: identical math.
    assert torch.equal(logits, batched[1][:, :8])
    assert tokens == [t[:8] for t in batched[0]]
