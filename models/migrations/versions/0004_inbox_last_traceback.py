"""inbox: the traceback of a notification's last failed attempt

Revision ID: 0003_inbox
Revises: 0003_reconcile
Create Date: 2026-12-01 22:35:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0003_inbox'
down_revision: str | None = '0003_reconcile'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_traceback', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_column('last_traceback')
