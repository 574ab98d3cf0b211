"""Registers one record and then idles: a worker that tests can kill -9. argv: ENDPOINT INSTANCE_ID TTL."""
from __future__ import annotations

import asyncio
import sys

from registry.etcd_settings import EtcdSettings
from registry.registration import Registration
from tests.registry.records import make_record


async def main(endpoint: str, instance_id: int, ttl: int) -> None:
    reg = Registration(EtcdSettings.parse(endpoint, timeout_s=2.0), make_record(instance_id), ttl=ttl)
    if not await reg.start(timeout_s=10):
        sys.exit("registration failed")
    print("registered", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
