"""Generated from protos/ by `./dev gen-protos`. Do not edit."""
