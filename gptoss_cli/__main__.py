"""`gptoss SUBCOMMAND ...`: dispatches to each part's own main(argv), imported lazily so that
`gptoss make-model` never pays for gRPC and `gptoss frontend` never imports torch."""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-model": ("gptoss_engine.make_model", "write a real-format gpt-oss checkpoint with random weights"),
    "generate": ("gptoss_engine.cli_generate", "generate with the engine alone (no server)"),
    "prefill": ("prefill_svc.__main__", "run a Prefill worker daemon"),
    "decode": ("decode_svc.__main__", "run a Decode worker daemon"),
    "frontend": ("frontend_svc.__main__", "run the OpenAI-compatible HTTP frontend"),
    "up": ("gptoss_cli.up", "run the whole stack on this machine (etcd, workers, frontend)"),
    "bench": ("bench.gpu_bench", "GPU benchmark (prefill, decode, throughput, vs HF transformers)"),
    "install-systemd": ("gptoss_cli.install_systemd", "install the systemd units and /etc/gptoss env files"),
}


def usage() -> str:
    lines = ["usage: gptoss SUBCOMMAND [args]", "", "subcommands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"gptoss: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
