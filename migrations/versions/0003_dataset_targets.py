"""datasets.label_shape and datasets.vocab_size: what a submission checks, kept in the row

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 10:30:00.000000

Uploads stored before keep NULL there, and are read from their data when a job is
submitted, as before; the built-ins are filled in when they are next registered.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("label_shape", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("vocab_size", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("vocab_size")
        batch_op.drop_column("label_shape")
