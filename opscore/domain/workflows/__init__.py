"""Workflows: definitions and their validation, the session aggregate with its rules,
task tokens, the durable task queue, and the engine that answers for them."""
