"""Triton kernels for the GPU path (MXFP4 MoE, paged attention) and the CUDA-graph decode wrapper.

Importing this package fails where Triton is absent (the CPU-only install): the model's reference
code catches that ImportError and keeps its PyTorch path. Each kernel module exposes the same
signature as the reference it replaces.
"""
from __future__ import annotations

import triton  # noqa: F401  (the import is the availability check; see the docstring)
