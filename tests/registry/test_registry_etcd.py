"""Registration and discovery against a real etcd (EmbeddedEtcd), including outages and kill -9."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from registry import keys
from registry.discovery import Discovery
from registry.registration import Registration
from tests.registry.records import make_record

pytestmark = pytest.mark.timeout(60)


async def get_value(settings, key: str) -> bytes | None:
    client = settings.client()
    try:
        result = await client.get(key.encode())
        return None if result is None else result.value
    finally:
        await client.close()


async def test_register_visible_then_close_removes_at_once(etcd_settings):
    record = make_record(0xABC)
    reg = Registration(etcd_settings, record, ttl=10)
    assert await reg.start()
    raw = await get_value(etcd_settings, "v1/instances/dynamo/prefill/generate/0000000000000abc")
    assert json.loads(raw) == json.loads(record.to_json())
    await reg.update(make_record(0xABC, num_running=5))
    assert json.loads(await get_value(etcd_settings, record.key))["load"]["num_running"] == 5
    await reg.close()   # revoke: gone now, not after the 10 s TTL
    assert await get_value(etcd_settings, record.key) is None


async def test_discovery_sees_changes_and_skips_malformed(etcd_settings):
    client = etcd_settings.client()
    await client.put(b"v1/instances/dynamo/prefill/generate/0000000000000001", b"{not json")
    await client.put(b"v1/instances/dynamo/prefill/generate/zzz", make_record(2).to_json().encode())
    await client.put(make_record(3).key.encode(), b'{"role": "prefill"}')
    disc = Discovery(etcd_settings, namespace="dynamo")
    changes = []
    disc.on_change(lambda: changes.append(len(disc.instances())))
    try:
        assert await disc.start()
        assert disc.instances() == []
        reg_p = Registration(etcd_settings, make_record(10), ttl=10)
        reg_d = Registration(etcd_settings, make_record(11, component=keys.DECODE), ttl=10)
        other_ns = Registration(etcd_settings, make_record(12, namespace="other"), ttl=10)
        for reg in (reg_p, reg_d, other_ns):
            assert await reg.start()
        assert await disc.wait_for(lambda d: len(d.instances()) == 2, 5)
        assert [r.instance_id for r in disc.instances(keys.PREFILL)] == [10]
        assert [r.instance_id for r in disc.instances(keys.DECODE)] == [11]
        await client.put(b"v1/instances/dynamo/backend/generate/00000000000000ff", b"[]")   # malformed via watch
        await reg_p.close()
        assert await disc.wait_for(lambda d: [r.instance_id for r in d.instances()] == [11], 5)
        assert changes and changes[-1] == 1
        await reg_d.close()
        await other_ns.close()
    finally:
        await disc.close()
        await client.close()


async def test_killed_worker_disappears_within_ttl(etcd, etcd_settings):
    ttl = 2
    proc = subprocess.Popen([sys.executable, "-m", "tests.registry.registrar", etcd.endpoint, "77", str(ttl)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "registered"
        disc = Discovery(etcd_settings)
        assert await disc.start()
        assert [r.instance_id for r in disc.instances()] == [77]
        proc.kill()   # SIGKILL: no revoke; only the lease TTL can remove the key
        proc.wait(5)
        start = time.monotonic()
        assert await disc.wait_for(lambda d: d.instances() == [], ttl + 3)
        assert time.monotonic() - start <= ttl + 3
        await disc.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


async def test_etcd_outage_registration_returns_and_view_converges(etcd, etcd_settings):
    reg = Registration(etcd_settings, make_record(5), ttl=2)
    disc = Discovery(etcd_settings)
    try:
        assert await reg.start()
        assert await disc.start()
        assert await disc.wait_for(lambda d: len(d.instances()) == 1, 5)
        etcd.kill()
        await asyncio.sleep(2.5)   # > ttl/3: the keep-alive has failed by now (and raised into nobody)
        assert not reg.registered
        assert [r.instance_id for r in disc.instances()] == [5]   # last known view kept during the outage
        await reg.update(make_record(5, num_running=9))            # must not raise while etcd is down
        await asyncio.to_thread(etcd.start)
        assert await reg.wait_registered(10)
        assert await disc.wait_for(
            lambda d: [(r.instance_id, r.load.num_running) for r in d.instances()] == [(5, 9)], 10)
        await asyncio.sleep(3)     # > ttl: the re-registration is kept alive, not a one-off put
        assert json.loads(await get_value(etcd_settings, make_record(5).key))["load"]["num_running"] == 9
    finally:
        await reg.close()
        await disc.close()
    assert await get_value(etcd_settings, make_record(5).key) is None


@pytest.mark.slow
async def test_after_a_long_outage_workers_return_before_their_restored_lease_expires(etcd, etcd_settings):
    """etcd restores a restarted server's leases with one fresh TTL. A worker must hold a new lease
    before that runs out, or its key vanishes from every frontend's view. grpc's shared subchannel
    used to stay in reconnect backoff for seconds after a 10 s outage (1.5-7.0 s in bench/results/reconnect.md, longer
    than this TTL); svc_common.grpc_reconnect.CHANNEL_OPTIONS make a new client connect at once."""
    ttl = 3
    regs = [Registration(etcd_settings, make_record(i), ttl=ttl) for i in (1, 2)]
    try:
        for reg in regs:
            assert await reg.start()
        await asyncio.to_thread(etcd.stop)
        await asyncio.sleep(10)   # long enough for grpc's reconnect backoff to pass several seconds
        assert not any(reg.registered for reg in regs)
        await asyncio.to_thread(etcd.start)
        back_by = time.monotonic() + ttl
        for reg in regs:
            assert await reg.wait_registered(max(0.0, back_by - time.monotonic())), "not back within one TTL"
        # Every key stays readable for two TTLs: the restored old leases expire in this window
        # and must take nothing with them.
        watch_until = time.monotonic() + 2 * ttl
        while time.monotonic() < watch_until:
            for i in (1, 2):
                assert await get_value(etcd_settings, make_record(i).key) is not None
            await asyncio.sleep(0.2)
    finally:
        for reg in regs:
            await reg.close()
