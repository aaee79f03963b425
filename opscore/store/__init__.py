"""Store backends: one interface (base.Store), SQLite today."""
