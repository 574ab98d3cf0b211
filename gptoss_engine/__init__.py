"""The gpt-oss engine: model, checkpoints, paged KV cache, scheduler, sampling.

Knows nothing of gRPC or HTTP: the daemons and the frontend convert at their edges.
"""
