"""Fixtures shared by the engine runtime tests."""
import pathlib

import pytest

from gptoss_engine.checkpoint import load_model
from gptoss_engine.model import GptOssForCausalLM


@pytest.fixture(scope="module")
def swa_model_dir(make_tiny_checkpoint) -> pathlib.Path:
    # A window of 8 < block_size 16: sliding blocks are freed during the test prompts.
    return make_tiny_checkpoint(sliding_window=8)


@pytest.fixture(scope="module")
def model(swa_model_dir: pathlib.Path) -> GptOssForCausalLM:
    return load_model(swa_model_dir, "cpu", progress=False)
