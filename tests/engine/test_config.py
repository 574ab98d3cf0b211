"""EngineConfig rejects settings the engine cannot honour, with the setting's name in the message."""
from __future__ import annotations

import pytest

from gptoss_engine.config import EngineConfig


@pytest.mark.parametrize("kw,match", [
    ({"moe_prefill_weights": "fp8"}, "moe_prefill_weights must be 'mxfp4' or 'bf16'"),
    ({"moe_prefill_weights": "bf16"}, "moe_prefill_weights='bf16' is for the GPU"),   # device cpu
    ({"device": "tpu"}, "device must be"),
    ({"max_num_tokens": 0}, "max_num_tokens must be a positive integer"),
    ({"free_gpu_memory_fraction": 1.5}, "free_gpu_memory_fraction must be in"),
])
def test_bad_settings_are_clear_errors(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EngineConfig("/m", **kw)


def test_bf16_prefill_experts_accepted_for_cuda() -> None:
    """Validation only (no GPU needed): the default and the GPU spelling both construct."""
    assert EngineConfig("/m").moe_prefill_weights == "mxfp4"
    assert EngineConfig("/m", device="cuda", moe_prefill_weights="bf16").moe_prefill_weights == "bf16"
