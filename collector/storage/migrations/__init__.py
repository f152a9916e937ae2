"""Alembic migrations that own the collector schema (env.py, versions/)."""
