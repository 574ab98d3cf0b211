"""What each spawned rank runs in tests/parallel (module-level functions: spawn pickles them by name)."""
from __future__ import annotations

import pathlib

import torch

from gptoss_engine.config import EngineConfig
from gptoss_engine.engine import LLMEngine
from gptoss_engine.parallel.loader import load_parallel_model
from gptoss_engine.parallel.process_group import build_groups, init_parallel, shutdown
from gptoss_engine.parallel.topology import Topology
from gptoss_engine.types import SamplingParams
from tests.fixtures.models import greedy_generate


def greedy_layouts(layouts: list[tuple[str, str, int, int]], prompts: list[list[int]], max_new_tokens: int,
                   out_dir: str) -> None:
    """For each (name, model_dir, attention_tp_size, moe_ep_size): greedy tokens + logits on this
    rank, saved as out_dir/name.rank{r}.pt. One process group; attention groups per layout."""
    groups = init_parallel(1, 1)
    world, rank = groups.topology.world_size, groups.topology.rank
    for name, model_dir, attn_tp, ep in layouts:
        layout_groups = build_groups(Topology(world, rank, attn_tp, ep), groups.device)
        model = load_parallel_model(model_dir, layout_groups)
        tokens, logits = greedy_generate(model, prompts, max_new_tokens, chunk_size=7)
        torch.save({"tokens": tokens, "logits": logits}, pathlib.Path(out_dir) / f"{name}.rank{rank}.pt")
    shutdown()


def engine_generate(model_dir: str, attn_tp: int, ep: int, prompts: list[list[int]], out_dir: str) -> None:
    """The whole LLMEngine on every rank in lockstep (SPMD): greedy and seeded sampling."""
    groups = init_parallel(attn_tp, ep)
    model = load_parallel_model(model_dir, groups)
    engine = LLMEngine(EngineConfig(model_path=model_dir, max_num_tokens=16, cpu_kv_cache_bytes=8 << 20), model)
    params = [SamplingParams(max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=6, ignore_eos=True)]
    results = engine.generate(prompts, params)
    torch.save([r.token_ids for r in results], pathlib.Path(out_dir) / f"engine.rank{groups.topology.rank}.pt")
    shutdown()
