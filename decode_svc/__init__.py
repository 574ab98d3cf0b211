"""The Decode worker daemon (`python -m decode_svc`, `gptoss decode`): disaggregated decode or aggregated."""
