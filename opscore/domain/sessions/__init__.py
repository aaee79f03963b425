"""Sessions as operators see them: queries, full history, live watch, retention."""
