"""Flags, GPTOSS_* env, engine YAML: what an operator types is either applied or refused clearly."""
from __future__ import annotations

import subprocess
import sys

import pytest

from svc_common.args import ConfigError, parse_worker_args
from svc_common.engine_factory import engine_overrides
from svc_common.engine_yaml import KNOWN_KEYS, load_engine_yaml, parse_engine_yaml

SEED_PREFILL_YAML = """
tensor_parallel_size: 1
moe_expert_parallel_size: 1
enable_attention_dp: false
max_num_tokens: 16384
enable_chunked_prefill: true
disable_overlap_scheduler: true
backend: pytorch
trust_remote_code: true
kv_cache_config:
  free_gpu_memory_fraction: 0.8
moe_config:
  backend: CUTLASS
cache_transceiver_config:
  backend: ucx
cuda_graph_config:
  max_batch_size: 32
"""


def test_seed_flags_parse():
    cfg = parse_worker_args(["--model-path", "/models/gpt-oss-120b", "--served-model-name", "openai/gpt-oss-120b",
                             "--disaggregation-mode", "decode", "--disaggregation-strategy", "prefill_first",
                             "--max-num-tokens", "16384", "--max-batch-size", "128",
                             "--free-gpu-memory-fraction", "0.9", "--tensor-parallel-size", "1",
                             "--expert-parallel-size", "1", "--dyn-reasoning-parser", "gpt_oss",
                             "--dyn-tool-call-parser", "harmony"], "t", "decode")
    assert (cfg.served_model_name, cfg.max_num_tokens, cfg.max_batch_size) == ("openai/gpt-oss-120b", 16384, 128)
    assert cfg.free_gpu_memory_fraction == 0.9 and cfg.component == "backend"
    assert parse_worker_args(["--model-path", "/m/x/", "--is-prefill-worker"], "t", "decode").component == "prefill"
    assert parse_worker_args(["--model-path", "/m/x/"], "t", "decode").served_model_name == "x"


