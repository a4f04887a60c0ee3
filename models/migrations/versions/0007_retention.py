"""retention: when a notification's bytes were pruned and a payment's customer data redacted;
an index on the anomalies' notification

Revision ID: 0007_retention
Revises: 0006_operators
Create Date: 2026-12-02 02:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base


revision: str = '0007_retention'
down_revision: str | None = '0006_operators'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('notifications') as batch:
        batch.add_column(
            sa.Column('pruned_at', models.base.UTCDateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table('payments') as batch:
        batch.add_column(
            sa.Column('redacted_at', models.base.UTCDateTime(timezone=True), nullable=True)
        )
    op.create_index(
        op.f('ix_anomalies_notification_id'), 'anomalies', ['notification_id'], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f('ix_anomalies_notification_id'), table_name='anomalies')
    with op.batch_alter_table('payments') as batch:
        batch.drop_column('redacted_at')
    with op.batch_alter_table('notifications') as batch:
        batch.drop_column('pruned_at')
