"""Moving a request's staged KV blocks from a prefill process to a decode process over UCX (ucxx)."""
from kv_transfer.blocks import kv_checksum
from kv_transfer.client import KVTransferClient
from kv_transfer.errors import (KVChecksumMismatch, KVLayoutMismatch, KVPeerGone, KVTransferBusy,
                                KVTransferError, KVTransferExpired, KVTransferNotFound, KVTransferTimeout)
from kv_transfer.server import KVTransferServer

__all__ = ["KVTransferServer", "KVTransferClient", "kv_checksum", "KVTransferError", "KVTransferNotFound",
           "KVTransferExpired", "KVTransferBusy", "KVLayoutMismatch", "KVChecksumMismatch",
           "KVTransferTimeout", "KVPeerGone"]
