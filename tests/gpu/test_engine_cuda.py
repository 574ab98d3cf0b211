"""LLMEngine on CUDA (tiny preset): the model runner plugs in CUDA-graph decode by itself, and its
greedy tokens equal the same engine's with graphs off; bf16/fp32 engines both run (MoE kernel
accepts fp32 activations)."""
from __future__ import annotations

import pytest
import torch

from gptoss_engine.config import EngineConfig
from gptoss_engine.engine import LLMEngine
from gptoss_engine.make_model import random_model
from gptoss_engine.model_config import ModelConfig
from gptoss_engine.presets import preset
from gptoss_engine.types import SamplingParams

pytestmark = pytest.mark.gpu


def _generate(dtype: str, **graph_options: object) -> tuple[list[list[int]], LLMEngine]:
    config = ModelConfig.from_dict(preset("tiny"))
    model = random_model(config, "cuda", getattr(torch, dtype), seed=3)
    engine = LLMEngine(EngineConfig(model_path="random", device="cuda", dtype=dtype, max_batch_size=8,
                                    max_model_len=512, num_kv_blocks=64, num_swa_blocks=64, **graph_options),
                       model=model)
    prompts = [[(7 * i + j) % 1000 for j in range(40 + 13 * i)] for i in range(3)]
    results = engine.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    return [r.token_ids for r in results], engine


def test_engine_graph_decode_matches_eager(device: str) -> None:
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    from gptoss_engine.kernels.cuda_graphs import CudaGraphForward
    graphed, engine = _generate("bfloat16")
    assert isinstance(engine.runner.forward_fn, CudaGraphForward)
    assert 4 in engine.runner.forward_fn._graphs  # 3 sequences decoded in the padded bucket of 4
    eager, engine = _generate("bfloat16", cuda_graph_batch_sizes=())
    assert not isinstance(engine.runner.forward_fn, CudaGraphForward)
    assert graphed == eager
    assert all(len(t) == 20 for t in graphed)


def test_engine_no_padding_replays_exact_sizes_only(device: str) -> None:
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    _, engine = _generate("bfloat16", cuda_graph_batch_sizes=(2, 4), cuda_graph_padding=False)
    assert engine.runner.forward_fn._graphs == {}  # batch 3 is no bucket: eager


def test_engine_fp32_on_cuda(device: str) -> None:
    if device != "cuda":
        pytest.skip("needs a GPU")
    tokens, _ = _generate("float32")
    assert all(len(t) == 20 for t in tokens)


def test_engine_with_bf16_prefill_experts(device: str) -> None:
    """moe_prefill_weights = "bf16" through LLMEngine: the runner keeps the copies before sizing the
    KV pool, and a first step large enough for the grouped GEMM (3 x 200 prompt tokens, top-4 of 8
    experts) generates the same greedy tokens as the engine that dequantizes per step."""
    if device != "cuda":
        pytest.skip("needs a GPU")
    config = ModelConfig.from_dict(preset("tiny"))
    prompts = [[(11 * i + j) % 1000 for j in range(200)] for i in range(3)]
    tokens = {}
    for weights in ("mxfp4", "bf16"):
        model = random_model(config, "cuda", torch.bfloat16, seed=4)
        engine = LLMEngine(EngineConfig(model_path="random", device="cuda", max_batch_size=8, max_model_len=512,
                                        num_kv_blocks=64, num_swa_blocks=64, moe_prefill_weights=weights),
                           model=model)
        copies = [layer.mlp.experts.bf16_copy for layer in model.model.layers]
        assert all(c is not None for c in copies) == (weights == "bf16")
        tokens[weights] = [r.token_ids for r in engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))]
    assert tokens["bf16"] == tokens["mxfp4"]