def test_env_vars_set_flags_and_command_line_wins(monkeypatch):
    monkeypatch.setenv("GPTOSS_MODEL_PATH", "/env/model")
    monkeypatch.setenv("GPTOSS_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("GPTOSS_ETCD_PASSWORD", "hunter2")
    cfg = parse_worker_args(["--max-batch-size", "9"], "t", "prefill")
    assert cfg.model_path == "/env/model" and cfg.max_batch_size == 9
    assert cfg.etcd_password == "hunter2" and "hunter2" not in repr(cfg)
    monkeypatch.setenv("GPTOSS_MAX_BATCH_SIZE", "lots")
    with pytest.raises(ConfigError, match="GPTOSS_MAX_BATCH_SIZE"):
        parse_worker_args([], "t", "prefill")


def test_no_password_flag():
    with pytest.raises(SystemExit):
        parse_worker_args(["--model-path", "/m", "--etcd-password", "x"], "t", "prefill")


@pytest.mark.parametrize("flags", [["--tensor-parallel-size", "4"], ["--expert-parallel-size", "2"]])
def test_multi_gpu_is_a_clear_error(flags):
    with pytest.raises(ConfigError, match="multi-GPU .* not supported yet"):
        parse_worker_args(["--model-path", "/m", *flags], "t", "prefill")


def test_tp_error_from_the_real_command_exits_2():
    r = subprocess.run([sys.executable, "-m", "prefill_svc", "--model-path", "/m", "--tensor-parallel-size", "4"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "multi-GPU" in r.stderr and "not supported yet" in r.stderr


def test_seed_yaml_applies_and_names_the_inapplicable(tmp_path):
    path = tmp_path / "prefill.yaml"
    path.write_text(SEED_PREFILL_YAML)
    y = load_engine_yaml(path)
    assert y.max_num_tokens == 16384 and y.enable_chunked_prefill is True
    assert y.free_gpu_memory_fraction == 0.8 and y.cuda_graph_max_batch_size == 32
    assert y.overlap_scheduler is False   # disable_overlap_scheduler: true, as the seeds' prefill workers
    assert parse_engine_yaml({"disable_overlap_scheduler": False}).overlap_scheduler is True
    assert parse_engine_yaml({}).overlap_scheduler is None   # the engine's default: on for CUDA
    assert set(y.ignored_keys) == {"enable_attention_dp", "trust_remote_code", "moe_config.backend"}
    # Flags override the YAML.
    cfg = parse_worker_args(["--model-path", "/m", "--max-num-tokens", "20000"], "t", "prefill")
    over = engine_overrides(cfg, y)
    assert over["max_num_tokens"] == 20000 and over["free_gpu_memory_fraction"] == 0.8
    # Overlap scheduling: off on prefill workers unless the YAML turns it on; decode: the engine's default.
    decode = parse_worker_args(["--model-path", "/m"], "t", "decode")
    assert "overlap_scheduler" not in engine_overrides(decode, parse_engine_yaml({}))
    assert engine_overrides(cfg, parse_engine_yaml({}))["overlap_scheduler"] is False
    assert engine_overrides(cfg, parse_engine_yaml({"disable_overlap_scheduler": False}))["overlap_scheduler"] is True


def test_moe_prefill_weights_key():
    """This engine's one key of its own: moe_config.prefill_weights, next to the seeds' moe_config.backend."""
    y = parse_engine_yaml({"moe_config": {"backend": "CUTLASS", "prefill_weights": "bf16"}})
    assert y.moe_prefill_weights == "bf16" and y.ignored_keys == ("moe_config.backend",)
    cfg = parse_worker_args(["--model-path", "/m"], "t", "prefill")
    assert engine_overrides(cfg, y)["moe_prefill_weights"] == "bf16"
    assert "moe_prefill_weights" not in engine_overrides(cfg, parse_engine_yaml({}))
    with pytest.raises(ConfigError, match="expected mxfp4 .* or bf16"):
        parse_engine_yaml({"moe_config": {"prefill_weights": "fp8"}})


def test_unknown_yaml_key_lists_known_keys():
    with pytest.raises(ConfigError) as e:
        parse_engine_yaml({"max_num_tokenz": 5, "kv_cache_config": {"free_gpu_memory_fraction": 0.5, "bogus": 1}})
    msg = str(e.value)
    assert "kv_cache_config.bogus" in msg and "max_num_tokenz" in msg
    assert all(k in msg for k in KNOWN_KEYS)


@pytest.mark.parametrize("data, match", [
    ({"cache_transceiver_config": {"backend": "nixl"}}, "only 'ucx'"),
    ({"tensor_parallel_size": 4}, "multi-GPU"),
    ({"max_batch_size": 0}, "positive integer"),
    ({"kv_cache_config": {"free_gpu_memory_fraction": 1.5}}, r"\(0, 1\]"),
    ({"enable_chunked_prefill": "yes"}, "true or false"),
])
def test_bad_yaml_values(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_engine_yaml(data)


def test_unknown_yaml_key_from_the_real_command_exits_2(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("max_num_tokens: 10\nfoo_bar: 1\n")
    r = subprocess.run([sys.executable, "-m", "decode_svc", "--model-path", str(tmp_path), "--log-format", "console",
                        "--extra-engine-args", str(path), "--etcd-endpoints", "http://127.0.0.1:1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "foo_bar" in r.stderr and "enable_chunked_prefill" in r.stderr


def test_context_limit_checksum_and_device_flags(monkeypatch):
    cfg = parse_worker_args(["--model-path", "/m", "--max-model-len", "4096"], "gptoss decode", "decode")
    assert cfg.max_model_len == 4096 and cfg.kv_checksum and cfg.device == "auto"
    assert engine_overrides(cfg, parse_engine_yaml({}))["max_model_len"] == 4096
    # The seeds' max_seq_len sets the context limit unless the flag does.
    assert engine_overrides(cfg, parse_engine_yaml({"max_seq_len": 8192}))["max_model_len"] == 4096
    no_flag = parse_worker_args(["--model-path", "/m"], "gptoss decode", "decode")
    assert engine_overrides(no_flag, parse_engine_yaml({"max_seq_len": 8192}))["max_model_len"] == 8192
    assert not parse_worker_args(["--model-path", "/m", "--no-kv-checksum"], "p", "prefill").kv_checksum
    monkeypatch.setenv("GPTOSS_KV_CHECKSUM", "false")
    assert not parse_worker_args(["--model-path", "/m"], "p", "prefill").kv_checksum
    assert parse_worker_args(["--model-path", "/m", "--kv-checksum"], "p", "prefill").kv_checksum
    with pytest.raises(ConfigError, match="max-model-len"):
        parse_worker_args(["--model-path", "/m", "--max-model-len", "0"], "p", "prefill")


@pytest.mark.parametrize("name", ["prefill.yaml", "decode.yaml", "prefill-20b-bf16-experts.yaml"])
def test_shipped_example_engine_yamls_parse_without_warnings(name):
    import pathlib

    y = load_engine_yaml(pathlib.Path(__file__).parents[2] / "examples" / "engine_configs" / "gpt-oss" / name)
    assert y.ignored_keys == () and y.max_num_tokens and y.free_gpu_memory_fraction == 0.9
    assert y.moe_prefill_weights == ("bf16" if "bf16" in name else None)
