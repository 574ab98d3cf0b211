import dataclasses
import json

import pytest

from registry import keys
from registry.etcd_settings import EtcdSettings
from registry.record import InstanceRecord, LoadInfo, MalformedRecord
from tests.registry.records import make_record


def test_instance_key_layout_and_parse():
    key = keys.instance_key("dynamo", "prefill", "generate", 0x694D997DBAE9A326)
    assert key == "v1/instances/dynamo/prefill/generate/694d997dbae9a326"
    assert keys.parse_instance_key(key.encode()) == keys.InstanceKey("dynamo", "prefill", "generate", 0x694D997DBAE9A326)
    assert key.startswith(keys.component_prefix("dynamo", keys.PREFILL))
    assert key.startswith(keys.namespace_prefix("dynamo"))
    assert not key.startswith(keys.namespace_prefix("dyn"))


@pytest.mark.parametrize("bad", ["v1/instances/dynamo/prefill/generate/xyz", "v2/instances/a/b/c/0000000000000001",
                                 "v1/instances/a/b/0000000000000001", "v1/instances/a/b/c/d/0000000000000001"])
def test_parse_rejects_malformed_keys(bad):
    with pytest.raises(ValueError):
        keys.parse_instance_key(bad)


def test_key_names_validated():
    with pytest.raises(ValueError, match="namespace"):
        keys.instance_key("a/b", "prefill", "generate", 1)
    with pytest.raises(ValueError, match="64-bit"):
        keys.instance_key("a", "prefill", "generate", -1)


def test_record_json_roundtrip_and_tolerance():
    record = make_record(7, num_running=3)
    assert InstanceRecord.from_json(record.to_json()) == record
    data = json.loads(record.to_json())
    data["some_future_field"] = {"x": 1}
    data["load"] = "garbage"
    parsed = InstanceRecord.from_json(json.dumps(data))
    assert parsed.load == LoadInfo() and parsed.instance_id == 7
    for mutate in (lambda d: d.pop("grpc_address"), lambda d: d.update(role="boss"),
                   lambda d: d.update(instance_id="7"), lambda d: d["kv_layout"].pop("head_dim")):
        broken = json.loads(record.to_json())
        mutate(broken)
        with pytest.raises(MalformedRecord):
            InstanceRecord.from_json(json.dumps(broken))
    with pytest.raises(MalformedRecord):
        InstanceRecord.from_json(b"\xff not json")


def test_etcd_settings_parse_and_secrets():
    s = EtcdSettings.parse("http://127.0.0.1:2379, 10.0.0.2:2380", username="u", password="hunter2")
    assert s.endpoints == ["http://127.0.0.1:2379", "10.0.0.2:2380"]
    assert "hunter2" not in repr(s) and "hunter2" not in s.describe()
    with pytest.raises(ValueError, match="use https://"):
        EtcdSettings.parse("http://127.0.0.1:2379", ca_file=__file__)
    with pytest.raises(ValueError, match="together"):
        EtcdSettings.parse("127.0.0.1:2379", username="u")
    with pytest.raises(ValueError):
        EtcdSettings.parse("")


def test_record_max_model_len_roundtrip_and_old_records():
    record = dataclasses.replace(make_record(9), max_model_len=4096)
    assert InstanceRecord.from_json(record.to_json()).max_model_len == 4096
    old = json.loads(record.to_json())
    del old["max_model_len"]   # written by a worker from before the field existed
    assert InstanceRecord.from_json(json.dumps(old)).max_model_len == 0
    for bad in ("4096", True, None, -5):
        data = json.loads(record.to_json())
        data["max_model_len"] = bad
        assert InstanceRecord.from_json(json.dumps(data)).max_model_len == 0, bad
