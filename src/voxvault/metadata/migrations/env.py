"""Alembic environment: migrations run on a connection handed over by ``SqlMetadataStore``."""

from alembic import context
from sqlalchemy import text

from voxvault.metadata.tables import metadata

# Any constant will do, as long as it is the same for every process migrating one database.
POSTGRES_MIGRATION_LOCK = 0x766F78766175  # "voxvau"

connection = context.config.attributes["connection"]
if connection.dialect.name == "postgresql":
    # Processes started together migrate one after another: a later one waits for the earlier
    # one's commit, then finds the schema at head and has nothing to do.
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": POSTGRES_MIGRATION_LOCK})
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
