"""Dispatch: connected agents' task streams, the loop that fills their free slots,
and the matching rule every store backend applies when it claims ready tasks."""
