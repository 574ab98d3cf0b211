"""Shared fixtures live in tests/fixtures/ (one module per concern), loaded as plugins."""
pytest_plugins = [
    "tests.fixtures.models",   # tiny checkpoints (made once per session)
    "tests.fixtures.etcd",     # a real etcd server
    "tests.fixtures.procs",    # starting daemons as real processes
    "tests.fixtures.tls",      # a throwaway CA + server/client certificates (openssl CLI)
]
