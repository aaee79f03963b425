"""Ops-Core: a gRPC control plane for fleets of AI agents."""
