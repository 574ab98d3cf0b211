"""The Prefill worker daemon (`python -m prefill_svc`, `gptoss prefill`)."""
