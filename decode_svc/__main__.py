"""`python -m decode_svc` / `gptoss decode`: a Decode worker, disaggregated (--disaggregation-mode
decode, takes KV hand-offs) or aggregated (prefills locally too). A prefill-mode worker does not
serve Decode: that is `gptoss prefill`."""
from __future__ import annotations

import sys

from svc_common.args import ConfigError, WorkerConfig
from svc_common.main import daemon_main
from svc_common.server import ServiceSpec


def _services(ctx) -> list[ServiceSpec]:
    from decode_svc.servicer import DecodeServicer
    from gptoss_pb.v1 import decode_pb2_grpc

    return [ServiceSpec("gptoss_pb.v1.Decode", DecodeServicer(ctx), decode_pb2_grpc.add_DecodeServicer_to_server)]


def _check_mode(cfg: WorkerConfig) -> None:
    if cfg.disaggregation_mode == "prefill":
        raise ConfigError("a decode worker runs with --disaggregation-mode decode or aggregated "
                          "(use `gptoss prefill` for a prefill worker)")


def main(argv: list[str] | None = None) -> int:
    return daemon_main(argv, "gptoss decode", "decode", _services, _check_mode)


if __name__ == "__main__":
    sys.exit(main())
