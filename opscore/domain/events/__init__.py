"""Live events: the hub that fans committed events out to watchers."""
