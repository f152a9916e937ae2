"""Storage through SQLAlchemy Core: SQLite (embedded default) or PostgreSQL."""
