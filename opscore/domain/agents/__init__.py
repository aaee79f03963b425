"""Agents: the registry and its state rules, agent tokens, liveness, and the watch."""
