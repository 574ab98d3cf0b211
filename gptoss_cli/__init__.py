"""The `gptoss` console script."""
