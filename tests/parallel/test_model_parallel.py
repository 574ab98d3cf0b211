"""Tensor/expert-parallel ranks as real processes (gloo on CPU) == the unsplit model.

Each layout's ranks load only their slices of the tiny checkpoint (4 query heads, 2 KV heads,
8 experts, intermediate 64) and all-reduce through torch.distributed; every rank's greedy tokens
and logits must equal the single-process model's (fp32: same tokens, logits within 1e-5 rel).
"""
from __future__ import annotations

import pathlib

import pytest
import torch

from gptoss_engine.checkpoint import load_model
from gptoss_engine.config import EngineConfig
from gptoss_engine.engine import LLMEngine
from gptoss_engine.parallel.launch import spawn
from gptoss_engine.types import SamplingParams
from tests.fixtures.models import greedy_generate
from tests.parallel import rank_programs

pytestmark = pytest.mark.slow  # process spawns + torch imports: ~20-40 s on two shared cores

PROMPTS = [[200006, 17360, 200008, 3575, 553, 261, 10297, 13, 200007, 200006, 1428, 200008, 12194, 0, 9, 12, 77],
           [200006, 1428, 200008, 5, 6, 7, 8, 9, 10, 11]]
MAX_NEW = 8
# name -> (checkpoint fixture, attention_tp_size, moe_ep_size); MoE TP = world / EP.
LAYOUTS_2 = {"tp2": ("mxfp4", 2, 1),          # heads 2+2, KV heads 1+1, intermediate 32+32
             "ep2": ("mxfp4", 1, 2),          # replicated attention, experts 0-3 | 4-7
             "tp2_ep2": ("dense", 2, 2)}      # heads split, experts split (dense checkpoint slicing)
LAYOUTS_4 = {"tp4x_attn2_ep2": ("mxfp4", 2, 2)}  # 2 attention groups, 2 EP groups of 2 MoE-TP ranks


def _dirs(tiny_model_dir: pathlib.Path, tiny_dense_model_dir: pathlib.Path) -> dict[str, str]:
    return {"mxfp4": str(tiny_model_dir), "dense": str(tiny_dense_model_dir)}


def _run(world: int, layouts: dict, dirs: dict[str, str], out: pathlib.Path) -> dict[str, list[dict]]:
    spec = [(name, dirs[kind], a, e) for name, (kind, a, e) in layouts.items()]
    spawn(rank_programs.greedy_layouts, world, spec, PROMPTS, MAX_NEW, str(out), timeout_s=300)
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(world)] for name in layouts}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: pathlib.Path) -> dict:
    # The dense and MXFP4 tiny checkpoints hold the same numbers, so one reference serves both.
    tokens, logits = greedy_generate(load_model(tiny_model_dir, progress=False), PROMPTS, MAX_NEW, chunk_size=7)
    return {"tokens": tokens, "logits": logits}


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tiny_dense_model_dir, tmp_path_factory) -> dict[str, list[dict]]:  # noqa: ANN001
    return _run(2, LAYOUTS_2, _dirs(tiny_model_dir, tiny_dense_model_dir), tmp_path_factory.mktemp("tp2"))


def _assert_same(reference: dict, ranks: list[dict]) -> None:
    ref_logits = reference["logits"]
    scale = ref_logits.abs().max()
    for r, got in enumerate(ranks):
        assert got["tokens"] == reference["tokens"], f"rank {r}"
        err = (got["logits"] - ref_logits).abs().max() / scale
        assert err < 1e-5, f"rank {r}: max logit error {err:.2e} (relative to max |logit|)"


@pytest.mark.parametrize("layout", sorted(LAYOUTS_2))
def test_two_ranks_equal_single_process(layout: str, two_ranks: dict, reference: dict) -> None:
    _assert_same(reference, two_ranks[layout])


def test_four_ranks_equal_single_process(tiny_model_dir, tiny_dense_model_dir, tmp_path, reference) -> None:  # noqa: ANN001
    _assert_same(reference, _run(4, LAYOUTS_4, _dirs(tiny_model_dir, tiny_dense_model_dir), tmp_path)["tp4x_attn2_ep2"])


def test_engine_in_lockstep_equals_single_engine(tiny_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """LLMEngine on both ranks (TP=2 + EP=2), greedy and seeded sampling == one unsplit engine."""
    spawn(rank_programs.engine_generate, 2, str(tiny_model_dir), 2, 2, PROMPTS, str(tmp_path), timeout_s=300)
    engine = LLMEngine(EngineConfig(model_path=str(tiny_model_dir), max_num_tokens=16, cpu_kv_cache_bytes=8 << 20))
    params = [SamplingParams(max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=6, ignore_eos=True)]
    want = [r.token_ids for r in engine.generate(PROMPTS, params)]
    for r in range(2):
        assert torch.load(tmp_path / f"engine.rank{r}.pt") == want, f"rank {r}"
