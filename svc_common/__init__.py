"""What the Prefill and Decode daemons share: flags + engine YAML, wire conversion, gRPC bootstrap,
logging, sd_notify, and the common worker life cycle (load -> serve -> register -> drain); also the
gRPC client channel options that the frontend and the registry use too (grpc_reconnect)."""
