"""KV head mapping between prefill and decode groups of different TP, checked by moving real pools."""
from __future__ import annotations

import pytest
import torch

from gptoss_engine.model_config import ModelConfig
from gptoss_engine.parallel.kv_handoff import HeadTransfer, copy_heads, kv_head_transfers, rank_kv_layout
from gptoss_engine.parallel.topology import ParallelConfigError, Topology
from gptoss_engine.presets import preset

K, LAYERS, BS, D = 8, 3, 4, 2


def shards(full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return [t.clone() for t in full.chunk(tp, dim=4)]


@pytest.mark.parametrize(("src_tp", "dst_tp"), [(1, 1), (2, 2), (1, 8), (2, 4), (8, 2), (4, 1), (2, 8), (8, 8)])
def test_transfers_rebuild_the_destination_sharding(src_tp: int, dst_tp: int) -> None:
    full = torch.randn(6, LAYERS, 2, BS, K, D)            # the unsplit pool, 6 blocks
    src = shards(full, src_tp)
    dst = [torch.zeros(9, LAYERS, 2, BS, K // dst_tp, D) for _ in range(dst_tp)]
    src_blocks, dst_blocks = torch.tensor([5, 0, 2]), torch.tensor([1, 8, 4])  # non-contiguous on both sides
    transfers = kv_head_transfers(K, src_tp, dst_tp)
    for t in transfers:
        copy_heads(t, src[t.src_rank], src_blocks, dst[t.dst_rank], dst_blocks)
    want = shards(full, dst_tp)
    for r in range(dst_tp):
        assert torch.equal(dst[r][dst_blocks], want[r][src_blocks]), f"destination rank {r}"
    # Every head is moved exactly once.
    assert sum(len(t.src_heads) for t in transfers) == K
    assert len(transfers) == max(src_tp, dst_tp)


def test_two_to_four_mapping_is_explicit() -> None:
    assert kv_head_transfers(8, 2, 4) == [HeadTransfer(0, 0, range(0, 2), range(0, 2)),
                                          HeadTransfer(0, 1, range(2, 4), range(0, 2)),
                                          HeadTransfer(1, 2, range(0, 2), range(0, 2)),
                                          HeadTransfer(1, 3, range(2, 4), range(0, 2))]
    assert kv_head_transfers(8, 4, 2)[1] == HeadTransfer(1, 0, range(0, 2), range(2, 4))


@pytest.mark.parametrize(("heads", "src_tp", "dst_tp", "message"), [
    (6, 2, 3, "one size must divide the other"),
    (8, 3, 1, "prefill attention TP size 3 does not divide"),
    (2, 1, 4, "decode attention TP size 4 does not divide"),
    (8, 0, 2, "positive integer"),
])
def test_unmappable_layouts_are_refused(heads: int, src_tp: int, dst_tp: int, message: str) -> None:
    with pytest.raises(ParallelConfigError, match=message):
        kv_head_transfers(heads, src_tp, dst_tp)


def test_rank_kv_layout_holds_its_share_of_heads() -> None:
    config = ModelConfig.from_dict(preset("120b"))
    layout = rank_kv_layout(config, Topology(4, 3, 4, 4), 16, torch.bfloat16)
    unsplit = config.kv_layout(16, torch.bfloat16)
    assert layout.num_kv_heads == 2
    assert layout.bytes_per_full_block * 4 == unsplit.bytes_per_full_block
