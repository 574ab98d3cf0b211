"""`python -m prefill_svc` / `gptoss prefill`: a Prefill worker (see svc_common.worker for its life cycle)."""
from __future__ import annotations

import sys

from svc_common.args import ConfigError, WorkerConfig
from svc_common.main import daemon_main
from svc_common.server import ServiceSpec


def _services(ctx) -> list[ServiceSpec]:
    from gptoss_pb.v1 import prefill_pb2_grpc
    from prefill_svc.servicer import PrefillServicer

    return [ServiceSpec("gptoss_pb.v1.Prefill", PrefillServicer(ctx), prefill_pb2_grpc.add_PrefillServicer_to_server)]


def _check_mode(cfg: WorkerConfig) -> None:
    if cfg.disaggregation_mode != "prefill":
        raise ConfigError(f"a prefill worker runs with --disaggregation-mode prefill, got "
                          f"{cfg.disaggregation_mode!r} (use `gptoss decode` for decode/aggregated)")


def main(argv: list[str] | None = None) -> int:
    return daemon_main(argv, "gptoss prefill", "prefill", _services, _check_mode)


if __name__ == "__main__":
    sys.exit(main())
