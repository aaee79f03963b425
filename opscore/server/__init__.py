"""The server process: settings, keys, transport security, logs, and the
composition root that wires them (`app.py`)."""
