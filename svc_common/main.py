"""The daemons' shared `main(argv)`: flags -> logging -> run_worker; errors become exit codes.

Exit codes: 0 clean stop (including after a drain), 2 bad configuration (systemd should not
restart-loop on it: see the units' RestartPreventExitStatus), 1 anything else.
"""
from __future__ import annotations

import asyncio
import sys
from typing import Callable

from svc_common.args import ConfigError, WorkerConfig, parse_worker_args
from svc_common.engine_yaml import EngineYaml, load_engine_yaml
from svc_common.logging import configure_logging, get_logger
from svc_common.server import ServiceSpec

EXIT_CONFIG = 2


def daemon_main(argv: list[str] | None, prog: str, default_mode: str,
                make_services: Callable[[object], list[ServiceSpec]],
                check_mode: Callable[[WorkerConfig], None]) -> int:
    try:
        cfg = parse_worker_args(argv, prog, default_mode)
        check_mode(cfg)
        engine_yaml = load_engine_yaml(cfg.extra_engine_args) if cfg.extra_engine_args else EngineYaml()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(cfg.log_format, cfg.log_level, component=cfg.component)
    if engine_yaml.ignored_keys:
        get_logger("main").warning("engine YAML keys that do not apply to this engine were ignored",
                                   keys=list(engine_yaml.ignored_keys), file=cfg.extra_engine_args)
    from svc_common.worker import run_worker  # torch and the engine load only past flag parsing

    try:
        return asyncio.run(run_worker(cfg, engine_yaml, make_services))
    except ConfigError as e:
        get_logger("main").error("configuration error", error=str(e))
        return EXIT_CONFIG
