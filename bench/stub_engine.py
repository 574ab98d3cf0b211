"""An LLMEngine whose forward is stubbed out, for the CPU benches of host overhead
(host_step_bench, serve_overhead_bench): the tiny model's engine with a real scheduler, block
manager, batch builder and sampler, and a forward that returns constant 32-column logits (token 7
wins, so an argmax on them costs next to nothing, as on the GPU)."""
from __future__ import annotations

import torch

BLOCK_SIZE = 16


def stub_engine(batch: int, prompt: int, output: int, overlap: bool = False):
    """-> (LLMEngine sized for `batch` requests of prompt + output tokens, the logits tensor its
    stub forward returns slices of). overlap: the engine's overlap scheduler (CUDA's default)."""
    from gptoss_engine.config import EngineConfig
    from gptoss_engine.engine import LLMEngine
    from gptoss_engine.make_model import random_model
    from gptoss_engine.model_config import ModelConfig
    from gptoss_engine.presets import preset

    bs = BLOCK_SIZE
    model = random_model(ModelConfig.from_dict(preset("tiny")), "cpu", seed=0)
    config = EngineConfig(model_path="random-tiny", device="cpu", block_size=bs, max_batch_size=batch,
                          max_num_tokens=8192, max_model_len=prompt + output + bs,
                          num_kv_blocks=batch * ((prompt + output) // bs + 2), num_swa_blocks=batch * 12 + 600,
                          overlap_scheduler=overlap)
    engine = LLMEngine(config, model=model)
    logits = torch.zeros(batch, 32)
    logits[:, 7] = 1.0
    engine.runner.forward_fn = lambda step, kv: logits[:step.logits_indices.numel()]
    return engine, logits
