"""Tensor and expert parallelism for gpt-oss, as a layer around the unmodified model (docs/MULTI_GPU.md).

topology.py (who owns what), plan.py (which tensor splits how), loader.py (read only this rank's
slices), layers.py (expert-sharded MoE, all-reduce hooks), process_group.py (init, groups),
launch.py (N local ranks without torchrun), kv_handoff.py (KV heads across different TP sizes).
"""
