"""OpenAI-compatible HTTP frontend: harmony rendering/parsing, routing to prefill/decode workers."""
