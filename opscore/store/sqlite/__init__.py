"""The embedded SQLite backend: one process per database file."""
