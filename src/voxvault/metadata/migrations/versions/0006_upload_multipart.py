"""Resumable uploads on S3: the multipart upload of the recording's blob that the chunks go to,
and the number the next attempt to store a chunk in it takes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("multipart_id", sa.String(1024)))
        batch.add_column(
            sa.Column("next_part_number", sa.Integer, nullable=False, server_default=sa.text("1"))
        )


def downgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("next_part_number")
        batch.drop_column("multipart_id")
