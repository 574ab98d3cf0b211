"""Why a KV fetch failed. Every failure raises: a fetch never reports partially written blocks as
success, and the caller (decode) frees its reservation on any of these."""
from __future__ import annotations


class KVTransferError(RuntimeError):
    """Base class; `status` is the wire name the server used (or a client-side one)."""
    status = "error"


class KVTransferNotFound(KVTransferError):
    status = "not_found"      # unknown transfer id, or already read / released


class KVTransferExpired(KVTransferError):
    status = "expired"        # the lease ran out and the prefill side freed the blocks


class KVTransferBusy(KVTransferError):
    status = "busy"           # another reader is reading this transfer right now


class KVLayoutMismatch(KVTransferError):
    status = "layout_mismatch"  # block shapes/dtype/counts differ between the two sides


class KVChecksumMismatch(KVTransferError):
    status = "checksum_mismatch"


class KVTransferTimeout(KVTransferError):
    status = "timeout"


class KVPeerGone(KVTransferError):
    status = "peer_gone"      # connection refused or reset: the prefill process is gone


BY_STATUS: dict[str, type[KVTransferError]] = {
    cls.status: cls for cls in (KVTransferNotFound, KVTransferExpired, KVTransferBusy, KVLayoutMismatch,
                                KVChecksumMismatch, KVTransferTimeout, KVPeerGone)
}


def from_status(status: str, message: str) -> KVTransferError:
    return BY_STATUS.get(status, KVTransferError)(message)
