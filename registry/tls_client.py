"""An aetcd client that talks to etcd over TLS (optionally mutual TLS).

Why this exists: aetcd 1.0's Client.connect() hard-codes `rpc.insecure_channel(...)` and has no
hook for channel credentials. `TlsClient.connect()` is the base method with that one line
changed to a secure channel; everything after it (authentication with user/password, the stubs,
the watcher) is the base's code, kept as close to it as possible so an aetcd upgrade is easy to
diff. Drop this module once aetcd accepts credentials.
"""
from __future__ import annotations

import asyncio

import aetcd
import grpc
from aetcd import rpc, watcher
from aetcd.client import _handle_errors  # maps grpc errors to aetcd's exceptions, as the base does


class TlsClient(aetcd.Client):
    def __init__(self, *, credentials: grpc.ChannelCredentials, **kwargs) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    @_handle_errors
    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            target = f"{self._host}:{self._port}"
            self.channel = grpc.aio.secure_channel(target, self._credentials, options=self._options.items())
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False
