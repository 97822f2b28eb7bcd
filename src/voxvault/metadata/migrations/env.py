"""Alembic environment: migrations run on a connection handed over by ``SqlMetadataStore``."""

from alembic import context

from voxvault.metadata.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
