"""The load-time pass that lays MXFP4 blocks out in mxfp4.WORD_BITS order on the GPU (or back).

One read and one write of every word: mxfp4.permute_words / unpermute_words call it for CUDA
tensors, where torch's elementwise forms take tens of passes (the int64 one added 7 s to building
120b, 57 GB of blocks; PERF_NOTES v20/v21).
"""
import torch
import triton
import triton.language as tl

from gptoss_engine.kernels.e2m1 import permute_words, unpermute_words

_BLOCK = 4096


@triton.jit
def _permute_kernel(src_ptr, dst_ptr, n, INVERSE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(src_ptr + i, mask=i < n, other=0)
    tl.store(dst_ptr + i, unpermute_words(w) if INVERSE else permute_words(w), mask=i < n)


def permute_words_into(src: torch.Tensor, dst: torch.Tensor, inverse: bool) -> None:
    """dst[i] = src[i]'s bits permuted (inverse: unpermuted); contiguous int32 CUDA tensors, same size."""
    n = src.numel()
    if n:
        _permute_kernel[(triton.cdiv(n, _BLOCK),)](src, dst, n, INVERSE=inverse, BLOCK=_BLOCK, num_warps=4)
