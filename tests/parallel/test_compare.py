"""parallel.compare: each layout against the one-process run of its dtype."""
from __future__ import annotations

from gptoss_engine.parallel.compare import compare, leading_equal


def _run(world: int, dtype: str, tokens: list[list[int]], tok_s: float) -> dict:
    return {"layout": {"world": world, "attention_tp": world, "moe_ep": 1, "moe_tp": world, "dtype": dtype},
            "tokens": tokens, "generate_tok_s": tok_s}


def test_compare_against_the_reference_of_the_same_dtype():
    rows = {r["name"]: r for r in compare({
        "tp1": _run(1, "bf16", [[1, 2, 3], [4, 5, 6]], 100.0),
        "tp2": _run(2, "bf16", [[1, 2, 3], [4, 9, 6]], 150.0),
        "tp2_fp32": _run(2, "fp32", [[1, 2, 3], [4, 5, 6]], 50.0)})}
    assert rows["tp1"]["all_equal"] and rows["tp1"]["speedup"] == 1.0
    assert not rows["tp2"]["all_equal"] and rows["tp2"]["min_leading_equal"] == 1 and rows["tp2"]["speedup"] == 1.5
    assert rows["tp2_fp32"]["reference"] is None and "all_equal" not in rows["tp2_fp32"]
    assert leading_equal([1, 2], [1, 2, 3]) == 2 and leading_equal([], [1]) == 0
