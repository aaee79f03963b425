"""SQLite schema, as numbered migrations applied in order (tracked in PRAGMA user_version)."""

MIGRATIONS: list[str] = [
    # 1: agents, their event log, and store-wide counters.
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('compacted_revision', 0);

    CREATE TABLE agents (
        agent_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        capabilities TEXT NOT NULL,
        contact_endpoint TEXT NOT NULL,
        metadata TEXT NOT NULL,
        state INTEGER NOT NULL,
        state_details TEXT NOT NULL,
        registered_at INTEGER NOT NULL,
        state_updated_at INTEGER NOT NULL,
        last_heartbeat_at INTEGER NOT NULL,
        state_observed_at INTEGER,
        revision INTEGER NOT NULL
    );
    CREATE INDEX agents_by_heartbeat ON agents (last_heartbeat_at);

    CREATE TABLE agent_events (
        revision INTEGER PRIMARY KEY,
        type INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        snapshot TEXT NOT NULL,
        occurred_at INTEGER NOT NULL
    );
    """,
]
