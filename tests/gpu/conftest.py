"""GPU kernel tests: run on CUDA; elsewhere skipped, unless TRITON_INTERPRET=1 (Triton's CPU
interpreter, slow but it checks the kernels' indexing on a machine without a GPU)."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def device() -> str:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)")


@pytest.fixture
def interpreted(device: str) -> bool:
    return device == "cpu"
