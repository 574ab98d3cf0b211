"""kernels/splitk_gemm (the projections at 3-64 tokens) against a float64 reference and F.linear.

Under Triton's CPU interpreter the operands are fp32: its bf16 tl.dot gives garbage (numpy has no
bf16), and the indexing and the split sum are what it can check."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def _ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """float64 on the CPU: no TF32 or split-K in the reference."""
    r = x.double().cpu() @ w.double().cpu().T
    return (r if b is None else r + b.double().cpu()).float().to(x.device)


def _close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """One bf16 rounding of an fp32 sum: within 2 ulp of the reference's rounding."""
    return bool(((y.float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-3).all())


@pytest.mark.parametrize("n,k", [(5120, 2880), (2880, 4096), (200, 272), (24, 48)])
@pytest.mark.parametrize("m", [3, 8, 17, 64])
def test_splitk_linear_matches_fp64_reference(device: str, interpreted: bool, n: int, k: int, m: int) -> None:
    """Token counts that fill a BLOCK_M tile or not, N that leaves a partial tile (200, 24), K that
    leaves a partial trip (272, 48) and a partial split (2880 in 4 splits of 768), with and without
    bias, one split and several."""
    from gptoss_engine.kernels import arrival, splitk_gemm
    if interpreted and (n * k > 300_000 or m > 17):
        pytest.skip("the interpreter takes the small shapes")
    gen = torch.Generator(device=device).manual_seed(n * 31 + k + m)
    dt = torch.float32 if interpreted else torch.bfloat16
    x = torch.randn(m, k, generator=gen, device=device).to(dt)
    w = (torch.randn(n, k, generator=gen, device=device) * 0.05).to(dt)
    b = torch.randn(n, generator=gen, device=device).to(dt)
    ref = _ref(x, w, b)
    configs = [None, (64, 128, 1, 4, 3), (32, 64, 3, 4, 2), (128, 32, 5, 8, 4)]
    for cfg in configs:
        splitk_gemm.CONFIG_OVERRIDE = cfg
        try:
            y = splitk_gemm.splitk_linear(x, w, b)
            y_nb = splitk_gemm.splitk_linear(x, w)
        finally:
            splitk_gemm.CONFIG_OVERRIDE = None
        assert y.shape == (m, n) and y.dtype == dt
        assert _close(y, ref), (cfg, (y.float() - ref).abs().max().item())
        assert _close(y_nb, _ref(x, w, None)), cfg
        if not interpreted:
            assert ((y.float() - F.linear(x, w, b).float()).abs() <= 2 * (ref.abs() * 2 ** -7 + 1e-3)).all(), cfg
    # Every counter the launches used is back at zero for the next launch.
    assert int(arrival.counters(splitk_gemm._COUNTERS, torch.device(device), 1).abs().sum()) == 0


def test_splitk_fp32_output_is_the_rounded_result_widened(device: str, interpreted: bool) -> None:
    """out_dtype=fp32 (the lm_head's logits): exactly the x-dtype result as fp32, for one split and
    several (both store paths)."""
    from gptoss_engine.kernels import splitk_gemm
    n, k = (70000, 2880) if not interpreted else (80, 320)
    gen = torch.Generator(device=device).manual_seed(9)
    dt = torch.float32 if interpreted else torch.bfloat16
    x = torch.randn(8, k, generator=gen, device=device).to(dt)
    w = (torch.randn(n, k, generator=gen, device=device) * 0.05).to(dt)
    for cfg in (None, (32, 64, 3, 4, 2)):
        splitk_gemm.CONFIG_OVERRIDE = cfg
        try:
            y = splitk_gemm.splitk_linear(x, w, None, torch.float32)
            assert y.dtype == torch.float32 and y.shape == (8, n)
            assert torch.equal(y, splitk_gemm.splitk_linear(x, w).float()), cfg
        finally:
            splitk_gemm.CONFIG_OVERRIDE = None


def test_splitk_linear_is_deterministic_and_takes_strided_rows(device: str, interpreted: bool) -> None:
    """The fixed-order sum: repeated calls give the same bits whichever split arrives last; x may be
    a row slice of a wider tensor (the attention output view)."""
    from gptoss_engine.kernels import splitk_gemm
    n, k = (2880, 4096) if not interpreted else (96, 320)
    gen = torch.Generator(device=device).manual_seed(5)
    dt = torch.float32 if interpreted else torch.bfloat16
    wide = torch.randn(8, k + 64, generator=gen, device=device).to(dt)
    x = wide[:, :k]
    w = (torch.randn(n, k, generator=gen, device=device) * 0.05).to(dt)
    splitk_gemm.CONFIG_OVERRIDE = (64, 64, 4, 4, 3)
    try:
        ys = [splitk_gemm.splitk_linear(x, w) for _ in range(1 if interpreted else 20)]
    finally:
        splitk_gemm.CONFIG_OVERRIDE = None
    assert _close(ys[0], _ref(x.contiguous(), w, None))
    assert all(torch.equal(y, ys[0]) for y in ys)


def test_splitk_linear_replays_in_a_cuda_graph(device: str, interpreted: bool) -> None:
    """Captured after an eager call, replayed on new inputs: the workspace comes from the graph's pool
    and the counters reset inside each replay."""
    if interpreted:
        pytest.skip("CUDA graphs: GPU only")
    from gptoss_engine.kernels.splitk_gemm import splitk_linear
    gen = torch.Generator(device=device).manual_seed(9)
    x = torch.randn(64, 2880, generator=gen, device=device).to(torch.bfloat16)
    w = (torch.randn(5120, 2880, generator=gen, device=device) * 0.05).to(torch.bfloat16)
    b = torch.randn(5120, generator=gen, device=device).to(torch.bfloat16)
    splitk_linear(x, w, b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        splitk_linear(x, w, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = splitk_linear(x, w, b)
    for seed in (1, 2, 3):
        x.copy_(torch.randn(64, 2880, generator=gen.manual_seed(seed), device=device).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert _close(y, _ref(x, w, b)), seed


def test_splitk_refuses_what_it_cannot_take(device: str, interpreted: bool) -> None:
    from gptoss_engine.kernels import splitk_gemm
    w = torch.zeros(16, 64, device=device, dtype=torch.bfloat16)
    if not interpreted:
        for why, x in {"fp32 x": torch.zeros(8, 64, device=device),
                       "two tokens (the GEMV's)": torch.zeros(2, 64, device=device, dtype=torch.bfloat16),
                       "too many tokens": torch.zeros(splitk_gemm.MAX_TOKENS + 1, 64, device=device,
                                                      dtype=torch.bfloat16)}.items():
            assert not splitk_gemm.takes(x, w), why
        assert splitk_gemm.takes(torch.zeros(8, 64, device=device, dtype=torch.bfloat16), w)
        # Where it runs in the model (the measured shapes): o up to 32 tokens, lm_head, never q|k|v.
        bf = dict(device=device, dtype=torch.bfloat16)
        o, qkv, head = (torch.empty(2880, 4096, **bf), torch.empty(5120, 2880, **bf),
                        torch.empty(splitk_gemm.WIDE_N, 2880, **bf))
        assert splitk_gemm.wins(torch.zeros(32, 4096, **bf), o) and not splitk_gemm.wins(torch.zeros(33, 4096, **bf), o)
        assert not splitk_gemm.wins(torch.zeros(8, 2880, **bf), qkv)
        assert splitk_gemm.wins(torch.zeros(64, 2880, **bf), head)
    for x in (torch.zeros(8, 72, device=device, dtype=torch.bfloat16),
              torch.zeros(splitk_gemm.MAX_TOKENS + 1, 64, device=device, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="splitk_linear"):
            splitk_gemm.splitk_linear(x, w)

