"""Alembic migrations that own the collector schema (env.py, versions/), configured without an alembic.ini.

Store.migrate runs them. A schema change is a new revision under versions/ plus the matching change
to schema.py; tests/collector/test_migrations.py fails while the two disagree. To draft one from
the difference, on a database at head:

    command.revision(alembic_config(conn), "what changed", autogenerate=True, rev_id="0003")
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

# This folder: env.py, script.py.mako and versions/ travel inside the installed package.
_SCRIPT_LOCATION = str(Path(__file__).resolve().parent)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for these migrations; env.py runs them on `connection`."""
    config = Config()
    # ConfigParser interpolation reads "%" as a reference; a literal one is "%%".
    config.set_main_option("script_location", _SCRIPT_LOCATION.replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    """The known revisions (what this fleetwatch can upgrade from and to)."""
    return ScriptDirectory.from_config(alembic_config())
