"""ModelRunner.build_batch (vectorized, from the block tables) against a per-token reference."""
from __future__ import annotations

import torch

from gptoss_engine.config import EngineConfig
from gptoss_engine.engine import LLMEngine
from gptoss_engine.scheduler import ScheduledSeq
from gptoss_engine.types import SamplingParams


def reference_batch(scheduled: list[ScheduledSeq], bs: int) -> dict[str, list]:
    """What each field must hold, computed token by token from the sequences' block lists."""
    ref: dict[str, list] = {k: [] for k in ("ids", "pos", "full", "swa", "qsl", "lens", "ftab", "stab")}
    ref["qsl"].append(0)
    width = max(len(s.seq.blocks.full) for s in scheduled)
    for s in scheduled:
        seq, start = s.seq, s.seq.num_computed_tokens
        full, swa = seq.blocks.full, seq.blocks.swa
        for p in range(start, start + s.num_tokens):
            ref["ids"].append(seq.token_ids[p])
            ref["pos"].append(p)
            ref["full"].append(full[p // bs] * bs + p % bs)
            ref["swa"].append(swa[p // bs] * bs + p % bs if swa[p // bs] >= 0 else -1)
        ref["qsl"].append(len(ref["ids"]))
        ref["lens"].append(start + s.num_tokens)
        ref["ftab"].append(full + [-1] * (width - len(full)))
        ref["stab"].append(swa + [-1] * (width - len(swa)))
    return ref


def test_build_batch_matches_per_token_reference(model, swa_model_dir):
    # Window 8 < block 16: sliding entries go -1 while decoding; max_num_tokens 40 chunks the prompts.
    engine = LLMEngine(EngineConfig(str(swa_model_dir), num_kv_blocks=64, num_swa_blocks=32, max_num_tokens=40),
                       model=model)
    bs = engine.config.block_size
    for i, n in enumerate([37, 5, 70, 16]):
        engine.add_request(f"r{i}", list(range(100 + n, 100 + 2 * n)), SamplingParams(max_tokens=30, ignore_eos=True))
    built = []
    orig = engine.runner.build_batch

    def spy(scheduled, tables, prev=None):
        batch = orig(scheduled, tables, prev)
        built.append((reference_batch(scheduled, bs), batch))
        return batch

    engine.runner.build_batch = spy
    while engine.has_unfinished():
        engine.step()
    assert any(b.max_query_len > 1 and b.num_seqs > 1 for _, b in built)           # mixed prefill + decode
    assert any(-1 in r["stab"][0][:-1] for r, _ in built)                            # freed sliding blocks
    for ref, b in built:
        assert b.input_ids.tolist() == ref["ids"] and b.positions.tolist() == ref["pos"]
        assert b.full_slot_mapping.tolist() == ref["full"] and b.swa_slot_mapping.tolist() == ref["swa"]
        assert b.query_start_loc.tolist() == ref["qsl"] and b.seq_lens.tolist() == ref["lens"]
        assert b.full_block_tables.tolist() == ref["ftab"] and b.swa_block_tables.tolist() == ref["stab"]
        assert b.logits_indices.tolist() == [q - 1 for q in ref["qsl"][1:]]
        qlens = [end - start for start, end in zip(ref["qsl"], ref["qsl"][1:])]
        assert (b.max_query_len, b.max_seq_len) == (max(qlens), max(ref["lens"]))
        assert b.input_ids.dtype == b.positions.dtype == b.full_slot_mapping.dtype == torch.int64
        assert b.full_block_tables.dtype == b.query_start_loc.dtype == b.seq_lens.dtype == torch.int32
